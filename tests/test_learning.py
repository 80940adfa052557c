"""benchmarks/learning.py: the grid of training commands it runs or prints, and its report: tables, curves and
figures that agree with each other and with the runs' metrics.csv, said plainly where runs were cut, written where
they replace nothing committed."""

import csv
import itertools
import os
import subprocess
import sys

import matplotlib.figure
import numpy as np
import pytest
import tyro
from conftest import ROOT, refusal, run_script

import qmle_dmc as q

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learning  # noqa: E402


def test_a_system_at_its_defaults_keeps_its_colour_under_any_experiment_name():
    colours = learning.colours_of(
        [
            "release",
            "qmle_n1",
            "qmle_n16",
            "qmle_n1_gpu",
            "qmle_dmc",
            "qmle_n4",
            "aql",
            "aql_discrete",
            "qtopt_cem",
            "uniformql",
            "wolpertinger",
        ]
    )
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
            writer.writerows(
                [name, "walker-walk", seed, 1000 * step, 10.0 * i + seed + step]
                for seed in seeds
                for step in range(1, 11)
            )


def plotted(monkeypatch, tmp_path, exp_names, labels=()):
    """Report the experiments from a curves file (the release among them) and return the saved figure."""
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))
    )
    path = str(tmp_path / f"{'_'.join(exp_names)}.csv")
    write_curves(path, ["release", *exp_names])
    learning.report(
        learning.Report(
            bootstrap_reps=20,  # the intervals' own test resamples 2000 times
            runs_dir=str(tmp_path / "none"),
            exp_names=list(exp_names),
            curves=[path],
            release_curves=[path],
            labels=list(labels),
            output_dir=str(tmp_path / "out"),
        )
    )
    return figures[-1]


def test_each_system_has_one_colour_in_every_figure_and_the_band_is_explained(monkeypatch, tmp_path):
    one = plotted(
        monkeypatch,
        tmp_path,
        ["qmle_dmc", "qmle_tnf2000", "aql"],
        labels=["release=authors' release", "qmle_dmc=qmle_dmc.py", "qmle_tnf2000=target period 2000"],
    )
    other = plotted(
        monkeypatch,
        tmp_path,
        ["qmle_n4", "qmle_n1"],
        labels=["release=authors' release", "qmle_n1=qmle_dmc.py", "qmle_n4=--num-envs 4"],
    )
    colours = [{line.get_label(): line.get_color() for ax in fig.axes for line in ax.lines} for fig in (one, other)]
    assert colours[0]["authors' release"] == colours[1]["authors' release"] == "black"
    assert colours[0]["qmle_dmc.py"] == colours[1]["qmle_dmc.py"] == "C0"
    assert colours[0]["target period 2000"] not in ("black", "C0", "C2")
    (legend,) = one.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == [
        "authors' release (3 seeds)",
        "qmle_dmc.py (3 seeds)",
        "target period 2000 (3 seeds)",
        "aql (3 seeds)",
    ]
    assert "±1 standard error" in legend.get_title().get_text()


def test_a_runner_whose_runs_failed_exits_1_after_its_summary(tmp_path):
    # a training script that fails at once for odd seeds (no JAX to import): which runs fail is known beforehand
    script = tmp_path / "odd_seeds_fail.py"
    script.write_text(
        "import sys\n"
        "seed = int(sys.argv[sys.argv.index('--seed') + 1])\n"
        "sys.exit('error: odd seed' if seed % 2 else 0)\n"
    )
    for seeds in (["2", "4"], ["1", "2"]):
        failing = [seed for seed in seeds if int(seed) % 2]
        result = run_script(
            os.path.join("benchmarks", "learning.py"),
            "run",
            "--script",
            str(script),
            "--env-ids",
            "Pendulum-v1",
            "--seeds",
            *seeds,
            "--runs-dir",
            str(tmp_path / "runs"),
            timeout=60,
        )
        assert result.returncode == (1 if failing else 0), result.stderr
        lines = result.stdout.strip().splitlines()
        assert lines[-1] == f"{len(seeds) - len(failing)} of {len(seeds)} runs finished"  # said before it exits
        assert [line for line in lines if line.startswith("failed")] == [
            f"failed (exit status 1), {tmp_path / 'runs' / 'logs' / f'odd_seeds_fail__Pendulum-v1__{seed}.log'}: "
            "error: odd seed"
            for seed in failing
        ]


@pytest.mark.parametrize(
    "mode, flags, status, named",
    [
        ("print", ["--env-ids", "walker-walk", "cartpole-swing"], 1, "cartpole-swing"),
        ("run", ["--env-ids", "walker-walk", "cartpole-swing"], 1, "cartpole-swing"),
        ("print", ["--seeds"], 1, "--seeds"),
        ("run", ["--seeds"], 1, "--seeds"),
        ("print", ["--env-ids"], 1, "--env-ids"),
        ("print", ["--extra=--seed 7"], 1, "--seed"),  # set by the grid for each run
        # what the training script's own parser refuses: tyro's message (a box), status 2, as each run would give it
        ("print", ["--extra=--learning-startz 5"], 2, "--learning-startz"),
        ("print", ["--extra=--k 7"], 2, "--k"),  # wolpertinger.py's flag, not this script's
        ("print", ["--extra=--learning-starts 1.5"], 2, "--learning-starts"),
        ("run", ["--extra=--learning-starts"], 2, "--learning-starts"),
    ],
)
def test_a_grid_its_runs_would_refuse_is_refused_before_any_starts(
    tmp_path, monkeypatch, capsys, mode, flags, status, named
):
    monkeypatch.chdir(tmp_path)  # --total-timesteps 10: a run started by mistake ends soon
    args = tyro.cli(learning.Mode, args=learning.joined_extra([mode, "--total-timesteps", "10", *flags]))
    if status == 1:  # our own check: one line
        assert named in refusal(learning.main, args)
    else:  # tyro's, in the child that parses the training script's flags: its status and its message
        with pytest.raises(SystemExit) as exit_info:
            learning.main(args)
        assert exit_info.value.code == 2 and named in capsys.readouterr().err
    assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "runs")  # nothing started


def test_a_grid_its_script_accepts_is_printed_whole(tmp_path):
    result = run_script(
        os.path.join("benchmarks", "learning.py"),
        "print",
        "--script",
        "wolpertinger.py",
        "--env-ids",
        "Pendulum-v1",
        "walker-walk",
        "--seeds",
        "1",
        "2",
        "3",
        "--extra=--k 7 --no-prioritized-replay --learning-rate=3e-4",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 * 3 and all(
        line.endswith("--k 7 --no-prioritized-replay --learning-rate=3e-4") for line in lines
    )


def test_extra_takes_its_value_after_a_space_as_well_as_after_an_equals_sign(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grids = [
        tyro.cli(learning.Mode, args=learning.joined_extra(["print", "--seeds", "1", "2", *extra]))  # as __main__
        for extra in (["--extra", "--num-bins 5 --m-greedy 20"], ["--extra=--num-bins 5 --m-greedy 20"])
    ]
    assert grids[0] == grids[1]
    learning.main(grids[0])
    for line in capsys.readouterr().out.strip().splitlines():
        parsed = tyro.cli(q.Args, args=line.split()[2:])
        assert (parsed.num_bins, parsed.m_greedy) == (5, 20)


def test_runner_expands_env_ids_times_seeds_into_valid_training_commands():
    args = tyro.cli(
        learning.Mode,
        args=[
            "print",
            "--env-ids",
            "cartpole-swingup",
            "walker-walk",
            "--seeds",
            "1",
            "2",
            "3",
            "--exp-name",
            "grid",
            "--extra=--target-network-frequency 2000",
        ],
    )
    commands = learning.commands(args)
    assert len(commands) == 6
    expected = set(itertools.product(["cartpole-swingup", "walker-walk"], ["1", "2", "3"]))
    assert {(c[c.index("--env-id") + 1], c[c.index("--seed") + 1]) for c in commands} == expected
    for command in commands:
        parsed = tyro.cli(q.Args, args=command[2:])  # each command is a valid qmle_dmc.py invocation
        assert parsed.target_network_frequency == 2000 and parsed.exp_name == "grid"
        assert parsed.total_timesteps == 100_000


def test_runs_of_another_script_are_named_after_it():
    import wolpertinger

    (command,) = learning.commands(
        tyro.cli(
            learning.Mode,
            args=["print", "--script", "wolpertinger.py", "--env-ids", "Pendulum-v1", "--seeds", "4", "--extra=--k 7"],
        )
    )
    assert command[1].endswith("wolpertinger.py")
    parsed = tyro.cli(wolpertinger.Args, args=command[2:])
    assert (parsed.exp_name, parsed.seed, parsed.k) == ("wolpertinger", 4, 7)


def test_each_mode_has_its_own_help(capsys):
    texts = {}
    for mode in ("run", "print", "report", "random"):
        with pytest.raises(SystemExit) as exit_info:
            tyro.cli(learning.Mode, args=[mode, "--help"])  # as its __main__ parses
        assert exit_info.value.code == 0
        texts[mode] = capsys.readouterr().out
    assert "--jobs" in texts["run"] and "--jobs" not in texts["report"]
    assert "--last-episodes" in texts["report"] and "--last-episodes" not in texts["run"]
    assert "--overwrite" in texts["report"] and "--extra" in texts["print"] and "--episodes" in texts["random"]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["report", "--reach", "walker-walk=nan"], "--reach"),
        (["report", "--windows", "20000-inf"], "--windows"),
        (["report", "--last-episodes", "0"], "--last-episodes"),
        (["report", "--bootstrap-reps", "0"], "--bootstrap-reps"),
        (["run", "--jobs", "0"], "--jobs"),
        (["print", "--script", "nope.py"], "--script"),
        (["report", "--release-curves", "docs/qmle_release/curves.csv", "nope.csv"], "--release-curves"),
        (["report", "--curves", "nope.csv"], "--curves"),
        (["random", "--env-ids", "cartpole-swing"], "--env-ids"),
    ],
)
def test_values_the_runner_cannot_use_give_one_error_line_naming_the_flag(flags, named):
    assert named in refusal(learning.main, tyro.cli(learning.Mode, args=learning.joined_extra(flags)))


def write_run(runs_dir, env_id, exp, seed, returns, stamp=123, steps=None):
    """A run's metrics.csv: one episode per return, ending at steps[i] (default: every 1000 steps)."""
    run_dir = os.path.join(runs_dir, f"{env_id}__{exp}__{seed}__{stamp}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["global_step", "charts/episodic_return", "charts/SPS"])
        for i, r in enumerate(returns):
            step = steps[i] if steps else 1000 * (i + 1)
            writer.writerow([step, r, ""])
            writer.writerow([step + 1, "", 100.0])  # rows without a return are skipped


def write_release(path, runs):
    """A release curves file of walker-walk: per (seed, episodes, return), that many 1000-step episodes."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_id", "seed", "step", "episodic_return"])
        writer.writerows(
            ["walker-walk", seed, 1000 * (i + 1), value] for seed, episodes, value in runs for i in range(episodes)
        )


def test_report_averages_the_whole_run_its_halves_and_its_end_against_the_release(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, offset in [(1, 0.0), (2, 10.0)]:
        write_run(str(runs), "walker-walk", "mine", seed, [offset + i for i in range(30)])
    write_run(str(runs), "walker-walk", "mine", 3, [])  # started, no episode finished yet
    release = tmp_path / "release.csv"
    write_release(release, [(1, 30, 40.0)])
    learning.report(
        learning.Report(
            bootstrap_reps=20,
            runs_dir=str(runs),
            exp_names=["mine"],
            release_curves=[str(release)],
            output_dir=str(tmp_path / "out"),
            last_episodes=10,
            metrics=["charts/SPS"],
            reach=["walker-walk=25"],
            windows=["10000-20000"],
            labels=["mine=Mine"],
        )
    )
    table = capsys.readouterr().out
    assert "note: mine on walker-walk, run 3, is at step 0 (no finished episode); left out" in table
    assert "| walker-walk | mine | seed 1 | charts/SPS, last 10 logged values (steps 21001-30001) | 100.0000 |" in table
    # seed 1 ends at 24.5 (20..29), never 25; seed 2 first at its 21st episode (returns 21..30, mean 25.5)
    assert "| walker-walk | mine | last-10 mean >= 25 first at step | 1: never, 2: 21000 |" in table
    # whole run: 14.5 and 24.5 (mean 19.5, s.e. 5.0); halves: 7 and 17 (steps 1k-15k), 22 and 32; 10k-20k
    # (episodes ending at 11k..20k): 14.5 and 24.5; last 10: 24.5 and 34.5, 29.5 against the release's 40: 74%
    assert (
        "| walker-walk | Mine | 2 | 30000 | none | 19.5 ± 5.0 | 12.0 ± 5.0 | 27.0 ± 5.0 | 19.5 ± 5.0 | 29.5 ± 5.0 "
        "| 74% |"
    ) in table
    assert (
        "| walker-walk | authors' release (PyTorch) | 1 | 30000 | none | 40.0 | 40.0 | 40.0 | 40.0 | 40.0 | 100% |"
    ) in table
    assert "| walker-walk | Mine | first half | 1: 7.0, 2: 17.0 |" in table
    rows = list(csv.DictReader(open(tmp_path / "out" / "learning_curves.csv")))
    assert len(rows) == 90 and {r["exp_name"] for r in rows} == {"mine", "release"}
    assert os.path.getsize(tmp_path / "out" / "learning_curves.png") > 10_000

    # An earlier report's curves stand in for runs that are gone; a seed run twice is reported twice, said so.
    write_run(str(runs), "walker-walk", "mine", 2, [5.0] * 30, stamp=456)
    learning.report(
        learning.Report(
            bootstrap_reps=20,
            runs_dir=str(runs),
            exp_names=["mine", "old"],
            release_curves=[],
            curves=[str(tmp_path / "out" / "learning_curves.csv")],
            output_dir=str(tmp_path / "again"),
        )
    )
    table = capsys.readouterr().out
    assert "note: mine on walker-walk: seed 2 ran more than once; each run is reported" in table
    assert "| walker-walk | mine | last 10 episodes | 1: 24.5, 2 (123): 34.5, 2 (456): 5.0 |" in table


def figure_of(monkeypatch):
    """The figures the report saves, as it saves them."""
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))
    )
    return figures


def test_curves_of_several_environments_average_the_episodes_that_end_at_the_same_step(tmp_path, capsys, monkeypatch):
    # --num-envs 4 and 1000-step episodes: four episodes end together every 4000 steps, with known returns
    returns = np.random.default_rng(0).uniform(0, 100, size=(3, 10, 4))  # seeds x logged steps x environments
    for seed in range(3):
        write_run(
            str(tmp_path / "runs"),
            "walker-walk",
            "mine",
            seed + 1,
            returns[seed].ravel(),
            steps=[4000 * (k + 1) for k in range(10) for _ in range(4)],
        )
    figures = figure_of(monkeypatch)
    learning.report(
        learning.Report(
            bootstrap_reps=20,
            runs_dir=str(tmp_path / "runs"),
            exp_names=["mine"],
            release_curves=[],
            output_dir=str(tmp_path / "out"),
        )
    )
    (line,) = figures[-1].axes[0].lines
    x, y = line.get_xdata(), line.get_ydata()
    # the curve: at each logged step, the mean over seeds of each run's mean over its four episodes; no point before
    # the first episodes end
    assert x[0] == 4000 and x[-1] == 40_000
    at_logged = np.isin(x, 4000 * np.arange(1, 11))
    assert y[at_logged] == pytest.approx(returns.mean(axis=(0, 2)))
    # the table: each run's mean over its 40 episodes, then over the seeds; the curve at the logged steps agrees
    per_run = returns.mean(axis=(1, 2))
    table = capsys.readouterr().out
    whole = f"{per_run.mean():.1f} ± {per_run.std(ddof=1) / np.sqrt(3):.1f}"
    assert f"| walker-walk | mine | 3 | 40000 | none | {whole} |" in table
    assert y[at_logged].mean() == pytest.approx(per_run.mean())


def test_a_run_whose_episodes_all_end_at_one_step_is_one_point_at_their_mean(tmp_path, monkeypatch):
    # three environments of humanoid-walk, their first episodes all ending at step 3000
    write_run(str(tmp_path / "runs"), "humanoid-walk", "mine", 1, [0.47, 1.18, 2.13], steps=[3000] * 3)
    figures = figure_of(monkeypatch)
    learning.report(
        learning.Report(
            bootstrap_reps=20,
            runs_dir=str(tmp_path / "runs"),
            exp_names=["mine"],
            release_curves=[],
            output_dir=str(tmp_path / "out"),
        )
    )
    (line,) = figures[-1].axes[0].lines
    assert list(line.get_xdata()) == [3000] and line.get_ydata() == pytest.approx([(0.47 + 1.18 + 2.13) / 3])
    assert line.get_marker() not in (None, "None", "")  # a single point is drawn


def test_runs_of_unequal_length_are_compared_over_the_shortest_and_the_cut_is_said(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    write_run(str(runs), "walker-walk", "mine", 1, [10.0, 20.0, 30.0])
    write_run(str(runs), "walker-walk", "mine", 2, [20.0, 30.0, 40.0])
    write_run(str(runs), "walker-walk", "mine", 3, [0.0, 0.0, 0.0, 100.0, 200.0])  # 5000 steps
    figures = figure_of(monkeypatch)
    learning.report(
        learning.Report(
            bootstrap_reps=20,
            runs_dir=str(runs),
            exp_names=["mine"],
            release_curves=[],
            last_episodes=2,
            output_dir=str(tmp_path / "out"),
        )
    )
    table = capsys.readouterr().out
    # up to step 3000: whole run 20, 30, 0 (mean 16.7, s.e. 8.8); first half (the episode at 1000) 10, 20, 0; second
    # half and last 2 episodes 25, 35, 0 (20.0 ± 10.4)
    assert (
        "| walker-walk | mine | 3 | 3000 | 3 (5000) | 16.7 ± 8.8 | 10.0 ± 5.8 | 20.0 ± 10.4 | 20.0 ± 10.4 |"
    ) in table
    # and each run at its own end: seed 3's last two episodes, 150
    assert (
        "| walker-walk | mine | last 2 episodes at each run's own end | 1 (at 3000): 25.0, 2 (at 3000): 35.0, "
        "3 (at 5000): 150.0 |" in table
    )
    (line,) = figures[-1].axes[0].lines  # the curve is cut there too
    assert list(line.get_xdata()) == [1000, 2000, 3000]


def test_the_intervals_are_rliables_bootstrap_of_the_mean_and_the_interquartile_mean(tmp_path, capsys):
    # Four runs at 0, 0, 0 and 100. Resampled four times with replacement, k of them are the 100 with probability
    # C(4, k) 3^(4 - k) / 256: k >= 3 5.1% of the time, k = 4 0.4%. The mean (25 k) has its 2.5th percentile at 0
    # and its 97.5th at 75; the IQM (the middle two of the four sorted, 0 for k <= 1, 50 for k = 2 and 100 above)
    # is 0 with its 97.5th percentile at 100. Mean ± standard error would say 25 ± 25.
    assert learning.intervals([[0.0, 0.0, 0.0, 100.0]], reps=2000) == [("25.0 [0.0, 75.0]", "0.0 [0.0, 100.0]")]
    # a column with a run's value missing (a window it did not reach), or a single run, has no interval
    assert learning.intervals([[1.0, float("nan")], [1.0, 2.0]], reps=100)[0] == ("-", "-")
    assert learning.intervals([[5.0]], reps=100) == [("-", "-")]
    for seed, value in enumerate([0.0, 0.0, 0.0, 100.0]):
        write_run(str(tmp_path / "runs"), "walker-walk", "mine", seed + 1, [value] * 4)
    learning.report(
        learning.Report(
            runs_dir=str(tmp_path / "runs"), exp_names=["mine"], release_curves=[], output_dir=str(tmp_path / "out")
        )
    )
    assert "| walker-walk | mine | 4 | whole run | 25.0 [0.0, 75.0] | 0.0 [0.0, 100.0] |" in capsys.readouterr().out


def git(folder, *command):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *command], cwd=folder, check=True, capture_output=True
    )


def test_report_writes_a_new_folder_under_runs_and_replaces_committed_files_only_when_asked(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("learning_curves.csv", "learning_curves.png"):
        (docs / name).write_text("committed\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "docs")
    git(tmp_path, "commit", "-q", "-m", "figures")
    write_run(str(tmp_path / "runs"), "walker-walk", "mine", 1, [1.0] * 5)
    monkeypatch.chdir(tmp_path)

    def report(*flags):  # as `python benchmarks/learning.py report ...` parses its command line
        argv = ["report", "--exp-names", "mine", "--release-curves", "--bootstrap-reps", "10", *flags]
        learning.main(tyro.cli(learning.Mode, args=learning.joined_extra(argv)))

    report()
    (folder,) = [f for f in os.listdir(tmp_path / "runs") if f.startswith("report__")]  # a new folder under runs/
    assert sorted(os.listdir(tmp_path / "runs" / folder)) == ["learning_curves.csv", "learning_curves.png"]
    assert "--overwrite" in refusal(report, "--output-dir", "docs")  # committed: refused, nothing written
    assert all((docs / name).read_text() == "committed\n" for name in ("learning_curves.csv", "learning_curves.png"))
    (docs / "new").mkdir()  # a folder of docs/ that git does not track yet takes the report
    report("--output-dir", "docs/new")
    assert len(os.listdir(docs / "new")) == 2
    report("--output-dir", "docs", "--overwrite")
    assert len(list(csv.DictReader(open(docs / "learning_curves.csv")))) == 5


def test_report_of_names_without_runs_is_one_line_and_leaves_saved_curves_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "learning_curves.csv").write_text("saved\n")
    write_run(str(tmp_path / "runs"), "walker-walk", "mine", 1, [1.0] * 5)  # 5k steps: too short for --min-steps
    write_release(tmp_path / "release.csv", [(1, 30, 40.0)])
    paths = ["--runs-dir", str(tmp_path / "runs"), "--release-curves", str(tmp_path / "release.csv")]
    for flags in (["--exp-names", "mnie"], ["--exp-names", "mine", "--min-steps", "6000"]):
        args = tyro.cli(learning.Mode, args=["report", *flags, *paths, "--output-dir", str(out)])
        assert flags[1] in refusal(learning.main, args)
    assert os.listdir(out) == ["learning_curves.csv"] and (out / "learning_curves.csv").read_text() == "saved\n"


def test_runs_are_listed_in_the_order_of_their_seeds_as_numbers(tmp_path, capsys):
    for seed in (10, 9, 2):
        write_run(str(tmp_path / "runs"), "walker-walk", "mine", seed, [float(seed)] * 5)
    learning.report(
        learning.Report(
            bootstrap_reps=20,
            runs_dir=str(tmp_path / "runs"),
            exp_names=["mine"],
            release_curves=[],
            output_dir=str(tmp_path),
        )
    )
    assert "| walker-walk | mine | whole run | 2: 2.0, 9: 9.0, 10: 10.0 |" in capsys.readouterr().out  # not 10, 2, 9
    rows = list(csv.DictReader(open(tmp_path / "learning_curves.csv")))
    assert [r["seed"] for r in rows[::5]] == ["2", "9", "10"]


def test_release_curves_from_several_files_are_merged_run_by_run(tmp_path, capsys):
    """More seeds of the release, run later and kept in a file of their own, join the table beside the first ones;
    --min-steps leaves out those that stopped short."""
    files = {"first.csv": [(1, 30, 10.0), (2, 30, 20.0)], "more.csv": [(3, 30, 60.0), (4, 20, 99.0)]}
    for name, runs in files.items():
        write_release(tmp_path / name, runs)
    write_run(str(tmp_path / "runs"), "walker-walk", "mine", 1, [30.0] * 30)
    learning.report(
        learning.Report(
            bootstrap_reps=20,
            runs_dir=str(tmp_path / "runs"),
            exp_names=["mine"],
            min_steps=30000,
            release_curves=[str(tmp_path / n) for n in files],
            output_dir=str(tmp_path),
        )
    )
    table = capsys.readouterr().out
    assert "note: release on walker-walk, run 4, is at step 20000; left out" in table
    # seeds 1-3: 10, 20 and 60, mean 30, standard deviation sqrt(1400 / 2) = 26.5, standard error 15.3 ...
    assert "| walker-walk | authors' release (PyTorch) | 3 | 30000 | none | 30.0 ± 15.3 |" in table
    # ... and the last-10 ratio against that mean
    assert "| walker-walk | mine | 1 | 30000 | none | 30.0 | 30.0 | 30.0 | 30.0 | 100% |" in table


def test_runs_replace_saved_curves_task_by_task_and_seed_by_seed(tmp_path):
    """A figure grows a task at a time: saved curves of one task stay when runs of another arrive, and a run of a
    task and seed the saved curves hold too replaces that curve only."""
    saved = tmp_path / "saved.csv"
    with open(saved, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["exp_name", "env_id", "seed", "step", "episodic_return"])
        writer.writerows(
            ["mine", env_id, seed, 1000 * (i + 1), value]
            for env_id, seed, value in [
                ("cartpole-swingup", 1, 1.0),
                ("cartpole-swingup", 2, 2.0),
                ("walker-walk", 1, 3.0),
                ("walker-walk", 2, 4.0),
            ]
            for i in range(10)
        )
    runs = tmp_path / "runs"
    write_run(str(runs), "walker-walk", "mine", 1, [30.0] * 10)
    write_run(str(runs), "walker-walk", "mine", 3, [50.0] * 10)
    learning.report(
        learning.Report(
            bootstrap_reps=20,
            runs_dir=str(runs),
            exp_names=["mine"],
            release_curves=[],
            curves=[str(saved)],
            output_dir=str(tmp_path / "out"),
        )
    )
    curves = learning.read_curves(str(tmp_path / "out" / "learning_curves.csv"))["mine"]
    assert {key: {r for _, r in points} for key, points in curves.items()} == {
        ("cartpole-swingup", "1"): {1.0},
        ("cartpole-swingup", "2"): {2.0},  # another task's saved runs kept
        ("walker-walk", "1"): {30.0},  # the run replaces the saved curve of its task and seed
        ("walker-walk", "2"): {4.0},
        ("walker-walk", "3"): {50.0},
    }


def test_random_floor_is_the_mean_return_of_random_actions(capsys):
    means = learning.random_returns(learning.Random(env_ids=["Pendulum-v1"], seeds=[1, 2], episodes=3))
    # Random torques leave the pendulum swinging: about -1200 per 200-step episode, never near 0.
    assert -1800 < means["Pendulum-v1"] < -800
    assert "| Pendulum-v1 | uniformly random actions | 6 episodes |" in capsys.readouterr().out


def test_reach_is_the_first_step_whose_trailing_window_meets_the_bar():
    points = [(200 * (i + 1), r) for i, r in enumerate([-900, -300, -100, -150, -250, -120])]
    # trailing means of 3: -433, -183 (step 800), -167, -173
    assert learning.first_reach(points, -200, 3) == 800
    assert learning.first_reach(points, -160, 3) is None
    assert learning.first_reach(points, -100, 1) == 600


def test_a_namespaced_env_id_logs_to_one_file_under_logs():
    # runs/logs/qmle_dmc__dm_control/walker-walk-v0__1.log named a folder that does not exist: launch crashed
    cmd = ["python", "qmle_dmc.py", "--env-id", "dm_control/walker-walk-v0", "--seed", "1"]
    assert learning.log_name("qmle_dmc", cmd) == "qmle_dmc__dm_control-walker-walk-v0__1.log"
