"""The benchmark tooling: the learning runner's grid, its report, and the W&B sweep file."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest
import tyro
import yaml
from conftest import ROOT, refusal, run_script

import qmle_dmc as q

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_sweep_file_runs_the_same_grid_with_real_flags():
    sweep = yaml.safe_load(open(os.path.join(ROOT, "benchmarks", "sweep.yaml")))
    assert os.path.exists(os.path.join(ROOT, sweep["program"]))
    flags = []
    for name, spec in sweep["parameters"].items():
        value = spec.get("value", spec.get("values", [None])[0])
        flags += [f"--{name}"] if value is True else [f"--{name}={value}"]  # W&B's ${args_no_boolean_flags}
    parsed = tyro.cli(q.Args, args=flags)
    assert parsed.track and parsed.env_id == "cartpole-swingup" and parsed.total_timesteps == 100_000
    assert set(sweep["parameters"]["env-id"]["values"]) == {"cartpole-swingup", "walker-walk"}
    assert sweep["parameters"]["seed"]["values"] == [1, 2, 3]


@pytest.mark.parametrize("env_id", ["walker-walk", "dog-walk"])
def test_speed_benchmark_tasks_exist_with_their_action_sizes(env_id):
    env = q.make_env(env_id, 0)
    assert env.action_space.shape == {"walker-walk": (6,), "dog-walk": (38,)}[env_id]


import doc_tables  # noqa: E402
import speed  # noqa: E402


def test_the_reference_matmul_is_its_fastest_call(monkeypatch):
    # calls of 12, 9, 15 and 9.5 ms after the warm-up: a hiccup must not set the machine's rate
    ticks = iter([0.0, 0.012, 1.0, 1.009, 2.0, 2.015, 3.0, 3.0095] * 2)
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(ticks))
    assert speed.fastest_ms(lambda: 0, repeats=4) == pytest.approx(9.0)
    assert speed.median_ms(lambda: 0, repeats=4) == pytest.approx(10.75)
    shapes = []
    monkeypatch.setattr(speed, "fastest_ms", lambda fn, x, w, repeats: shapes.append((x.shape, w.shape, repeats)))
    speed.matmul_ms(10)
    assert shapes == [((25_856, 256), (256, 256), 30)]


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or speed.jax.devices()[0].platform != "cpu",
    reason="names CPU cores only: no CPU affinity here, or JAX runs on an accelerator",
)
def test_the_speed_benchmark_names_the_cores_it_may_use(monkeypatch):
    # a run under `taskset -c 0` gets one core's threads: its figures must not claim the machine's two
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert speed.device_name().endswith(", 1 of 2 cores")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert speed.device_name().endswith(", 2 cores")


def test_training_sps_reads_the_steady_rate_from_the_log(monkeypatch):
    # A loop that acts at 400 steps per second until step 1000, spends 10 s compiling the update, then runs
    # at exactly 200 steps per second; each log line holds the rate since the one before, as main() logs it.
    def fake_main(args):
        os.makedirs("runs/x")
        seconds = lambda step: step / 400 if step <= 1000 else 2.5 + 10 + (step - 1000) / 200  # noqa: E731
        with open("runs/x/metrics.csv", "w") as f:
            f.write("global_step,charts/episodic_return,charts/SPS\n")
            for step in range(500, args.total_timesteps + 1, 500):
                f.write(f"{step},,{500 / (seconds(step) - seconds(step - 500))}\n")
                f.write(f"{step},12.5,\n")  # an episode's row: no SPS

    monkeypatch.setattr(q, "main", fake_main)
    cumulative, steady = speed.training_sps(q, "walker-walk", 4000, 1)
    assert steady == pytest.approx(200.0)
    assert cumulative == pytest.approx(4000 / (2.5 + 10 + 15))


def speed_parts(agent_name):
    """An agent's parts as speed.py builds them for walker-walk (24 observation, 6 action dimensions), untimed."""
    agent, parts_of = speed.AGENTS[agent_name]
    size, keys = agent.Args.batch_size, jax.random.split(jax.random.PRNGKey(1), 4)
    obs, action = jnp.zeros((size, 24)), jnp.zeros((size, 6))
    batch = dict(obs=obs, action=action, reward=jnp.ones(size), next_obs=obs, terminated=jnp.zeros(size), argmax=action)
    return parts_of("walker-walk", 24, 6, batch, keys)


def test_speed_benchmark_times_an_agent_against_the_matmul(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(speed, "training_sps", lambda agent, env_id, steps, num_envs: (117.0, 234.0))
    monkeypatch.setattr(speed, "physics_ms", lambda env_id, num_envs: 0.5 * num_envs)
    small = speed.prefilled_buffer  # the benchmark times updates against a 1e6 buffer; 4096 slots do here
    monkeypatch.setattr(speed, "prefilled_buffer", lambda agent, transitions, capacity: small(agent, transitions, 4096))
    output = tmp_path / "speed.json"
    speed.main(speed.Args(env_ids=["walker-walk"], agents=["qtopt_cem"], num_envs=[4], repeats=1, output=str(output)))
    results = {(r["agent"], r["num_envs"]): r for r in __import__("json").load(open(output))["results"]}
    assert set(results) == {("qtopt_cem", 4)}
    for r in results.values():
        assert r["target_eval_over_matmul"] == pytest.approx(r["target_eval_ms"] / r["matmul_ms"])
        assert 0 < r["target_eval_fraction_of_matmul_rate"] and r["greedy_action_ms"] > 0
        assert r["physics_sps"] == pytest.approx(2000.0)  # 0.5 ms per environment, whatever N
        assert r["update_ms_per_step"] == pytest.approx(r["update_ms"] / 20)  # one call per lcm(4, 10) steps
        assert r["greedy_action_ms_per_step"] == pytest.approx(r["greedy_action_ms"] / r["num_envs"])
        # the FLOP-bound rate: the matmul's GFLOP/s over one step's GFLOP (greedy action + a tenth of an update)
        matmul_rate = 2 * 25_856 * 256 * 256 / 1e9 / (r["matmul_ms"] / 1e3)
        step_gflop = r["step_gflop"]
        assert r["flop_bound_sps"] == pytest.approx(matmul_rate / step_gflop)
        assert r["fraction_of_flop_bound"] == pytest.approx(234.0 / r["flop_bound_sps"])
        # with the physics in series: 1 / (the arithmetic's seconds per step + the physics' 0.5 ms per step)
        assert r["flop_and_physics_bound_sps"] == pytest.approx(1 / (step_gflop / matmul_rate + 0.5e-3))
        assert r["fraction_of_flop_and_physics_bound"] == pytest.approx(234.0 / r["flop_and_physics_bound_sps"])
        # the kernels alone: a vector step's greedy action shared by 4, an update call by 20 steps, nothing else
        kernel_seconds_per_step = (r["greedy_action_ms"] / 4 + r["update_ms"] / 20) / 1e3
        assert r["kernels_bound_sps"] == pytest.approx(1 / kernel_seconds_per_step)
        assert r["kernels_cap_on_fraction"] == pytest.approx(step_gflop / matmul_rate / kernel_seconds_per_step)
        assert r["speedup_after_compile"] is None  # the release ran one environment: no ratio for four
    # QMLE's target: 256 x 101 candidates, about 1.5 matmuls' worth of multiply-adds; QT-Opt's: 256 x 128
    matmul_gflop = 2 * 25_856 * 256 * 256 / 1e9
    qmle, aql = (speed_parts(a) for a in ("qmle_dmc", "aql_discrete"))  # what the other agents' rows would count
    assert 1.45 < qmle["target_gflop"] / matmul_gflop < 1.6
    assert 1.85 < results["qtopt_cem", 4]["target_eval_gflop"] / matmul_gflop < 2.0
    # AQL's: 256 x 500 candidates (about 7.5 matmuls) plus 100 proposal samples of 6 sub-actions per state
    assert 7.4 < aql["target_gflop"] / matmul_gflop < 7.9
    # One QMLE step on walker-walk: 1000 greedy candidates (~98.9k multiply-adds each: 6 x 128 + 128 x 256 +
    # 256 x 256 + 256) and a tenth of an update: its target, then the gradient step on 256 replayed pairs,
    # which adds a few percent (a forward and backward pass on one candidate per state, instead of 101)
    greedy = 2 * 1000 * (6 * 128 + 128 * 256 + 256 * 256 + 256) / 1e9
    step_gflop = speed.flop_bound(qmle, 10, 234.0, matmul=1.0, physics_per_step=0.0)["step_gflop"]
    assert 1.0 < step_gflop / (greedy + qmle["target_gflop"] / 10) < 1.1
    table = capsys.readouterr().out
    assert "| qtopt_cem | walker-walk | 4 | 234 | 2000 |" in table and "CPU" in table


def test_a_step_splits_into_physics_action_update_and_the_rest():
    # 16 environments at 500 steps/s: 2 ms per step; a vector step's 8 ms of physics and 4 ms of action are
    # shared by 16, an update call's 20 ms by lcm(16, 10) = 80 steps, and 2 - 0.5 - 0.25 - 0.25 ms is left over.
    parts = speed.breakdown(16, 10, 500.0, physics=8.0, act_ms=4.0, update_ms=20.0)
    assert parts == pytest.approx(
        dict(
            step_ms=2.0,
            physics_ms_per_step=0.5,
            greedy_action_ms_per_step=0.25,
            update_ms_per_step=0.25,
            rest_ms_per_step=1.0,
        )
    )


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--timesteps", "100"], "--timesteps"),
        (["--num-envs", "0"], "--num-envs"),
        (["--agents", "dqn"], "--agents"),
        (["--env-ids", "walker-wlak"], "--env-id"),
    ],
)
def test_bad_flags_of_the_speed_benchmark_give_one_line(flags, named, capsys):
    assert named in refusal(speed.main, tyro.cli(speed.Args, args=flags))
    assert capsys.readouterr().out == ""  # before anything is measured


def test_wolpertinger_speed_splits_a_training_step_into_its_parts():
    r = speed.measure_wolpertinger(1000, speed.Args(repeats=1), 2.0)  # a 2 ms matmul
    assert (r["num_actions"], r["k"]) == (1000, 100)  # Pendulum's 1-D grid, k = 10% of the actions
    assert r["step_ms"] == pytest.approx(r["act_ms"] + r["env_step_ms"] + r["update_ms"])  # one update per step
    assert r["knn_share_of_step"] == pytest.approx(r["knn_ms"] / r["step_ms"]) and 0 < r["knn_share_of_step"] < 1
    assert r["act_over_matmul"] == pytest.approx(r["act_ms"] / 2.0)


import checkpoint  # noqa: E402


def test_checkpoint_cost_is_the_replay_storage_plus_the_networks(tmp_path):
    r = checkpoint.measure(checkpoint.Args(env_id="walker-walk", transitions=1000, directory=str(tmp_path)))
    # walker-walk: 24 observation and 6 action dimensions; a transition stores obs, next_obs, action, argmax,
    # reward and terminated as float32: (24 + 24 + 6 + 6 + 1 + 1) x 4 bytes
    assert r["bytes_per_transition"] == 248 and r["replay_storage_bytes"] == 248_000
    # on top: parameters, target parameters and Adam's two moments (about 0.17M floats each), the sum-tree, and the
    # environment, pickled whole (walker's model and simulator: megabytes)
    assert r["environment_bytes"] > 1e6
    extra = r["bytes"] - 248_000 - r["environment_bytes"]
    assert 4 * 4 * 150_000 < extra < 4 * 4 * 250_000
    assert os.path.getsize(tmp_path / "checkpoint.npz") == r["bytes"]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--transitions", "0"], "--transitions"),
        (["--directory", "/no/such/dir"], "--directory"),
        (["--env-id", "dog-wlak"], "--env-id"),
    ],
)
def test_bad_flags_of_the_checkpoint_benchmark_give_one_line(flags, named, capsys):
    assert named in refusal(checkpoint.main, tyro.cli(checkpoint.Args, args=flags))
    assert capsys.readouterr().out == ""  # before anything is measured


FAKE_CLONE = "<a directory with src/model.py>"  # stands for a clone of the release, made per test
NO_TORCH = "<a Python without PyTorch>"  # a stand-in program that fails as such a Python would


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "the following arguments are required: --release-dir"),
        (["--release-dir", "/no/such/dir"], "--release-dir '/no/such/dir' has no src/model.py"),
        (["--release-dir", FAKE_CLONE, "--inits", "1"], "--inits must be >= 2"),
        (["--release-dir", FAKE_CLONE, "--inits", "1.5"], "argument --inits: invalid int value: '1.5'"),
        (
            ["--release-dir", FAKE_CLONE, "--release-layernorm-eps", "nan"],
            "--release-layernorm-eps must be a positive number",
        ),
        (
            ["--release-dir", FAKE_CLONE, "--torch-python", "/no/such/python"],
            "--torch-python '/no/such/python' does not run",
        ),
        (
            ["--release-dir", FAKE_CLONE, "--torch-python", NO_TORCH],
            "cannot import torch and numpy: ModuleNotFoundError",
        ),
    ],
)
def test_bad_flags_of_the_release_check_give_one_line(flags, message, tmp_path):
    """Every mistake is found, in one line, before the check computes anything."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.py").write_text("")
    no_torch = tmp_path / "python"
    no_torch.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    no_torch.chmod(0o755)
    flags = [{FAKE_CLONE: str(tmp_path), NO_TORCH: str(no_torch)}.get(flag, flag) for flag in flags]
    result = run_script(os.path.join("benchmarks", "release_update.py"), *flags, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and len(result.stderr.splitlines()) == 1


def test_the_device_script_gives_speed_py_flags_it_accepts():
    # device.sh once passed --timesteps 2000 to a speed.py that had come to need 2500: every speed part failed
    text = open(os.path.join(ROOT, "benchmarks", "device.sh")).read()
    steps = [int(v) for v in re.findall(r"--timesteps (\d+)", text)]
    assert len(steps) == 2 and text.count('"$repo/benchmarks/speed.py"') == 2
    for value in steps:
        speed.check_args(speed.Args(env_ids=[], timesteps=value))


@pytest.mark.parametrize("name", list(doc_tables.TABLES))
def test_each_documented_table_is_what_its_measurements_say(name):
    # the rows of each table of measurements in docs/, rendered again from the committed JSON and CSV files they
    # summarise (`python benchmarks/doc_tables.py --write` rewrites a table from them)
    table = doc_tables.TABLES[name]
    rows = doc_tables.committed(table)[-1]
    assert rows and rows == table.rows()
