"""The learning report's figures: one colour per system whatever its experiment is called, legends in the docs'
words, and the shaded band said to be ±1 standard error over the seeds."""

import csv
import os
import sys

import matplotlib.figure
import pytest

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learning  # noqa: E402


def test_a_system_at_its_defaults_keeps_its_colour_under_any_experiment_name():
    colours = learning.colours_of(["release", "qmle_n1", "qmle_n16", "qmle_n1_gpu", "qmle_dmc", "qmle_n4", "aql",
                                   "aql_discrete", "qtopt_cem", "uniformql", "wolpertinger"])
    assert colours["release"] == "black"
    assert colours["qmle_n1"] == "C0"  # --num-envs 1: the default
    for name in ("qmle_dmc", "qmle_n1_gpu"):  # alone, each is QMLE at its defaults and wears its colour
        assert learning.colours_of(["release", name])[name] == "C0"
    # beside the first, later experiments of the same system are told apart: no two lines share a colour
    assert len(set(colours.values())) == len(colours)
    assert colours["aql"] == learning.colours_of(["aql_discrete"])["aql_discrete"] == "C2"
    assert (colours["qtopt_cem"], colours["uniformql"], colours["wolpertinger"]) == ("C1", "C3", "C4")
    # variants (16 or 4 environments) take the next free colours, none of a system's
    assert colours["qmle_n16"] != colours["qmle_n4"]
    assert not {colours["qmle_n16"], colours["qmle_n4"]} & set(learning.COLOURS.values())
    # with only QMLE and the release shown, six variants take six colours, the absent systems' among them
    variants = learning.colours_of(["release", "qmle_n1"] + [f"v{i}" for i in range(6)])
    assert len({variants[f"v{i}"] for i in range(6)}) == 6
    assert not {variants[f"v{i}"] for i in range(6)} & {"C0", "black", "grey"}


def write_curves(path, exp_names, seeds=(1, 2, 3)):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["exp_name", "env_id", "seed", "step", "episodic_return"])
        for i, name in enumerate(exp_names):
            writer.writerows([name, "walker-walk", seed, 1000 * step, 10.0 * i + seed + step]
                             for seed in seeds for step in range(1, 11))


def plotted(monkeypatch, tmp_path, exp_names, labels=()):
    """Report the experiments from a curves file (the release among them) and return the saved figure."""
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    path = str(tmp_path / f"{'_'.join(exp_names)}.csv")
    write_curves(path, ["release", *exp_names])
    learning.report(learning.Report(runs_dir=str(tmp_path / "none"), exp_names=list(exp_names), curves=[path],
                                    release_curves=[path], labels=list(labels), output_dir=str(tmp_path / "out")))
    return figures[-1]


def test_each_system_has_one_colour_in_every_figure_and_the_band_is_explained(monkeypatch, tmp_path):
    one = plotted(monkeypatch, tmp_path, ["qmle_dmc", "qmle_tnf2000", "aql"],
                  labels=["release=authors' release", "qmle_dmc=qmle_dmc.py", "qmle_tnf2000=target period 2000"])
    other = plotted(monkeypatch, tmp_path, ["qmle_n4", "qmle_n1"],
                    labels=["release=authors' release", "qmle_n1=qmle_dmc.py", "qmle_n4=--num-envs 4"])
    colours = [{line.get_label(): line.get_color() for ax in fig.axes for line in ax.lines} for fig in (one, other)]
    assert colours[0]["authors' release"] == colours[1]["authors' release"] == "black"
    assert colours[0]["qmle_dmc.py"] == colours[1]["qmle_dmc.py"] == "C0"
    assert colours[0]["target period 2000"] not in ("black", "C0", "C2")
    (legend,) = one.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["authors' release (3 seeds)", "qmle_dmc.py (3 seeds)", "target period 2000 (3 seeds)",
                     "aql (3 seeds)"]
    assert "±1 standard error" in legend.get_title().get_text()


def test_a_runner_whose_runs_failed_exits_1_after_its_summary(tmp_path):
    # a training script that fails at once for odd seeds (no JAX to import): which runs fail is known beforehand
    script = tmp_path / "odd_seeds_fail.py"
    script.write_text("import sys\n"
                      "seed = int(sys.argv[sys.argv.index('--seed') + 1])\n"
                      "sys.exit('error: odd seed' if seed % 2 else 0)\n")
    for seeds in (["2", "4"], ["1", "2"]):
        failing = [seed for seed in seeds if int(seed) % 2]
        result = run_script(os.path.join("benchmarks", "learning.py"), "run", "--script", str(script), "--env-ids",
                            "Pendulum-v1", "--seeds", *seeds, "--runs-dir", str(tmp_path / "runs"), timeout=60)
        assert result.returncode == (1 if failing else 0), result.stderr
        lines = result.stdout.strip().splitlines()
        assert lines[-1] == f"{len(seeds) - len(failing)} of {len(seeds)} runs finished"  # said before it exits
        assert [line for line in lines if line.startswith("failed")] == [
            f"failed (exit status 1), {tmp_path / 'runs' / 'logs' / f'odd_seeds_fail__Pendulum-v1__{seed}.log'}: "
            "error: odd seed" for seed in failing]


UNKNOWN_ENV_ID = ("unknown --env-ids 'cartpole-swing' (did you mean 'cartpole-swingup'?); DeepMind Control tasks are "
                  "domain-task (walker-walk), else a Gymnasium id (Pendulum-v1)")


@pytest.mark.parametrize("mode, flags, message", [
    ("print", ["--env-ids", "walker-walk", "cartpole-swing"], UNKNOWN_ENV_ID),
    ("run", ["--env-ids", "walker-walk", "cartpole-swing"], UNKNOWN_ENV_ID),
    ("print", ["--seeds"], "--seeds was given no values"),
    ("run", ["--seeds"], "--seeds was given no values"),
    ("print", ["--env-ids"], "--env-ids was given no values"),
    ("print", ["--extra=--learning-startz 5"],
     "--extra '--learning-startz 5': qmle_dmc.py has no flag --learning-startz"),
    ("print", ["--extra=--k 7"], "--extra '--k 7': qmle_dmc.py has no flag --k"),  # wolpertinger.py's, not this one's
    ("print", ["--extra=--learning-starts 1.5"], "--extra '--learning-starts 1.5': qmle_dmc.py refuses it: "),
    ("run", ["--extra=--learning-starts"], "--extra '--learning-starts': qmle_dmc.py refuses it: "),
    ("print", ["--extra=--seed 7"], "--extra '--seed 7': --seed is set by the grid for each run (--env-ids, --seeds, "
                                    "--total-timesteps, --exp-name)"),
])
def test_a_grid_its_runs_would_refuse_is_refused_in_one_line_before_any_starts(tmp_path, mode, flags, message):
    # --total-timesteps 10: a run started by mistake ends soon
    result = run_script(os.path.join("benchmarks", "learning.py"), mode, "--total-timesteps", "10", *flags,
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    # a parser's complaint ends in its own words (tyro's); ours are whole
    assert line.startswith(f"error: {message}") if message.endswith("refuses it: ") else line == f"error: {message}"
    assert not os.path.exists(tmp_path / "runs")  # nothing started


def test_a_grid_its_script_accepts_is_printed_whole(tmp_path):
    result = run_script(os.path.join("benchmarks", "learning.py"), "print", "--script", "wolpertinger.py",
                        "--env-ids", "Pendulum-v1", "walker-walk", "--seeds", "1", "2", "3",
                        "--extra=--k 7 --no-prioritized-replay --learning-rate=3e-4", cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 * 3 and all(line.endswith("--k 7 --no-prioritized-replay --learning-rate=3e-4")
                                       for line in lines)
