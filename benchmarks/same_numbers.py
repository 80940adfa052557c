"""Do two versions of an agent compute the same run? Trains the working tree's script and the same script at an
earlier commit with the same flags on this machine, then continues both from their checkpoints, and compares their
metrics.csv value for value (the wall-clock column charts/SPS aside).

    python benchmarks/same_numbers.py --against 9947e49 --agents qmle_dmc aql_discrete

Scripts before e2aa604 restarted the environments at a resume (their checkpoints held no environment): against
them, the rows agree up to the resume only, which the comparison says.
"""

import csv
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A short run with updates, evaluations and a checkpoint, then a resume to `total`: (flags, steps first, total).
RUNS = {
    "qmle_dmc": (["--env-id", "walker-walk"], 2000, 3000),
    "qtopt_cem": (["--env-id", "walker-walk"], 2000, 3000),
    "aql_discrete": (["--env-id", "walker-walk", "--learning-starts", "500"], 1500, 2000),
    "wolpertinger": (["--env-id", "Pendulum-v1", "--learning-starts", "500"], 2000, 3000),
    "dqn_grid": (["--env-id", "walker-walk"], 2000, 3000),
}


@dataclass
class Args:
    against: str  # the commit whose scripts are the reference
    agents: List[str] = field(default_factory=lambda: list(RUNS))  # which agents to compare


def train(script: str, folder: str, flags: list, first: int, total: int) -> list:
    """The rows of metrics.csv of a run of `first` steps continued from its checkpoint to `total`."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(folder, "xla"), MUJOCO_GL="disable")
    common = ["--seed", "3", "--eval-frequency", "1000", "--log-frequency", "250", "--checkpoint-frequency", "1000"]
    for extra in (["--total-timesteps", str(first), *flags], None):
        if extra is None:
            (run,) = os.listdir(os.path.join(folder, "runs"))
            extra = ["--resume", os.path.join("runs", run), "--total-timesteps", str(total)]
        done = subprocess.run(
            [sys.executable, script, *common, *extra], cwd=folder, env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"error: {script} {' '.join(extra)} failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(folder, "runs", run, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k != "charts/SPS"} for row in csv.DictReader(f)]


def main(args: Args) -> int:
    differ = 0
    for agent in args.agents:
        flags, first, total = RUNS[agent]
        with tempfile.TemporaryDirectory() as old, tempfile.TemporaryDirectory() as new:
            with open(os.path.join(old, f"{agent}.py"), "w") as f:
                f.write(subprocess.check_output(["git", "show", f"{args.against}:{agent}.py"], cwd=ROOT, text=True))
            reference = train(os.path.join(old, f"{agent}.py"), old, flags, first, total)
            ours = train(os.path.join(ROOT, f"{agent}.py"), new, flags, first, total)
        same = reference == ours
        differ += not same
        values = sum(len([v for v in row.values() if v]) for row in ours)
        print(f"{agent}: {len(ours)} rows, {values} values, {'identical' if same else 'DIFFERENT'} to {args.against}'s")
        before = [[r for r in rows if int(r["global_step"]) <= first] for rows in (reference, ours)]
        if not same and before[0] == before[1]:
            print(f"  identical up to the resume at step {first}, {len(before[1])} rows")
        if not same:
            for i, (a, b) in enumerate(zip(reference, ours)):
                if a != b:
                    print(f"  first difference, row {i}: {args.against}: {a}\n  working tree: {b}")
                    break
            else:
                print(f"  rows: {len(reference)} against {len(ours)}")
    return differ


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
