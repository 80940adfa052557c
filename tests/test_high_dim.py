"""benchmarks/high_dim.py: the long runs' table against an independent computation, and the committed table against
the committed curves it was made from."""

import json
import os
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import high_dim  # noqa: E402

DOCS = os.path.join(ROOT, "docs", "high_dim")


def test_the_table_averages_each_seeds_last_ten_and_whole_run_up_to_each_checkpoint():
    # seed 1: one episode per 1000 steps to 260k, returning step / 1000; seed 2 the same plus 7, to 120k only
    episodes = [
        dict(env_id="dog-walk", seed=s, step=t, episodic_return=t / 1000 + 7 * (s == 2))
        for s, end in ((1, 260_000), (2, 120_000))
        for t in range(1000, end + 1, 1000)
    ]
    runs = [
        dict(env_id="dog-walk", seed=1, reached=260_000, sps=61.0, cpu="AVX2"),
        dict(env_id="dog-walk", seed=2, reached=120_000, sps=59.0, cpu="AVX2"),
    ]
    row = high_dim.table(episodes, runs, {"dog-walk": 3.25}).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["dog-walk", "1: 260k, 2: 120k", "61, 59 (AVX2)", "3.2"]  # seed by seed
    last10 = [np.mean(np.arange(91, 101)), np.mean(np.arange(91, 101)) + 7]  # at 100k: episodes 91..100
    whole = [np.mean(np.arange(1, 101)), np.mean(np.arange(1, 101)) + 7]
    se = lambda v: np.std(v, ddof=1) / np.sqrt(2)  # noqa: E731
    assert cells[4] == f"{np.mean(last10):.1f} ± {se(last10):.1f} (2); {np.mean(whole):.1f} ± {se(whole):.1f} (2)"
    assert cells[5] == f"{np.mean(np.arange(241, 251)):.1f} (1); {np.mean(np.arange(1, 251)):.1f} (1)"  # seed 1 only
    assert cells[6:] == ["–", "–"]  # no seed has reached 500k or 1M


def test_the_standing_table_sets_the_seeds_evaluations_beside_each_method_at_the_same_step():
    # two seeds evaluated every 50k (seed 2 to 100k only), and two methods: TD7 with two seeds at 100k, MR.Q at 200k
    evaluations = [
        dict(env_id="dog-walk", seed=s, step=t, episodic_return=t / 1000 + s)
        for s, end in ((1, 200_000), (2, 100_000))
        for t in range(50_000, end + 1, 50_000)
    ]
    anchors = [
        dict(method="TD7", env_id="dog-walk", seed=1, step="100000", episodic_return="30.0"),
        dict(method="TD7", env_id="dog-walk", seed=2, step="100000.0", episodic_return="40.0"),
        dict(method="MR.Q", env_id="dog-walk", seed=1, step="200000", episodic_return="700.0"),
        dict(method="MR.Q", env_id="quadruped-run", seed=1, step="100000", episodic_return="900.0"),
    ]
    lines = high_dim.standing(evaluations, anchors, {"dog-walk": 8.04}).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert list(rows) == ["dog-walk, 100k", "dog-walk, 200k"]  # the 100k steps a run has evaluated at
    at_100k, at_200k = (dict(zip(header, rows[k])) for k in rows)
    assert at_100k["QMLE (seeds)"] == f"101.5 ± {np.std([101, 102], ddof=1) / np.sqrt(2):.1f} (2)"
    assert at_200k["QMLE (seeds)"] == "201.0 (1)" and at_100k["random"] == "8.0"
    assert at_100k["TD7"] == "35.0" and at_100k["MR.Q"] == "–"  # another task's MR.Q row is not this one's
    assert at_200k["MR.Q"] == "700.0" and at_200k["TD7"] == "–"


def synthetic_episodes(last=300_000, length=1300, resumed_at=150_000):
    """(start, end, reward) of a one-environment run's episodes to `last`: 1300 steps each, every reward of episode k
    0.001 (k + 1); the one under way at `resumed_at` is cut short there (a resume starts a new one, and its end is
    never logged), and the last one has not ended. Steps count from 1."""
    episodes, start = [], 1
    while start <= last:
        end = min(start + length - 1, resumed_at if start <= resumed_at else last, last)
        episodes.append((start, end, 0.001 * (len(episodes) + 1)))
        start = end + 1
    return episodes


def synthetic_run(folder, capacity, gamma, last=300_000):
    """The run of synthetic_episodes(last) with a checkpoint at `last` + 5 (5 transitions still pending), its replay
    buffer holding the last `capacity` transitions, written over the oldest as the agent's is."""
    run_dir = folder / f"dog-walk__longrun__3__{capacity}"
    run_dir.mkdir()
    rewards = np.concatenate([np.full(end - start + 1, r, np.float32) for start, end, r in synthetic_episodes(last)])
    stored = np.arange(max(last - capacity, 0) + 1, last + 1)
    storage = np.zeros(capacity, np.float32)
    storage[(stored - 1) % capacity] = rewards[stored - 1]
    meta = dict(args=dict(num_envs=1, train_frequency=10, gamma=gamma), global_step=last + 5)
    buffer = {"['buffer'].storage['reward']": storage, "['buffer'].size": len(stored), "['buffer'].cursor": 0}
    buffer["['buffer'].cursor"] = last % capacity
    np.savez(run_dir / "checkpoint.npz", __meta__=json.dumps(meta), **buffer)
    with open(run_dir / "metrics.csv", "w") as f:
        f.write("global_step,charts/episodic_return,charts/episodic_length,losses/q_values,losses/td_loss\n")
        for start, end, r in synthetic_episodes(last):
            if end - start + 1 == 1300:  # ended: neither the one cut short nor the last
                f.write(f"{end},{1300 * r},1300.0,,\n")
        for step in range(1000, last + 1001, 1000):  # past the checkpoint too, as a run that went on writes
            f.write(f"{step},,,{step / 1e5},0.5\n")
    return str(run_dir)


def test_the_value_table_discounts_each_episodes_rewards_to_its_end_beside_the_logged_q(tmp_path):
    gamma, tail = 0.9, 5  # a short tail, so that another episode's rewards would show: gamma ** 5 = 0.59

    def expected(end, capacity):  # each held step's return, summed to its episode's end in closed form
        returns = [
            r * (1 - gamma ** (stop - t + 1)) / (1 - gamma)
            for start, stop, r in synthetic_episodes()
            if stop - start + 1 == 1300 and stop <= 300_000
            for t in range(max(start, end - capacity + 1, 1), min(stop, end) + 1)
            if stop - t >= tail
        ]
        return np.mean(returns)

    whole, wrapped = (high_dim.value_rows(synthetic_run(tmp_path, c, gamma), tail=tail) for c in (400_000, 200_000))
    assert [r["step"] for r in whole] == [100_000, 200_000, 300_000]
    assert [r["step"] for r in wrapped] == [300_000]  # at 100k and 200k the buffer held steps now overwritten
    for rows, capacity in ((whole, 400_000), (wrapped, 200_000)):
        for r in rows:
            assert r["discounted_return"] == pytest.approx(expected(r["step"], capacity), rel=1e-5)
            assert r["q_values"] == pytest.approx(np.mean(np.arange(r["step"] - 99_000, r["step"] + 1, 1000) / 1e5))
            assert r["td_loss"] == 0.5
    ended = [(stop, 1300 * r) for start, stop, r in synthetic_episodes() if stop - start + 1 == 1300]
    assert whole[1]["episodic_return"] == pytest.approx(np.mean([v for stop, v in ended if 100_000 < stop <= 200_000]))
    row = high_dim.values_table(wrapped).splitlines()[2]
    q = np.mean(np.arange(201_000, 300_001, 1000) / 1e5)
    assert row.startswith("| dog-walk, 3 | 300k | ") and f"| {q / expected(300_000, 200_000):.1f} |" in row


@pytest.mark.parametrize(
    "name, render",
    [
        ("table", lambda d: high_dim.table(d("learning_curves.csv"), d("runs.csv"), high_dim.random_floor(DOCS))),
        ("standing", lambda d: high_dim.standing(d("evaluations.csv"), d("anchors.csv"), high_dim.random_floor(DOCS))),
        ("values", lambda d: high_dim.values_table(d("values.csv"))),
    ],
)
def test_each_committed_table_is_what_the_committed_csvs_say(name, render):
    text = open(os.path.join(DOCS, "README.md")).read()
    assert f"<!-- {name}: begin" in text
    assert high_dim.with_table(text, render(lambda f: high_dim.read(os.path.join(DOCS, f))), name) == text


def test_a_lost_runs_rows_stand_until_its_restart_from_scratch_passes_them(tmp_path, monkeypatch):
    """After a lost machine each run restarts from scratch (and differs from the lost one after its first resume):
    the lost run's committed rows stand until the restart passes its last step, then the restart's replace them; a
    seed not restarted yet keeps its rows."""
    out = tmp_path / "docs"
    out.mkdir()
    for name in ("README.md", "anchors.csv", "random.csv", "learning_curves.csv", "evaluations.csv", "values.csv"):
        (out / name).write_text(open(os.path.join(DOCS, name)).read())
    (out / "runs.csv").write_text(open(os.path.join(DOCS, "runs.csv")).read())
    rows = lambda folder, name: high_dim.read(os.path.join(folder, f"{name}.csv"))  # noqa: E731
    own = lambda table, seed: [r for r in table if (r["env_id"], r["seed"]) == ("dog-walk", seed)]  # noqa: E731
    lost_reach = {r["seed"]: int(r["reached"]) for r in own(rows(DOCS, "runs"), "1") + own(rows(DOCS, "runs"), "2")}

    def restarted(seed, until, stamp=7):  # dog-walk `seed` run again to `until`: an episode a 1000 steps, return 1.5
        run_dir = tmp_path / f"dog-walk__longrun__{seed}__{stamp}"
        run_dir.mkdir()
        with open(run_dir / "metrics.csv", "w") as f:
            f.write("global_step,charts/episodic_return,charts/SPS,eval/episodic_return\n")
            f.writelines(
                f"{step},1.5,50.0,{2.5 if step % 25_000 == 0 else ''}\n" for step in range(1000, until + 1, 1000)
            )
        return str(run_dir)

    behind, past = restarted("1", lost_reach["1"] - 2000), restarted("2", lost_reach["2"] + 5000)
    high_dim.report(high_dim.Report(runs=[behind, past], output_dir=str(out), cpu="test machine"))

    def others(table):  # all but dog-walk seed 2's rows, how far a restart is aside (asserted below)
        return [dict(r, restarted="") for r in table if (r["env_id"], r["seed"]) != ("dog-walk", "2")]

    for name in ("learning_curves", "evaluations", "values", "runs"):
        assert sorted(map(str, others(rows(out, name)))) == sorted(map(str, others(rows(DOCS, name)))), name
    (run_1,) = own(rows(out, "runs"), "1")
    assert run_1["restarted"] == str(lost_reach["1"] - 2000)
    assert (
        f"| dog-walk | 1: {lost_reach['1'] // 1000}k (restarted: {lost_reach['1'] // 1000 - 2}k), 2: "
        in open(out / "README.md").read()
    )
    episodes, evaluations = own(rows(out, "learning_curves"), "2"), own(rows(out, "evaluations"), "2")
    assert [int(r["step"]) for r in episodes] == list(range(1000, lost_reach["2"] + 5001, 1000))
    assert {r["episodic_return"] for r in episodes} == {"1.5"}
    assert {r["episodic_return"] for r in evaluations} == {"2.5"}
    assert own(rows(out, "values"), "2") == []  # the restart has no checkpoint here: no values of the lost run's
    kept = own(rows(out, "restarts"), "1")  # the restart behind its lost run: its own rows wait in restarts.csv
    assert [(r["kind"], int(r["step"])) for r in kept if r["kind"] == "training"] == [
        ("training", step) for step in range(1000, lost_reach["1"] - 1999, 1000)
    ]
    assert {r["episodic_return"] for r in kept if r["kind"] == "evaluation"} == {"2.5"}
    assert own(rows(out, "restarts"), "2") == []  # passed: its rows are the curves themselves

    monkeypatch.setattr(high_dim, "figure", lambda *args: None)  # drawn above
    high_dim.report(high_dim.Report(runs=[restarted("1", lost_reach["1"] + 1000, stamp=8), past], output_dir=str(out)))
    assert not (out / "restarts.csv").exists()  # every restart has passed its lost run
