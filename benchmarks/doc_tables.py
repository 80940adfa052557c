"""The documentation's tables of measurements, rendered from the committed files they summarise: each table's rows
are what its JSON or CSV says, so that a table cannot drift from its measurements (tests/test_benchmarks.py checks
every one of them).

    python benchmarks/doc_tables.py            # name each table whose rows differ from its measurements
    python benchmarks/doc_tables.py --write    # rewrite those rows in place (headers and text stay as written)
"""

import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASH = "—"


def load(*path: str):
    return json.load(open(os.path.join(ROOT, "docs", *path)))["results"]


def cells(*values) -> str:
    return "| " + " | ".join(str(v) for v in values) + " |"


def signed(x: float, digits: int = 2) -> str:  # a typographic minus, as the docs write it
    return f"{x:.{digits}f}".replace("-", "−")


def curves(folder: str) -> dict:
    """(env_id, exp_name, seed) -> [(step, return)] of one docs folder's learning_curves.csv."""
    runs = {}
    for r in csv.DictReader(open(os.path.join(ROOT, "docs", folder, "learning_curves.csv"))):
        key = (r["env_id"], r["exp_name"], int(r["seed"]))
        runs.setdefault(key, []).append((int(r["step"]), float(r["episodic_return"])))
    return runs


def mean_and_error(runs: dict, env_id: str, exp_name: str, seeds, window) -> str:
    """Each run's mean return over the episodes ending in (start, end] (or its last 10 episodes), then the mean over
    the seeds ± its standard error."""
    means = []
    for seed in seeds:
        episodes = runs[env_id, exp_name, seed]
        returns = (
            [r for _, r in episodes[-10:]]
            if window == "last 10"
            else [r for s, r in episodes if window[0] < s <= window[1]]
        )
        means.append(sum(returns) / len(returns))
    mean = sum(means) / len(means)
    error = (sum((m - mean) ** 2 for m in means) / (len(means) - 1) / len(means)) ** 0.5
    return f"{mean:.1f} ± {error:.1f}"


def gpu_rows() -> list:
    """docs/gpu.md: one environment from the 4000-step run (speed_n1), 16 from the first run (its 2000-step loops at
    one environment end before a steady rate can be read); aql_discrete's dog-walk at 1, which the lease cut short,
    from the first run's parts alone."""
    first = [
        r for name in ("speed_qmle_walker", "speed_qmle_dog", "speed_others") for r in load("speed_gpu", f"{name}.json")
    ]
    measured = {(r["agent"], r["env_id"], 16): r for r in first if r.get("num_envs") == 16}
    measured.update({(r["agent"], r["env_id"], 1): r for r in load("speed_gpu", "speed_n1.json")})
    rows = []
    for agent in ("qmle_dmc", "qtopt_cem", "aql_discrete"):
        for env_id in ("walker-walk", "dog-walk"):
            for n in (1, 16):
                r = measured.get((agent, env_id, n))
                if r is None:
                    (r,) = [r for r in first if (r["agent"], r.get("env_id"), r.get("num_envs")) == (agent, env_id, n)]
                parts = [r[k] for k in ("physics_ms_per_step", "greedy_action_ms_per_step", "update_ms_per_step")]
                steady = r["sps_after_compile"] is not None
                ms = ", ".join([*(signed(p) for p in parts), signed(r["rest_ms_per_step"]) if steady else DASH])
                sps, fraction = (
                    (f"{r['sps_after_compile']:,.0f}", f"{r['fraction_of_flop_bound']:#.2g}")
                    if steady
                    else (DASH, DASH)
                )
                rows.append(cells(f"{agent}.py", env_id, n, sps, f"{r['physics_sps']:,.0f}", ms, fraction))
    return rows


RELEASE, OURS = "authors' release", "`qmle_dmc.py` (defaults)"


def avx512_100k_rows() -> list:
    """docs/qmle_dmc.md: the whole 100k on the AVX-512 machine, the release's 5 seeds beside all of ours and our first
    five."""
    runs, rows = curves("avx512_100k"), []
    windows = [(0, 100_000), (0, 50_000), (50_000, 100_000), (20_000, 60_000), (0, 30_000), "last 10"]
    for env_id, seeds in (("walker-walk", 20), ("cartpole-swingup", 10)):
        for label, exp_name, n in (
            (RELEASE, "release", 5),
            (f"{OURS}, AVX-512 machine", "avx512_100k", seeds),
            ("the same, seeds 1–5", "avx512_100k", 5),
        ):
            summary = [mean_and_error(runs, env_id, exp_name, range(1, n + 1), window) for window in windows]
            rows.append(cells(env_id, label, n, *summary))
    return rows


def by_machine_rows() -> list:
    """docs/qmle_dmc.md: walker-walk on each kind of machine, the runs to 60k on the AVX2 machines (both programs)
    and the release's seeds 1-5 beside the AVX-512 runs."""
    rows = []
    for machine, label, folder, exp_name, first, last in (
        ("AVX2", f"{RELEASE}, seeds 6–9", "walker_60k", "release", 6, 9),
        ("AVX2", f"{OURS}, seeds 1–13", "walker_60k", "rel_paperloss", 1, 13),
        ("AVX-512 or as fast", f"{RELEASE}, seeds 1–5", "avx512_100k", "release", 1, 5),
        ("AVX-512", f"{OURS}, seeds 1–20", "avx512_100k", "avx512_100k", 1, 20),
    ):
        seeds, runs = range(first, last + 1), curves(folder)
        windows = [mean_and_error(runs, "walker-walk", exp_name, seeds, w) for w in ((0, 30_000), (20_000, 60_000))]
        rows.append(cells(machine, label, len(seeds), *windows))
    return rows


def kernels_rows() -> list:
    """docs/qmle_dmc.md: the loop against its two jitted calls alone (speed_cpu_avx512_kernels.json)."""
    rows = []
    for r in load("speed_cpu_avx512_kernels.json"):
        n, bound = r["num_envs"], r["flop_bound_sps"]
        kernels = 1e3 / (r["greedy_action_ms"] / n + r["update_ms"] / math.lcm(n, 10))
        ratios = (r["sps_after_compile"] / bound, kernels / bound, r["sps_after_compile"] / kernels)
        rows.append(
            cells(
                r["env_id"],
                n,
                round(r["sps_after_compile"]),
                round(bound),
                f"{ratios[0]:.2f}",
                round(kernels),
                *(f"{x:.2f}" for x in ratios[1:]),
                f"{r['flop_and_physics_bound_sps'] / bound:.2f}",
            )
        )
    return rows


def cpu_bounds_rows() -> list:
    """docs/qmle_dmc.md: FLOP-bound fractions with and without the physics, on two cores and on one."""
    rows = []
    for name, cores in (("speed_cpu_avx512_bounds.json", 2), ("speed_cpu_avx512_one_core.json", 1)):
        for r in load(name):
            physics = r["flop_and_physics_bound_sps"]
            rows.append(
                cells(
                    r["env_id"],
                    cores,
                    r["num_envs"],
                    round(r["sps_after_compile"]),
                    round(r["flop_bound_sps"]),
                    f"{r['fraction_of_flop_bound']:.2f}",
                    round(physics),
                    f"{r['fraction_of_flop_and_physics_bound']:.2f}",
                    f"{physics / r['flop_bound_sps']:.2f}",
                )
            )
    return rows


@dataclass(frozen=True)
class Table:
    doc: str  # under docs/
    marker: str  # the text that comes before the table: the first table after it is this one
    rows: Callable[[], list]


TABLES = {
    "gpu": Table("gpu.md", "## Measured on an NVIDIA H200", gpu_rows),
    "avx512_100k": Table("qmle_dmc.md", "**The whole 100k on that machine", avx512_100k_rows),
    "by_machine": Table("qmle_dmc.md", "#### Each program on its own kind of machine", by_machine_rows),
    "kernels": Table("qmle_dmc.md", "**The kernels' own rate.**", kernels_rows),
    "cpu_bounds": Table("qmle_dmc.md", "**Counting the physics, and one core against two.**", cpu_bounds_rows),
}


def committed(table: Table) -> tuple:
    """(the doc's text, where the table's rows begin and end in it, the rows): the first table after the marker,
    its header and rule left out."""
    text = open(os.path.join(ROOT, "docs", table.doc)).read()
    start = text.index("\n|", text.index(table.marker)) + 1
    end = text.find("\n\n", start)
    end = len(text) if end < 0 else end
    lines = text[start:end].split("\n")
    begin = start + len(lines[0]) + len(lines[1]) + 2
    return text, begin, end, lines[2:]


@dataclass
class Args:
    write: bool = False  # rewrite the rows that differ from their measurements (headers and text stay as written)


def main(args: Args) -> int:
    differ = 0
    for name, table in TABLES.items():
        text, begin, end, rows = committed(table)
        if rows == table.rows():
            continue
        differ += 1
        if args.write:
            with open(os.path.join(ROOT, "docs", table.doc), "w") as f:
                f.write(text[:begin] + "\n".join(table.rows()) + text[end:])
        print(f"{name} (docs/{table.doc}): {'rewritten' if args.write else 'differs from its measurements'}")
    return differ and not args.write


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
