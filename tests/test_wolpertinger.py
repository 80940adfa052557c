"""wolpertinger.py: k-NN, the refined action, the action grid and the TD target against independent computations
(numpy brute force, networks written out from their raw parameters), then argument errors and a whole run."""

import csv
import functools
import glob
import itertools
import os

import flax
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wolpertinger as w
from conftest import run_script

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
    return dict(actor=jax.jit(actor.init)(k_actor, jnp.zeros((1, OBS_DIM))),
                critic=jax.jit(critic.init)(k_critic, jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, dim))))


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


# --- acting ---------------------------------------------------------------------------------------------------------

def test_selected_action_is_the_critic_s_best_of_the_k_nearest_to_the_noisy_proto_action():
    dim, k, noise = 2, 12, 0.3
    params = networks(dim, 0)
    nets = w.Networks(w.Actor(dim), w.Critic(), k)
    table = w.action_table(gym.spaces.Box(-1, 1, (dim,)), 400)  # 20 x 20
    rng = np.random.default_rng(1)
    changed = 0
    for i in range(6):
        obs = rng.normal(size=OBS_DIM).astype(np.float32)
        key = jax.random.PRNGKey(i)
        index, nearest = w.select_action(nets, params, jnp.asarray(table), obs, key, noise, 0.0)
        k_noise = jax.random.split(key, 3)[0]  # select_action's own split
        noise_draw = np.asarray(jax.random.normal(k_noise, (dim,)))
        proto = np.clip(np_actor(params["actor"], obs.astype(np.float64)) + noise * noise_draw, -1, 1)
        neighbours = np_nearest(table, proto, k)
        q = np_critic(params["critic"], obs.astype(np.float64), table[neighbours].astype(np.float64))
        assert int(index) == neighbours[q.argmax()] and int(nearest) == neighbours[0]
        changed += int(index) != int(nearest)
        # epsilon 1, no noise: uniform over the k nearest to the proto-action itself
        randoms = {int(w.select_action(nets, params, jnp.asarray(table), obs, kk, 0.0, 1.0)[0])
                   for kk in jax.random.split(key, 30)}
        around_proto = np_nearest(table, np_actor(params["actor"], obs.astype(np.float64)), k)
        assert randoms <= set(around_proto.tolist()) and len(randoms) > 3
    assert changed > 0  # the critic overruled the nearest neighbour at least once


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


@pytest.mark.parametrize("terminated", [0.0, 1.0])
@pytest.mark.parametrize("prioritized, knn_in_target", [(True, False), (False, True)])
def test_td_target_actor_step_and_soft_update_match_a_hand_computation(terminated, prioritized, knn_in_target):
    dim, k, gamma, tau, alpha, eps = 1, 5, 0.9, 0.1, 0.6, 1e-6
    online, target = networks(dim, 0), networks(dim, 1)  # different online and target networks
    nets = w.Networks(w.Actor(dim), w.Critic(), k)
    table = w.action_table(gym.spaces.Box(-1, 1, (dim,)), 50)
    tx = optax.adam(1e-3)
    actor_state = w.DDPGState.create(apply_fn=None, params=online["actor"], target_params=target["actor"], tx=tx)
    critic_state = w.DDPGState.create(apply_fn=None, params=online["critic"], target_params=target["critic"], tx=tx)
    rng = np.random.default_rng(0)
    chunk = dict(obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32), action=table[rng.integers(0, 50, 8)],
                 reward=np.array([1.0, -0.5, 0.25, 2.0, 0.0, -1.0, 0.5, 3.0], np.float32),
                 next_obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
                 terminated=np.full(8, terminated, np.float32))
    empty = lambda: w.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8)  # noqa: E731
    key, batch_size = jax.random.PRNGKey(3), (8 if prioritized else 32)
    new_actor, new_critic, buffer, metrics = w.update(
        nets, actor_state, critic_state, empty(), chunk, jnp.asarray(table), key, gamma=gamma, tau=tau,
        batch_size=batch_size, prioritized=prioritized, alpha=alpha, beta=0.2, priority_epsilon=eps,
        update_actor=True, knn_in_target=knn_in_target)

    index, batch, _ = w.buffer_sample(w.buffer_add(empty(), chunk), key, batch_size, prioritized, 0.2)  # the same rows
    y = hand_targets(target["actor"], target["critic"], batch, gamma, table if knn_in_target else None, k)
    q = np.array([np_critic(online["critic"], o, a[None])[0] for o, a in zip(np.asarray(batch["obs"], np.float64),
                                                                          np.asarray(batch["action"], np.float64))])
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
    actor_loss = -np.mean([np_critic(new_critic.params, o, np_actor(online["actor"], o)[None])[0] for o in obs])
    assert float(metrics["losses/actor_loss"]) == pytest.approx(actor_loss, rel=1e-4)
    for state, before in ((new_actor, target["actor"]), (new_critic, target["critic"])):
        expected = jax.tree.map(lambda p, t: tau * p + (1 - tau) * t, state.params, before)
        for a, b in zip(jax.tree.leaves(state.target_params), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_actor.params),
                                                     jax.tree.leaves(online["actor"])))


# --- argument checking: one clear line, exit code 1 ---------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(k=0), "--k must be >= 1, got 0"),
    (dict(max_actions=0), "--max-actions must be >= 1, got 0"),
    (dict(k_ratio=0.0), "--k-ratio must be in (0, 1], got 0.0"),
    (dict(knn="kdtree"), "--knn must be exact or approx, got 'kdtree'"),
    (dict(tau=1.5), "--tau must be in [0, 1], got 1.5"),
    (dict(policy_frequency=0), "--policy-frequency must be >= 1, got 0"),
    (dict(load_model="/no/such/model.flax"), "--load-model: no such file: /no/such/model.flax"),
])
def test_bad_arguments_are_rejected_with_one_line(overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        w.check_args(w.Args(**overrides))
    text = str(exit_info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_bad_input_exits_with_one_line_from_the_command_line(tmp_path):
    for flags, expected in [(["--env-id", "Pendulum-v9"], "error: unknown --env-id 'Pendulum-v9'"),
                            (["--max-actions", "0"], "error: --max-actions must be >= 1, got 0"),
                            (["--env-id", "CartPole-v1", "--k", "3"],
                             "error: --k must be <= the number of actions (2), got 3")]:
        result = run_script("wolpertinger.py", *flags, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
        assert ("dog-walk" in errors[0]) == ("Pendulum-v9" in flags)  # the valid ids are listed
    assert not os.path.exists(tmp_path / "runs")  # nothing started


# --- a whole run -------------------------------------------------------------------------------------------------

SMOKE = dict(total_timesteps=400, learning_starts=200, max_actions=1000, buffer_size=1000, batch_size=32,
             eval_frequency=300, log_frequency=100)


def test_smoke_run_writes_metrics_and_a_model_that_loads_and_its_seed_reproduces_it(tmp_path, monkeypatch, capsys):
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SMOKE.items()]
    result = run_script("wolpertinger.py", "--save-model", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1000 actions in 1 embedding dims, k = 100 (exact k-NN)" in result.stdout
    assert "step      400" in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Pendulum-v1__wolpertinger__1__*"))
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))
    assert list(rows[0]) == ["global_step", "charts/episodic_return", "charts/episodic_length", "charts/SPS",
                             "charts/refine_changed", "losses/qf_loss", "losses/actor_loss", "losses/qf_values",
                             "eval/episodic_return"]
    episodes = [r for r in rows if r["charts/episodic_return"]]
    assert [r["global_step"] for r in episodes] == ["200", "400"]  # 200-step Pendulum episodes
    assert all(r["charts/episodic_length"] == "200.0" and -2000 < float(r["charts/episodic_return"]) <= 0
               for r in episodes)
    updates = [r for r in rows if r["losses/qf_loss"]]
    assert [r["global_step"] for r in updates] == ["200", "300", "400"]  # the first update ran at step 200
    assert all(np.isfinite(float(r[c])) for r in updates for c in ("losses/qf_loss", "losses/actor_loss",
                                                                    "losses/qf_values"))
    changed = [float(r["charts/refine_changed"]) for r in rows if r["charts/refine_changed"]]
    assert len(changed) == 2 and all(0.0 <= c <= 1.0 for c in changed)  # policy steps from step 201 on
    assert [r["global_step"] for r in rows if r["eval/episodic_return"]] == ["300", "400"]  # and at the end

    # The same seed in this process writes the same numbers (all but the speed).
    (tmp_path / "again").mkdir()
    monkeypatch.chdir(tmp_path / "again")
    w.main(w.Args(exp_name="again", **SMOKE))
    (again,) = glob.glob(str(tmp_path / "again" / "runs" / "Pendulum-v1__again__1__*"))
    without_speed = lambda rows: [{k: v for k, v in r.items() if k != "charts/SPS"} for r in rows]  # noqa: E731
    assert without_speed(csv.DictReader(open(os.path.join(again, "metrics.csv")))) == without_speed(rows)

    model_path = os.path.join(run_dir, "wolpertinger.flax")
    key = jax.random.PRNGKey(0)  # Pendulum: 3-dim observations, 1-dim embeddings
    template = dict(actor=w.Actor(1).init(key, jnp.zeros((1, 3))),
                    critic=w.Critic().init(key, jnp.zeros((1, 3)), jnp.zeros((1, 1, 1))))
    loaded = flax.serialization.from_bytes(template, open(model_path, "rb").read())
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)))
    capsys.readouterr()
    w.main(w.Args(max_actions=1000, load_model=model_path))  # what --load-model does
    assert f"{model_path}: greedy return over 1 episode(s)" in capsys.readouterr().out
    assert len(glob.glob(str(tmp_path / "again" / "runs" / "*"))) == 1  # evaluating started no run
