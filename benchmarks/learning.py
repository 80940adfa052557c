"""Learning results of qmle_dmc.py: expand env ids x seeds into training commands, run or print them, and
report the last-10-episode returns against the authors' release with a learning-curve plot.

    # run 3 seeds of two tasks locally, two runs at a time (each run writes runs/{run_name}/metrics.csv)
    python benchmarks/learning.py run --env-ids cartpole-swingup walker-walk --seeds 1 2 3 --jobs 2
    # the same grid as commands, one per line, for a cluster scheduler (or see benchmarks/sweep.yaml for W&B)
    python benchmarks/learning.py print --env-ids cartpole-swingup walker-walk --seeds 1 2 3
    # table (markdown) + curves CSV + plot from what the runs wrote, against ../shared/peers/qmle-release
    python benchmarks/learning.py report --exp-names qmle_dmc --output-dir docs
    # the floor: returns of uniformly random actions (10 episodes per seed)
    python benchmarks/learning.py random --env-ids cartpole-swingup walker-walk
Extra flags go to every training command as one string: --extra="--target-network-frequency 2000".
"""

import csv
import glob
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_CURVES = os.path.join(ROOT, "..", "shared", "peers", "qmle-release", "curves.csv")


@dataclass
class Args:
    mode: tyro.conf.Positional[Literal["run", "print", "report", "random"]]
    """run: train locally; print: emit the commands; report: table and plot from runs/; random: the returns of
    uniformly random actions, the floor that "it learns" is judged against"""
    env_ids: List[str] = field(default_factory=lambda: ["cartpole-swingup", "walker-walk"])
    """tasks of the grid"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds of the grid"""
    total_timesteps: int = 100_000
    """environment steps per run"""
    exp_name: str = "qmle_dmc"
    """experiment name given to the runs (run/print)"""
    script: str = os.path.join(ROOT, "qmle_dmc.py")
    """the training script (a frozen copy keeps long queues safe from edits to the working tree)"""
    extra: str = ""
    """further qmle_dmc.py flags for every run, as one string"""
    jobs: int = 2
    """runs at a time (run mode)"""
    pin_cores: bool = False
    """pin run i to core i mod cores with taskset, so parallel runs do not fight over caches (Linux)"""
    runs_dir: str = "runs"
    """where the training runs write (report mode reads it)"""
    exp_names: List[str] = field(default_factory=lambda: ["qmle_dmc"])
    """experiments to report, each a group of runs"""
    release_curves: str = RELEASE_CURVES
    """the authors' release curves (env_id, seed, step, episodic_return) to compare against"""
    output_dir: str = "docs"
    """report mode: where learning_curves.csv and learning_curves.png go"""
    last_episodes: int = 10
    """report mode: episodes averaged at the end of each run; random mode: episodes per task and seed"""
    metrics: List[str] = field(default_factory=list)
    """report mode: further logged columns (e.g. charts/amortisation_gap) to average over each run's last
    --last-episodes logged values"""
    reach: List[str] = field(default_factory=list)
    """report mode: bars as ENV_ID=RETURN (e.g. Pendulum-v1=-200): per run, the first step at which the mean
    of the last --last-episodes episodes reaches the bar"""


def commands(args: Args) -> List[List[str]]:
    return [[sys.executable, args.script, "--env-id", env_id, "--seed", str(seed), "--total-timesteps",
             str(args.total_timesteps), "--exp-name", args.exp_name, *shlex.split(args.extra)]
            for env_id in args.env_ids for seed in args.seeds]


def run(args: Args) -> None:
    todo, running, cores = list(enumerate(commands(args))), [], os.cpu_count() or 1
    os.makedirs(os.path.join(args.runs_dir, "logs"), exist_ok=True)
    while todo or running:
        running = [p for p in running if p.poll() is None]
        while todo and len(running) < args.jobs:
            i, cmd = todo.pop(0)
            cmd = ["taskset", "-c", str(i % cores), *cmd] if args.pin_cores else cmd
            log = os.path.join(args.runs_dir, "logs", f"{args.exp_name}__{cmd[cmd.index('--env-id') + 1]}__"
                               f"{cmd[cmd.index('--seed') + 1]}.log")
            print(f"starting ({log}): {shlex.join(cmd)}", flush=True)
            running.append(subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                            cwd=os.path.dirname(os.path.abspath(args.runs_dir))))
        time.sleep(5)


def read_runs(runs_dir: str, exp_name: str) -> dict:
    """{(env_id, seed): [(step, episodic_return), ...]} from runs/{env}__{exp}__{seed}__{time}/metrics.csv."""
    return read_metric(runs_dir, exp_name, "charts/episodic_return")


def read_metric(runs_dir: str, exp_name: str, column: str) -> dict:
    """{(env_id, seed): [(step, value), ...]} of one logged column, rows where it is empty skipped."""
    series = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, f"*__{exp_name}__*__*", "metrics.csv"))):
        env_id, _, seed, _ = os.path.basename(os.path.dirname(path)).split("__")
        rows = [r for r in csv.DictReader(open(path)) if r.get(column)]
        series[(env_id, int(seed))] = [(int(r["global_step"]), float(r[column])) for r in rows]
    return series


def read_release(path: str) -> dict:
    curves = defaultdict(list)
    for r in csv.DictReader(open(path)):
        curves[(r["env_id"], int(r["seed"]))].append((int(r["step"]), float(r["episodic_return"])))
    return dict(curves)


def first_reach(points: list, bar: float, window: int) -> Optional[int]:
    """The step of the first episode whose window of the last `window` episodes averages at least `bar`."""
    returns = [r for _, r in points]
    for i in range(window - 1, len(points)):
        if np.mean(returns[i - window + 1: i + 1]) >= bar:
            return points[i][0]
    return None


def report(args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {name: read_runs(args.runs_dir, name) for name in args.exp_names}
    groups["release"] = read_release(args.release_curves) if os.path.isfile(args.release_curves) else {}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "learning_curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["exp_name", "env_id", "seed", "step", "episodic_return"])
        for name, curves in groups.items():
            for (env_id, seed), points in sorted(curves.items()):
                writer.writerows([name, env_id, seed, s, r] for s, r in points)

    env_ids = sorted({env for name in args.exp_names for env, _ in groups[name]})  # release-only tasks left out
    print(f"| task | experiment | steps | last-{args.last_episodes}-episode return per seed | mean | vs release |")
    print("|---|---|---|---|---|---|")
    release_mean = {}
    for env_id in env_ids:
        for name in ["release", *args.exp_names]:
            finals = {seed: (pts[-1][0], np.mean([r for _, r in pts[-args.last_episodes:]]))
                      for (env, seed), pts in sorted(groups[name].items()) if env == env_id}
            if not finals:
                continue
            mean = float(np.mean([v for _, v in finals.values()]))
            release_mean.setdefault(env_id, mean if name == "release" else None)
            ratio = f"{mean / release_mean[env_id]:.0%}" if release_mean[env_id] else "-"
            per_seed = ", ".join(f"{seed}: {v:.1f}" for seed, (_, v) in finals.items())
            steps = min(s for s, _ in finals.values())
            print(f"| {env_id} | {name} | {steps} | {per_seed} | {mean:.1f} | {ratio} |")

    for metric in args.metrics:
        for name in args.exp_names:
            for (env_id, seed), values in sorted(read_metric(args.runs_dir, name, metric).items()):
                if values:
                    last = [v for _, v in values[-args.last_episodes:]]
                    print(f"| {env_id} | {name} | seed {seed} | {metric}, last {len(last)} logged values "
                          f"(steps {values[-len(last)][0]}-{values[-1][0]}) | {np.mean(last):.4f} |")
    for bar in args.reach:
        env_id, value = bar.rsplit("=", 1)
        for name in args.exp_names:
            firsts = {seed: first_reach(pts, float(value), args.last_episodes)
                      for (env, seed), pts in sorted(groups[name].items()) if env == env_id}
            print(f"| {env_id} | {name} | last-{args.last_episodes} mean >= {value} first at step | "
                  + ", ".join(f"{seed}: {'never' if step is None else step}" for seed, step in firsts.items()) + " |")

    fig, axes = plt.subplots(1, len(env_ids), figsize=(5 * len(env_ids), 3.6), squeeze=False)
    for ax, env_id in zip(axes[0], env_ids):
        for colour, (name, curves) in enumerate(groups.items()):  # one colour per experiment in every panel
            runs = [pts for (env, _), pts in curves.items() if env == env_id]
            if not runs:
                continue
            grid = np.arange(1000, min(pts[-1][0] for pts in runs) + 1, 1000)
            values = np.array([np.interp(grid, *zip(*pts)) for pts in runs])
            mean, sem = values.mean(0), values.std(0) / np.sqrt(len(runs))
            ax.plot(grid, mean, color=f"C{colour}", label=f"{name} ({len(runs)} seeds)")
            ax.fill_between(grid, mean - sem, mean + sem, color=f"C{colour}", alpha=0.25)
        ax.set(title=env_id, xlabel="environment steps", ylabel="episodic return")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "learning_curves.png"), dpi=110)
    print(f"wrote {args.output_dir}/learning_curves.csv and learning_curves.png")


def random_returns(args: Args) -> dict:
    """Mean return of uniformly random actions over `last_episodes` episodes per seed, per task."""
    sys.path.insert(0, ROOT)
    import qmle_dmc

    means = {}
    for env_id in args.env_ids:
        returns = []
        for seed in args.seeds:
            env = qmle_dmc.make_env(env_id, seed)
            env.reset(seed=seed)
            for _ in range(args.last_episodes):
                done = False
                while not done:
                    _, _, terminated, truncated, info = env.step(env.action_space.sample())
                    done = terminated or truncated
                returns.append(float(info["episode"]["r"]))
                env.reset()
        means[env_id] = float(np.mean(returns))
        print(f"| {env_id} | uniformly random actions | {len(returns)} episodes | {means[env_id]:.1f} |")
    return means


def main(args: Args) -> None:
    if args.mode == "print":
        print("\n".join(shlex.join(c) for c in commands(args)))
    elif args.mode == "run":
        run(args)
    elif args.mode == "random":
        random_returns(args)
    else:
        report(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
