"""The paper's ablations by name (benchmarks/ablations.py): each figure's variants train what the paper describes,
checked through the training script's own parser and budget split, and the report's verdicts follow from the runs."""

import os
import shlex
import subprocess
import sys

import pytest
import tyro
from conftest import ROOT, refusal
from test_learning import git, write_run

import qmle_dmc as q

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ablations  # noqa: E402


def parsed(exp_name, total_timesteps=100_000):
    """The qmle_dmc.py settings a figure's variant trains with, as its command line gives them."""
    variant = next(v for f in ablations.FIGURES.values() for v in f.variants if v.exp_name == exp_name)
    assert variant.script == "qmle_dmc.py"
    args = tyro.cli(q.Args, args=shlex.split(ablations.flags_of(variant, total_timesteps)))
    q.check_args(args)
    return args


def budgets(args):
    split = lambda m: q.Budget.split(
        m,
        args.rho_uniform,
        args.rho_delta,
        args.rho_categorical,  # noqa: E731
        args.grid_fraction,
    )
    return split(args.m_greedy), split(args.m_target)


def test_fig8_compares_one_uniform_and_one_delta_sample_against_two_uniform_samples_without_the_cache():
    # Appendix D.1: budgets 2; QMLE half uniform, half delta; the ablation all uniform. Both continuous (no grid),
    # and the ablation has no amortisation at all, so the cached arg-max leaves its target search.
    amortised, uniform = parsed("fig8_amortised"), parsed("fig8_uniform")
    assert budgets(amortised) == (q.Budget(1, 0, 1, 0),) * 2 and amortised.cache_argmax
    assert budgets(uniform) == (q.Budget(2, 0, 0, 0),) * 2 and not uniform.cache_argmax


def test_fig9_changes_the_budgets_alone():
    small, large, defaults = parsed("fig9_m2"), parsed("fig9_m1000"), q.Args()
    assert (small.m_greedy, small.m_target, large.m_greedy, large.m_target) == (2, 2, 1000, 1000)
    for args in (small, large):  # Table 1's ratios and everything else as the defaults
        assert {k: v for k, v in vars(args).items() if k not in ("m_greedy", "m_target")} == {
            k: v for k, v in vars(defaults).items() if k not in ("m_greedy", "m_target")
        }


def test_fig10_pits_categorical_only_qmle_on_the_grid_against_dqn_on_the_same_grid():
    total = 40_000
    args, defaults = parsed("fig10_qmle", total), q.Args()
    # Appendix D.3: Table 1's budgets and uniform share, delta 0, the rest categorical; on the bang-off-bang grid
    # for the whole run.
    assert (args.m_greedy, args.m_target, args.rho_uniform) == (
        defaults.m_greedy,
        defaults.m_target,
        defaults.rho_uniform,
    )
    assert args.rho_delta == 0 and args.rho_categorical == pytest.approx(1 - defaults.rho_uniform)
    assert args.num_bins == 3 and args.discrete_steps >= total
    (dqn,) = [v for v in ablations.FIGURES[10].variants if v.exp_name == "fig10_dqn"]
    assert dqn.script == "dqn_grid.py" and os.path.isfile(os.path.join(ROOT, dqn.script))


def test_fig12_runs_the_grid_throughout_the_box_throughout_and_the_grid_for_the_first_half():
    total = 60_000
    assert parsed("fig12_discrete", total).discrete_steps >= total
    assert parsed("fig12_continuous", total).discrete_steps == 0
    assert parsed("fig12_curriculum", total).discrete_steps == 30_000


def test_every_command_is_a_real_run_of_its_script():
    args = tyro.cli(ablations.Mode, args=["print", "--seeds", "1", "2", "--total-timesteps", "5000"])
    runs = ablations.planned(args)
    figures = ablations.FIGURES.values()
    assert len(runs) == sum(len(f.variants) * len(f.tasks) * 2 for f in figures)
    for cmd, log in runs:
        assert os.path.isfile(cmd[1]) and cmd[cmd.index("--total-timesteps") + 1] == "5000"
        exp, env_id, seed = log[: -len(".log")].split("__")
        assert (cmd[cmd.index("--exp-name") + 1], cmd[cmd.index("--env-id") + 1], cmd[cmd.index("--seed") + 1]) == (
            exp,
            env_id,
            seed,
        )
    paper = ablations.planned(tyro.cli(ablations.Mode, args=["print", "--figures", "10", "--paper-tasks"]))
    assert {cmd[cmd.index("--env-id") + 1] for cmd, _ in paper} >= {"finger-spin", "walker-walk", "dog-walk"}


@pytest.mark.parametrize(
    "relation, first, second, outcome",
    [
        # means 12 and 10, standard errors 1 and 1: difference 2 ± 1.41, within two standard errors
        ("better", [11, 13], [9, 11], "cannot be told apart at this scale"),
        ("better", [14, 16], [9, 11], "held"),  # +5 ± 1.41
        ("better", [4, 6], [9, 11], "did not hold"),
        ("similar", [11, 13], [9, 11], "held (no difference beyond two standard errors)"),
        ("similar", [14, 16], [9, 11], "did not hold"),
        ("not worse", [8, 10], [9, 11], "held (not behind by more than two standard errors)"),  # -1 ± 1.41
        ("not worse", [4, 6], [9, 11], "did not hold"),
    ],
)
def test_a_verdict_is_two_standard_errors_of_the_difference(relation, first, second, outcome):
    claim = ablations.Claim("claim", "a", "b", relation, "whole run")
    verdict, diff, se = ablations.verdict(claim, first, second)
    assert verdict == outcome
    assert diff == pytest.approx(sum(first) / 2 - sum(second) / 2) and se == pytest.approx(2**0.5)


@pytest.mark.parametrize("relation", ["better", "similar", "not worse"])
def test_one_seed_cannot_tell_two_variants_apart(relation):
    claim = ablations.Claim("claim", "a", "b", relation, "whole run")
    assert ablations.verdict(claim, [50.0], [10.0, 11.0])[0] == "cannot be told apart at this scale"
    assert ablations.verdict(claim, [10.0, 11.0], [10.5])[0] == "cannot be told apart at this scale"


def test_report_writes_each_figures_table_verdict_and_plot_and_rereads_them_without_runs(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed in (1, 2, 3):  # the amortised variant ahead by 50 at every episode
        write_run(str(runs), "walker-walk", "fig8_amortised", seed, [100.0 + 50 + seed + i for i in range(20)])
        write_run(str(runs), "walker-walk", "fig8_uniform", seed, [100.0 + seed + i for i in range(20)])
    args = ablations.Report(figures=[8], runs_dir=str(runs), output_dir=str(out), curves_dir=str(out))
    page = ablations.report_figure(ablations.FIGURES[8], args)
    # whole run: the mean of 100 + seed + 0..19 is 109.5 + seed: 110.5, 111.5, 112.5 -> 111.5 ± 0.6
    assert (
        "| walker-walk | uniform sampling alone (ρ_uniform = 1, no cached arg-max) | 3 | 20000 | 111.5 ± 0.6 |" in page
    )
    assert "| walker-walk | delta predictor (ρ_uniform = ρ_delta = 0.5) | 3 | 20000 | 161.5 ± 0.6 |" in page
    assert (
        "walker-walk, whole run: amortised maximisation (the delta predictor and the cached arg-max) learns faster"
        in page
    )
    assert "**held**" in page and "difference +50.0 ± 0.8" in page
    assert open(out / "fig8.md").read() == page
    assert os.path.getsize(out / "fig8.png") > 10_000 and not os.path.exists(out / ".fig8")
    # The committed CSV alone gives the same page once the runs are gone.
    gone = ablations.Report(figures=[8], runs_dir=str(tmp_path / "gone"), output_dir=str(out), curves_dir=str(out))
    assert ablations.report_figure(ablations.FIGURES[8], gone) == page
    assert ablations.report_figure(ablations.FIGURES[9], gone) == ""  # nothing run: no page


@pytest.mark.parametrize(
    "flags, named",
    [
        (["run", "--figures", "7"], "--figures"),
        (["run", "--jobs", "0"], "--jobs"),
        (["print", "--total-timesteps", "0"], "--total-timesteps"),
        (["print", "--paper-tasks", "--env-ids", "walker-walk"], "--paper-tasks"),
    ],
)
def test_values_the_ablations_runner_cannot_use_give_one_error_line_naming_the_flag(flags, named):
    assert named in refusal(ablations.main, tyro.cli(ablations.Mode, args=flags))


def test_each_mode_has_its_own_help(capsys):
    for mode, flag in (("list", "--figures"), ("run", "--jobs"), ("print", "--paper-tasks"), ("report", "--overwrite")):
        with pytest.raises(SystemExit) as exit_info:
            tyro.cli(ablations.Mode, args=[mode, "--help"])  # as its __main__ parses
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out


def test_report_writes_a_new_folder_under_runs_and_replaces_committed_pages_only_when_asked(tmp_path, monkeypatch):
    committed = tmp_path / "committed"
    committed.mkdir()
    (committed / "fig8.md").write_text("committed\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "committed")
    git(tmp_path, "commit", "-q", "-m", "pages")
    for seed in (1, 2):
        for name in ("fig8_amortised", "fig8_uniform"):
            write_run(str(tmp_path / "runs"), "walker-walk", name, seed, [float(seed)] * 5)
    monkeypatch.chdir(tmp_path)

    def report(*flags):  # as its __main__ parses them
        return tyro.cli(ablations.Mode, args=["report", "--figures", "8", "--bootstrap-reps", "10", *flags])

    ablations.main(report())
    (folder,) = [f for f in os.listdir(tmp_path / "runs") if f.startswith("ablations__")]
    assert sorted(os.listdir(tmp_path / "runs" / folder)) == ["fig8.csv", "fig8.md", "fig8.png"]
    assert "--overwrite" in refusal(ablations.main, report("--output-dir", "committed"))
    assert os.listdir(committed) == ["fig8.md"] and (committed / "fig8.md").read_text() == "committed\n"
    ablations.main(report("--output-dir", "committed", "--overwrite"))
    assert (committed / "fig8.md").read_text().startswith("# Fig. 8")
    assert subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True, text=True).stdout


def test_the_launcher_runs_every_command_into_its_own_log_jobs_at_a_time_and_names_the_failed(tmp_path, capsys):
    runs = tmp_path / "runs"
    cmds = [[sys.executable, "-c", f"import os; print({i}, os.getcwd())"] for i in range(3)]
    cmds.append([sys.executable, "-c", "raise SystemExit('error: refused')"])
    logs = [str(runs / "logs" / f"{i}.log") for i in range(4)]
    assert ablations.learning.launch(cmds, logs, jobs=2, pin_cores=False, runs_dir=str(runs)) == 1  # failures counted
    # each from the runs folder's parent, so that the runs' own runs/ is this one
    assert [open(log).read() for log in logs[:3]] == [f"{i} {tmp_path}\n" for i in range(3)]
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [f"failed (exit status 1), {logs[3]}: error: refused", "3 of 4 runs finished"]


def test_run_warns_of_the_runs_that_cost_far_more_than_a_default_run():
    here = ablations.planned(tyro.cli(ablations.Mode, args=["run", "--figures", "8", "12"]))
    assert ablations.costs(here) == []
    budget = ablations.costs(ablations.planned(tyro.cli(ablations.Mode, args=["run", "--figures", "9"])))
    assert len(budget) == 1 and "fig9_m1000" in budget[0]
    paper = ablations.costs(
        ablations.planned(tyro.cli(ablations.Mode, args=["run", "--figures", "10", "--paper-tasks"]))
    )
    assert len(paper) == 1 and "quadruped-walk" in paper[0]


def test_every_variant_of_a_task_is_judged_over_the_steps_of_its_shortest_run(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(str(runs), "cartpole-swingup", "fig8_amortised", seed, [100.0 * seed + i for i in range(20)])
    write_run(str(runs), "cartpole-swingup", "fig8_uniform", 1, [10.0 + i for i in range(20)])
    write_run(str(runs), "cartpole-swingup", "fig8_uniform", 2, [20.0 + i for i in range(8)])  # stopped at 8k
    args = ablations.Report(runs_dir=str(runs), output_dir=str(tmp_path), curves_dir=str(tmp_path))
    page = ablations.report_figure(ablations.FIGURES[8], args)
    # both variants over 0-8k: amortised 103.5 and 203.5, uniform 13.5 and 23.5 (one seed would say 19.5 over 20k)
    assert "| cartpole-swingup | delta predictor (ρ_uniform = ρ_delta = 0.5) | 2 | 8000 | 153.5 ± 50.0 |" in page
    assert (
        "| cartpole-swingup | uniform sampling alone (ρ_uniform = 1, no cached arg-max) | 2 | 8000 | 18.5 ± 5.0 |"
        in page
    )
    # and the page says which runs were cut
    assert (
        "- cartpole-swingup: up to step 8000, where its shortest run ends; cut there: delta predictor (ρ_uniform = "
        "ρ_delta = 0.5), seed 1 (at 20000); delta predictor (ρ_uniform = ρ_delta = 0.5), seed 2 (at 20000); "
        "uniform sampling alone (ρ_uniform = 1, no cached arg-max), seed 1 (at 20000)."
    ) in page
    left_out = ablations.Report(
        runs_dir=str(runs), output_dir=str(tmp_path / "min"), curves_dir=str(runs), min_steps=10_000
    )
    assert "| 1 | 20000 | 19.5 |" in ablations.report_figure(ablations.FIGURES[8], left_out)


@pytest.mark.parametrize("ahead", ["fig10_qmle", "fig10_dqn"])
def test_a_similarity_that_did_not_hold_names_the_variant_that_ended_higher(tmp_path, ahead):
    runs, label = tmp_path / "runs", {v.exp_name: v.label for v in ablations.FIGURES[10].variants}
    for seed in (1, 2, 3):
        for name in label:
            write_run(str(runs), "finger-spin", name, seed, [200.0 * (name == ahead) + seed + i for i in range(20)])
    args = ablations.Report(runs_dir=str(runs), output_dir=str(tmp_path), curves_dir=str(tmp_path))
    page = ablations.report_figure(ablations.FIGURES[10], args)
    assert f"both reach similar final performance: **did not hold, {label[ahead]} higher** (" in page


def test_a_verdict_on_one_seed_says_which_variant_has_no_spread_instead_of_an_infinite_error(tmp_path):
    runs, label = tmp_path / "runs", {v.exp_name: v.label for v in ablations.FIGURES[9].variants}
    write_run(str(runs), "cartpole-swingup", "fig9_m1000", 1, [300.0 + i for i in range(20)])
    for seed in (1, 2, 3):
        write_run(str(runs), "cartpole-swingup", "fig9_m2", seed, [100.0 + seed + i for i in range(20)])
    args = ablations.Report(runs_dir=str(runs), output_dir=str(tmp_path), curves_dir=str(tmp_path))
    page = ablations.report_figure(ablations.FIGURES[9], args)
    # whole run: 309.5 against the mean of 110.5, 111.5 and 112.5
    assert (
        f"**cannot be told apart at this scale** ({label['fig9_m1000']} 309.5 against {label['fig9_m2']} "
        f"111.5 ± 0.6; one seed of {label['fig9_m1000']}, no spread to judge a difference of +198.0 by)"
    ) in page
    assert "± inf" not in page
