"""wolpertinger.py: k-NN, the refined action, the action table, the TD target, the importance weights and the
--policy-frequency gate against independent computations (numpy brute force, networks written out from their raw
parameters), the golden recording of the script before its redesign, then refusals, checkpoints and whole runs
judged by what they write."""

import functools
import glob
import itertools
import json
import os

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    ROOT,
    command_line,
    counting_compiles,
    interrupt,
    load_saved,
    read_metrics,
    refusal,
    resumes_as_if_it_never_stopped,
    run_in_process,
    run_script,
    saved,
)

import wolpertinger as w

OBS_DIM = 4


def np_actor(params, obs):
    p = {name: {k: np.asarray(v, np.float64) for k, v in layer.items()} for name, layer in params["params"].items()}
    h = np.maximum(obs @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    h = np.maximum(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
    return np.tanh(h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"])


def np_critic(params, obs, embeddings):
    """Q of one state [O] and [M, D] embeddings: the 256-256 MLP on concat(s, e), as DDPG draws it."""
    p = {name: {k: np.asarray(v, np.float64) for k, v in layer.items()} for name, layer in params["params"].items()}
    x = np.concatenate([np.broadcast_to(obs, (len(embeddings), len(obs))), embeddings], 1)
    w_in = np.concatenate([p["obs_in"]["kernel"], p["act_in"]["kernel"]], 0)
    h = np.maximum(x @ w_in + p["obs_in"]["bias"], 0)
    h = np.maximum(h @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    return (h @ p["out"]["kernel"] + p["out"]["bias"])[:, 0]


def np_nearest(table, query, k):
    return np.argsort(np.sum((np.asarray(table, np.float64) - query) ** 2, 1), kind="stable")[:k]


@functools.lru_cache
def networks(dim, seed):
    actor, critic = w.Actor(dim), w.Critic()
    k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed))
    return dict(
        actor=jax.jit(actor.init)(k_actor, jnp.zeros((1, OBS_DIM))),
        critic=jax.jit(critic.init)(k_critic, jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, dim))),
    )


def ddpg_states(online, target, tx=None):
    tx = tx or optax.adam(1e-3)
    return {
        name: jax.tree.map(
            jnp.asarray, w.DDPGState.create(apply_fn=None, params=online[name], target_params=target[name], tx=tx)
        )
        for name in ("actor", "critic")
    }


def config(**settings):
    defaults = dict(
        updates=1,
        policy_frequency=1,
        gamma=0.9,
        tau=0.1,
        batch_size=8,
        prioritized_replay=True,
        priority_exponent=0.6,
        importance_exponent=0.2,
        priority_epsilon=1e-6,
        knn_in_target=False,
    )
    return w.UpdateConfig(**dict(defaults, **settings))


# --- k-NN --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("approx", [False, True])
def test_nearest_actions_match_brute_force(dim, approx):
    rng = np.random.default_rng(dim)
    table = rng.uniform(-1, 1, (3000, dim)).astype(np.float32)
    queries = rng.uniform(-1.2, 1.2, (16, dim)).astype(np.float32)  # some outside the box
    found = np.asarray(w.nearest_actions(jnp.asarray(table), jnp.asarray(queries), 40, approx, 0.9))
    assert found.shape == (16, 40)
    for query, row in zip(queries, found):
        expected = np_nearest(table, query.astype(np.float64), 40)
        if approx:  # approx_max_k promises recall, not order; on CPU it returns all of them
            assert len(set(row) & set(expected)) >= 0.9 * 40
        else:  # nearest first, in order
            np.testing.assert_array_equal(row, expected)


# --- the action table -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, max_actions, bins", [(1, 1000, 1000), (2, 120, 11), (3, 1000, 10), (3, 900, 10)])
def test_grid_is_the_product_of_evenly_spaced_bins_in_c_order(dim, max_actions, bins):
    table = w.action_table(gym.spaces.Box(-1, 1, (dim,)), max_actions)
    values = np.linspace(-1, 1, bins)
    expected = np.array(list(itertools.product(values, repeat=dim)))  # last dimension fastest
    assert table.shape == (bins**dim, dim) and table.dtype == np.float32
    np.testing.assert_allclose(table, expected, atol=1e-6)
    rng = np.random.default_rng(0)
    for index in rng.integers(0, len(table), 20):  # index -> bins -> index, and index -> point -> index
        per_dim = np.unravel_index(index, (bins,) * dim)
        np.testing.assert_allclose(table[index], values[list(per_dim)], atol=1e-6)
        assert int(w.nearest_actions(jnp.asarray(table), jnp.asarray(table[index][None]), 1)[0, 0]) == index


def test_discrete_actions_get_evenly_spaced_embeddings_and_grid_points_reach_the_env_bounds():
    np.testing.assert_array_equal(w.action_table(gym.spaces.Discrete(2), 7), [[-1.0], [1.0]])
    np.testing.assert_allclose(w.action_table(gym.spaces.Discrete(5), 7)[:, 0], [-1, -0.5, 0, 0.5, 1])
    env = w.make_env("Pendulum-v1", 0)
    table = w.action_table(env.action_space, 200_000)
    assert table.shape == (200_000, 1)
    env.reset(seed=0)
    for index, torque in [(0, -2.0), (len(table) - 1, 2.0), (len(table) // 2, 2.0 * float(table[len(table) // 2, 0]))]:
        env.step(w.env_action(env.action_space, table, index))
        assert float(env.unwrapped.last_u) == pytest.approx(torque, abs=1e-5)  # rescaled to Pendulum's [-2, 2]
    cartpole = w.make_env("CartPole-v1", 0)
    assert w.env_action(cartpole.action_space, w.action_table(cartpole.action_space, 7), 1) == 1
    shifted = gym.spaces.Discrete(3, start=-1)  # index i is the space's start + i
    assert [w.env_action(shifted, w.action_table(shifted, 7), i) for i in range(3)] == [-1, 0, 1]


# --- acting ---------------------------------------------------------------------------------------------------------


def test_act_picks_the_critic_s_best_of_the_k_nearest_to_the_noisy_proto_actions_and_counts_the_overrulings():
    dim, k, noise, states = 2, 12, 0.3, 6
    params, nets = networks(dim, 0), w.Networks(w.Actor(dim), w.Critic(), k)
    table = w.action_table(gym.spaces.Box(-1, 1, (dim,)), 400)  # 20 x 20
    obs = np.random.default_rng(1).normal(size=(states, OBS_DIM)).astype(np.float32)
    loop_key = jax.random.PRNGKey(5)
    index, next_key, update_key, counts = w.act(
        nets, jnp.asarray(table), params, obs, loop_key, jnp.array([3, 10], jnp.int32), noise, 0.0
    )
    key, k_act, k_update = jax.random.split(loop_key, 3)  # act's own splits
    noise_draw = np.asarray(jax.random.normal(jax.random.split(k_act, 3)[0], (states, dim)))
    np.testing.assert_array_equal(next_key, key)
    np.testing.assert_array_equal(update_key, k_update)
    changed = 0
    for i in range(states):
        proto = np.clip(np_actor(params["actor"], obs[i].astype(np.float64)) + noise * noise_draw[i], -1, 1)
        neighbours = np_nearest(table, proto, k)
        q = np_critic(params["critic"], obs[i].astype(np.float64), table[neighbours].astype(np.float64))
        assert int(index[i]) == neighbours[q.argmax()]
        changed += int(index[i]) != neighbours[0]
    assert changed > 0  # the critic overruled the nearest neighbour at least once
    np.testing.assert_array_equal(counts, [3 + changed, 10 + states])
    # epsilon 1, no noise: uniform over the k nearest to each proto-action itself
    randoms = np.array(
        [
            w.act(nets, jnp.asarray(table), params, obs, kk, jnp.zeros(2, jnp.int32), 0.0, 1.0)[0]
            for kk in jax.random.split(key, 30)
        ]
    )
    for i in range(states):
        around_proto = np_nearest(table, np_actor(params["actor"], obs[i].astype(np.float64)), k)
        assert set(randoms[:, i].tolist()) <= set(around_proto.tolist()) and len(set(randoms[:, i].tolist())) > 3


def test_random_steps_leave_the_key_sequence_as_if_every_step_had_split_it():
    key = jax.random.PRNGKey(3)
    by_hand = key
    for _ in range(7):
        by_hand, _, k_update = jax.random.split(by_hand, 3)  # what act does once per step
    advanced, last_update_key = w.advance_key(key, 7)
    np.testing.assert_array_equal(advanced, by_hand)
    np.testing.assert_array_equal(last_update_key, k_update)


def test_epsilon_falls_linearly_to_its_end_over_the_exploration_fraction():
    args = w.Args(epsilon=0.5, end_epsilon=0.1, exploration_fraction=0.4, total_timesteps=1000)  # over 400 steps
    for step, expected in [
        (1, 0.5 - 0.4 / 400),
        (100, 0.4),
        (200, 0.3),
        (399, 0.5 - 0.4 * 399 / 400),
        (400, 0.1),
        (401, 0.1),
        (1000, 0.1),
    ]:
        assert w.exploration_epsilon(args, step) == pytest.approx(expected, abs=1e-12), step
    assert w.exploration_epsilon(w.Args(epsilon=0.3, end_epsilon=0.3), 77) == pytest.approx(0.3)


# --- the update ---------------------------------------------------------------------------------------------------


def hand_targets(actor_target, critic_target, batch, gamma, table=None, k=None):
    """r + gamma (1 - d) Q'(s', a'), a' = mu'(s') or (knn) the target critic's best of the k nearest to mu'(s')."""
    values = []
    for next_obs in np.asarray(batch["next_obs"], np.float64):
        proto = np_actor(actor_target, next_obs)
        if table is None:
            values.append(np_critic(critic_target, next_obs, proto[None])[0])
        else:
            neighbours = table[np_nearest(table, proto, k)].astype(np.float64)
            values.append(np_critic(critic_target, next_obs, neighbours).max())
    return np.asarray(batch["reward"]) + gamma * (1 - np.asarray(batch["terminated"])) * np.array(values)


def hand_q(critic, batch):
    return np.array(
        [
            np_critic(critic, o, a[None])[0]
            for o, a in zip(np.asarray(batch["obs"], np.float64), np.asarray(batch["action"], np.float64))
        ]
    )


@pytest.mark.parametrize("terminated", [0.0, 1.0])
@pytest.mark.parametrize("prioritized, knn_in_target", [(True, False), (False, True)])
def test_td_target_actor_step_and_soft_update_match_a_hand_computation(terminated, prioritized, knn_in_target):
    dim, k, gamma, tau, alpha, eps = 1, 5, 0.9, 0.1, 0.6, 1e-6
    online, target = networks(dim, 0), networks(dim, 1)  # different online and target networks
    nets = w.Networks(w.Actor(dim), w.Critic(), k)
    table = w.action_table(gym.spaces.Box(-1, 1, (dim,)), 50)
    rng = np.random.default_rng(0)
    chunk = dict(
        obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
        action=table[rng.integers(0, 50, 8)],
        reward=np.array([1.0, -0.5, 0.25, 2.0, 0.0, -1.0, 0.5, 3.0], np.float32),
        next_obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
        terminated=np.full(8, terminated, np.float32),
    )
    empty = lambda: w.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8)  # noqa: E731
    key, batch_size = jax.random.PRNGKey(3), (8 if prioritized else 32)
    cfg = config(
        gamma=gamma,
        tau=tau,
        batch_size=batch_size,
        prioritized_replay=prioritized,
        priority_exponent=alpha,
        priority_epsilon=eps,
        knn_in_target=knn_in_target,
    )  # every update steps the actor
    states, buffer, metrics = w.update(nets, ddpg_states(online, target), empty(), chunk, jnp.asarray(table), key, cfg)

    index, batch, _ = w.buffer_sample(w.buffer_add(empty(), chunk), key, batch_size, prioritized, 0.2)  # the same rows
    y = hand_targets(target["actor"], target["critic"], batch, gamma, table if knn_in_target else None, k)
    q = hand_q(online["critic"], batch)
    assert float(metrics["losses/qf_loss"]) == pytest.approx(np.mean((y - q) ** 2), rel=1e-4)
    assert float(metrics["losses/qf_values"]) == pytest.approx(q.mean(), rel=1e-4, abs=1e-6)
    if not terminated:  # the two kinds of target differ, so the check can tell which one ran
        other = hand_targets(target["actor"], target["critic"], batch, gamma, None if knn_in_target else table, k)
        assert np.abs(other - y).max() > 1e-3
    if prioritized:
        np.testing.assert_allclose(buffer.tree[8:][np.asarray(index)], (np.abs(y - q) + eps) ** alpha, rtol=1e-4)
    else:
        np.testing.assert_array_equal(buffer.tree[8:], 1.0)

    # The actor's loss is -Q(s, mu(s)) under the critic just updated; the targets moved tau of the way.
    obs = np.asarray(batch["obs"], np.float64)
    critic = states["critic"].params
    actor_loss = -np.mean([np_critic(critic, o, np_actor(online["actor"], o)[None])[0] for o in obs])
    assert float(metrics["losses/actor_loss"]) == pytest.approx(actor_loss, rel=1e-4)
    for name, state in states.items():
        expected = jax.tree.map(lambda p, t: tau * p + (1 - tau) * t, state.params, target[name])
        for a, b in zip(jax.tree.leaves(state.target_params), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not same(states["actor"].params, online["actor"])


def random_chunk(table, size, seed):
    rng = np.random.default_rng(seed)
    return dict(
        obs=rng.normal(size=(size, OBS_DIM)).astype(np.float32),
        action=table[rng.integers(0, len(table), size)],
        reward=rng.normal(size=size).astype(np.float32),
        next_obs=rng.normal(size=(size, OBS_DIM)).astype(np.float32),
        terminated=np.zeros(size, np.float32),
    )


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


TABLE = w.action_table(gym.spaces.Box(-1, 1, (1,)), 50)
NETS = w.Networks(w.Actor(1), w.Critic(), 5)


def test_importance_weights_scale_the_td_loss():
    online, target = networks(1, 0), networks(1, 1)  # targets from networks unlike the online ones
    chunk = random_chunk(TABLE, 4, 0)
    priorities = np.array([0.05, 0.5, 2.0, 8.0], np.float32)  # unequal, so the weights are too
    buffer = w.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8)
    buffer = w.buffer_update(w.buffer_add(buffer, chunk), jnp.arange(4), jnp.asarray(priorities), alpha=0.6)
    key = jax.random.PRNGKey(3)
    index = np.asarray(w.buffer_sample(buffer, key, 16, True, 0.2)[0])  # one update samples with the key itself
    *_, metrics = w.update(
        NETS,
        ddpg_states(online, target),
        buffer,
        jax.tree.map(lambda x: x[:0], chunk),
        jnp.asarray(TABLE),
        key,
        config(batch_size=16),
    )
    probability = priorities**0.6 / np.sum(priorities**0.6)
    weights = (4 * probability[index]) ** -0.2
    weights /= weights.max()
    batch = {name: v[index] for name, v in chunk.items()}
    y, q = hand_targets(target["actor"], target["critic"], batch, 0.9), hand_q(online["critic"], batch)
    assert len(set(np.round(weights, 6))) > 1
    assert abs(np.mean(weights * (y - q) ** 2) - np.mean((y - q) ** 2)) > 0.01 * np.mean((y - q) ** 2)
    np.testing.assert_allclose(metrics["losses/qf_loss"], np.mean(weights * (y - q) ** 2), rtol=1e-4)


def test_policy_frequency_gates_the_actor_step_and_the_soft_target_update():
    online, target = networks(1, 0), networks(1, 1)
    chunk, table, key = random_chunk(TABLE, 8, 1), jnp.asarray(TABLE), jax.random.PRNGKey(4)
    fresh = lambda: w.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=16)  # noqa: E731
    cfg = config(policy_frequency=3)
    for phase in (1, 2):  # the run has taken 1 or 2 updates modulo --policy-frequency 3: an off-step
        states, _, metrics = w.update(NETS, ddpg_states(online, target), fresh(), chunk, table, key, cfg, phase)
        assert not same(states["critic"].params, online["critic"])  # the critic steps every update
        assert same(states["actor"].params, online["actor"]) and int(states["actor"].step) == 0
        assert "losses/actor_loss" not in metrics
        assert same(states["actor"].target_params, target["actor"])
        assert same(states["critic"].target_params, target["critic"])
    states, _, metrics = w.update(NETS, ddpg_states(online, target), fresh(), chunk, table, key, cfg, 0)
    assert not same(states["actor"].params, online["actor"]) and int(states["actor"].step) == 1
    assert np.isfinite(metrics["losses/actor_loss"])
    for name, state in states.items():  # both targets moved tau of the way
        expected = jax.tree.map(lambda p, t: 0.1 * p + 0.9 * t, state.params, target[name])
        assert not same(state.target_params, target[name])
        for x, y in zip(jax.tree.leaves(state.target_params), jax.tree.leaves(expected)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("phase", [0, 2])
def test_updates_in_one_call_gate_the_actor_as_the_same_updates_one_by_one(phase):
    online, target = networks(1, 0), networks(1, 1)
    chunk, table, key = random_chunk(TABLE, 8, 2), jnp.asarray(TABLE), jax.random.PRNGKey(5)
    fresh = lambda: w.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=16)  # noqa: E731
    # actor steps: phase 0 -> the 1st and 4th, phase 2 -> the 2nd
    together = w.update(
        NETS, ddpg_states(online, target), fresh(), chunk, table, key, config(updates=4, policy_frequency=3), phase
    )
    states, buffer, no_new, actor_loss = (
        ddpg_states(online, target),
        fresh(),
        jax.tree.map(lambda x: x[:0], chunk),
        None,
    )
    for i, k in enumerate(jax.random.split(key, 4)):
        states, buffer, metrics = w.update(
            NETS, states, buffer, chunk if i == 0 else no_new, table, k, config(policy_frequency=3), (phase + i) % 3
        )
        actor_loss = metrics.get("losses/actor_loss", actor_loss)
    assert int(together[0]["actor"].step) == int(states["actor"].step) == {0: 2, 2: 1}[phase]
    assert int(together[0]["critic"].step) == int(states["critic"].step) == 4
    for x, y in zip(
        jax.tree.leaves((together[0], together[1].tree)), jax.tree.leaves((states, buffer.tree)), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together[2]["losses/actor_loss"], actor_loss, rtol=1e-5)  # the last actor step's
    np.testing.assert_allclose(together[2]["losses/qf_loss"], metrics["losses/qf_loss"], rtol=1e-5)


def test_before_learning_starts_an_update_call_only_stores():
    chunk, states = random_chunk(TABLE, 8, 3), ddpg_states(networks(1, 0), networks(1, 1))
    buffer = w.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=16)
    after, buffer, metrics = w.update(
        NETS, states, buffer, chunk, jnp.asarray(TABLE), jax.random.PRNGKey(0), config(updates=0)
    )
    assert metrics == {} and same(after, states) and int(buffer.size) == 8
    np.testing.assert_array_equal(buffer.storage["action"][:8], chunk["action"])


def test_the_first_updates_and_actions_match_the_golden_recording():
    """tests/golden/wolpertinger.json holds what the script computed before its redesign (its "source"), on the same
    inputs: the actions of six states (greedy, and with noise and epsilon), and three update calls' metrics in three
    settings. Float32 rounding differs between CPU kinds and with this suite's XLA flags (bit for bit without them)."""
    golden = json.load(open(os.path.join(ROOT, "tests", "golden", "wolpertinger.json")))
    rs = np.random.RandomState(0)
    obs = rs.randn(6, 5).astype(np.float32)
    table_np = w.action_table(gym.spaces.Box(-1, 1, (2,)), 400)
    table, nets = jnp.asarray(table_np), w.Networks(w.Actor(2), w.Critic(), 12)
    key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(3), 3)
    init = jax.jit(w.nn.Module.init, static_argnums=0)  # as main initialises them
    params = dict(
        actor=init(nets.actor, k_actor, obs[:1]), critic=init(nets.critic, k_critic, obs[:1], table[None, :1])
    )
    for name, act_key, noise in [("greedy", key, 0.0), ("noisy", jax.random.PRNGKey(7), 0.3)]:
        index, _, _, counts = w.act(nets, table, params, obs, act_key, jnp.zeros(2, jnp.int32), noise, noise)
        assert index.tolist() == golden[f"{name}_actions"] and counts.tolist() == golden[f"{name}_counts"]
    n = 300
    data = dict(
        obs=rs.randn(n, 5).astype(np.float32),
        action=table_np[rs.randint(0, len(table_np), n)],
        reward=rs.rand(n).astype(np.float32),
        next_obs=rs.randn(n, 5).astype(np.float32),
        terminated=(rs.rand(n) < 0.1).astype(np.float32),
    )
    settings = {
        "uniform, knn in target, 5 updates a call": (5, False, True),
        "prioritized, 5 updates a call": (5, True, False),
        "prioritized, 1 update a call": (1, True, False),
    }
    for name, (updates, prioritized, knn_in_target) in settings.items():
        states = ddpg_states(params, params, w.adam(3e-4))
        buffer = w.buffer_init({k: v[0] for k, v in data.items()}, 1000)
        cfg = config(
            updates=updates,
            policy_frequency=2,
            gamma=0.99,
            tau=0.005,
            batch_size=64,
            prioritized_replay=prioritized,
            knn_in_target=knn_in_target,
        )
        for i, expected in enumerate(golden["update_metrics"][name]):
            chunk = {k: v[i * 100 : (i + 1) * 100] for k, v in data.items()}
            states, buffer, metrics = w.update(
                nets, states, buffer, chunk, table, jax.random.PRNGKey(10 + i), cfg, i * updates % 2
            )
            assert set(metrics) == set(expected)
            for metric, value in expected.items():
                assert float(metrics[metric]) == pytest.approx(value, rel=1e-3, abs=1e-6), (name, i, metric)


# --- checkpoints ----------------------------------------------------------------------------------------------------


def run_state(online, target, capacity=64):
    example = jax.tree.map(lambda x: x[0], random_chunk(TABLE, 1, 0))
    return dict(
        states=ddpg_states(online, target),
        buffer=w.buffer_init(example, capacity),
        key=jax.random.PRNGKey(0),
        counts=jnp.zeros(2, jnp.int32),
        pending={name: np.zeros((4, *np.shape(v)), np.float32) for name, v in example.items()},
    )


def test_a_checkpointed_run_continues_exactly_as_one_that_never_stopped(tmp_path):
    online, target = networks(1, 0), networks(1, 1)
    steps, keys = [random_chunk(TABLE, 4, seed) for seed in range(6)], jax.random.split(jax.random.PRNGKey(1), 6)

    def train(run, first, last):  # one update per call, the actor every third one, as the loop counts them
        for chunk, key in zip(steps[first:last], keys[first:last]):
            phase = int(run["states"]["critic"].step) % 3
            states, buffer, _ = w.update(
                NETS, run["states"], run["buffer"], chunk, jnp.asarray(TABLE), key, config(policy_frequency=3), phase
            )
            run = dict(run, states=states, buffer=buffer)
        return run

    uninterrupted = train(run_state(online, target), 0, 6)
    stopped = train(run_state(online, target), 0, 2)
    stopped["pending"]["obs"][:2] = 1.5  # steps taken since the last update travel with the checkpoint too
    stopped["counts"] = jnp.array([4, 9], jnp.int32)
    path = w.save_arrays(str(tmp_path / "checkpoint.npz"), stopped, dict(global_step=12))
    meta, arrays = load_saved(path)
    assert meta == dict(global_step=12, script="wolpertinger.py")
    resumed = w.restore(run_state(online, target), arrays, "--resume")
    assert same(stopped, resumed)  # the resume point is the checkpoint
    resumed = train(resumed, 2, 6)  # the 3rd update is an off-step: the critic's step count decides
    assert same(uninterrupted["states"], resumed["states"])
    np.testing.assert_array_equal(uninterrupted["buffer"].tree, resumed["buffer"].tree)


def test_damaged_missing_or_foreign_checkpoints_are_refused_with_one_line(tmp_path):
    run = run_state(networks(1, 0), networks(1, 1))
    data = open(w.save_arrays(str(tmp_path / "checkpoint.npz"), run, dict(args=vars(w.Args()))), "rb").read()
    for name, content in [("cut", data[: len(data) // 2]), ("noise", b"not a checkpoint"), ("missing", None)]:
        os.makedirs(tmp_path / name)
        if content is not None:
            (tmp_path / name / "checkpoint.npz").write_bytes(content)
        with pytest.raises(SystemExit, match=r"^error: --resume: [^\n]*$"):
            w.saved_settings(w.Args(resume=str(tmp_path / name)))
    _, meta, arrays = w.saved_settings(w.Args(resume=str(tmp_path)))
    assert meta["script"] == "wolpertinger.py"
    with pytest.raises(SystemExit, match=r"^error: --resume: [^\n]*$"):  # the arrays of another kind of run
        w.restore(dict(run, extra=jnp.zeros(3)), arrays, "--resume")
    w.restore(run, arrays, "--resume")  # its own kind


# --- refusals: one clear line, before anything starts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(k=0), "--k"),
        (dict(max_actions=0), "--max-actions"),
        (dict(k_ratio=0.0), "--k-ratio"),
        (dict(k_ratio=1.5), "--k-ratio"),
        (dict(tau=1.5), "--tau"),
        (dict(recall_target=-0.1), "--recall-target"),
        (dict(policy_frequency=0), "--policy-frequency"),
        (dict(exploration_noise=float("nan")), "--exploration-noise"),
        (dict(exploration_noise=-0.1), "--exploration-noise"),
        (dict(end_epsilon=2.0), "--end-epsilon"),
        (dict(gamma=float("inf")), "--gamma"),
        (dict(learning_rate=0.0), "--learning-rate"),
        (dict(prioritized_replay=True, priority_epsilon=0.0), "--priority-epsilon"),
        (dict(num_envs=0), "--num-envs"),
        (dict(checkpoint_frequency=-1), "--checkpoint-frequency"),
        (dict(num_envs=4, train_frequency=3, buffer_size=11), "--buffer-size"),
    ],
)
def test_bad_arguments_are_rejected_with_one_line(overrides, flag):
    with pytest.raises(SystemExit) as exit_info:
        w.check_args(w.Args(**overrides))
    text = str(exit_info.value)
    assert text.startswith("error: ") and flag in text and "\n" not in text
    w.check_args(w.Args(priority_epsilon=0.0))  # uniform replay needs no priority epsilon
    w.check_args(w.Args(k=1, k_ratio=1.0, num_envs=4, train_frequency=3, buffer_size=12))  # the edges


def test_bad_input_is_refused_in_one_line_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = refusal(w.main, w.Args(env_id="CartPole-v1", k=3))
    assert "--k" in text and "(2)" in text  # CartPole's 2 actions
    for settings, message in [
        (dict(env_id="Pendulum-v9"), "unknown --env-id 'Pendulum-v9'"),
        (dict(max_actions=0), "--max-actions"),
    ]:
        with pytest.raises(SystemExit, match=f"^error: {message}"):
            w.main(w.Args(**settings))
    assert not os.path.exists(tmp_path / "runs")  # nothing started


class MultiAction(gym.Env):
    """A task whose actions wolpertinger.py cannot index: a [2, 2] box, or several discrete choices."""

    observation_space = gym.spaces.Box(-1, 1, (3,))

    def __init__(self, action_space, render_mode=None):
        self.action_space = action_space


@pytest.mark.parametrize("space", [gym.spaces.Box(-1, 1, (2, 2)), gym.spaces.MultiDiscrete([3, 3])])
def test_action_spaces_it_cannot_index_are_refused_with_one_line(space):
    gym.register("WolpertingerTestMulti-v0", entry_point=MultiAction, kwargs=dict(action_space=space))
    try:
        with pytest.raises(SystemExit, match=r"^error: --env-id 'WolpertingerTestMulti-v0' has .* actions; [^\n]*$"):
            w.make_env("WolpertingerTestMulti-v0", 0)
    finally:
        del gym.registry["WolpertingerTestMulti-v0"]


# --- action tables too large for memory: refused before they are built ---------------------------------------------


@pytest.fixture
def no_grid(monkeypatch):
    """Building any grid fails the test: the refusal must come before the allocation."""

    def meshgrid(*arrays, **kwargs):
        raise AssertionError(f"a grid of {[len(a) for a in arrays]} was built")

    monkeypatch.setattr(np, "meshgrid", meshgrid)


def reference_bytes(bins, dim, k=None, k_ratio=0.1, num_envs=1, knn_in_target=False, batch_size=256):
    """The most a grid holds at once: its float32 table, or per device call the distances from each searched state
    to every action and the critic's two 256-wide hidden layers over its k neighbours."""
    n = bins**dim
    k = min(n, k if k is not None else max(1, round(k_ratio * n)))
    states = max(num_envs, min(batch_size, max(1, 65536 // k)) if knn_in_target else 1)
    return max(4 * n * dim, states * (4 * n + 2 * 256 * 4 * k))


@pytest.mark.parametrize(
    "dim, max_actions, settings",
    [
        (1, 10**8, {}),
        (6, 10**9, {}),
        (6, 200_000, dict(num_envs=64)),
        (1, 10**10, dict(k=20_000)),
        (1, 2 * 10**6, dict(k=2, knn_in_target=True)),
        (3, 10**12, dict(k=10)),
    ],
)
def test_the_memory_check_counts_what_a_grid_holds_at_once(no_grid, monkeypatch, dim, max_actions, settings):
    asked = []
    monkeypatch.setattr(w, "check_fits", lambda what, nbytes, host=False: asked.append((what, nbytes)))
    w.check_actions(w.Args(max_actions=max_actions, **settings), gym.spaces.Box(-1, 1, (dim,)))
    bins = max(2, round(max_actions ** (1 / dim)))
    assert asked[0][1] == reference_bytes(2, dim, **settings) and "qmle_dmc.py" in asked[0][0]  # the 2-bin floor
    assert asked[-1][1] == reference_bytes(bins, dim, **settings)


def test_dog_walk_is_refused_at_start_up_before_its_grid_is_built(no_grid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # 2**38 actions at 2 bins: a 38 TiB table
        w.main(w.Args(env_id="dog-walk"))
    assert str(exit_info.value).startswith("error: 38 action dimensions") and "\n" not in str(exit_info.value)
    assert "qmle_dmc.py and aql_discrete.py" in str(exit_info.value) and not os.path.exists(tmp_path / "runs")
    with pytest.raises(SystemExit, match=r"^error: a table of 1,000,000,000,000 actions \(--max-actions\)"):
        w.check_actions(w.Args(max_actions=10**12), gym.spaces.Box(-1, 1, (1,)))  # 4 TB


def test_too_few_bins_ask_for_the_smallest_grid_and_it_builds():
    with pytest.raises(SystemExit, match=r"^error: --max-actions must be >= 64 .*, got 5$"):
        w.check_actions(w.Args(max_actions=5), gym.spaces.Box(-1, 1, (6,)))
    w.check_actions(w.Args(max_actions=64), gym.spaces.Box(-1, 1, (6,)))
    assert w.action_table(gym.spaces.Box(-1, 1, (6,)), 64).shape == (64, 6)


@pytest.mark.parametrize(
    "dim, settings, slow",
    [
        (6, {}, True),  # walker-walk's default: 8 ** 6 = 262,144 actions, k = 26,214: a few steps per second
        (6, dict(k=64), False),  # the same grid with a small k: 50-100 steps/s
        (1, {}, False),  # the Pendulum headline: 200,000 actions, k = 20,000
    ],
)
def test_a_slow_grid_is_allowed_with_a_warning(capsys, dim, settings, slow):
    w.check_actions(w.Args(**settings), gym.spaces.Box(-1, 1, (dim,)))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == slow
    if slow:
        assert warnings[0].startswith("warning: 262,144 actions of 6 dimensions and k = 26,214 make every step slow")


# --- whole runs ---------------------------------------------------------------------------------------------------

SMOKE = dict(
    total_timesteps=400,
    learning_starts=200,
    max_actions=1000,
    buffer_size=1000,
    batch_size=32,
    eval_frequency=300,
    log_frequency=100,
)


def test_smoke_run_writes_metrics_and_a_model_that_loads_and_its_seed_reproduces_it(tmp_path, monkeypatch, capsys):
    flags = command_line(**SMOKE)
    result = run_script("wolpertinger.py", "--save-model", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1000 actions in 1 embedding dims, k = 100 (exact k-NN)" in result.stdout
    assert "step      400" in result.stdout and "compiling the update" in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Pendulum-v1__wolpertinger__1__*"))
    rows = read_metrics(run_dir)
    assert list(rows[0]) == ["global_step", *w.METRICS] and w.METRICS == [
        "charts/episodic_return",
        "charts/episodic_length",
        "charts/SPS",
        "charts/refine_changed",
        "losses/qf_loss",
        "losses/actor_loss",
        "losses/qf_values",
        "eval/episodic_return",
    ]  # the columns of the original, in order
    episodes = [r for r in rows if r["charts/episodic_return"]]
    assert [r["global_step"] for r in episodes] == ["200", "400"]  # 200-step Pendulum episodes
    assert all(
        r["charts/episodic_length"] == "200.0" and -2000 < float(r["charts/episodic_return"]) <= 0 for r in episodes
    )
    updates = [r for r in rows if r["losses/qf_loss"]]
    assert [r["global_step"] for r in updates] == ["200", "300", "400"]  # the first update ran at step 200
    assert all(
        np.isfinite(float(r[c])) for r in updates for c in ("losses/qf_loss", "losses/actor_loss", "losses/qf_values")
    )
    changed = [float(r["charts/refine_changed"]) for r in rows if r["charts/refine_changed"]]
    assert len(changed) == 2 and all(0.0 <= c <= 1.0 for c in changed)  # policy steps from step 201 on
    evaluations = [float(r["eval/episodic_return"]) for r in rows if r["eval/episodic_return"]]
    assert [r["global_step"] for r in rows if r["eval/episodic_return"]] == ["300", "400"]  # and at the end

    # The same seed in this process writes the same numbers (all but the speed).
    (tmp_path / "again").mkdir()
    monkeypatch.chdir(tmp_path / "again")
    w.main(w.Args(exp_name="again", **SMOKE))
    (again,) = glob.glob(str(tmp_path / "again" / "runs" / "Pendulum-v1__again__1__*"))
    without_speed = lambda rows: [{k: v for k, v in r.items() if k != "charts/SPS"} for r in rows]  # noqa: E731
    assert without_speed(read_metrics(again)) == without_speed(rows)

    model_path = os.path.join(run_dir, "wolpertinger.npz")
    meta, arrays = load_saved(model_path)
    assert meta["script"] == "wolpertinger.py" and meta["args"]["max_actions"] == 1000 and meta["global_step"] == 400
    assert sorted({name.split("']")[0] for name in arrays}) == ["['actor", "['critic"]
    capsys.readouterr()
    w.main(w.Args(load_model=model_path))  # its task, grid and k, and the run's eval seeds
    # the saved model scores what the run logged at its end
    assert (
        f"{model_path} on Pendulum-v1  greedy evaluation return {evaluations[-1]:.1f} over 1 episode(s)"
        in capsys.readouterr().out
    )
    assert len(glob.glob(str(tmp_path / "again" / "runs" / "*"))) == 1  # evaluating started no run
    for overrides, flag in [
        (dict(max_actions=500), "--max-actions"),
        (dict(k=7), "--k"),
        (dict(env_id="CartPole-v1"), "--env-id"),
    ]:  # another grid, k or task than it acted on
        with pytest.raises(SystemExit, match=f"^error: --load-model: {flag} "):
            w.saved_settings(w.Args(load_model=model_path, **overrides))


FAST = dict(
    env_id="Pendulum-v1",
    max_actions=200,
    learning_starts=100,
    buffer_size=2000,
    batch_size=16,
    eval_frequency=0,
    log_frequency=100,
)


def train_in_process(directory, monkeypatch, **overrides):
    return run_in_process(w, directory, monkeypatch, **dict(FAST, **overrides))


def host_draws(num_actions, num_envs, steps, seed=1):
    """The uniformly random action indices of the first `steps` vector steps: N draws of the seed's RNG each."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(num_actions, size=num_envs) for _ in range(steps)])


def stored(arrays):
    """The transitions in a checkpoint's replay buffer, its filled rows."""
    return {k: v[: int(arrays["['buffer'].size"])] for k, v in saved(arrays, "['buffer'].storage").items()}


@pytest.mark.parametrize("num_envs", [1, 4])
def test_vector_env_transitions_equal_single_envs_and_updates_keep_their_ratio(tmp_path, monkeypatch, num_envs):
    _, (meta, arrays) = train_in_process(
        tmp_path,
        monkeypatch,
        total_timesteps=900,
        num_envs=num_envs,
        train_frequency=3,
        checkpoint_frequency=10_000,
        exp_name=f"vector{num_envs}",
    )
    final, rows = meta["global_step"], np.lcm(num_envs, 3)  # rows: transitions per update call
    buffer, pending = stored(arrays), saved(arrays, "['pending']")
    assert final == -(-900 // num_envs) * num_envs and len(buffer["['obs']"]) == final // rows * rows
    buffer = {k: np.concatenate([v, pending[k][: final % rows]]) for k, v in buffer.items()}  # not yet sent
    ends = 0
    for i in range(num_envs):  # env i's transitions sit at rows i, i + N, ...; replay its actions alone
        env = w.make_env("Pendulum-v1", 1 + i)
        obs, _ = env.reset(seed=1 + i)
        for row in range(i, final, num_envs):
            np.testing.assert_array_equal(buffer["['obs']"][row], obs)
            obs, reward, terminated, truncated, _ = env.step(buffer["['action']"][row])
            np.testing.assert_allclose(buffer["['reward']"][row], reward, rtol=1e-6)
            np.testing.assert_array_equal(buffer["['next_obs']"][row], obs)  # the episode's own, not the reset's
            assert buffer["['terminated']"][row] == terminated == 0.0  # a time limit is not a termination
            if terminated or truncated:
                obs, _ = env.reset()
                ends += 1
    assert ends == (final // num_envs) // 200 * num_envs  # every 200 steps of each env
    # Before learning starts the actions are the host RNG's, N draws per vector step.
    random_steps = -(-100 // num_envs)
    table = w.action_table(w.make_env("Pendulum-v1", 0).action_space, 200)
    np.testing.assert_array_equal(
        buffer["['action']"][: random_steps * num_envs], table[host_draws(200, num_envs, random_steps)]
    )
    # One split of the loop key per vector step, random steps included (they catch up when learning starts).
    key = jax.random.split(jax.random.PRNGKey(1), 3)[0]  # main's split of the seed's key
    for _ in range(final // num_envs):
        key = jax.random.split(key, 3)[0]
    np.testing.assert_array_equal(arrays["['key']"], key)
    # one update per 3 environment steps, from the first update call at or after step 100; the actor every second
    first, last = -(-100 // rows) * rows, final // rows * rows
    updates = (last - first) // 3 + rows // 3
    assert int(arrays["['states']['critic'].step"]) == updates
    assert int(arrays["['states']['actor'].step"]) == -(-updates // 2)
    assert abs(updates - (final - 100) / 3) <= rows / 3


def test_a_termination_is_stored_as_terminal_and_random_steps_make_no_device_call(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a device call to act before learning starts")

    # CartPole-v1 terminates when the pole falls, which uniformly random pushes soon let it do.
    monkeypatch.setattr(w, "act", forbidden)
    monkeypatch.setattr(w, "advance_key", forbidden)
    run_dir, (meta, arrays) = train_in_process(
        tmp_path,
        monkeypatch,
        env_id="CartPole-v1",
        num_envs=2,
        total_timesteps=300,
        learning_starts=1000,
        checkpoint_frequency=300,
        exp_name="falls",
    )
    buffer = stored(arrays)
    indices = host_draws(2, 2, 150)
    np.testing.assert_array_equal(buffer["['action']"][:, 0], np.where(indices == 1, 1.0, -1.0))  # the embeddings
    falls = 0
    for i in range(2):
        env = w.make_env("CartPole-v1", 1 + i)
        obs, _ = env.reset(seed=1 + i)
        for row in range(i, 300, 2):
            np.testing.assert_array_equal(buffer["['obs']"][row], obs)
            obs, reward, terminated, truncated, _ = env.step(indices[row])
            np.testing.assert_array_equal(buffer["['next_obs']"][row], obs)
            assert buffer["['terminated']"][row] == terminated
            if terminated or truncated:
                obs, _ = env.reset()
                falls += terminated
    assert falls >= 5 and len([r for r in read_metrics(run_dir) if r["charts/episodic_return"]]) == falls


def test_resume_continues_the_metrics_the_update_count_the_host_rng_and_the_epsilon_schedule(tmp_path, monkeypatch):
    # Learning starts at 200: the first run stops at 150, among the random steps; the second at 250, after 51
    # updates (an odd count, so that restarting the count would move the actor steps); the third ends at 401.
    settings = dict(
        learning_starts=200,
        checkpoint_frequency=1000,
        log_frequency=50,
        epsilon=0.5,
        end_epsilon=0.1,
        exploration_fraction=1.0,
        exp_name="resumed",
    )
    run_dir, (meta, arrays) = train_in_process(tmp_path, monkeypatch, total_timesteps=150, **settings)
    assert meta["global_step"] == 150 and int(arrays["['states']['critic'].step"]) == 0
    _, (meta, arrays) = train_in_process(tmp_path, monkeypatch, total_timesteps=250, resume=run_dir, **settings)
    assert meta["global_step"] == 250 and int(arrays["['states']['critic'].step"]) == 51
    epsilons, schedule = [], w.exploration_epsilon

    def recorded(args, step):  # the loop's own schedule, watched
        epsilons.append((step, schedule(args, step)))
        return epsilons[-1][1]

    monkeypatch.setattr(w, "exploration_epsilon", recorded)
    with counting_compiles() as compiled:  # what the second run compiled serves the third: nothing is keyed on a run
        _, (meta, arrays) = train_in_process(tmp_path, monkeypatch, total_timesteps=401, resume=run_dir, **settings)
    assert compiled == []
    assert meta["global_step"] == 401 and int(arrays["['states']['critic'].step"]) == 202
    assert int(arrays["['states']['actor'].step"]) == 101  # every second update, counted over the three runs
    assert [step for step, _ in epsilons] == list(range(251, 402))  # one per step, continuing the step count
    np.testing.assert_allclose([e for _, e in epsilons], [0.5 - 0.4 * s / 401 for s in range(251, 402)])
    table = w.action_table(w.make_env("Pendulum-v1", 0).action_space, 200)
    actions = stored(arrays)["['action']"]
    np.testing.assert_array_equal(actions[:200], table[host_draws(200, 1, 200)])  # one RNG across the resume
    steps = [int(r["global_step"]) for r in read_metrics(run_dir) if r["charts/SPS"]]
    assert steps == list(range(50, 401, 50))  # metrics.csv continued where each checkpoint was taken
    changed = [float(r["charts/refine_changed"]) for r in read_metrics(run_dir) if r["charts/refine_changed"]]
    assert len(changed) == 4 and all(0.0 <= c <= 1.0 for c in changed)  # greedy steps from 201 on


def test_sigint_saves_the_model_and_a_checkpoint_and_says_how_to_resume(tmp_path):
    flags = command_line(**dict(FAST, total_timesteps=1_000_000, checkpoint_frequency=5000))
    returncode, stdout, stderr = interrupt("wolpertinger.py", flags, tmp_path)
    assert returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "interrupted at step" in stdout and f"--resume runs/{os.path.basename(run_dir)}" in stdout
    meta, arrays = load_saved(os.path.join(run_dir, "checkpoint.npz"))
    assert 300 <= meta["global_step"] < 1_000_000
    assert int(arrays["['states']['critic'].step"]) == meta["global_step"] - 100 + 1  # one update per step from 100
    assert load_saved(os.path.join(run_dir, "wolpertinger.npz"))[0]["global_step"] == meta["global_step"]
    with pytest.raises(SystemExit, match="^error: --resume: --seed 2 differs"):  # a resumed run keeps its seed
        w.saved_settings(w.Args(resume=run_dir, seed=2))


def test_videos_play_at_the_tasks_own_speed(tmp_path):
    # Gymnasium's classic control declares 30 frames per second; one frame per step after the reset frame.
    import imageio

    env = w.make_env("Pendulum-v1", 0, video_dir=str(tmp_path))
    env.reset(seed=0)
    for _ in range(20):
        env.step(env.action_space.sample())
    env.close()  # an unfinished episode's video is written on close
    (video,) = glob.glob(str(tmp_path / "*.mp4"))
    reader = imageio.get_reader(video)
    assert reader.get_meta_data()["fps"] == 20 and reader.count_frames() == 21


def test_a_run_stopped_in_the_middle_of_an_episode_resumes_as_if_it_never_stopped(tmp_path, monkeypatch):
    resumes_as_if_it_never_stopped(w, tmp_path, monkeypatch, **FAST)
