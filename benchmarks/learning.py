"""Learning results of the agent scripts: expand env ids x seeds into training commands, run or print them, and
report each experiment's returns (over the whole run, its halves and its last episodes) against the authors'
release, with a learning-curve plot.

    # 3 seeds of two tasks locally, two runs at a time (each run writes runs/{run_name}/metrics.csv)
    python benchmarks/learning.py run --env-ids cartpole-swingup walker-walk --seeds 1 2 3 --jobs 2
    # the same grid as commands, one per line, for a cluster scheduler (or see benchmarks/sweep.yaml for W&B)
    python benchmarks/learning.py print --script aql_discrete.py --env-ids humanoid-walk --seeds 1 2 3
    # tables (markdown) + curves CSV + plot from what the runs wrote, against docs/qmle_release/curves.csv, into a
    # new folder runs/report__{time} (--output-dir names another; a committed file is replaced only with --overwrite)
    python benchmarks/learning.py report --exp-names qmle_dmc
    # the floor: returns of uniformly random actions (10 episodes per seed)
    python benchmarks/learning.py random --env-ids cartpole-swingup walker-walk

Each mode has its own --help. Extra flags go to every training command as one string:
--extra "--target-network-frequency 2000" (or --extra="...").
"""

import csv
import glob
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Annotated, List, Optional, Union

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_CURVES = os.path.join(ROOT, "docs", "qmle_release", "curves.csv")
# One colour per system in every figure, whatever its experiment is called: SYSTEMS lists the names under which
# an experiment is that system at its defaults (a full match; `qmle_n1...`: --num-envs 1 is the default).
# Any other experiment, a variant, takes the next free colour of the figure, and so does a second experiment of a
# system already shown (two runs of the defaults from different times): no two lines of a figure share a colour.
COLOURS = {
    "release": "black",
    "qmle_dmc": "C0",
    "qtopt_cem": "C1",
    "aql": "C2",
    "uniformql": "C3",
    "wolpertinger": "C4",
    "random": "grey",
}
SYSTEMS = {
    "release": r"release",
    "qmle_dmc": r"qmle_dmc|qmle_n1(?!\d).*",
    "qtopt_cem": r"qtopt_cem",
    "aql": r"aql|aql_discrete|aql_amortisation",
    "uniformql": r"uniformql",
    "wolpertinger": r"wolpertinger",
    "random": r"random",
}
FREE_COLOURS = ["C5", "C6", "C8", "C9", "C7"]


def colours_of(names: list) -> dict:
    """{experiment: colour}: its system's colour for the first experiment of that system, the next free colour
    for a variant or a later experiment of a system already shown (in the order given)."""
    owner = {}  # the first experiment of each system shown wears that system's colour
    for name in names:
        system = next((s for s, pattern in SYSTEMS.items() if re.fullmatch(pattern, name)), None)
        if system and COLOURS[system] not in owner.values():
            owner[name] = COLOURS[system]
    shown = set(owner.values())  # then the colours of systems this figure does not show
    free = itertools.cycle([c for c in FREE_COLOURS + list(COLOURS.values()) if c not in shown | {"black", "grey"}])
    return {name: owner[name] if name in owner else next(free) for name in names}


@dataclass
class Grid:
    env_ids: List[str] = field(default_factory=lambda: ["cartpole-swingup", "walker-walk"])
    """tasks of the grid"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds of the grid"""
    total_timesteps: int = 100_000
    """environment steps per run"""
    script: str = "qmle_dmc.py"
    """the training script, relative to the repository (a frozen copy elsewhere keeps long queues safe from
    edits to the working tree)"""
    exp_name: Optional[str] = None
    """experiment name given to the runs (default: the script's name)"""
    extra: str = ""
    """further flags of the training script for every run, as one string"""


@dataclass
class Run(Grid):
    """Train the grid locally, --jobs runs at a time, each logging to runs/logs/{exp}__{env}__{seed}.log."""

    jobs: int = 2
    """runs at a time (on one GPU, each run allocates GPU memory as it needs it instead of most of it up front)"""
    pin_cores: bool = False
    """pin run i to core i mod cores with taskset, so parallel runs do not fight over caches (Linux)"""
    runs_dir: str = "runs"
    """where the training runs write"""


@dataclass
class Print(Grid):
    """Print the grid's training commands, one per line (for a cluster scheduler)."""


@dataclass
class Report:
    """Markdown tables, learning_curves.csv and learning_curves.png from runs/*/metrics.csv (and saved curves)."""

    exp_names: List[str] = field(default_factory=lambda: ["qmle_dmc"])
    """experiments to report, each the group of runs named runs/{env}__{exp}__{seed}__{time}"""
    runs_dir: str = "runs"
    """where the training runs wrote"""
    curves: List[str] = field(default_factory=list)
    """learning_curves.csv files of earlier reports to read experiments from as well (runs/ wins for a task and
    seed both hold; their other runs are kept)"""
    labels: List[str] = field(default_factory=list)
    """EXP=LABEL: what the tables and legends call an experiment (e.g. "uniformql=UniformQL (N = 0, M = 500)")"""
    release_curves: List[str] = field(default_factory=lambda: [RELEASE_CURVES])
    """the authors' release curves (env_id, seed, step, episodic_return) to compare against, one file or several
    (their runs merged; a task and seed in two files is taken from the later); none given = no release"""
    output_dir: Optional[str] = None
    """where learning_curves.csv and learning_curves.png go (default: a new folder {runs-dir}/report__{time})"""
    overwrite: bool = False
    """replace files there that git tracks (a committed figure); without it they are refused"""
    last_episodes: int = 10
    """episodes averaged at the end of each run"""
    min_steps: int = 0
    """leave out runs that have not reached this many steps (e.g. runs still going)"""
    windows: List[str] = field(default_factory=list)
    """further step windows START-END (e.g. 20000-60000) to average each run's returns over"""
    metrics: List[str] = field(default_factory=list)
    """further logged columns (e.g. charts/amortisation_gap) to average over each run's last --last-episodes
    logged values"""
    reach: List[str] = field(default_factory=list)
    """bars as ENV_ID=RETURN (e.g. Pendulum-v1=-200): per run, the first step at which the mean of the last
    --last-episodes episodes reaches the bar"""
    bootstrap_reps: int = 2000
    """resamples of the bootstrap confidence intervals (rliable)"""


@dataclass
class Random:
    """The floor that "it learns" is judged against: the mean return of uniformly random actions."""

    env_ids: List[str] = field(default_factory=lambda: ["cartpole-swingup", "walker-walk"])
    """tasks"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds, each its own environment"""
    episodes: int = 10
    """episodes per task and seed"""


Mode = Union[
    Annotated[Run, tyro.conf.subcommand("run")],
    Annotated[Print, tyro.conf.subcommand("print")],
    Annotated[Report, tyro.conf.subcommand("report")],
    Annotated[Random, tyro.conf.subcommand("random")],
]


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def check(args) -> None:
    for name in ("total_timesteps", "jobs", "last_episodes", "episodes", "bootstrap_reps"):
        if getattr(args, name, 1) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for option, items, numbers in (
        ("--reach", getattr(args, "reach", []), 1),
        ("--windows", getattr(args, "windows", []), 2),
    ):
        for item in items:
            parts = item.rsplit("=", 1)[1:] if option == "--reach" else item.split("-")
            try:
                values = [float(p) for p in parts]
            except ValueError:
                values = []
            if len(values) != numbers or not all(map(math.isfinite, values)):
                fail(
                    f"{option} {item!r}: expected {'ENV_ID=RETURN' if numbers == 1 else 'START-END'} with finite "
                    "numbers"
                )
    for label in getattr(args, "labels", []):
        if "=" not in label:
            fail(f"--labels {label!r}: expected EXP=LABEL")
    for option in ("curves", "release_curves"):
        for path in getattr(args, option, []):
            if not os.path.isfile(path):
                fail(f"--{option.replace('_', '-')}: no such file: {path}")
    if isinstance(args, Grid) and not os.path.isfile(os.path.join(ROOT, args.script)):
        fail(f"--script: no such file: {args.script}")
    for option in ("env_ids", "seeds"):  # an empty list is a grid of no runs: nothing to print or run
        if getattr(args, option, [None]) == []:
            fail(f"--{option.replace('_', '-')} was given no values")
    if isinstance(args, Grid):  # what every one of its runs would refuse, refused once, before any starts
        check_runs(args.env_ids, args.script, extra_flags(args))
    elif isinstance(args, Random):
        check_runs(args.env_ids)


GRID_FLAGS = ("--env-id", "--seed", "--total-timesteps", "--exp-name")  # what commands() sets for each run


def extra_flags(args: Grid) -> List[str]:
    """--extra's flags, refusing those the grid sets itself: given again they would win over the grid's (every seed
    the same seed)."""
    try:
        flags = shlex.split(args.extra)
    except ValueError as error:
        fail(f"--extra {args.extra!r}: {error}")
    for flag in flags:
        if flag.partition("=")[0].replace("_", "-") in GRID_FLAGS:
            fail(
                f"--extra {args.extra!r}: {flag.partition('=')[0]} is set by the grid for each run (--env-ids, "
                "--seeds, --total-timesteps, --exp-name)"
            )
    return flags


# Run in a child Python, as each run would: the ids looked up as the scripts' make_env does (a DeepMind Control task
# domain-task, or a Gymnasium id, with shimmy's dm_control/* ids registered), printed with the nearest known id of
# each unknown one; then, if all are known, the training script's own Args parses --extra's flags as its __main__
# does, so that tyro refuses here, once, what every run would. A child because importing dm_control and the script
# loads JAX and the renderer MUJOCO_GL names, and this process's environment is what its runs inherit.
CHECK_RUNS = """
import difflib, importlib.util, json, os, sys
import gymnasium as gym
import shimmy
from dm_control import suite

env_ids, script, flags = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dmc = [f"{domain}-{task}" for domain, task in suite.ALL_TASKS]
unknown = [i for i in env_ids
           if (f"dm_control/{i}-v0" if tuple(i.split("-", 1)) in suite.ALL_TASKS else i) not in gym.registry]
print(json.dumps({i: (difflib.get_close_matches(i, dmc + list(gym.registry), 1) or [None])[0] for i in unknown}))
sys.stdout.flush()
if flags and not unknown:
    import tyro
    spec = importlib.util.spec_from_file_location("training_script", script)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tyro.cli(module.Args, args=flags, prog=os.path.basename(script))
"""


def check_runs(env_ids: List[str], script: str = "", flags: List[str] = ()) -> None:
    """Refuse ids that are neither a DeepMind Control task nor a Gymnasium id, with the nearest known id, and flags
    the training script refuses (tyro's message, status 2). Whether a known id suits the script (Box or discrete
    actions) its runs still check."""
    command = [sys.executable, "-c", CHECK_RUNS, json.dumps(env_ids), os.path.join(ROOT, script), json.dumps(flags)]
    child = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, MUJOCO_GL="disable"))
    try:
        unknown = json.loads(child.stdout.splitlines()[0])
    except (IndexError, ValueError):  # no gymnasium or dm_control here (a login node): the runs check their own
        unknown = None
    if unknown:
        fail(
            "unknown --env-ids "
            + ", ".join(f"{i!r}" + (f" (did you mean {near!r}?)" if near else "") for i, near in unknown.items())
            + "; DeepMind Control tasks are domain-task (walker-walk), else a Gymnasium id (Pendulum-v1)"
        )
    if child.returncode == 2 and unknown == {}:  # tyro's refusal
        print(f"{script} refuses --extra {shlex.join(flags)!r}:", file=sys.stderr)
        sys.stderr.write(child.stderr)
        raise SystemExit(2)
    if child.returncode != 0:  # the ids or the script do not import here: each run checks its own
        last = (child.stderr.strip().splitlines() or ["(nothing said)"])[-1]
        checked = "--extra" if unknown == {} else "--env-ids" + " and --extra" * bool(flags)
        print(f"note: {checked} not checked here ({last}); each run checks its own", file=sys.stderr)


def exp_name(args: Grid) -> str:
    return args.exp_name or os.path.basename(args.script)[: -len(".py")]


def commands(args: Grid) -> List[List[str]]:
    return [
        [
            sys.executable,
            os.path.join(ROOT, args.script),
            "--env-id",
            env_id,
            "--seed",
            str(seed),
            "--total-timesteps",
            str(args.total_timesteps),
            "--exp-name",
            exp_name(args),
            *shlex.split(args.extra),
        ]
        for env_id in args.env_ids
        for seed in args.seeds
    ]


def log_name(exp: str, cmd: List[str]) -> str:
    """{exp}__{env_id}__{seed}.log: where a training command's console goes, under runs/logs/ (a namespaced
    id's "/" as "-", as the scripts name their run folders)."""
    env_name = cmd[cmd.index("--env-id") + 1].replace("/", "-")
    return f"{exp}__{env_name}__{cmd[cmd.index('--seed') + 1]}.log"


def run(args: Run) -> None:
    cmds = commands(args)
    failed = launch(
        cmds,
        [os.path.join(args.runs_dir, "logs", log_name(exp_name(args), cmd)) for cmd in cmds],
        args.jobs,
        args.pin_cores,
        args.runs_dir,
    )
    if failed:  # after the summary, so that a script or a cluster job waiting on this runner sees it
        raise SystemExit(1)


def launch(cmds: List[List[str]], logs: List[str], jobs: int, pin_cores: bool, runs_dir: str) -> int:
    """Run the commands, `jobs` at a time, each writing its console to its log, from runs_dir's parent folder.
    Returns how many failed."""
    todo, running, cores = list(enumerate(zip(cmds, logs))), [], os.cpu_count() or 1
    os.makedirs(os.path.join(runs_dir, "logs"), exist_ok=True)
    # Runs that share one GPU must not each take most of its memory up front (JAX's default).
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false") if jobs > 1 else None
    started = []
    while todo or running:
        running = [p for p in running if p.poll() is None]
        while todo and len(running) < jobs:
            i, (cmd, log) = todo.pop(0)
            cmd = ["taskset", "-c", str(i % cores), *cmd] if pin_cores else cmd
            print(f"starting ({log}): {shlex.join(cmd)}", flush=True)
            running.append(
                subprocess.Popen(
                    cmd,
                    stdout=open(log, "w"),
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=os.path.dirname(os.path.abspath(runs_dir)),
                )
            )
            started.append((running[-1], log))
        time.sleep(1)
    failed = [(p.returncode, log) for p, log in started if p.returncode != 0]
    for code, log in failed:  # a refused or crashed run is said at the end, not only in its log
        last = (open(log).read().strip().splitlines() or ["(nothing written)"])[-1]
        print(f"failed (exit status {code}), {log}: {last}", flush=True)
    print(f"{len(started) - len(failed)} of {len(started)} runs finished", flush=True)
    return len(failed)


def read_metric(runs_dir: str, exp: str, column: str) -> dict:
    """{(env_id, run): [(step, value), ...]} of one logged column from runs/{env}__{exp}__{seed}__{time}/,
    rows where it is empty skipped. A run is its seed, or "seed (time)" when the seed ran more than once."""
    paths = sorted(glob.glob(os.path.join(runs_dir, f"*__{exp}__*__*", "metrics.csv")))
    names = [os.path.basename(os.path.dirname(p)).split("__") for p in paths]
    runs_per_seed = Counter((env_id, seed) for env_id, _, seed, _ in names)
    series = {}
    for path, (env_id, _, seed, stamp) in zip(paths, names):
        rows = [r for r in csv.DictReader(open(path)) if r.get(column)]
        run_id = f"{seed} ({stamp})" if runs_per_seed[(env_id, seed)] > 1 else seed
        series[(env_id, run_id)] = [(int(r["global_step"]), float(r[column])) for r in rows]
    return series


def by_run(item) -> tuple:
    """Sort key of ((env_id, run), value) items: the task, then the seed as a number (10 after 9), then the time."""
    (env_id, run_id), _ = item
    seed, _, stamp = str(run_id).partition(" ")
    return env_id, int(seed), stamp


def read_curves(path: str) -> dict:
    """{exp_name: {(env_id, run): [(step, return), ...]}} of a learning_curves.csv or the release's curves.csv."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in csv.DictReader(open(path)):
        groups[r.get("exp_name", "release")][(r["env_id"], r["seed"])].append(
            (int(r["step"]), float(r["episodic_return"]))
        )
    return {name: dict(curves) for name, curves in groups.items()}


def first_reach(points: list, bar: float, window: int) -> Optional[int]:
    """The step of the first episode whose window of the last `window` episodes averages at least `bar`."""
    returns = [r for _, r in points]
    for i in range(window - 1, len(points)):
        if np.mean(returns[i - window + 1 : i + 1]) >= bar:
            return points[i][0]
    return None


def window_mean(points: list, start: float, end: float) -> float:
    """Mean return of the episodes that ended in (start, end]; nan if the run has not reached `end`."""
    inside = [r for s, r in points if start < s <= end]
    return float(np.mean(inside)) if inside and points[-1][0] >= end else float("nan")


def summary(values: list) -> str:
    """mean ± standard error over runs, as the tables print it."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return f"{np.mean(values):.1f}" if values else "-"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1) / np.sqrt(len(values)):.1f}"


def intervals(columns: list, reps: int) -> list:
    """Per column of the runs' values: ("mean [low, high]", "IQM [low, high]"), rliable's 95% percentile
    stratified-bootstrap confidence intervals over the runs (each column a stratum; IQM: the mean of the middle
    half of the runs); "-" for a column with a run's value missing or fewer than 2 runs. Agarwal et al., "Deep
    reinforcement learning at the edge of the statistical precipice", NeurIPS 2021."""
    from rliable import library

    scores = np.array(columns).T  # runs x columns
    whole = [j for j in range(scores.shape[1]) if not np.isnan(scores[:, j]).any()] if len(scores) > 1 else []
    texts = [("-", "-")] * len(columns)
    if whole:
        np.random.seed(0)  # rliable resamples with numpy's global generator: the same intervals at every report
        # rliable's aggregate_mean and aggregate_iqm (scipy's trim_mean) of each column, all columns in one call
        cut = len(scores) // 4
        middle = lambda x: np.partition(x, (cut, len(x) - cut - 1), axis=0)[cut : len(x) - cut]
        aggregate = lambda x: np.concatenate([x.mean(axis=0), middle(x).mean(axis=0)])
        point, interval = library.get_interval_estimates({"runs": scores[:, whole]}, aggregate, reps=reps)
        found = [f"{p:.1f} [{low:.1f}, {high:.1f}]" for p, low, high in zip(point["runs"], *interval["runs"])]
        for i, j in enumerate(whole):
            texts[j] = (found[i], found[len(whole) + i])
    return texts


def seeds_text(counts: set) -> str:
    """How many seeds a legend entry's curves average, over the panels it appears in."""
    if counts == {1}:
        return "1 seed, no band"
    return f"{min(counts)} seeds" if len(counts) == 1 else f"{min(counts)}–{max(counts)} seeds"


def mean_per_step(points: list) -> tuple:
    """A run's curve: each step at which episodes ended, with the mean return of those episodes (with --num-envs N,
    several end at one step; np.interp needs each step once)."""
    steps, at = np.unique([s for s, _ in points], return_inverse=True)
    return steps, np.bincount(at, weights=[r for _, r in points]) / np.bincount(at)


def tracked(path: str) -> bool:
    """Whether git tracks the file (a committed figure or table)."""
    command = ["git", "ls-files", "--error-unmatch", os.path.basename(path)]
    try:
        return subprocess.run(command, cwd=os.path.dirname(os.path.abspath(path)), capture_output=True).returncode == 0
    except OSError:  # no such folder, or no git
        return False


def refuse_tracked(paths: List[str], overwrite: bool) -> None:
    for path in paths:
        if not overwrite and tracked(path):
            fail(f"{path} is committed (git tracks it): --overwrite replaces it, or name another --output-dir")


def report(args: Report) -> None:
    try:
        import rliable  # noqa: F401  (the confidence intervals)
    except ImportError:
        fail("report needs rliable for its confidence intervals: pip install -r benchmarks/requirements.txt")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = dict(item.split("=", 1) for item in args.labels)
    label = lambda name: labels.get(name, "authors' release (PyTorch)" if name == "release" else name)  # noqa: E731
    groups = {}
    for path in args.curves:
        groups.update({k: v for k, v in read_curves(path).items() if k in args.exp_names})
    for name in args.exp_names:
        # runs/ wins run by run: a task and seed it holds replaces the saved curve, saved runs of others stay
        ran = read_metric(args.runs_dir, name, "charts/episodic_return")
        ran_seeds = {(env_id, run.split()[0]) for env_id, run in ran}  # a run is "seed" or "seed (time)"
        groups[name] = {
            **{
                (env_id, run): points
                for (env_id, run), points in groups.get(name, {}).items()
                if (env_id, run.split()[0]) not in ran_seeds
            },
            **ran,
        }
    release = {}
    for path in args.release_curves:
        release.update(read_curves(path).get("release", {}))
    if release:
        groups = {"release": release, **groups}
    for name, curves in groups.items():
        for (env_id, run_id), points in list(curves.items()):
            if not points or points[-1][0] < args.min_steps:
                print(
                    f"note: {name} on {env_id}, run {run_id}, is at step {points[-1][0] if points else 0}"
                    f"{' (no finished episode)' if not points else ''}; left out"
                )
                del curves[(env_id, run_id)]
            elif " (" in str(run_id):
                print(f"note: {name} on {env_id}: seed {run_id.split()[0]} ran more than once; each run is reported")

    env_ids = sorted({env for name in args.exp_names for env, _ in groups.get(name, {})})  # release-only left out
    if not env_ids:  # before anything is written: a mistyped name must not replace a saved learning_curves.csv
        fail(
            f"no finished episode of {' '.join(args.exp_names)} in {args.runs_dir}/"
            + (f" or {' '.join(args.curves)}" if args.curves else "")
            + (f" from a run that reached step {args.min_steps}" if args.min_steps else "")
            + "; nothing written"
        )
    output_dir = args.output_dir or os.path.join(args.runs_dir, f"report__{int(time.time())}")
    refuse_tracked([os.path.join(output_dir, f"learning_curves.{ext}") for ext in ("csv", "png")], args.overwrite)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "learning_curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["exp_name", "env_id", "seed", "step", "episodic_return"])
        for name, curves in groups.items():
            for (env_id, run_id), points in sorted(curves.items(), key=by_run):
                writer.writerows([name, env_id, run_id, s, r] for s, r in points)

    windows = [tuple(float(x) for x in w.split("-")) for w in args.windows]
    last = args.last_episodes
    headers = [
        "whole run",
        "first half",
        "second half",
        *(f"{int(a) // 1000}k-{int(b) // 1000}k" for a, b in windows),
        f"last {last} episodes",
    ]
    print(
        "Mean return per run (mean ± standard error over runs; per-run values below the table). The runs of a "
        "task and system are compared up to the step their shortest run reached: longer runs are cut there "
        "(column cut: the run and its own end), and so are the curves.\n"
    )
    print(f"| task | system | runs | up to step | cut | {' | '.join(headers)} | last {last} vs release |")
    print("|---|---|---|---|---|" + "---|" * (len(headers) + 1))
    per_run_lines, interval_lines, release_last = [], [], {}
    for env_id in env_ids:
        for name in ["release", *args.exp_names]:
            runs = {
                run_id: pts for (env, run_id), pts in sorted(groups.get(name, {}).items(), key=by_run) if env == env_id
            }
            if not runs:
                continue
            ends = {run_id: pts[-1][0] for run_id, pts in runs.items()}
            steps = min(ends.values())  # every run judged over the same steps
            cut = {run_id: end for run_id, end in ends.items() if end > steps}
            columns = [
                [window_mean(pts, 0, steps) for pts in runs.values()],
                [window_mean(pts, 0, steps / 2) for pts in runs.values()],
                [window_mean(pts, steps / 2, steps) for pts in runs.values()],
                *([window_mean(pts, a, b) for pts in runs.values()] for a, b in windows),
                [float(np.mean([r for s, r in pts if s <= steps][-last:])) for pts in runs.values()],
            ]
            mean_last = float(np.mean(columns[-1]))
            release_last.setdefault(env_id, mean_last if name == "release" else None)
            ratio = f"{mean_last / release_last[env_id]:.0%}" if release_last[env_id] else "-"
            print(
                f"| {env_id} | {label(name)} | {len(runs)} | {steps} | "
                + (", ".join(f"{run_id} ({end})" for run_id, end in cut.items()) or "none")
                + " | "
                + " | ".join(summary(c) for c in columns)
                + f" | {ratio} |"
            )
            for header, column in zip(headers, columns):
                per_run_lines.append(
                    f"| {env_id} | {label(name)} | {header} | "
                    + ", ".join(f"{run_id}: {v:.1f}" for run_id, v in zip(runs, column))
                    + " |"
                )
            if cut:  # what each run reached at its own end
                own = [float(np.mean([r for _, r in pts][-last:])) for pts in runs.values()]
                per_run_lines.append(
                    f"| {env_id} | {label(name)} | last {last} episodes at each run's own end | "
                    + ", ".join(f"{run_id} (at {ends[run_id]}): {v:.1f}" for run_id, v in zip(runs, own))
                    + " |"
                )
            interval_lines += [
                f"| {env_id} | {label(name)} | {len(runs)} | {header} | {mean} | {iqm} |"
                for header, (mean, iqm) in zip(headers, intervals(columns, args.bootstrap_reps))
            ]
    print("\n| task | system | returns over | per run |\n|---|---|---|---|\n" + "\n".join(per_run_lines))
    print(
        "\nThe same columns with 95% confidence intervals over the runs: rliable's percentile stratified bootstrap "
        f"({args.bootstrap_reps} resamples) of the mean and of the interquartile mean (IQM: the mean of the middle "
        "half of the runs), as Agarwal et al. recommend (NeurIPS 2021). With few runs these intervals are narrow "
        "(a bootstrap cannot see beyond the runs it has).\n"
    )
    print(
        "| task | system | runs | returns over | mean [95% CI] | IQM [95% CI] |\n|---|---|---|---|---|---|\n"
        + "\n".join(interval_lines)
    )

    for metric in args.metrics:
        for name in args.exp_names:
            for (env_id, run_id), values in sorted(read_metric(args.runs_dir, name, metric).items(), key=by_run):
                if values:
                    logged = [v for _, v in values[-last:]]
                    print(
                        f"| {env_id} | {name} | seed {run_id} | {metric}, last {len(logged)} logged values "
                        f"(steps {values[-len(logged)][0]}-{values[-1][0]}) | {np.mean(logged):.4f} |"
                    )
    for bar in args.reach:
        env_id, value = bar.rsplit("=", 1)
        for name in args.exp_names:
            firsts = {
                run_id: first_reach(pts, float(value), last)
                for (env, run_id), pts in sorted(groups.get(name, {}).items(), key=by_run)
                if env == env_id
            }
            print(
                f"| {env_id} | {name} | last-{last} mean >= {value} first at step | "
                + ", ".join(f"{run_id}: {'never' if s is None else s}" for run_id, s in firsts.items())
                + " |"
            )

    colours, seeds = colours_of(list(groups)), defaultdict(set)
    fig, axes = plt.subplots(1, len(env_ids), figsize=(5 * len(env_ids), 3.8), squeeze=False)
    for ax, env_id in zip(axes[0], env_ids):
        for name, curves in groups.items():
            runs = [mean_per_step(pts) for (env, _), pts in curves.items() if env == env_id]
            if not runs:
                continue
            # every 1000 steps, from the first at which every run has ended an episode to the end of the shortest
            grid = np.arange(1000, min(steps[-1] for steps, _ in runs) + 1, 1000)
            grid = grid[grid >= max(steps[0] for steps, _ in runs)]
            values = np.array([np.interp(grid, steps, returns) for steps, returns in runs])
            mean = values.mean(0)
            sem = values.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
            ax.plot(grid, mean, color=colours[name], label=label(name), marker="o" if len(grid) == 1 else None)
            ax.fill_between(grid, mean - sem, mean + sem, color=colours[name], alpha=0.2, linewidth=0)
            seeds[name].add(len(runs))
        ax.set(title=env_id, xlabel="environment steps", ylabel="episodic return (training)")
    # One legend for all panels, below them: each entry a line over its band, with the seeds it averages.
    names = [name for name in groups if seeds[name]]
    fig.legend(
        [(Patch(color=colours[n], alpha=0.2, linewidth=0), plt.Line2D([], [], color=colours[n])) for n in names],
        [f"{label(n)} ({seeds_text(seeds[n])})" for n in names],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=max(1, min(len(names), len(env_ids))),
        fontsize=8,
        frameon=False,
        title_fontsize=8,
        title="line: mean over seeds; shaded band: ±1 standard error of that mean over the seeds",
    )
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "learning_curves.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)  # a process that reports many times keeps no figure
    print(f"\nwrote {output_dir}/learning_curves.csv and learning_curves.png")


def random_returns(args: Random) -> dict:
    """Mean return of uniformly random actions over `episodes` episodes per seed, per task."""
    os.environ.setdefault("MUJOCO_GL", "disable")  # no rendering, and none to find
    import gymnasium as gym
    import shimmy  # noqa: F401  (registers the dm_control/* ids)
    from dm_control import suite

    means = {}
    for env_id in args.env_ids:
        returns = []
        for seed in args.seeds:
            env = gym.make(f"dm_control/{env_id}-v0" if tuple(env_id.split("-", 1)) in suite.ALL_TASKS else env_id)
            env.action_space.seed(seed)
            env.reset(seed=seed)
            for _ in range(args.episodes):
                done, total = False, 0.0
                while not done:
                    _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                    done, total = terminated or truncated, total + float(reward)
                returns.append(total)
                env.reset()
        means[env_id] = float(np.mean(returns))
        print(f"| {env_id} | uniformly random actions | {len(returns)} episodes | {means[env_id]:.1f} |")
    return means


def main(args) -> None:
    check(args)
    if isinstance(args, Print):
        print("\n".join(shlex.join(c) for c in commands(args)))
    elif isinstance(args, Run):
        run(args)
    elif isinstance(args, Random):
        random_returns(args)
    else:
        report(args)


def joined_extra(argv: List[str]) -> List[str]:
    """`--extra VALUE` as `--extra=VALUE`: tyro would read a VALUE that starts with -- as a flag of its own."""
    joined = []
    for arg in argv:
        if joined and joined[-1] == "--extra":
            joined[-1] = f"--extra={arg}"
        else:
            joined.append(arg)
    return joined


if __name__ == "__main__":
    main(tyro.cli(Mode, args=joined_extra(sys.argv[1:])))
