"""qmle_dmc.py at 12, 21 and 38 action dimensions: long runs against a uniformly random policy and the public curves
of other methods (docs/high_dim/). Three steps, each writing into --output-dir (docs/high_dim by default):

    python benchmarks/high_dim.py random                          # random.csv: >= 10 random episodes per task
    python benchmarks/high_dim.py anchors --source CURVES_CSV   # anchors.csv, once, from the dmc-anchors collection
    python benchmarks/high_dim.py report --runs ~/longruns/*/runs/*   # the curves, README's tables, a figure a task

A lost run's committed rows stand until its restart from scratch passes them; until then the restart's own episodes
and evaluations are in restarts.csv.
"""

import csv
import glob
import json
import os
import sys
from dataclasses import dataclass, field
from typing import List, Union

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["dog-walk", "humanoid-walk", "quadruped-run"]
ANCHORS = ["SAC (tdmpc2 repo)", "TD7", "TD-MPC2", "MR.Q", "BRO (UTD=2)", "SimbaV2 (UTD=1)"]  # the methods
CHECKPOINTS = [100_000, 250_000, 500_000, 1_000_000]


@dataclass
class Random:
    """Returns of uniformly random actions (each task's floor), episode by episode."""

    env_ids: List[str] = field(default_factory=lambda: list(TASKS))  # tasks
    seeds: List[int] = field(default_factory=lambda: [1, 2])  # one environment each
    episodes: int = 5  # episodes per seed
    output_dir: str = os.path.join(ROOT, "docs", "high_dim")  # where random.csv goes


@dataclass
class Anchors:
    """Copy the plotted methods' public evaluation curves on these tasks, source column included."""

    source: str  # the anchors' curves.csv (method, env_id, seed, step, episodic_return, source)
    output_dir: str = os.path.join(ROOT, "docs", "high_dim")  # where anchors.csv goes


@dataclass
class Report:
    """The runs' curves as CSV, their tables (in README.md) and one figure per task beside the floor and the anchors."""

    runs: List[str]  # run folders of qmle_dmc.py (each with metrics.csv and checkpoint.npz)
    output_dir: str = os.path.join(ROOT, "docs", "high_dim")  # where the CSVs, README.md and the figures are
    cpu: str = ""  # the machine the runs ran on, for the table's steps/s column


def fail(message: str):
    raise SystemExit(f"error: {message}")


def random_returns(args: Random) -> None:
    os.environ.setdefault("MUJOCO_GL", "disable")
    sys.path.insert(0, ROOT)
    import qmle_dmc

    rows = []
    for env_id in args.env_ids:
        for seed in args.seeds:
            env = qmle_dmc.make_env(env_id, seed)
            env.reset(seed=seed)
            for episode in range(args.episodes):
                done = False
                while not done:
                    _, _, terminated, truncated, info = env.step(env.action_space.sample())
                    done = terminated or truncated
                rows.append(dict(env_id=env_id, seed=seed, episode=episode, episodic_return=info["episode"]["r"]))
                env.reset()
            print(env_id, seed, np.mean([r["episodic_return"] for r in rows if r["env_id"] == env_id]))
    write(os.path.join(args.output_dir, "random.csv"), rows)


def copy_anchors(args: Anchors) -> None:
    with open(args.source) as f:
        rows = [r for r in csv.DictReader(f) if r["method"] in ANCHORS and r["env_id"] in TASKS]
    if not rows:
        fail(f"--source {args.source} holds none of {ANCHORS} on {TASKS}")
    write(os.path.join(args.output_dir, "anchors.csv"), rows)


def write(path: str, rows: list) -> None:
    if not rows:
        return print(f"nothing to write to {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows)")


def read(path: str) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_rows(run_dir: str) -> tuple:
    """(training episodes, greedy evaluations, steps/s after compilation) of one run, from its metrics.csv."""
    env_id, exp_name, seed, _ = os.path.basename(run_dir.rstrip("/")).split("__")
    episodes, evaluations, sps = [], [], []
    for row in read(os.path.join(run_dir, "metrics.csv")):
        step = int(row["global_step"])
        common = dict(exp_name=exp_name, env_id=env_id, seed=int(seed), step=step)
        if row["charts/episodic_return"]:
            episodes.append(dict(common, episodic_return=float(row["charts/episodic_return"])))
        if row["eval/episodic_return"]:
            evaluations.append(dict(common, episodic_return=float(row["eval/episodic_return"])))
        if row["charts/SPS"] and step > 2000:  # past the compilations
            sps.append(float(row["charts/SPS"]))
    return episodes, evaluations, sps


def value_rows(run_dir: str, window: int = 100_000, tail: int = 500) -> list:
    """Per `window` steps of a run of one environment, from its metrics.csv and its checkpoint's replay buffer: its
    training return there, the mean Q of replayed actions and the TD loss its updates logged there, and the mean
    discounted return of the transitions the buffer held at the window's end (those that replays drew from), each
    from its step to its episode's end (steps within `tail` of the end, and episodes that did not end, such as one
    cut short by a resume, are left out). Windows whose buffer the checkpoint no longer holds whole are skipped."""
    paths = [os.path.join(run_dir, "checkpoint.npz"), os.path.join(run_dir, "checkpoint", "state.npz")]  # now, 9947e49
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        return []
    with np.load(path) as f:
        meta, stored = json.loads(str(f["__meta__"])), f["['buffer'].storage['reward']"]
        size, cursor = int(f["['buffer'].size"]), int(f["['buffer'].cursor"])
    settings, capacity = meta["args"], len(stored)
    if settings["num_envs"] != 1:  # one environment's transitions are stored in the order they happened
        return []
    rewards = np.roll(stored, -cursor) if size == capacity else stored[:size]  # oldest first
    last = meta["global_step"] - meta["global_step"] % settings["train_frequency"]  # the rest still pending
    first = last - size + 1  # global step after the oldest stored transition
    rows = read(os.path.join(run_dir, "metrics.csv"))
    returns = np.full(size, np.nan)
    for r in rows:  # each episode that ended by the checkpoint: (end - length, end]
        end = int(r["global_step"])
        if r["charts/episodic_return"] and end <= last:
            ahead = 0.0
            for step in range(end, max(end - int(float(r["charts/episodic_length"])), first - 1), -1):
                ahead = float(rewards[step - first]) + settings["gamma"] * ahead
                returns[step - first] = ahead if end - step >= tail else np.nan
    env_id, _, seed, _ = os.path.basename(run_dir.rstrip("/")).split("__")
    steps, out = np.arange(first, last + 1), []
    for end in range(window, last + 1, window):
        if max(end - capacity, 0) < first - 1:  # part of what the buffer held then is overwritten
            continue
        there = [r for r in rows if end - window < int(r["global_step"]) <= end]
        held = returns[(steps > end - capacity) & (steps <= end)]
        out.append(
            dict(
                env_id=env_id,
                seed=int(seed),
                step=end,
                episodic_return=column_mean(there, "charts/episodic_return"),
                discounted_return=float(np.nanmean(held)),
                q_values=column_mean(there, "losses/q_values"),
                td_loss=column_mean(there, "losses/td_loss"),
            )
        )
    return out


def column_mean(rows: list, column: str) -> float:
    return float(np.mean([float(r[column]) for r in rows if r[column]]))


def values_table(rows: list) -> str:
    lines = [
        "| task, seed | step | training return | discounted return | logged Q | Q / discounted return | TD loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["env_id"], int(r["seed"]), int(r["step"]))):
        q, g = float(r["q_values"]), float(r["discounted_return"])
        cells = [f"{int(r['step']) // 1000}k", f"{float(r['episodic_return']):.1f}", f"{g:.2f}", f"{q:.2f}"]
        cells += [f"{q / g:.1f}" if g > 0 else "–", f"{float(r['td_loss']):.3f}"]
        lines.append(f"| {r['env_id']}, {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def window_means(episodes: list, end: int, last: int = 10) -> tuple:
    """(mean of the last `last` episodes ending by `end`, mean of every episode ending by `end`) of one run."""
    returns = [float(r["episodic_return"]) for r in episodes if int(r["step"]) <= end]
    return (np.mean(returns[-last:]), np.mean(returns)) if returns else (np.nan, np.nan)


def mean_se(values) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "–"
    se = np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
    return f"{np.mean(values):.1f}" + (f" ± {se:.1f}" if np.isfinite(se) else "") + f" ({len(values)})"


def table(episodes: list, runs: list, floor: dict) -> str:
    """Per task: each checkpoint's last-10-episode and whole-run means over the seeds that reached it."""
    lines = [
        "| task | seeds: steps reached | steps/s (machine) | random policy | "
        + " | ".join(f"{c // 1000}k: last 10; whole run" for c in CHECKPOINTS)
        + " |",
        "|---|---|---|---|" + "---|" * len(CHECKPOINTS),
    ]
    for env_id in sorted({r["env_id"] for r in runs}):
        own = sorted((r for r in runs if r["env_id"] == env_id), key=lambda r: int(r["seed"]))
        cells = []
        for end in CHECKPOINTS:
            done = [int(r["seed"]) for r in own if int(r["reached"]) >= end]
            means = [
                window_means([e for e in episodes if (e["env_id"], int(e["seed"])) == (env_id, s)], end) for s in done
            ]
            cells.append(f"{mean_se([m[0] for m in means])}; {mean_se([m[1] for m in means])}" if done else "–")
        restarts = lambda r: f" (restarted: {int(r['restarted']) // 1000}k)" if r.get("restarted") else ""  # noqa: E731
        reached = ", ".join(f"{r['seed']}: {int(r['reached']) // 1000}k{restarts(r)}" for r in own)
        cpus = sorted({r["cpu"] for r in own})  # each run's rate, grouped by the machine that ran it
        rates = "; ".join(", ".join(f"{float(r['sps']):.0f}" for r in own if r["cpu"] == c) + f" ({c})" for c in cpus)
        lines.append(f"| {env_id} | {reached} | {rates} | {floor[env_id]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def standing(evaluations: list, anchors: list, floor: dict) -> str:
    """Per task, at every 100k steps a run has evaluated at: the seeds' greedy evaluations (mean, ± standard error,
    seed count), the random policy, and each public method's evaluation at the same environment step (mean over
    its seeds that have one there)."""
    lines = [
        "| task, step | QMLE (seeds) | random | " + " | ".join(ANCHORS) + " |",
        "|---|---|---|" + "---|" * len(ANCHORS),
    ]
    for env_id in sorted({r["env_id"] for r in evaluations}):
        own = [r for r in evaluations if r["env_id"] == env_id]
        for step in sorted({int(r["step"]) for r in own if int(r["step"]) % 100_000 == 0}):
            by_seed = {r["seed"]: float(r["episodic_return"]) for r in own if int(r["step"]) == step}  # its last
            ours = mean_se(list(by_seed.values()))
            public = []
            for method in ANCHORS:
                there = [
                    float(r["episodic_return"])
                    for r in anchors
                    if (r["method"], r["env_id"], int(float(r["step"]))) == (method, env_id, step)
                ]
                public.append(f"{np.mean(there):.1f}" if there else "–")
            lines.append(f"| {env_id}, {step // 1000}k | {ours} | {floor[env_id]:.1f} | " + " | ".join(public) + " |")
    return "\n".join(lines) + "\n"


def figure(env_id: str, episodes: list, evaluations: list, floor: float, anchors: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, rows, title in ((train_ax, episodes, "training episodes"), (eval_ax, evaluations, "greedy evaluations")):
        for seed in sorted({r["seed"] for r in rows}):
            own = [r for r in rows if r["seed"] == seed]
            ax.plot(
                [r["step"] for r in own],
                [r["episodic_return"] for r in own],
                lw=0.8,
                alpha=0.6,
                label=f"QMLE seed {seed}",
            )
        ax.axhline(floor, color="k", ls=":", label=f"uniformly random ({floor:.1f})")
        ax.set(title=f"{env_id}: {title}", xlabel="environment steps")
    by_method = {}
    for r in anchors:
        by_method.setdefault(r["method"], []).append(r)
    for method, rows in sorted(by_method.items()):
        grid = np.unique([int(float(r["step"])) for r in rows])
        curves = []
        for seed in {r["seed"] for r in rows}:
            own = sorted((int(float(r["step"])), float(r["episodic_return"])) for r in rows if r["seed"] == seed)
            xs, ys = zip(*own)
            curves.append(np.where((grid >= xs[0]) & (grid <= xs[-1]), np.interp(grid, xs, ys), np.nan))
        eval_ax.plot(grid, np.nanmean(curves, axis=0), lw=1.2, ls="--", label=f"{method} ({len(curves)} seeds)")
    train_ax.set_ylabel("episodic return")
    eval_ax.set_xlim(0, max([r["step"] for r in evaluations + episodes] + [1]) * 1.05)
    eval_ax.legend(fontsize=7, loc="upper left")
    train_ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def report(args: Report) -> None:
    folders = sorted({d for pattern in args.runs for d in glob.glob(os.path.expanduser(pattern))})
    if not folders:
        fail(f"--runs {' '.join(args.runs)} names no run folder")
    out, episodes, evaluations, runs, values, restarts = args.output_dir, [], [], [], [], []
    committed = committed_runs(out)  # a lost machine's runs stand until their restarts pass them
    for run_dir in folders:
        (e, v, rates), q = run_rows(run_dir), value_rows(run_dir)
        if not q:
            print(f"note: {run_dir}: no Q values against returns (no checkpoint, or several environments)")
        run = dict(env_id=e[0]["env_id"], seed=e[0]["seed"], reached=e[-1]["step"], sps=np.median(rates), cpu=args.cpu)
        run["restarted"] = ""  # a lost run's row (below) gives the step its restart from scratch has reached
        e, v, q, run, own = lost_run_until_passed(committed.pop((run["env_id"], run["seed"]), None), e, v, q, run)
        for rows, new in zip((episodes, evaluations, values, runs, restarts), (e, v, q, [run], own)):
            rows.extend(new)
    for (env_id, seed), (e, v, q, run) in sorted(committed.items()):
        print(f"note: {env_id} seed {seed}: no run folder given; its committed rows (to step {run['reached']}) stand")
        for rows, new in zip((episodes, evaluations, values, runs), (e, v, q, [run])):
            rows.extend(new)
    for name, rows in (("learning_curves", episodes), ("evaluations", evaluations), ("runs", runs), ("values", values)):
        write(os.path.join(out, f"{name}.csv"), rows)
    if restarts:
        write(os.path.join(out, "restarts.csv"), restarts)
    elif os.path.exists(os.path.join(out, "restarts.csv")):  # every restart has passed its lost run
        os.remove(os.path.join(out, "restarts.csv"))
    with open(os.path.join(out, "README.md")) as f:
        text = f.read()
    anchors, floor = read(os.path.join(out, "anchors.csv")), random_floor(out)
    text = with_table(with_table(text, table(episodes, runs, floor)), values_table(values), "values")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(with_table(text, standing(evaluations, anchors, floor), "standing"))
    for env_id in sorted({r["env_id"] for r in runs}):
        reach = max(int(r["reached"]) for r in runs if r["env_id"] == env_id)
        figure(
            env_id,
            [r for r in episodes if r["env_id"] == env_id],
            [r for r in evaluations if r["env_id"] == env_id],
            floor[env_id],
            [r for r in anchors if r["env_id"] == env_id and float(r["step"]) <= 1.1 * reach],
            os.path.join(out, f"{env_id}.png"),
        )


def committed_runs(folder: str) -> dict:
    """{(env_id, seed): (episodes, evaluations, values, run row)} of the runs the CSVs in `folder` hold."""
    names = ("learning_curves", "evaluations", "values", "runs")
    if not all(os.path.exists(os.path.join(folder, f"{name}.csv")) for name in names):
        return {}
    tables = [read(os.path.join(folder, f"{name}.csv")) for name in names]
    for rows in tables[:2]:
        for r in rows:
            r.update(seed=int(r["seed"]), step=int(r["step"]), episodic_return=float(r["episodic_return"]))
    runs = {(r["env_id"], int(r["seed"])): dict(r, restarted=r.get("restarted", "")) for r in tables[3]}
    return {
        key: [[r for r in rows if (r["env_id"], int(r["seed"])) == key] for rows in tables[:3]] + [row]
        for key, row in runs.items()
    }


def lost_run_until_passed(old: list, episodes: list, evaluations: list, values: list, run: dict) -> tuple:
    """A run restarted from scratch after its machine was lost: until it passes the lost run's last step, the rows
    committed from the lost run (`old`, from committed_runs) stand, its runs.csv row saying how far the restart is,
    and the restart's own episodes and evaluations go to restarts.csv (the last of the five returned)."""
    if old is None or run["reached"] >= int(old[3]["reached"]):
        return episodes, evaluations, values, run, []
    same = next((i for i, (a, b) in enumerate(zip(episodes, old[0])) if a != b), min(len(episodes), len(old[0])))
    print(
        f"note: {run['env_id']} seed {run['seed']}: the committed rows to step {old[3]['reached']} stand; its restarted"
        f" run is at step {run['reached']}, its first {same} episodes equal to theirs"
    )
    own = [(r, "training") for r in episodes] + [(r, "evaluation") for r in evaluations]
    columns = ("exp_name", "env_id", "seed", "kind", "step", "episodic_return")
    own = [{c: kind if c == "kind" else r[c] for c in columns} for r, kind in own]
    return old[0], old[1], old[2], dict(old[3], restarted=run["reached"]), own


def random_floor(folder: str) -> dict:
    rows = read(os.path.join(folder, "random.csv"))
    return {
        t: np.mean([float(r["episodic_return"]) for r in rows if r["env_id"] == t]) for t in {r["env_id"] for r in rows}
    }


def with_table(text: str, table_text: str, name: str = "table") -> str:
    """README.md's text with the table between its two marker lines (<!-- name: begin/end -->) replaced."""
    begin = text.index("\n", text.index(f"<!-- {name}: begin")) + 1
    return text[:begin] + table_text + text[text.index(f"<!-- {name}: end -->") :]


if __name__ == "__main__":
    mode: Union[Random, Anchors, Report] = tyro.extras.subcommand_cli_from_dict(
        dict(random=Random, anchors=Anchors, report=Report)
    )
    dict(Random=random_returns, Anchors=copy_anchors, Report=report)[type(mode).__name__](mode)
