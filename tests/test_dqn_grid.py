"""dqn_grid.py: its parts against independent computations, then whole runs judged by what they write."""

import functools
import glob
import itertools
import json
import os
import pickle
import signal

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    ROOT,
    counting_compiles,
    interrupt,
    load_saved,
    read_metrics,
    refusal,
    resumes_as_if_it_never_stopped,
    run_in_process,
    saved,
)

import dqn_grid as dqn

OBS_DIM, DIM = 5, 2
GRID = np.array(list(itertools.product([-1.0, 0.0, 1.0], repeat=DIM)), np.float32)  # all 9 joint actions, in order
CFG = dqn.UpdateConfig(
    updates=1,
    gamma=0.9,
    batch_size=16,
    prioritized_replay=True,
    priority_exponent=0.6,
    importance_exponent=0.2,
    priority_epsilon=1e-6,
)


@pytest.fixture(scope="module")
def networks():
    """The model and two unlike parameter sets (online, target), so a target computed with the wrong one shows."""
    model = dqn.QNetwork(DIM)
    init = jax.jit(model.init)
    drawn = (init(jax.random.PRNGKey(seed), jnp.zeros((1, OBS_DIM))) for seed in (0, 1))
    return model, *(dqn.pytorch_biases(p, jax.random.PRNGKey(9 + i)) for i, p in enumerate(drawn))  # biases unlike too


def test_dense_biases_start_as_pytorch_s_and_qmle_dmc_s(networks):
    """U(+-1/sqrt(fan_in)) per dense layer, as nn.Linear and qmle_dmc.py's --bias-init uniform; LayerNorms at zero."""
    _, params, _ = networks
    layers = params["params"]
    drawn = {"obs_embed": OBS_DIM, "joint_in": 128, "joint_out": 256, "q_head": 256}
    drawn.update({f"obs_block/{d}": 128 for d in ("Dense_0", "Dense_1")})
    for name, fan_in in drawn.items():
        layer = functools.reduce(lambda tree, key: tree[key], name.split("/"), layers)
        assert layer["kernel"].shape[0] == fan_in, name
        assert 0 < float(jnp.abs(layer["bias"]).max()) <= fan_in**-0.5, name
        if layer["bias"].size >= 128:
            assert float(layer["bias"].std()) == pytest.approx(fan_in**-0.5 / np.sqrt(3), rel=0.25), name
    for norm in ("obs_norm", "joint_norm"):
        np.testing.assert_array_equal(layers[norm]["bias"], 0)


@jax.jit
def q_reference(params, obs):
    """The action-out network written out from the raw parameters, for one state [O] -> [3^D]: Appendix B.1's
    observation stream, then qmle_dmc.py's joint block fed the observation features alone (the action's half of its
    residual input is zero), LayerNorm, ELU, one linear output per grid action."""
    p = params["params"]
    relu, elu = jax.nn.relu, jax.nn.elu
    dense = lambda name, x: x @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731

    def norm(name, x):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-6) * p[name]["scale"] + p[name]["bias"]

    def block(name, x):
        h = x @ p[name]["Dense_0"]["kernel"] + p[name]["Dense_0"]["bias"]
        return x + relu(h) @ p[name]["Dense_1"]["kernel"] + p[name]["Dense_1"]["bias"]

    o = elu(norm("obs_norm", block("obs_block", dense("obs_embed", obs))))
    x = jnp.concatenate([o, jnp.zeros(128)])
    h = dense("joint_out", relu(dense("joint_in", o)))
    return dense("q_head", elu(norm("joint_norm", x + h)))


# --- the grid and the network -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_action_indices_enumerate_the_grid_in_itertools_product_order(dim):
    expected = np.array(list(itertools.product([-1.0, 0.0, 1.0], repeat=dim)), np.float32)
    np.testing.assert_array_equal(dqn.grid_action(np.arange(3**dim), dim), expected)
    np.testing.assert_array_equal(dqn.grid_action(np.int32(3**dim - 1), dim), np.ones(dim))  # a scalar index: [D]
    np.testing.assert_array_equal(dqn.grid_action(np.array([[0], [3**dim // 2]]), dim).shape, (2, 1, dim))


def test_grid_actions_reach_the_task_s_bounds_as_qmle_dmc_s_do():
    # The bins are -1, 0, 1 of the box make_env rescales to [-1, 1]: the env sees its low, middle and high values.
    env = dqn.make_env("Pendulum-v1", 0)  # torque in [-2, 2]
    rescale = env
    while not isinstance(rescale, gym.wrappers.RescaleAction):
        rescale = rescale.env
    np.testing.assert_allclose([rescale.action(a) for a in dqn.grid_action(np.arange(3), 1)], [[-2.0], [0.0], [2.0]])


def test_the_network_is_the_written_out_action_out_q(networks):
    model, params, _ = networks
    obs = jax.random.normal(jax.random.PRNGKey(2), (3, OBS_DIM))
    np.testing.assert_allclose(
        model.apply(params, obs), jax.vmap(q_reference, (None, 0))(params, obs), rtol=1e-4, atol=1e-5
    )
    layers = params["params"]
    assert layers["q_head"]["kernel"].shape == (256, 3**DIM) and layers["joint_in"]["kernel"].shape == (128, 256)


def test_the_greedy_action_is_the_brute_force_argmax_and_epsilon_picks_uniformly(networks):
    model, params, _ = networks
    obs = jax.random.normal(jax.random.PRNGKey(3), (6, OBS_DIM))
    brute = np.array([GRID[np.argmax(q_reference(params, o))] for o in obs])  # each of the 9 actions evaluated
    assert len({tuple(a) for a in brute}) > 1  # the states disagree, so a fixed answer would not pass
    index, _, _ = dqn.act(model, params, obs, jax.random.PRNGKey(0), 0.0)
    assert index.dtype == jnp.int32
    np.testing.assert_array_equal(dqn.grid_action(index, DIM), brute)
    counts = np.zeros(9)
    for key in jax.random.split(jax.random.PRNGKey(1), 10):  # 6,000 draws: a share's std is 0.004
        index, _, _ = dqn.act(model, params, jnp.tile(obs, (100, 1)), key, 1.0)
        counts += np.bincount(np.asarray(index), minlength=9)
    np.testing.assert_allclose(counts / counts.sum(), 1 / 9, atol=0.02)  # uniform over the grid, not greedy


# --- targets and updates ------------------------------------------------------------------------------------


def batch_of(terminated):
    rng = np.random.default_rng(0)
    return dict(
        obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
        action=np.array([0, 4, 8, 5], np.int32),
        reward=np.array([1.0, -0.5, 0.25, 2.0], np.float32),
        next_obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
        terminated=np.asarray(terminated, np.float32),
    )


@pytest.mark.parametrize("terminated", [[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]])
def test_td_target_is_reward_plus_discounted_max_of_the_target_network(networks, terminated):
    model, params, target_params = networks
    batch = batch_of(terminated)
    target = dqn.td_target(model, target_params, batch, 0.9)
    for i in range(4):  # the max over all 9 grid actions of Q_target(s'), cut only where s' is terminal
        bootstrap = 0.0 if terminated[i] else 0.9 * float(np.max(q_reference(target_params, batch["next_obs"][i])))
        assert float(target[i]) == pytest.approx(batch["reward"][i] + bootstrap, rel=1e-5, abs=1e-6)
    online = dqn.td_target(model, params, batch, 0.9)
    assert not np.allclose(online, target) or all(terminated)  # the target network, not the online one


def fresh(model, params, target_params, capacity=8):
    state = dqn.DQNState.create(apply_fn=model.apply, params=params, target_params=target_params, tx=optax.adam(1e-3))
    state = jax.tree.map(jnp.array, state)  # copies: the update donates its state, and the fixture must survive
    return state, dqn.buffer_init(jax.tree.map(lambda x: x[0], batch_of([0] * 4)), capacity)


def td_errors(params, target_params, batch, gamma):
    """r + gamma (1 - terminated) max_a' Q_target(s', a') - Q(s, a), from the written-out network."""
    next_max = jax.vmap(q_reference, (None, 0))(target_params, batch["next_obs"]).max(1)
    q = jax.vmap(q_reference, (None, 0))(params, batch["obs"])[np.arange(4), batch["action"]]
    return batch["reward"] + gamma * (1 - batch["terminated"]) * next_max - q


def test_priorities_and_the_importance_weighted_loss_match_a_hand_computation(networks):
    model, params, target_params = networks
    batch = batch_of([0, 1, 0, 0])
    state, buffer = fresh(model, params, target_params)
    priorities = np.array([0.05, 0.5, 2.0, 8.0], np.float32)  # unequal, so the importance weights are too
    buffer = dqn.buffer_update(dqn.buffer_add(buffer, batch), jnp.arange(4), jnp.asarray(priorities), alpha=0.6)
    key = jax.random.PRNGKey(3)
    index = np.asarray(dqn.buffer_sample(buffer, key, 16, True, 0.2)[0])  # the update's own draws
    state, buffer, metrics = dqn.update(model, state, buffer, jax.tree.map(lambda x: x[:0], batch), key, CFG)
    td_error = np.asarray(td_errors(params, target_params, batch, 0.9))
    probability = priorities**0.6 / np.sum(priorities**0.6)
    weights = (4 * probability[index]) ** -0.2
    weights /= weights.max()
    assert len(set(np.round(weights, 6))) > 1
    np.testing.assert_allclose(metrics["losses/td_loss"], np.mean(weights * td_error[index] ** 2), rtol=1e-4)
    replayed = np.unique(index)
    np.testing.assert_allclose(buffer.tree[8 + replayed], (np.abs(td_error[replayed]) + 1e-6) ** 0.6, rtol=1e-4)
    assert int(state.step) == 1 and not np.allclose(
        state.params["params"]["q_head"]["kernel"], params["params"]["q_head"]["kernel"]
    )


def test_updates_lower_the_td_error_of_a_fixed_batch(networks):
    model, params, target_params = networks
    batch = batch_of([1, 1, 1, 1])  # terminal: fixed targets, so the loss must fall
    state, buffer = fresh(model, params, target_params)
    buffer = dqn.buffer_add(buffer, batch)
    no_new = jax.tree.map(lambda x: x[:0], batch)
    losses = []
    for i in range(40):
        state, buffer, metrics = dqn.update(model, state, buffer, no_new, jax.random.PRNGKey(i), CFG)
        losses.append(float(metrics["losses/td_loss"]))
    assert losses[-1] < 0.05 * losses[0]


def test_several_updates_in_one_call_equal_the_same_updates_one_by_one(networks):
    model, params, target_params = networks
    batch = batch_of([0, 0, 0, 0])
    together = dqn.update(
        model, *fresh(model, params, target_params), batch, jax.random.PRNGKey(5), CFG._replace(updates=3)
    )
    state, buffer = fresh(model, params, target_params)
    no_new = jax.tree.map(lambda x: x[:0], batch)
    for i, key in enumerate(jax.random.split(jax.random.PRNGKey(5), 3)):
        state, buffer, _ = dqn.update(model, state, buffer, batch if i == 0 else no_new, key, CFG)
    assert int(together[0].step) == int(state.step) == 3
    for a, b in zip(jax.tree.leaves((together[0].params, together[1])), jax.tree.leaves((state.params, buffer))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_original_s_greedy_actions_and_update_metrics_are_reproduced():
    # tests/golden/dqn_grid.json: dqn_grid.py at 9947e49 on the same fixed init, states and synthetic transitions.
    # Tolerances for other CPUs and the suite's XLA flag: actions are exact indices, losses within rtol 1e-3.
    golden = json.load(open(os.path.join(ROOT, "tests", "golden", "dqn_grid.json")))
    rs = np.random.RandomState(0)
    obs = rs.randn(8, 24).astype(np.float32)
    model = dqn.QNetwork(6)
    key, k_init = jax.random.split(jax.random.PRNGKey(3))
    params = dqn.pytorch_biases(jax.jit(model.init)(k_init, obs[:1]), jax.random.fold_in(k_init, 1))
    greedy, _, _ = dqn.act(model, params, obs, key, 0.0)
    np.testing.assert_array_equal(greedy, golden["greedy_actions"])
    n = 300
    tr = dict(
        obs=rs.randn(n, 24).astype(np.float32),
        action=rs.randint(0, 3**6, n).astype(np.int32),
        reward=rs.rand(n).astype(np.float32),
        next_obs=rs.randn(n, 24).astype(np.float32),
        terminated=(rs.rand(n) < 0.1).astype(np.float32),
    )
    state = dqn.DQNState.create(apply_fn=None, params=params, target_params=params, tx=dqn.adam(5e-4))
    state, buffer = jax.tree.map(jnp.array, state), dqn.buffer_init({k: v[0] for k, v in tr.items()}, 1000)
    cfg = dqn.UpdateConfig(10, 0.99, 64, True, 0.6, 0.2, 1e-6)
    for i, expected in enumerate(golden["update_metrics"]):
        chunk = {k: v[i * 100 : (i + 1) * 100] for k, v in tr.items()}
        state, buffer, metrics = dqn.update(model, state, buffer, chunk, jax.random.PRNGKey(10 + i), cfg)
        assert {k: pytest.approx(float(v), rel=1e-3) for k, v in metrics.items()} == expected


# --- the memory wall ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, batch_size", [(1, 256), (6, 256), (12, 256), (12, 32)])
def test_the_memory_estimate_counts_the_head_s_copies_and_the_batch_s_q_values(dim, batch_size):
    # The head's parameter count taken from the network itself (shapes only, nothing allocated), then the copies
    # training keeps: parameters, target, Adam's two moments, gradients; and Q(s), its gradient and Q_target(s').
    shapes = jax.eval_shape(dqn.QNetwork(dim).init, jax.random.PRNGKey(0), jnp.zeros((1, OBS_DIM)))
    head = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]["q_head"]))
    assert head == 257 * 3**dim
    assert dqn.head_bytes(dim, batch_size) == 4 * (5 * head + 3 * batch_size * 3**dim)


def test_the_memory_estimate_is_exact_in_python_integers_where_int64_overflows():
    assert dqn.head_bytes(38, 256) == 4 * 3**38 * (257 * 5 + 256 * 3) == 11_093_194_305_530_611_034_868
    assert dqn.head_bytes(38, 256) > np.iinfo(np.int64).max


def test_the_estimate_covers_what_xla_allocates_for_the_compiled_update():
    # XLA's own accounting of the compiled update (9 dimensions: the head dominates): its inputs, which the update
    # donates to its outputs, and its temporaries. The estimate must not be below it, nor far above.
    model = dqn.QNetwork(9)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, OBS_DIM)))
    state = jax.eval_shape(
        lambda p: dqn.DQNState.create(apply_fn=None, params=p, target_params=p, tx=optax.adam(1e-3)), params
    )
    example = dict(
        obs=np.zeros(OBS_DIM, np.float32),
        action=np.int32(0),
        reward=np.float32(0),
        next_obs=np.zeros(OBS_DIM, np.float32),
        terminated=np.float32(0),
    )
    buffer = dqn.buffer_init(example, 16)
    chunk = {k: np.zeros((10, *np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}
    cfg = CFG._replace(batch_size=256)
    memory = dqn.update.lower(model, state, buffer, chunk, jax.random.PRNGKey(0), cfg).compile().memory_analysis()
    held = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    assert memory.alias_size_in_bytes > 0.99 * 4 * 257 * 3**9 * 4  # the state's four head copies are donated
    assert held + memory.temp_size_in_bytes <= dqn.head_bytes(9, 256) <= 2 * (held + memory.temp_size_in_bytes)


class EightGiB:  # an accelerator with 8 GiB free, as check_fits asks JAX's first device
    def memory_stats(self):
        return {"bytes_limit": 8 * 2**30, "bytes_in_use": 0}


def test_a_head_over_the_memory_is_refused_and_a_large_one_warned_of(monkeypatch, capsys):
    monkeypatch.setattr(dqn.jax, "devices", lambda: [EightGiB()])
    small = dqn.Args(buffer_size=1000)
    dqn.check_head(small, 6, OBS_DIM)
    assert capsys.readouterr().err == ""
    dqn.check_head(small, 12, OBS_DIM)  # 4.1 GiB: fits, with a warning of its size
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: ") and "3^12" in warning and "4.1 GiB" in warning
    with pytest.raises(SystemExit) as exit_info:
        dqn.check_head(small, 14, OBS_DIM)  # 36.6 GiB
    assert str(exit_info.value).startswith("error: --env-id walker-walk: a 3^14-output head")


def test_the_replay_memory_counts_against_what_the_head_may_take_unless_a_model_is_only_evaluated(monkeypatch):
    monkeypatch.setattr(dqn.jax, "devices", lambda: [EightGiB()])
    gib = 2**30 // (4 * (2 * OBS_DIM + 3))  # transitions of obs, next_obs, action, reward, terminated in 1 GiB
    dqn.check_head(dqn.Args(buffer_size=gib), 12, OBS_DIM)  # 4.1 + 1 GiB: fits
    with pytest.raises(SystemExit) as exit_info:
        dqn.check_head(dqn.Args(buffer_size=4 * gib), 12, OBS_DIM)  # 4.1 + 4 GiB: does not
    assert str(exit_info.value).startswith("error: --env-id walker-walk: a 3^12-output head beside a full replay")
    dqn.check_head(dqn.Args(buffer_size=4 * gib, load_model="model.npz"), 12, OBS_DIM)  # no replay memory then
    with pytest.raises(SystemExit) as exit_info:
        dqn.check_head(dqn.Args(buffer_size=9 * gib), 1, OBS_DIM)  # the replay memory alone does not fit
    assert str(exit_info.value).startswith("error: --buffer-size")


def test_dog_walk_is_refused_with_one_line_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = refusal(dqn.main, dqn.Args(env_id="dog-walk"))
    assert text.startswith("error: --env-id dog-walk: a 3^38-output head beside a full replay memory")
    assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "runs")


# --- argument checking: one clear line, non-zero exit, no traceback ------------------------------------------


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(total_timesteps=0), "--total-timesteps"),
        (dict(batch_size=0), "--batch-size"),
        (dict(train_frequency=0), "--train-frequency"),
        (dict(target_network_frequency=-1), "--target-network-frequency"),
        (dict(learning_starts=-5), "--learning-starts"),
        (dict(epsilon=1.5), "--epsilon"),
        (dict(gamma=-0.1), "--gamma"),
        (dict(learning_rate=0.0), "--learning-rate"),
        (dict(learning_rate=float("nan")), "--learning-rate"),
        (dict(priority_epsilon=0.0), "--priority-epsilon"),
        (dict(num_envs=4, train_frequency=6, buffer_size=11), "--buffer-size"),
    ],
)
def test_bad_arguments_are_rejected_with_one_line(overrides, flag):
    with pytest.raises(SystemExit) as exit_info:
        dqn.check_args(dqn.Args(**overrides))
    text = str(exit_info.value)
    assert text.startswith(f"error: {flag}") and "\n" not in text
    dqn.check_args(dqn.Args(priority_epsilon=0.0, prioritized_replay=False))  # no priorities, no epsilon needed
    dqn.check_args(dqn.Args(num_envs=4, train_frequency=6, buffer_size=12))  # exactly one update's transitions


def test_unknown_and_unusable_envs_are_refused_with_one_line():
    for env_id, expected in [("walker-wlak", "'walker-wlak'"), ("CartPole-v1", "Discrete(2)")]:
        with pytest.raises(SystemExit) as exit_info:
            dqn.make_env(env_id, 0)
        text = str(exit_info.value)
        assert text.startswith("error: ") and "--env-id" in text and expected in text and "\n" not in text


# --- a whole run ---------------------------------------------------------------------------------------------


FAST = dict(env_id="Pendulum-v1", learning_starts=100, buffer_size=2000, batch_size=16, log_frequency=100)


def test_a_run_on_pendulum_logs_stores_its_transitions_resumes_and_saves_a_model_that_loads(
    tmp_path, monkeypatch, capsys
):
    # Pendulum-v1 (1 action dimension: 3 grid actions) ends every 200 steps by its time limit, a truncation, never
    # a termination. Updates from step 100, one per 10 steps; targets copy every 300; an evaluation at each end.
    fast = dict(FAST, eval_frequency=1000, target_network_frequency=300, checkpoint_frequency=300, exp_name="pendulum")
    run_dir, (meta, arrays) = run_in_process(dqn, tmp_path, monkeypatch, total_timesteps=300, **fast)
    assert "1 action dims, 3 grid actions, 1 env(s)" in capsys.readouterr().out
    rows = read_metrics(run_dir)
    assert list(rows[0]) == ["global_step", *dqn.METRICS]
    assert [int(r["global_step"]) for r in rows if r["charts/SPS"]] == [100, 200, 300]
    assert [r["charts/episodic_length"] for r in rows if r["charts/episodic_return"]] == ["200.0"]
    assert all(np.isfinite(float(r["losses/td_loss"])) for r in rows if r["charts/SPS"])  # the first update: step 100
    assert [int(r["global_step"]) for r in rows if r["eval/episodic_return"]] == [300]  # at the end
    params, target = saved(arrays, "['state'].params"), saved(arrays, "['state'].target_params")
    assert all(np.array_equal(params[k], target[k]) for k in params)  # copied at step 300, after its update
    assert int(arrays["['state'].step"]) == (300 - 100) // 10 + 1

    size = int(arrays["['buffer'].size"])
    buffer = {k: v[:size] for k, v in saved(arrays, "['buffer'].storage").items()}
    obs, next_obs, action = buffer["['obs']"], buffer["['next_obs']"], buffer["['action']"]
    assert size == 300 and action.dtype == np.int32 and set(np.unique(action)) == {0, 1, 2}  # grid indices, all 3
    np.testing.assert_array_equal(buffer["['terminated']"], 0.0)  # a time limit is not a termination
    np.testing.assert_array_equal(np.flatnonzero(np.any(next_obs[:-1] != obs[1:], axis=1)), [199])
    env = dqn.make_env("Pendulum-v1", 1)  # replay the first episode's actions: the stored transitions are its own
    env.reset(seed=1)
    for row in range(200):
        last, reward, terminated, truncated, _ = env.step(dqn.grid_action(action[row], 1))
        np.testing.assert_allclose(buffer["['reward']"][row], reward, rtol=1e-6)
    assert truncated and not terminated
    np.testing.assert_array_equal(next_obs[199], last)  # the episode's last observation, not the next one's first
    # Through the truncation the target bootstraps from that observation: r + gamma max_a Q_target(s_200, a).
    model = dqn.QNetwork(1)
    target_params = dqn.restore(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 3))), target, "test")
    row = {k[2:-2]: v[199:200] for k, v in buffer.items()}
    bootstrap = 0.99 * float(np.max(q_reference(target_params, last)))
    assert abs(bootstrap) > 1e-3
    assert float(dqn.td_target(model, target_params, row, 0.99)[0]) == pytest.approx(
        row["reward"][0] + bootstrap, rel=1e-5
    )

    _, (meta, resumed) = run_in_process(
        dqn, tmp_path, monkeypatch, total_timesteps=500, resume=run_dir, save_model=True
    )
    assert meta["global_step"] == 500 and int(resumed["['state'].step"]) == (500 - 100) // 10 + 1
    resumed_target = saved(resumed, "['state'].target_params")
    assert all(np.array_equal(resumed_target[k], target[k]) for k in target)  # no copy in (300, 500] ...
    assert not all(np.array_equal(saved(resumed, "['state'].params")[k], params[k]) for k in params)  # ... training on
    np.testing.assert_array_equal(resumed["['buffer'].storage['obs']"][:300], obs)  # the same replay memory, continued
    rows = read_metrics(run_dir)
    assert [int(r["global_step"]) for r in rows if r["charts/SPS"]] == [100, 200, 300, 400, 500]  # one file goes on
    last_eval = [float(r["eval/episodic_return"]) for r in rows if r["eval/episodic_return"]][-1]

    model_path = os.path.join(run_dir, "pendulum.npz")
    meta, arrays = load_saved(model_path)
    assert meta["script"] == "dqn_grid.py" and meta["args"]["env_id"] == "Pendulum-v1" and meta["global_step"] == 500
    assert arrays["['params']['q_head']['kernel']"].shape == (256, 3)
    capsys.readouterr()
    dqn.main(dqn.Args(load_model=model_path))  # what --load-model runs
    # The run's own evaluation seed: the saved model scores what the run logged at its end.
    assert capsys.readouterr().out == (
        f"{model_path} on Pendulum-v1  greedy evaluation return {last_eval:.1f} over 1 episode(s)\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        dqn.main(dqn.Args(env_id="cartpole-swingup", load_model=model_path))
    assert str(exit_info.value).startswith("error: --load-model: --env-id 'cartpole-swingup'")


def test_sigterm_to_the_process_group_saves_the_model_and_a_checkpoint_and_says_how_to_resume(tmp_path):
    # A cluster's stop reaches every process of the job (as Ctrl-C does in a terminal): the worker processes leave it
    # to the trainer, which stops once and saves their environments in its checkpoint, then closes them.
    flags = [
        "--num-envs",
        "2",
        "--env-id",
        "Pendulum-v1",
        "--learning-starts",
        "100",
        "--buffer-size",
        "2000",
        "--batch-size",
        "16",
        "--log-frequency",
        "100",
        "--total-timesteps",
        "1000000",
        "--checkpoint-frequency",
        "100000",
    ]
    returncode, stdout, stderr = interrupt("dqn_grid.py", flags, tmp_path, signum=signal.SIGTERM, group=True)
    assert returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    assert stdout.count("SIGTERM: stopping") == 1, stdout[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    meta, arrays = load_saved(os.path.join(run_dir, "checkpoint.npz"))
    step = meta["global_step"]
    assert step >= 300 and f"interrupted at step {step}" in stdout
    assert f"--resume {os.path.relpath(run_dir, tmp_path)}" in stdout  # how to continue it
    stored = step // 10 * 10  # the rest waits in `pending` for the next update call, saved with it
    assert int(arrays["['buffer'].size"]) == stored and int(arrays["['state'].step"]) == (stored - 100) // 10 + 1
    model_meta, _ = load_saved(os.path.join(run_dir, "dqn_grid.npz"))
    assert model_meta["global_step"] == step
    assert [len(state) > 0 for state in pickle.loads(arrays["['envs']['envs']"].tobytes())] == [True, True]


def test_a_second_run_in_one_process_compiles_nothing(tmp_path, monkeypatch):
    # The optimizer and the init are keyed on their settings, not on one run's objects, so a second main() with the
    # same settings finds every program compiled (what keeps the many in-process runs of these tests fast).
    fast = dict(FAST, eval_frequency=0, total_timesteps=300, checkpoint_frequency=300)
    run_in_process(dqn, tmp_path, monkeypatch, exp_name="first", **fast)
    with counting_compiles() as compiled:
        run_in_process(dqn, tmp_path, monkeypatch, exp_name="second", **fast)
    assert compiled == []


def test_a_run_stopped_in_the_middle_of_an_episode_resumes_as_if_it_never_stopped(tmp_path, monkeypatch):
    resumes_as_if_it_never_stopped(dqn, tmp_path, monkeypatch, **FAST)
