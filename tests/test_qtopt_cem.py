"""qtopt_cem.py: CEM and the clipped double-Q target against independent computations, then whole runs."""

import functools
import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    ROOT,
    command_line,
    counting_compiles,
    interrupt,
    load_saved,
    q_reference,
    read_metrics,
    resumes_as_if_it_never_stopped,
    run_in_process,
    saved,
)

import qmle_dmc
import qtopt_cem as q

OBS_DIM, ACTION_DIM = 5, 2
MODEL = q.QNetwork(ACTION_DIM)  # one instance: a new one would be a new static argument to jit
_init = jax.jit(MODEL.init)


@functools.lru_cache
def init_params(seed):
    return MODEL, _init(jax.random.PRNGKey(seed), jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, ACTION_DIM)))


def test_the_same_numbers_as_the_original_script():
    """tests/golden/qtopt_cem.json, recorded from qtopt_cem.py at 9947e49 (see its "source"): the greedy actions of
    four states, and the metrics of three calls of 3 prioritised updates and one uniform one. Tolerances allow for
    another CPU and the suite's XLA flags; CEM's actions are samples, so a changed search would miss them by far."""
    golden = json.load(open(os.path.join(ROOT, "tests", "golden", "qtopt_cem.json")))
    rs = np.random.RandomState(0)
    obs = rs.randn(4, 24).astype(np.float32)
    model, cem = q.QNetwork(6), q.CEM(64, 6, 2, 0.01)
    init = jax.jit(q.QNetwork.init, static_argnums=0)
    key, k_init = jax.random.split(jax.random.PRNGKey(3))
    params = init(model, k_init, obs[:1], jnp.zeros((1, 1, 6)))
    target, lagged = (init(model, jax.random.PRNGKey(s), obs[:1], jnp.zeros((1, 1, 6))) for s in (4, 5))
    actions, _, _, greedy = q.act(model, params, obs, key, jnp.zeros(2), 0.0, cem)
    np.testing.assert_allclose(actions, golden["greedy_actions"], atol=1e-5)
    assert float(greedy[0]) == pytest.approx(golden["greedy_std_sum"], rel=1e-4) and float(greedy[1]) == 4
    n = 400
    tr = dict(
        obs=rs.randn(n, 24).astype(np.float32),
        action=rs.uniform(-1, 1, (n, 6)).astype(np.float32),
        reward=rs.rand(n).astype(np.float32),
        next_obs=rs.randn(n, 24).astype(np.float32),
        terminated=(rs.rand(n) < 0.1).astype(np.float32),
    )
    state = q.QTOptState.create(
        apply_fn=None, params=params, target_params=target, lagged_params=lagged, tx=q.adam(5e-4)
    )
    state, buffer = jax.tree.map(jnp.asarray, state), q.buffer_init({k: v[0] for k, v in tr.items()}, 1000)
    for i, expected in enumerate(golden["update_metrics"]):
        cfg = q.UpdateConfig(cem, 3 if i < 3 else 1, 0.99, 64, i < 3, 0.6, 0.2, 1e-6)
        chunk = {k: v[i * 100 : (i + 1) * 100] for k, v in tr.items()}
        state, buffer, metrics = q.update(model, state, buffer, chunk, jax.random.PRNGKey(10 + i), cfg)
        assert metrics.keys() == expected.keys()
        for name, value in expected.items():
            assert float(metrics[name]) == pytest.approx(value, rel=1e-3, abs=1e-6), (i, name)


QMLE = qmle_dmc.QMLENetwork(ACTION_DIM, num_bins=3)


@jax.jit
def q_four_ways(params, qmle_params, obs, actions):
    """This Q, qmle_dmc.py's Q on the same layers' parameters, the written-out Q, and the chunked evaluation."""
    shared = {"params": {k: v for k, v in qmle_params["params"].items() if k in params["params"]}}
    embedding = MODEL.apply(params, obs, method=q.QNetwork.observation_stream)
    chunked = q.q_over_candidates(MODEL, params, embedding, actions, states_per_chunk=2)  # 2 does not divide 3
    return (
        MODEL.apply(params, obs, actions),
        MODEL.apply(shared, obs, actions),
        QMLE.apply(qmle_params, obs, actions)[0],
        jax.vmap(q_reference, (None, 0, 0))(params, obs, actions),
        chunked,
    )


def test_q_network_is_qmle_dmc_s_q_without_the_predictors():
    _, params = init_params(0)
    obs = jax.random.normal(jax.random.PRNGKey(1), (3, OBS_DIM))
    actions = jax.random.uniform(jax.random.PRNGKey(2), (3, 7, ACTION_DIM), minval=-1, maxval=1)
    qmle_params = jax.jit(QMLE.init)(jax.random.PRNGKey(0), obs, actions)
    shared = {k: v for k, v in qmle_params["params"].items() if k in params["params"]}
    assert jax.tree.structure(shared) == jax.tree.structure(params["params"])  # the same layers, no more or fewer
    ours, on_qmle_params, qmle, direct, chunked = q_four_ways(params, qmle_params, obs, actions)
    np.testing.assert_allclose(on_qmle_params, qmle, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(chunked, ours, rtol=1e-5, atol=1e-6)


# --- CEM on a known concave function of the action --------------------------------------------------------------

STATES = 256
CENTRES = jnp.concatenate(
    [
        jax.random.uniform(jax.random.PRNGKey(1), (STATES - 2, ACTION_DIM), minval=-0.5, maxval=0.5),
        jnp.array([[1.5, -2.0], [0.3, 1.2]]),
    ]
)  # the last two peak outside the box
MAXIMISERS = jnp.clip(CENTRES, -1.0, 1.0)  # of -|a - c|^2 over the box


def quadratic(actions):  # [B, N, D] -> [B, N]
    return -jnp.sum((actions - CENTRES[:, None]) ** 2, -1)


@functools.partial(jax.jit, static_argnums=(1,))
def cem_on_quadratic(key, cem):
    return q.cem_maximise(quadratic, key, STATES, ACTION_DIM, cem)


def test_cem_finds_the_maximum_of_a_concave_quadratic_and_gets_closer_with_more_iterations():
    errors = []
    for iterations in (1, 2, 4, 8):
        argmax, value, std, first_best = cem_on_quadratic(jax.random.PRNGKey(0), q.CEM(64, 6, iterations, 0.01))
        assert argmax.shape == (STATES, ACTION_DIM) and float(jnp.abs(argmax).max()) <= 1.0
        np.testing.assert_allclose(value, quadratic(argmax[:, None])[:, 0], rtol=1e-6, atol=1e-7)  # Q of a*
        assert bool(jnp.all(value >= first_best))  # the best sample seen: later iterations never lose it
        errors.append(np.asarray(jnp.abs(argmax - MAXIMISERS).max(-1)))
    means = [e.mean() for e in errors]
    assert all(later < 0.5 * earlier for earlier, later in zip(means, means[1:])), means
    assert means[1] < 0.06  # the paper's 2 iterations
    assert np.percentile(errors[-1], 95) < 0.01 and errors[-1].max() < 0.1, errors[-1]
    assert argmax[-2].tolist() == [1.0, -1.0] and float(argmax[-1, 1]) == 1.0  # on the bounds, exactly


def test_the_variance_floor_holds():
    _, _, std, _ = cem_on_quadratic(jax.random.PRNGKey(0), q.CEM(64, 6, 6, 0.2))
    assert float(std.min()) >= 0.2 and float(std.mean()) < 0.25  # converged, but no narrower than the floor
    _, _, std, _ = cem_on_quadratic(jax.random.PRNGKey(0), q.CEM(64, 1, 1, 0.05))
    np.testing.assert_allclose(std, 0.05)  # one elite has zero spread: the floor is all that is left
    _, _, std, _ = cem_on_quadratic(jax.random.PRNGKey(0), q.CEM(64, 6, 1, 0.0))
    assert float(std.min()) < 0.2 and float(std.max()) > 0.0  # without a floor, the elites' own spread


def test_act_is_cem_s_argmax_or_random_and_sums_the_final_std_of_greedy_actions_only():
    model, params = init_params(0)
    obs = jax.random.normal(jax.random.PRNGKey(6), (8, OBS_DIM))  # a batch of states, one search each
    cem, key = q.CEM(16, 4, 2, 0.01), jax.random.PRNGKey(2)
    actions, next_key, k_update, greedy = q.act(model, params, obs, key, jnp.array([0.25, 3.0]), 0.5, cem)
    loop_key, k_act, update_key = jax.random.split(key, 3)  # the loop's split, then the action's
    k_cem, k_explore, k_random = jax.random.split(k_act, 3)
    direct = lambda a: jax.vmap(q_reference, (None, 0, 0))(params, obs, a)
    expected, _, std, _ = jax.jit(q.cem_maximise, static_argnums=(0, 2, 3, 4))(direct, k_cem, 8, ACTION_DIM, cem)
    random = jax.random.uniform(k_random, (8, ACTION_DIM), minval=-1.0, maxval=1.0)
    greedy_rows = np.asarray(jax.random.uniform(k_explore, (8,)) >= 0.5)
    assert 0 < greedy_rows.sum() < 8  # both kinds of step in this batch
    np.testing.assert_allclose(actions, np.where(greedy_rows[:, None], expected, random), atol=1e-6)
    assert len({float(a) for a in actions[greedy_rows, 0]}) == greedy_rows.sum()  # a search per state
    np.testing.assert_array_equal(next_key, loop_key)
    np.testing.assert_array_equal(k_update, update_key)
    std = np.asarray(std.mean(-1))[greedy_rows]
    assert np.all(std >= 0.01)  # at or above the floor
    np.testing.assert_allclose(greedy, [0.25 + std.sum(), 3.0 + greedy_rows.sum()], rtol=1e-5)


# --- the clipped double-Q target and the update ---------------------------------------------------------------------

TD_CEM = q.CEM(16, 4, 2, 0.01)


def config(prioritized=True, updates=1):
    return q.UpdateConfig(TD_CEM, updates, 0.9, 8, prioritized, 0.6, 0.2, 1e-6)


@functools.partial(jax.jit, static_argnums=(5,))
def hand_td_errors(online, target1, target2, batch, key, cem, gamma):
    """r + gamma (1 - d) min(Q1, Q2)(s', a*) - Q(s, a), with a* CEM's arg-max of Q1 evaluated by q_reference;
    also Q1 and Q2 at a*."""
    per_state = jax.vmap(q_reference, (None, 0, 0))
    q1_of = lambda a: per_state(target1, batch["next_obs"], a)
    argmax = q.cem_maximise(q1_of, key, batch["obs"].shape[0], ACTION_DIM, cem)[0]
    q1, q2 = (per_state(p, batch["next_obs"], argmax[:, None])[:, 0] for p in (target1, target2))
    now = per_state(online, batch["obs"], batch["action"][:, None])[:, 0]
    targets = dict(clipped=jnp.minimum(q1, q2), q1=q1, q2=q2)
    return {k: batch["reward"] + gamma * (1.0 - batch["terminated"]) * v - now for k, v in targets.items()}, q1, q2


def td_inputs(terminated):
    """Online, target and lagged parameters of three different networks, and eight transitions."""
    model, online = init_params(0)
    target1, target2 = init_params(1)[1], init_params(3)[1]
    tx = q.adam(1e-3)
    state = q.QTOptState.create(apply_fn=None, params=online, target_params=target1, lagged_params=target2, tx=tx)
    rng = np.random.default_rng(0)
    chunk = dict(
        obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
        action=rng.uniform(-1, 1, (8, ACTION_DIM)).astype(np.float32),
        reward=np.array([1.0, -0.5, 0.25, 2.0, 0.0, -1.0, 0.5, 3.0], np.float32),
        next_obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
        terminated=np.full(8, terminated, np.float32),
    )
    return model, jax.tree.map(jnp.asarray, state), chunk, q.buffer_init(jax.tree.map(lambda x: x[0], chunk), 8)


@pytest.mark.parametrize("terminated", [0.0, 1.0])
@pytest.mark.parametrize("prioritized", [True, False])
def test_clipped_double_q_target_matches_a_hand_computation(terminated, prioritized):
    model, state, chunk, empty = td_inputs(terminated)  # online, target and lagged: three different networks
    key = jax.random.PRNGKey(3)
    # The same rows, in the same order, as update's own sample (its key split: sample, then target).
    k_sample, k_target = jax.random.split(key)
    index, batch, _ = q.buffer_sample(q.buffer_add(empty, chunk), k_sample, 8, prioritized, 0.2)
    _, buffer, metrics = q.update(model, state, empty, chunk, key, config(prioritized=prioritized))
    if prioritized:  # equal priorities and 8 strata over 8 transitions: each one exactly once
        np.testing.assert_array_equal(index, np.arange(8))
    td, q1, q2 = hand_td_errors(state.params, state.target_params, state.lagged_params, batch, k_target, TD_CEM, 0.9)
    # all weights are 1: uniform replay, or equal priorities
    assert float(metrics["losses/td_loss"]) == pytest.approx(float(jnp.mean(td["clipped"] ** 2)), rel=1e-4)
    if prioritized:
        np.testing.assert_allclose(buffer.tree[8:], (np.abs(td["clipped"]) + 1e-6) ** 0.6, rtol=1e-4)
    else:
        np.testing.assert_array_equal(buffer.tree[8:], 1.0)  # uniform replay leaves the priorities alone
    assert int(buffer.size) == 8
    # The clip gap is how far the clipping pulled the target below Q1: Q1 - min(Q1, Q2), zero where Q2 >= Q1.
    if prioritized:  # all 8 transitions, in both cases, so that neither |Q1 - Q2| nor Q1 - Q2 passes
        assert np.any(q1 > q2) and np.any(q1 < q2)
    assert float(metrics["losses/clip_gap"]) == pytest.approx(float(np.mean(np.maximum(q1 - q2, 0.0))), rel=1e-4)
    if prioritized and not terminated:  # the check can tell the clipped target from either network's own
        for other in ("q1", "q2"):
            assert not np.allclose(td["clipped"], td[other], rtol=1e-3), other


def test_importance_weights_scale_the_td_loss():
    model, state, chunk, buffer = td_inputs(0.0)
    priorities = np.array([0.05, 0.5, 2.0, 8.0, 0.2, 1.0, 4.0, 0.1], np.float32)  # unequal, so the weights are too
    buffer = q.buffer_update(q.buffer_add(buffer, chunk), jnp.arange(8), jnp.asarray(priorities), alpha=0.6)
    key = jax.random.PRNGKey(3)
    k_sample, k_target = jax.random.split(key)  # the update's own split
    index, batch, _ = q.buffer_sample(buffer, k_sample, 8, True, 0.2)  # the update's draws
    _, _, metrics = q.update(model, state, buffer, jax.tree.map(lambda x: x[:0], chunk), key, config())
    probability = priorities**0.6 / np.sum(priorities**0.6)
    weights = (8 * probability[np.asarray(index)]) ** -0.2
    weights /= weights.max()
    td = hand_td_errors(state.params, state.target_params, state.lagged_params, batch, k_target, TD_CEM, 0.9)[0]
    td = np.asarray(td["clipped"])
    assert len(set(np.round(weights, 6))) > 1
    assert np.mean(td**2) > 1.05 * np.mean(weights * td**2)  # the unweighted loss would fail the check below
    np.testing.assert_allclose(metrics["losses/td_loss"], np.mean(weights * td**2), rtol=1e-4)


def test_one_call_stores_then_takes_its_updates_as_the_same_updates_one_by_one():
    model, state, chunk, buffer = td_inputs(0.0)
    kept, stored, metrics = q.update(model, state, jax.tree.map(jnp.copy, buffer), chunk, None, config(updates=0))
    assert metrics == {} and int(kept.step) == 0  # before --learning-starts: stored, no update
    np.testing.assert_array_equal(stored.storage["obs"], chunk["obs"])
    together = q.update(model, state, jax.tree.map(jnp.copy, buffer), chunk, jax.random.PRNGKey(5), config(updates=3))
    no_new = jax.tree.map(lambda x: x[:0], chunk)
    for i, key in enumerate(jax.random.split(jax.random.PRNGKey(5), 3)):
        state, buffer, metrics = q.update(model, state, buffer, chunk if i == 0 else no_new, key, config())
    assert int(together[0].step) == int(state.step) == 3
    for a, b in zip(jax.tree.leaves((together[0].params, together[1])), jax.tree.leaves((state.params, buffer))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together[2]["losses/td_loss"], metrics["losses/td_loss"], rtol=1e-5)  # the last's


# --- refusals: one `error:` line naming the flag, before anything starts ------------------------------------------


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(cem_samples=0), "--cem-samples"),
        (dict(cem_elites=0), "--cem-elites"),
        (dict(cem_iterations=-1), "--cem-iterations"),
        (dict(cem_elites=65), "--cem-elites must be <= --cem-samples"),
        (dict(cem_min_std=-0.1), "--cem-min-std"),
        (dict(cem_min_std=float("inf")), "--cem-min-std"),
        (dict(target_network_frequency=0), "--target-network-frequency"),
        (dict(learning_starts=-5), "--learning-starts"),
        (dict(epsilon=1.5), "--epsilon"),
        (dict(learning_rate=0.0), "--learning-rate"),
        (dict(priority_epsilon=0.0), "--priority-epsilon"),
        (dict(buffer_size=15, num_envs=4), "--buffer-size"),
    ],
)
def test_bad_arguments_are_rejected_with_one_line(overrides, flag):
    with pytest.raises(SystemExit) as exit_info:
        q.check_args(q.Args(**overrides))
    text = str(exit_info.value)
    assert text.startswith("error: ") and flag in text and "\n" not in text


def test_an_env_without_a_box_of_actions_or_a_missing_model_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, expected in [
        (q.Args(env_id="CartPole-v1"), "error: --env-id 'CartPole-v1' has Discrete(2) actions"),
        (q.Args(load_model="nowhere.npz"), "error: --load-model: nowhere.npz"),
    ]:
        with pytest.raises(SystemExit, match=f"^{re.escape(expected)}") as exit_info:
            q.main(args)
        assert "\n" not in str(exit_info.value)
    assert not os.path.exists("runs")  # refused before a run folder was made


# --- whole runs ----------------------------------------------------------------------------------------------------

SMOKE = dict(
    total_timesteps=1100,
    learning_starts=200,
    buffer_size=2000,
    batch_size=32,
    cem_samples=16,
    cem_elites=4,
    eval_frequency=600,
    log_frequency=100,
    target_network_frequency=100,
)


def test_smoke_run_writes_metrics_and_a_model_that_loads(tmp_path, monkeypatch, capsys):
    settings = dict(SMOKE, env_id="cartpole-swingup", save_model=True, checkpoint_frequency=10_000)
    run_dir, _ = run_in_process(q, tmp_path, monkeypatch, **settings)
    printed = capsys.readouterr().out
    assert os.path.basename(run_dir).startswith("cartpole-swingup__qtopt_cem__1__")
    rows = read_metrics(run_dir)
    assert list(rows[0]) == ["global_step", *q.METRICS]
    episodes = [r for r in rows if r["charts/episodic_return"]]
    assert len(episodes) == 1 and episodes[0]["charts/episodic_length"] == "1000.0"  # one 1000-step DMC episode
    assert 0.0 <= float(episodes[0]["charts/episodic_return"]) <= 1000.0
    updates = [r for r in rows if r["losses/td_loss"]]
    assert len(updates) == 10  # logged at steps 200, 300, ..., 1100; the first update ran at step 200
    for r in updates:
        assert np.isfinite(float(r["losses/td_loss"])) and np.isfinite(float(r["losses/q_values"]))
        assert float(r["cem/target_gain"]) >= 0.0  # the best sample of any iteration, never below the first's
        assert 0.01 <= float(r["cem/target_final_std"]) <= 1.0  # at or above the floor
    assert any(float(r["losses/clip_gap"]) > 0 for r in updates)  # the two targets came apart
    greedy = [float(r["cem/greedy_final_std"]) for r in rows if r["cem/greedy_final_std"]]
    assert len(greedy) == 11 and min(greedy) >= 0.01 and max(greedy) <= 1.0  # a random step's std is in no mean
    evaluations = [float(r["eval/episodic_return"]) for r in rows if r["eval/episodic_return"]]
    assert len(evaluations) == 2  # at step 600 and at the end
    assert "step     1100" in printed and "CEM(samples=16, elites=4, iterations=2" in printed

    model_path = os.path.join(run_dir, "qtopt_cem.npz")
    meta, arrays = load_saved(model_path)
    assert meta["script"] == "qtopt_cem.py" and meta["args"]["env_id"] == "cartpole-swingup"
    template = jax.jit(q.QNetwork(1).init)(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 1, 1)))
    loaded = q.restore(template, arrays, "--load-model")
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)))
    q.main(q.Args(load_model=model_path))  # its task, evaluation seeds and CEM: it scores what its run logged last
    assert f"greedy evaluation return {evaluations[-1]:.1f} over 1 episode(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="^error: --load-model: --env-id 'cartpole-balance' differs"):
        q.saved_settings(q.Args(env_id="cartpole-balance", load_model=model_path))
    elsewhere = str(tmp_path / "elsewhere.npz")  # the right header on arrays of another tree
    q.save_arrays(elsewhere, dict(x=np.zeros(3)), dict(args=meta["args"]))
    with pytest.raises(SystemExit, match="^error: --load-model: the saved arrays are not this run's"):
        q.restore(template, q.saved_settings(q.Args(load_model=elsewhere))[2], "--load-model")


FAST = dict(
    env_id="Pendulum-v1",
    learning_starts=100,
    buffer_size=2000,
    batch_size=16,
    cem_samples=8,
    cem_elites=2,
    eval_frequency=0,
    log_frequency=50,
)


def train_in_process(directory, monkeypatch, **overrides):
    return run_in_process(q, directory, monkeypatch, **dict(FAST, **overrides))


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_targets_rotate_at_each_copy_and_resume_continues_the_run(tmp_path, monkeypatch):
    # Copies every 100 steps; the run stops 5 steps after each copy (before the next update) and resumes from its
    # checkpoint, so the parameters of every copy point are on disk: at a copy the lagged target takes the target's
    # and the target the online's. The 5 steps since the last update wait in the checkpoint, to be stored on resume.
    run_dir, (meta, first) = train_in_process(
        tmp_path,
        monkeypatch,
        total_timesteps=105,
        target_network_frequency=100,
        checkpoint_frequency=100,
        exp_name="copies",
    )
    checkpoints = [first]
    for total in (205, 305):
        _, (meta, arrays) = train_in_process(tmp_path, monkeypatch, total_timesteps=total, resume=run_dir)
        assert meta["global_step"] == total and meta["args"]["target_network_frequency"] == 100
        checkpoints.append(arrays)
    params, target, lagged = (
        [saved(c, f"['state'].{name}") for c in checkpoints] for name in ("params", "target_params", "lagged_params")
    )
    obs, _ = q.make_env("Pendulum-v1", 1).reset(seed=1)
    init = jax.jit(q.QNetwork(1).init)(jax.random.split(jax.random.PRNGKey(1))[1], obs[None], jnp.zeros((1, 1, 1)))
    initial = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(init)[0]}
    assert same(lagged[0], initial)  # at the first copy the target handed on its initial parameters
    for i in range(3):
        assert same(target[i], params[i])  # copied after the update of the copy step
        assert int(checkpoints[i]["['state'].step"]) == 100 * i // 10 + 1  # one update per 10 steps from step 100
    for i in (1, 2):
        assert same(lagged[i], params[i - 1])  # the target of the copy before
        assert not same(params[i], params[i - 1])  # trained in between, so the check can tell them apart
    logged = [r for r in read_metrics(run_dir) if r["charts/SPS"]]
    assert [int(r["global_step"]) for r in logged] == list(range(50, 301, 50))  # metrics.csv continued each time
    assert all(r["cem/greedy_final_std"] for r in logged)
    stored = arrays["['buffer'].storage['obs']"][: int(arrays["['buffer'].size"])]
    assert len(stored) == 300 and np.all(np.abs(stored[:, :2]).sum(1) > 0.5)  # (cos, sin): never an empty row


@pytest.mark.parametrize("num_envs, total", [(1, 300), (4, 820)])  # each env's 200-step episode ends
def test_vector_env_transitions_equal_single_envs_and_updates_keep_their_ratio(tmp_path, monkeypatch, num_envs, total):
    _, (meta, arrays) = train_in_process(
        tmp_path,
        monkeypatch,
        total_timesteps=total,
        num_envs=num_envs,
        checkpoint_frequency=10_000,
        exp_name=f"vector{num_envs}",
    )
    final, rows = meta["global_step"], np.lcm(num_envs, 10)  # rows: transitions per update call
    size, pending = int(arrays["['buffer'].size"]), saved(arrays, "['pending']")
    stored = {k: v[:size] for k, v in saved(arrays, "['buffer'].storage").items()}
    assert final == -(-total // num_envs) * num_envs and size == final // rows * rows
    buffer = {k: np.concatenate([v, pending[k][: final % rows]]) for k, v in stored.items()}  # not yet sent
    np.testing.assert_array_equal(buffer["['terminated']"], 0.0)  # Pendulum's time limit is not a termination
    time_limits = 0
    for i in range(num_envs):  # env i's transitions sit at rows i, i + N, ...; replay its actions alone
        env = q.make_env("Pendulum-v1", 1 + i)
        obs, _ = env.reset(seed=1 + i)
        for row in range(i, final, num_envs):
            np.testing.assert_array_equal(buffer["['obs']"][row], obs)
            obs, reward, terminated, truncated, _ = env.step(buffer["['action']"][row])
            np.testing.assert_allclose(buffer["['reward']"][row], reward, rtol=1e-6)
            np.testing.assert_array_equal(buffer["['next_obs']"][row], obs)  # the episode's own, never a reset
            assert buffer["['terminated']"][row] == terminated
            if terminated or truncated:
                obs, _ = env.reset()
                time_limits += 1
    assert time_limits == num_envs * (final // num_envs // 200)  # episodes of 200 steps ended inside the run
    # one update per 10 environment steps, from the first update call at or after step 100
    first, last = -(-100 // rows) * rows, final // rows * rows
    assert int(arrays["['state'].step"]) == (last - first) // 10 + rows // 10


def test_a_termination_is_stored_as_terminal(tmp_path, monkeypatch):
    # InvertedPendulum-v5 terminates once the pole leans past 0.2 rad, which an untrained agent soon lets it do.
    _, (_, arrays) = train_in_process(
        tmp_path,
        monkeypatch,
        env_id="InvertedPendulum-v5",
        total_timesteps=200,
        checkpoint_frequency=200,
        exp_name="falls",
    )
    size = int(arrays["['buffer'].size"])
    buffer = {k: v[:size] for k, v in saved(arrays, "['buffer'].storage").items()}
    terminated, next_obs, obs = buffer["['terminated']"], buffer["['next_obs']"], buffer["['obs']"]
    fallen = np.abs(next_obs[:, 1]) > 0.2
    assert fallen.sum() >= 3
    np.testing.assert_array_equal(terminated, fallen.astype(np.float32))
    np.testing.assert_array_equal(np.flatnonzero(np.any(next_obs[:-1] != obs[1:], axis=1)), np.flatnonzero(fallen[:-1]))


def run_state(state, capacity=8):
    example = dict(
        obs=np.zeros(OBS_DIM, np.float32),
        action=np.zeros(ACTION_DIM, np.float32),
        reward=np.float32(0),
        next_obs=np.zeros(OBS_DIM, np.float32),
        terminated=np.float32(0),
    )
    pending = {k: np.zeros((10, *np.shape(v)), np.float32) for k, v in example.items()}
    return dict(
        state=state,
        buffer=q.buffer_init(example, capacity),
        key=jax.random.PRNGKey(0),
        greedy=jnp.zeros(2),
        pending=pending,
    )


def test_a_checkpointed_run_continues_exactly_as_one_that_never_stopped(tmp_path):
    model, state, _, _ = td_inputs(0.0)  # online, target and lagged parameters all different
    rng = np.random.default_rng(7)  # chunks of 8 transitions, as td_inputs': the update is compiled already
    steps = [
        dict(
            obs=rng.normal(size=(8, OBS_DIM)),
            action=rng.uniform(-1, 1, (8, ACTION_DIM)),
            reward=rng.normal(size=8),
            next_obs=rng.normal(size=(8, OBS_DIM)),
            terminated=np.zeros(8),
        )
        for _ in range(6)
    ]
    keys = jax.random.split(jax.random.PRNGKey(1), 6)

    def train(run, first, last):
        for chunk, key in zip(steps[first:last], keys[first:last]):
            chunk = jax.tree.map(lambda x: np.asarray(x, np.float32), chunk)
            new_state, buffer, _ = q.update(model, run["state"], run["buffer"], chunk, key, config())
            run = dict(run, state=new_state, buffer=buffer)
        return run

    uninterrupted = train(run_state(state), 0, 6)
    stopped = train(run_state(state), 0, 3)
    stopped["pending"]["obs"][:4] = 1.5  # steps taken since the last update travel with the checkpoint too
    stopped["greedy"] = jnp.array([1.25, 7.0])  # and so do the acting statistics not yet logged
    path = q.save_arrays(str(tmp_path / "checkpoint.npz"), stopped, dict(global_step=30))
    meta, arrays = load_saved(path)
    assert meta == dict(global_step=30, script="qtopt_cem.py")
    resumed = q.restore(run_state(state), arrays, "--resume")
    for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(resumed)):  # the resume point is the checkpoint
        np.testing.assert_array_equal(a, b)
    resumed = train(resumed, 3, 6)
    for a, b in zip(jax.tree.leaves(uninterrupted["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(uninterrupted["buffer"].tree, resumed["buffer"].tree)


def test_damaged_missing_or_foreign_checkpoints_are_refused_with_one_line(tmp_path):
    _, state, _, _ = td_inputs(0.0)
    good = tmp_path / "good"
    good.mkdir()
    path = q.save_arrays(str(good / "checkpoint.npz"), run_state(state), dict(args=vars(q.Args())))
    data = open(path, "rb").read()
    foreign = tmp_path / "foreign"  # a checkpoint of another agent
    foreign.mkdir()
    qmle_dmc.save_arrays(str(foreign / "checkpoint.npz"), dict(x=np.zeros(3)), dict(args=vars(qmle_dmc.Args())))
    for name, content in [("cut", data[: len(data) // 2]), ("noise", b"not a checkpoint"), ("nowhere", None)]:
        (tmp_path / name).mkdir()
        if content is not None:
            (tmp_path / name / "checkpoint.npz").write_bytes(content)
    for name in ("cut", "noise", "nowhere", "foreign"):
        with pytest.raises(SystemExit, match="^error: --resume: ") as exit_info:
            q.saved_settings(q.Args(resume=str(tmp_path / name)))
        assert "\n" not in str(exit_info.value)
    _, _, arrays = q.saved_settings(q.Args(resume=str(good)))
    wider = run_state(state)
    wider["buffer"] = wider["buffer"]._replace(storage=dict(wider["buffer"].storage, extra=jnp.zeros(8)))
    with pytest.raises(SystemExit, match="^error: --resume: the saved arrays are not this run's"):
        q.restore(wider, arrays, "--resume")


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(q.time, "time", lambda: 1_700_000_000.0)
    first, second = q.new_run_dir(q.Args()), q.new_run_dir(q.Args())
    assert first != second and os.path.isdir(first) and os.path.isdir(second)


def test_sigint_saves_the_model_and_a_checkpoint_and_says_how_to_resume(tmp_path):
    flags = command_line(**dict(FAST, total_timesteps=1_000_000, checkpoint_frequency=5000))  # FAST: compiled
    returncode, stdout, stderr = interrupt("qtopt_cem.py", flags, tmp_path)
    assert returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "interrupted at step" in stdout and f"--resume runs/{os.path.basename(run_dir)}" in stdout
    meta, _ = load_saved(os.path.join(run_dir, "checkpoint.npz"))
    assert 300 <= meta["global_step"] < 1_000_000
    assert load_saved(os.path.join(run_dir, "qtopt_cem.npz"))[0]["global_step"] == meta["global_step"]
    with pytest.raises(SystemExit, match="^error: --resume: --seed 2 differs from the saved 1"):
        q.saved_settings(q.Args(resume=run_dir, seed=2))  # a resumed run keeps its own settings


def test_a_second_run_in_one_process_compiles_nothing(tmp_path, monkeypatch):
    # The optimizer and the init are keyed on their settings, not on one run's objects, so a second main() with the
    # same settings finds every program compiled (what keeps the many in-process runs of these tests fast).
    train_in_process(tmp_path, monkeypatch, total_timesteps=300, checkpoint_frequency=300, exp_name="first")
    with counting_compiles() as compiled:
        train_in_process(tmp_path, monkeypatch, total_timesteps=300, checkpoint_frequency=300, exp_name="second")
    assert compiled == []


def test_a_run_stopped_in_the_middle_of_an_episode_resumes_as_if_it_never_stopped(tmp_path, monkeypatch):
    resumes_as_if_it_never_stopped(q, tmp_path, monkeypatch, **FAST)
