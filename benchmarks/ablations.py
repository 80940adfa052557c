"""The QMLE paper's ablations (Appendix D and E.3): each figure's variants and tasks by name, run here or printed
for a cluster, and reported per figure as a table, a verdict on the paper's claim and a plot in docs/ablations/.

    python benchmarks/ablations.py list                                   # figures, variants, flags, claims
    python benchmarks/ablations.py run --figures 8 12 --jobs 2            # this machine's scale: 100k steps, 3 seeds
    python benchmarks/ablations.py print --figures 10 --paper-tasks --seeds 1 2 3 4 5 --total-timesteps 1000000
    python benchmarks/ablations.py report --figures 8 9 10 12             # runs/ablations__{time}/fig{N}.md, .png, .csv

Fig. 8: amortised maximisation (a delta predictor) against uniform sampling alone, budgets 2. Fig. 9: budgets 2
against 1000. Fig. 10: action-in QMLE against action-out DQN (dqn_grid.py), both on the bang-off-bang grid.
Fig. 12: the grid throughout, the continuous box throughout, and the grid for the first half then the box.
"""

import contextlib
import io
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, List, Optional, Tuple, Union

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import learning  # noqa: E402  (the runner and report these figures share with every other learning result)

ROOT = learning.ROOT
OUTPUT_DIR = os.path.join(ROOT, "docs", "ablations")


@dataclass(frozen=True)
class Variant:
    exp_name: str
    label: str
    script: str
    flags: str
    """flags of the script; {total} and {half} stand for --total-timesteps and half of it"""


@dataclass(frozen=True)
class Claim:
    text: str
    """the paper's claim, one sentence"""
    first: str
    second: str
    """the two variants (exp names) it compares"""
    relation: str
    """'better' (first above second), 'similar' or 'not worse' (first not below second)"""
    column: str
    """'whole run' (learning speed) or 'last episodes' (the level reached: the last --last-episodes)"""


@dataclass(frozen=True)
class Figure:
    number: int
    title: str
    tasks: Tuple[str, ...]
    """this machine's scale"""
    paper_tasks: Tuple[str, ...]
    variants: Tuple[Variant, ...]
    claims: Tuple[Claim, ...]
    source: str


BUDGET_2 = "--m-greedy 2 --m-target 2"
FIGURES = {
    f.number: f
    for f in [
        Figure(
            8,
            "Amortised maximisation against uniform sampling alone (a continuous QMLE, budgets 2)",
            ("cartpole-swingup", "walker-walk"),
            # The paper's panels run from 1 to 6 action dimensions; the extracted text does not name them.
            ("cartpole-swingup", "finger-spin", "hopper-hop", "cheetah-run", "walker-walk"),
            (
                Variant(
                    "fig8_amortised",
                    "delta predictor (ρ_uniform = ρ_delta = 0.5)",
                    "qmle_dmc.py",
                    f"{BUDGET_2} --rho-uniform 0.5 --rho-delta 0.5 --rho-categorical 0 --grid-fraction 0",
                ),
                # The paper counts the replay-cached arg-max as amortisation too: the ablation searches without it.
                Variant(
                    "fig8_uniform",
                    "uniform sampling alone (ρ_uniform = 1, no cached arg-max)",
                    "qmle_dmc.py",
                    f"{BUDGET_2} --rho-uniform 1 --rho-delta 0 --rho-categorical 0 --grid-fraction 0 --no-cache-argmax",
                ),
            ),
            (
                Claim(
                    "amortised maximisation (the delta predictor and the cached arg-max) learns faster than uniform "
                    "sampling alone",
                    "fig8_amortised",
                    "fig8_uniform",
                    "better",
                    "whole run",
                ),
            ),
            "Appendix D.1, Fig. 8",
        ),
        Figure(
            9,
            "Sampling budgets 2 against 1000 (Table 1's ratios)",
            ("cartpole-swingup", "walker-walk"),
            ("cartpole-swingup", "finger-spin", "hopper-hop", "cheetah-run", "walker-walk"),
            (
                Variant("fig9_m1000", "m_greedy = m_target = 1000", "qmle_dmc.py", "--m-greedy 1000 --m-target 1000"),
                Variant("fig9_m2", "m_greedy = m_target = 2", "qmle_dmc.py", BUDGET_2),
            ),
            (
                Claim(
                    "more samples for the maximisation improve performance",
                    "fig9_m1000",
                    "fig9_m2",
                    "better",
                    "whole run",
                ),
            ),
            "Appendix D.2, Fig. 9",
        ),
        Figure(
            10,
            "Action-in QMLE against action-out DQN, both on the bang-off-bang grid (3 bins per dimension)",
            ("finger-spin", "walker-walk"),
            # Beyond 6 dimensions DQN runs out of memory or time (dqn_grid.py refuses what cannot fit).
            ("finger-spin", "walker-walk", "quadruped-walk", "humanoid-walk", "dog-walk"),
            # Table 1's budgets and uniform share, the rest of the budget to the factored categorical predictor; the
            # whole run on the grid (--discrete-steps {total}), as DQN is.
            (
                Variant(
                    "fig10_qmle",
                    "QMLE, factored categorical predictor (ρ_delta = 0)",
                    "qmle_dmc.py",
                    "--rho-uniform 0.9 --rho-delta 0 --rho-categorical 0.1 --discrete-steps {total}",
                ),
                Variant("fig10_dqn", "DQN (action-out, 3^D outputs, exact max)", "dqn_grid.py", ""),
            ),
            (
                Claim(
                    "where DQN is tractable, both reach similar final performance",
                    "fig10_qmle",
                    "fig10_dqn",
                    "similar",
                    "last episodes",
                ),
                Claim(
                    "QMLE is the more sample-efficient (the paper credits its action-in network's generalisation)",
                    "fig10_qmle",
                    "fig10_dqn",
                    "better",
                    "whole run",
                ),
            ),
            "Appendix D.3, Fig. 10",
        ),
        Figure(
            12,
            "Curriculum: the bang-off-bang grid first, then the continuous box",
            ("cartpole-swingup", "walker-walk"),
            ("cartpole-swingup", "finger-spin", "hopper-hop", "cheetah-run", "walker-walk"),
            (
                Variant(
                    "fig12_curriculum",
                    "grid for the first half, then continuous",
                    "qmle_dmc.py",
                    "--discrete-steps {half}",
                ),
                Variant("fig12_continuous", "continuous throughout", "qmle_dmc.py", ""),
                Variant("fig12_discrete", "grid throughout", "qmle_dmc.py", "--discrete-steps {total}"),
            ),
            # The paper shows the switch as a capability (a preliminary experiment), not as a gain.
            (
                Claim(
                    "QMLE can move from the grid to the continuous box without losing what it learned: the curriculum "
                    "ends no lower than continuous-only",
                    "fig12_curriculum",
                    "fig12_continuous",
                    "not worse",
                    "last episodes",
                ),
            ),
            "Appendix E.3, Fig. 12",
        ),
    ]
}


@dataclass
class Selection:
    figures: List[int] = field(default_factory=lambda: sorted(FIGURES))
    """figures by the paper's number"""


@dataclass
class Grid(Selection):
    env_ids: List[str] = field(default_factory=list)
    """tasks (default: each figure's tasks at this machine's scale, or the paper's with --paper-tasks)"""
    paper_tasks: bool = False
    """each figure's tasks in the paper, up to dog-walk (days of compute per run on a CPU)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds of every variant and task"""
    total_timesteps: int = 100_000
    """environment steps per run"""


@dataclass
class Listing(Selection):
    """Each figure's variants with their flags, its tasks here and in the paper, and the claims it tests."""


@dataclass
class Run(Grid):
    """Train every variant of the figures on their tasks, --jobs runs at a time; logs in runs/logs/."""

    jobs: int = 2
    """runs at a time"""
    pin_cores: bool = False
    """pin run i to core i mod cores with taskset (Linux)"""
    runs_dir: str = "runs"
    """where the training runs write"""


@dataclass
class Print(Grid):
    """Print the training commands, one per line (for a cluster scheduler)."""


@dataclass
class Report(Selection):
    """Per figure: fig{N}.md (table, per-run values, verdicts), fig{N}.png and fig{N}.csv, from the runs and the
    figure's saved curves."""

    runs_dir: str = "runs"
    """where the training runs wrote (a task and seed found there wins over the figure's saved curves)"""
    curves_dir: str = OUTPUT_DIR
    """where each figure's saved curves, fig{N}.csv, are read from"""
    output_dir: Optional[str] = None
    """where the figures' pages, plots and curves go (default: a new folder {runs-dir}/ablations__{time})"""
    overwrite: bool = False
    """replace files there that git tracks (the committed pages); without it they are refused"""
    bootstrap_reps: int = learning.Report.bootstrap_reps
    """resamples of the bootstrap confidence intervals (rliable)"""
    last_episodes: int = 10
    """episodes averaged at the end of each run (the 'last episodes' column)"""
    min_steps: int = 0
    """leave out runs that have not reached this many steps (e.g. runs still going)"""


Mode = Union[
    Annotated[Listing, tyro.conf.subcommand("list")],
    Annotated[Run, tyro.conf.subcommand("run")],
    Annotated[Print, tyro.conf.subcommand("print")],
    Annotated[Report, tyro.conf.subcommand("report")],
]


def check(args) -> None:
    unknown = [n for n in args.figures if n not in FIGURES]
    if unknown:
        learning.fail(f"--figures: no figure {unknown[0]}; the ablations are figures {', '.join(map(str, FIGURES))}")
    for name in ("total_timesteps", "jobs", "last_episodes", "bootstrap_reps"):
        if getattr(args, name, 1) < 1:
            learning.fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "env_ids", None) and getattr(args, "paper_tasks", False):
        learning.fail("--env-ids and --paper-tasks both name the tasks; give one")


def tasks(figure: Figure, args: Grid) -> Tuple[str, ...]:
    return tuple(args.env_ids) or (figure.paper_tasks if args.paper_tasks else figure.tasks)


def flags_of(variant: Variant, total_timesteps: int) -> str:
    return variant.flags.format(total=total_timesteps, half=total_timesteps // 2)


def planned(args: Grid) -> List[Tuple[List[str], str]]:
    """(command, log) of every run of the selected figures: variants x tasks x seeds."""
    runs = []
    for number in args.figures:
        for variant in FIGURES[number].variants:
            grid = learning.Grid(
                env_ids=list(tasks(FIGURES[number], args)),
                seeds=args.seeds,
                total_timesteps=args.total_timesteps,
                script=variant.script,
                exp_name=variant.exp_name,
                extra=flags_of(variant, args.total_timesteps),
            )
            runs += [(cmd, learning.log_name(variant.exp_name, cmd)) for cmd in learning.commands(grid)]
    return runs


def costs(runs: List[Tuple[List[str], str]]) -> List[str]:
    """What makes some of the planned runs far slower than a default run of qmle_dmc.py, said before they start."""
    exps = {log.split("__")[0] for _, log in runs}
    dqn_tasks = {log.split("__")[1] for _, log in runs if log.startswith("fig10_dqn__")}
    warnings = []
    if "fig9_m1000" in exps:
        warnings.append(
            "fig9_m1000 searches 1000 candidates per replayed state, 10 times the default target budget: "
            "a 100k-step run takes 1.5-2 hours alone on a 2-core CPU (13-18 steps/s against about 100 "
            "for a default run); two at a time, one per core (--pin-cores), walker-walk ran at 10-11 "
            "steps/s, nearly 3 hours each"
        )
    if dqn_tasks & {"quadruped-walk", "humanoid-walk", "dog-walk"}:
        warnings.append(
            "dqn_grid.py runs quadruped-walk (3^12 outputs) at about 1 step/s on a CPU and refuses "
            "humanoid-walk and dog-walk where their heads do not fit (docs/dqn_grid.md)"
        )
    return warnings


def verdict(claim: Claim, first: List[float], second: List[float]) -> Tuple[str, float, float]:
    """'held', 'did not hold' or 'cannot be told apart at this scale', from the difference of the two variants'
    means and its standard error (each variant's over its seeds, added in quadrature); two standard errors decide.
    Returns the verdict, the difference and its standard error."""
    sem = lambda v: np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else math.inf  # noqa: E731
    diff, se = float(np.mean(first) - np.mean(second)), float(math.hypot(sem(first), sem(second)))
    if min(len(first), len(second)) < 2:  # one seed has no spread to judge a difference by
        outcome = "cannot be told apart at this scale"
    elif claim.relation == "similar":  # not a proof of equality: no difference beyond the seeds' spread
        outcome = "held (no difference beyond two standard errors)" if abs(diff) <= 2 * se else "did not hold"
    elif claim.relation == "not worse":
        outcome = "held (not behind by more than two standard errors)" if diff >= -2 * se else "did not hold"
    else:
        outcome = (
            "held" if diff > 2 * se else "did not hold" if diff < -2 * se else "cannot be told apart at this scale"
        )
    return outcome, diff, se


def run_values(points: list, steps: int, last_episodes: int) -> dict:
    """One run's mean returns by column, judged over its first `steps` steps."""
    return {
        "whole run": learning.window_mean(points, 0, steps),
        "first half": learning.window_mean(points, 0, steps / 2),
        "second half": learning.window_mean(points, steps / 2, steps),
        "last episodes": float(np.mean([r for s, r in points if s <= steps][-last_episodes:])),
    }


def report_figure(figure: Figure, args: Report) -> str:
    """Write fig{N}.csv and fig{N}.png with the learning report and fig{N}.md with the table and the verdicts into
    args.output_dir; return the page's text ('' when no variant has a finished run)."""
    saved = os.path.join(args.curves_dir, f"fig{figure.number}.csv")
    names, labels = [v.exp_name for v in figure.variants], [f"{v.exp_name}={v.label}" for v in figure.variants]
    if not os.path.isfile(saved) and not any(
        learning.read_metric(args.runs_dir, n, "charts/episodic_return") for n in names
    ):
        return ""
    scratch = os.path.join(args.output_dir, f".fig{figure.number}")
    with contextlib.redirect_stdout(io.StringIO()):  # its tables are not this page's: one bootstrap resample will do
        learning.report(
            learning.Report(
                exp_names=names,
                runs_dir=args.runs_dir,
                labels=labels,
                release_curves=[],
                curves=[saved] if os.path.isfile(saved) else [],
                output_dir=scratch,
                last_episodes=args.last_episodes,
                min_steps=args.min_steps,
                bootstrap_reps=1,
            )
        )
    curves = learning.read_curves(os.path.join(scratch, "learning_curves.csv"))
    os.replace(os.path.join(scratch, "learning_curves.csv"), os.path.join(args.output_dir, f"fig{figure.number}.csv"))
    os.replace(os.path.join(scratch, "learning_curves.png"), os.path.join(args.output_dir, f"fig{figure.number}.png"))
    os.rmdir(scratch)

    columns = ["whole run", "first half", "second half", "last episodes"]
    lines = [
        f"# Fig. {figure.number}: {figure.title}",
        "",
        f"The paper: {figure.source}. Returns are each run's mean training episodic return over the window (the "
        f"last episodes: its last {args.last_episodes}), then mean ± standard error over seeds; every variant of a "
        "task is judged over the same steps.",
        "",
        f"| task | variant | seeds | steps | {' | '.join(columns)} |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    per_run, interval_rows, cuts, values = [], [], [], {}
    label = {v.exp_name: v.label for v in figure.variants}
    env_ids = sorted({env for runs in curves.values() for env, _ in runs})
    for env_id in env_ids:
        # every variant of a task judged over the same steps, those of its shortest run; the longer ones cut, said so
        ends = {
            (name, seed): pts[-1][0]
            for name, runs in curves.items()
            for (env, seed), pts in runs.items()
            if env == env_id
        }
        steps = min(ends.values())
        cut = [f"{label[name]}, seed {seed} (at {end})" for (name, seed), end in ends.items() if end > steps]
        if cut:
            cuts.append(f"- {env_id}: up to step {steps}, where its shortest run ends; cut there: {'; '.join(cut)}.")
        for name in names:
            runs = {
                seed: pts
                for (env, seed), pts in sorted(curves.get(name, {}).items(), key=learning.by_run)
                if env == env_id
            }
            if not runs:
                continue
            table = {seed: run_values(pts, steps, args.last_episodes) for seed, pts in runs.items()}
            values[(env_id, name)] = {c: [t[c] for t in table.values()] for c in columns}
            lines.append(
                f"| {env_id} | {label[name]} | {len(runs)} | {steps} | "
                + " | ".join(learning.summary(values[(env_id, name)][c]) for c in columns)
                + " |"
            )
            per_run.append(
                f"| {env_id} | {label[name]} | "
                + "; ".join(f"{seed}: " + ", ".join(f"{t[c]:.1f}" for c in columns) for seed, t in table.items())
                + " |"
            )
            found = learning.intervals([values[(env_id, name)][c] for c in columns], args.bootstrap_reps)
            interval_rows += [
                f"| {env_id} | {label[name]} | {c} | {mean} | {iqm} |" for c, (mean, iqm) in zip(columns, found)
            ]
    if cuts:
        lines += ["", "Runs cut to their task's shortest:", "", *cuts]
    lines += [
        "",
        f"95% confidence intervals over the seeds: rliable's percentile stratified bootstrap "
        f"({args.bootstrap_reps} resamples) of the mean and of the interquartile mean (IQM), as Agarwal et al. "
        "recommend (NeurIPS 2021); with few seeds they are narrow.",
        "",
        "| task | variant | returns over | mean [95% CI] | IQM [95% CI] |",
        "|---|---|---|---|---|",
        *interval_rows,
    ]
    lines += [
        "",
        "Per run (seed: " + ", ".join(columns) + "):",
        "",
        "| task | variant | runs |",
        "|---|---|---|",
        *per_run,
        "",
        "## The paper's claims at this scale",
        "",
    ]
    for claim in figure.claims:
        for env_id in env_ids:
            if (env_id, claim.first) not in values or (env_id, claim.second) not in values:
                continue
            first, second = values[(env_id, claim.first)][claim.column], values[(env_id, claim.second)][claim.column]
            outcome, diff, se = verdict(claim, first, second)
            if outcome == "did not hold" and claim.relation == "similar":  # say which way they differ
                outcome += f", {label[claim.first] if diff > 0 else label[claim.second]} higher"
            lone = [label[n] for n, v in ((claim.first, first), (claim.second, second)) if len(v) < 2]
            basis = (
                f"one seed of {' and of '.join(lone)}, no spread to judge a difference of {diff:+.1f} by"
                if lone
                else f"difference {diff:+.1f} ± {se:.1f}, two standard errors decide"
            )
            lines.append(
                f"- {env_id}, {claim.column}: {claim.text}: **{outcome}** ({label[claim.first]} "
                f"{learning.summary(first)} against {label[claim.second]} {learning.summary(second)}; "
                f"{basis})."
            )
    lines += ["", f"![Fig. {figure.number}](fig{figure.number}.png)", ""]
    text = "\n".join(lines)
    with open(os.path.join(args.output_dir, f"fig{figure.number}.md"), "w") as f:
        f.write(text)
    return text


def main(args) -> None:
    check(args)
    if isinstance(args, Listing):
        for number in args.figures:
            figure = FIGURES[number]
            print(
                f"Fig. {number} ({figure.source}): {figure.title}\n  tasks here: {' '.join(figure.tasks)}\n"
                f"  the paper's: {' '.join(figure.paper_tasks)}"
            )
            for v in figure.variants:
                print(f"  {v.exp_name:<18} {v.script} {flags_of(v, 100_000)}   ({v.label})")
            for c in figure.claims:
                print(f"  claim ({c.column}): {c.text}")
    elif isinstance(args, Print):
        print("\n".join(shlex.join(cmd) for cmd, _ in planned(args)))
    elif isinstance(args, Run):
        runs = planned(args)
        print(f"{len(runs)} runs of {args.total_timesteps} steps, {args.jobs} at a time", flush=True)
        for warning in costs(runs):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        if learning.launch(
            [cmd for cmd, _ in runs],
            [os.path.join(args.runs_dir, "logs", log) for _, log in runs],
            args.jobs,
            args.pin_cores,
            args.runs_dir,
        ):
            raise SystemExit(1)  # some runs failed (named above): a script or cluster job waiting on this must see it
    else:
        args.output_dir = args.output_dir or os.path.join(args.runs_dir, f"ablations__{int(time.time())}")
        learning.refuse_tracked(
            [os.path.join(args.output_dir, f"fig{n}.{ext}") for n in args.figures for ext in ("md", "png", "csv")],
            args.overwrite,
        )
        os.makedirs(args.output_dir, exist_ok=True)
        for number in args.figures:
            text = report_figure(FIGURES[number], args)
            print(text or f"Fig. {number}: no finished runs in {args.runs_dir} or {args.curves_dir}; left out\n")


if __name__ == "__main__":
    main(tyro.cli(Mode))
