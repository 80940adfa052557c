"""qmle_dmc.py: its parts against independent computations, then whole runs judged by what they write."""

import functools
import glob
import itertools
import json
import os
import pickle
import shlex
import signal
import struct
import subprocess
import sys

import imageio
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
    q_reference,
    read_metrics,
    refusal,
    resumes_as_if_it_never_stopped,
    run_in_process,
    run_script,
    saved,
)

import qmle_dmc as q

OBS_DIM, ACTION_DIM = 5, 2


@pytest.fixture(scope="module")
def model_and_params():
    model = q.QMLENetwork(ACTION_DIM, num_bins=3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, ACTION_DIM)))
    return model, params


def config(budget, updates=1, **overrides):
    """The update's settings: the script's defaults, then UPDATE's small-batch ones, then `overrides`."""
    settings = dict(vars(q.Args()), **dict(UPDATE, **overrides))
    return q.UpdateConfig(budget, updates, *(settings[k] for k in q.UpdateConfig._fields[2:]))


def test_split_joint_layer_equals_the_network_on_the_concatenation(model_and_params):
    model, params = model_and_params
    obs = jax.random.normal(jax.random.PRNGKey(1), (OBS_DIM,))
    actions = jax.random.uniform(jax.random.PRNGKey(2), (7, ACTION_DIM), minval=-1, maxval=1)
    embedding = model.apply(params, obs, method=q.QMLENetwork.heads)[0]
    ours = model.apply(params, embedding, actions, method=q.QMLENetwork.q_values)
    np.testing.assert_allclose(ours, q_reference(params, obs, actions), rtol=1e-4, atol=1e-5)


def test_layers_start_at_pytorchs_default_scale(model_and_params):
    """The release's nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): bounded there, with that uniform's std."""
    _, params = model_and_params
    kernels = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel"
    }
    assert len(kernels) == 12  # 8 in Q (its joint block's first layer split in two), 2 per predictor
    for name, kernel in kernels.items():
        bound = kernel.shape[0] ** -0.5
        assert float(jnp.abs(kernel).max()) <= bound, name
        if kernel.size >= 128 * 128:
            assert float(kernel.std()) == pytest.approx(bound / np.sqrt(3), rel=0.02), name


def test_the_releases_init_draws_biases_and_the_joint_layer_as_one_pytorch_linear_would(model_and_params):
    """--bias-init uniform, --joint-init whole: every dense bias from U(+-1/sqrt(fan_in)) of its layer, the split
    joint layer's halves (one nn.Linear(256, 256) in the release) both at fan-in 256; norms and the rest as drawn."""
    _, params = model_and_params
    flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    as_drawn = q.release_init(params, jax.random.PRNGKey(5), "zeros", "halves")
    jax.tree.map(np.testing.assert_array_equal, as_drawn, params)  # the paper's choices change nothing
    release = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            q.release_init(params, jax.random.PRNGKey(5), "uniform", "whole")
        )
    }
    fan_in = {"joint_in_obs": 256, "joint_in_act": 256}  # the concatenation [obs 128, action 128]
    dense_biases = 0
    for name, leaf in release.items():
        layer = name.rsplit("/", 1)[0]
        if name.endswith("kernel") and layer.split("/")[-1] in fan_in:
            bound = fan_in[layer.split("/")[-1]] ** -0.5
            assert float(jnp.abs(leaf).max()) <= bound
            assert float(leaf.std()) == pytest.approx(bound / np.sqrt(3), rel=0.02), name
            np.testing.assert_allclose(leaf, flat[name] * np.sqrt(0.5), rtol=1e-6)  # the same draw, rescaled
        elif name.endswith("bias") and layer + "/kernel" in release:
            dense_biases += 1
            bound = fan_in.get(layer.split("/")[-1], release[layer + "/kernel"].shape[0]) ** -0.5
            assert 0 < float(jnp.abs(leaf).max()) <= bound, name
            if leaf.size >= 128:
                assert float(leaf.std()) == pytest.approx(bound / np.sqrt(3), rel=0.25), name
        else:  # the other kernels, the norms' scales and biases
            np.testing.assert_array_equal(leaf, flat[name], err_msg=name)
    assert dense_biases == 11  # 12 kernels, one of them (joint_in_act) without a bias of its own


def test_chunked_candidate_evaluation_equals_one_pass(model_and_params):
    model, params = model_and_params
    embedding = jax.random.normal(jax.random.PRNGKey(3), (96, 128))
    candidates = jax.random.uniform(jax.random.PRNGKey(4), (96, 13, ACTION_DIM), minval=-1, maxval=1)
    one_pass = model.apply(params, embedding, candidates, method=q.QMLENetwork.q_values)
    for rows in (32 * 13, 7 * 13, 96 * 13, 5):  # 7 states do not divide 96: a divisor; 5 rows: one state a chunk
        chunked = q.q_over_candidates(model, params, embedding, candidates, rows_per_chunk=rows)
        np.testing.assert_allclose(chunked, one_pass, rtol=1e-5, atol=1e-5)


def test_predictors_do_not_train_the_observation_stream(model_and_params):
    model, params = model_and_params
    obs = jnp.ones((3, OBS_DIM))

    def predictor_loss(p):
        _, delta, logits = model.apply(p, obs, method=q.QMLENetwork.heads)
        return delta.sum() + logits.sum()

    grads = jax.grad(predictor_loss)(params)["params"]
    for name in ("obs_embed", "obs_block", "obs_norm"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[name]))
    assert float(jnp.abs(grads["delta_head"]["kernel"]).max()) > 0


@pytest.mark.parametrize("m, expected", [(100, (45, 45, 1, 9)), (1000, (450, 450, 10, 90)), (2, (1, 1, 0, 0))])
def test_budget_split_follows_the_ratios_and_adds_up(m, expected):
    budget = q.Budget.split(m, 0.9, 0.01, 0.09)
    assert tuple(budget) == expected and sum(budget) == m
    assert sum(q.Budget.split(7, 1.0, 0.0, 0.0)) == 7  # the all-uniform ablation
    assert q.Budget.split(100, 0.9, 0.01, 0.09, grid_fraction=0.0) == (90, 0, 1, 9)  # continuous only (Fig. 8)
    assert q.Budget.split(100, 0.9, 0.01, 0.09, grid_fraction=0.25) == (68, 22, 1, 9)


def test_the_grid_phase_draws_uniform_samples_evenly_over_the_bins():
    # Fig. 12's first phase: the continuous uniform part is drawn over the bins, not the box snapped to them
    # (which gives the middle of 3 bins twice the share of each end).
    c = q.sample_candidates(
        jax.random.PRNGKey(9), jnp.zeros((1, 2)), jnp.zeros((1, 2, 3)), q.Budget(30_000, 0, 0, 0), 0.1, discrete=True
    )
    shares = [float(jnp.mean(c == v)) for v in (-1.0, 0.0, 1.0)]
    np.testing.assert_allclose(shares, 1 / 3, atol=0.01)


def test_candidates_respect_bounds_sources_and_the_delta_point():
    delta = jnp.array([[0.3, -0.95], [0.0, 0.99]])
    logits = jnp.array([[[9.0, -9, -9], [-9, -9, 9]], [[-9, 9, -9], [-9, 9, -9]]])  # near-certain bins
    budget = q.Budget(uniform_continuous=50, uniform_grid=40, delta=20, categorical=30)
    c = q.sample_candidates(jax.random.PRNGKey(0), delta, logits, budget, noise_std=0.1)
    assert c.shape == (2, 140, ACTION_DIM)
    assert float(c.min()) >= -1.0 and float(c.max()) <= 1.0
    uniform, grid, around, cat = np.split(np.asarray(c), np.cumsum(budget)[:-1], axis=1)
    assert len(np.unique(uniform)) == uniform.size  # continuous draws
    assert set(np.unique(grid)) == {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(around[:, 0], delta)  # the first delta sample is the point itself
    assert np.abs(around - np.asarray(delta)[:, None]).max() < 0.6 and np.std(around[:, 1:]) > 0.01
    np.testing.assert_array_equal(cat[0], np.broadcast_to([-1.0, 1.0], (30, 2)))
    np.testing.assert_array_equal(cat[1], 0.0)
    snapped = q.sample_candidates(jax.random.PRNGKey(0), delta, logits, budget, 0.1, discrete=True)
    assert set(np.unique(snapped)) <= {-1.0, 0.0, 1.0}


def test_sampled_bins_follow_the_categorical_and_uniform_distributions():
    logits = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 4)) * 1.5  # 2 states, 3 dims, 4 bins
    budget = q.Budget(0, 20_000, 0, 20_000)
    c = q.sample_candidates(jax.random.PRNGKey(4), jnp.zeros((2, 3)), logits, budget, 0.1)
    bins = np.asarray(q.bins(4))
    index = np.abs(np.asarray(c)[..., None] - bins).argmin(-1)  # [2, 40000, 3]
    grid, cat = index[:, :20_000], index[:, 20_000:]
    for state, dim in itertools.product(range(2), range(3)):
        np.testing.assert_allclose(np.bincount(grid[state, :, dim], minlength=4) / 20_000, 0.25, atol=0.012)
        expected = np.exp(logits[state, dim]) / np.exp(logits[state, dim]).sum()
        np.testing.assert_allclose(np.bincount(cat[state, :, dim], minlength=4) / 20_000, expected, atol=0.012)


def test_source_counts_count_the_winning_segments_and_skip_random_actions():
    budget = q.Budget(3, 2, 1, 4)  # indices 0-2 uniform, 3-4 grid, 5 delta, 6-9 categorical, 10 cached
    best = jnp.array([0, 2, 3, 5, 6, 9, 10, 10, -1])  # -1: a random action, from no source
    np.testing.assert_array_equal(q.source_counts(best, budget), [2, 1, 1, 2, 2])


def test_target_argmax_matches_brute_force_on_a_small_discrete_space(model_and_params):
    model, params = model_and_params
    next_obs = jax.random.normal(jax.random.PRNGKey(5), (4, OBS_DIM))
    grid = jnp.array(list(itertools.product([-1.0, 0.0, 1.0], repeat=ACTION_DIM)))  # all 9 grid actions
    brute = jax.vmap(lambda o: q_reference(params, o, grid))(next_obs)
    # On the grid, 300 candidates cover all 9 actions (miss chance < 1e-14 per state).
    budget = q.Budget(0, 200, 10, 90)
    prior = jnp.full((4, ACTION_DIM), 0.5)  # off the grid, so it can only win when it is the true max
    target_argmax = jax.jit(q.target_argmax, static_argnums=(0, 5, 6))
    argmax, value, best = target_argmax(model, params, next_obs, prior, jax.random.PRNGKey(6), config(budget), True)
    prior_q = jax.vmap(lambda o, p: q_reference(params, o, p[None])[0])(next_obs, prior)
    expected = jnp.maximum(brute.max(1), prior_q)
    np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5)
    for i in range(4):
        chosen = prior[i] if prior_q[i] > brute[i].max() else grid[brute[i].argmax()]
        np.testing.assert_allclose(argmax[i], chosen)


def test_the_cached_prior_is_a_candidate(model_and_params):
    model, params = model_and_params
    next_obs = jax.random.normal(jax.random.PRNGKey(7), (3, OBS_DIM))
    prior = jnp.array([[0.2, -0.4], [0.9, 0.9], [-1.0, 0.0]])
    target_argmax = jax.jit(q.target_argmax, static_argnums=(0, 5, 6))
    argmax, value, best = target_argmax(
        model, params, next_obs, prior, jax.random.PRNGKey(8), config(q.Budget(0, 0, 0, 0))
    )
    np.testing.assert_array_equal(argmax, prior)  # the only candidate
    np.testing.assert_array_equal(best, 0)
    with_others = target_argmax(model, params, next_obs, prior, jax.random.PRNGKey(8), config(q.Budget(45, 45, 1, 9)))
    assert bool(jnp.all(with_others[1] >= value - 1e-6))  # more candidates never lower the max


@pytest.fixture(scope="module")
def target_params(model_and_params):
    """Target parameters unlike the online ones, so that a target computed with the wrong network shows."""
    model, _ = model_and_params
    return jax.jit(model.init)(jax.random.PRNGKey(99), jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, ACTION_DIM)))


def test_without_the_cache_the_target_search_is_its_samples_alone(model_and_params):
    model, params = model_and_params
    next_obs = jax.random.normal(jax.random.PRNGKey(10), (3, OBS_DIM))
    fine = jnp.array(list(itertools.product(np.linspace(-1, 1, 41), repeat=ACTION_DIM)))
    prior = jax.vmap(lambda o: fine[q_reference(params, o, fine).argmax()])(next_obs)  # beats the 3-bin grid
    grid = jnp.array(list(itertools.product([-1.0, 0.0, 1.0], repeat=ACTION_DIM)))
    grid_max = jax.vmap(lambda o: q_reference(params, o, grid).max())(next_obs)
    prior_q = jax.vmap(lambda o, p: q_reference(params, o, p[None])[0])(next_obs, prior)
    assert bool(jnp.all(prior_q > grid_max))
    search = jax.jit(q.target_argmax, static_argnums=(0, 5, 6))
    budget = q.Budget(0, 200, 0, 0)  # the 9 grid actions, each drawn w.h.p.
    cached = search(model, params, next_obs, prior, jax.random.PRNGKey(11), config(budget))
    alone = search(model, params, next_obs, prior, jax.random.PRNGKey(11), config(budget, cache_argmax=False))
    np.testing.assert_allclose(cached[0], prior)
    np.testing.assert_allclose(alone[1], grid_max, rtol=1e-5)
    assert set(np.unique(alone[0]).tolist()) <= {-1.0, 0.0, 1.0}


def make_update_inputs(model, params, target_params, terminated):
    state = q.QMLEState.create(apply_fn=model.apply, params=params, target_params=target_params, tx=optax.adam(1e-3))
    rng = np.random.default_rng(0)
    chunk = dict(
        obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
        action=rng.uniform(-1, 1, (4, ACTION_DIM)).astype(np.float32),
        reward=np.array([1.0, -0.5, 0.25, 2.0], np.float32),
        next_obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
        terminated=np.full(4, terminated, np.float32),
        argmax=rng.uniform(-1, 1, (4, ACTION_DIM)).astype(np.float32),
    )
    buffer = q.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8)
    return state, buffer, chunk


def no_new(chunk):  # an update call that stores nothing: the transitions are in the buffer already
    return jax.tree.map(lambda x: x[:0], {k: v for k, v in chunk.items() if k != "argmax"})


UPDATE = dict(
    gamma=0.9,
    batch_size=16,
    delta_noise_std=0.1,
    prioritized_replay=True,
    priority_exponent=0.6,
    importance_exponent=0.2,
    priority_epsilon=1e-6,
)


def td_errors(params, target_params, chunk, gamma, terminated):
    """r + gamma (1 - terminated) Q_target(s', cached arg-max) - Q(s, a), from the written-out network."""
    pairwise = lambda p, o, a: jax.vmap(lambda o, a: q_reference(p, o, a[None])[0])(o, a)  # noqa: E731
    next_q = pairwise(target_params, chunk["next_obs"], chunk["argmax"])
    return chunk["reward"] + gamma * (1 - terminated) * next_q - pairwise(params, chunk["obs"], chunk["action"])


@pytest.mark.parametrize("terminated", [0.0, 1.0])
def test_td_errors_written_back_as_priorities_match_a_hand_computation(model_and_params, target_params, terminated):
    model, params = model_and_params
    state, buffer, chunk = make_update_inputs(model, params, target_params, terminated)
    # With an empty budget the target arg-max is the cached prior, so the target is deterministic.
    buffer = q.buffer_add(buffer, chunk)
    _, buffer, metrics = q.update(
        model, state, buffer, no_new(chunk), jax.random.PRNGKey(0), config(q.Budget(0, 0, 0, 0))
    )
    td_error = td_errors(params, target_params, chunk, UPDATE["gamma"], terminated)
    np.testing.assert_allclose(buffer.tree[8:12], (np.abs(td_error) + 1e-6) ** 0.6, rtol=1e-4)
    np.testing.assert_allclose(buffer.storage["argmax"][:4], chunk["argmax"])  # the prior won and was kept
    assert int(buffer.size) == 4


@pytest.mark.parametrize("draws", ["stratified", "independent"])
@pytest.mark.parametrize("normalisation", ["batch", "buffer"])
def test_importance_weights_scale_the_td_loss(model_and_params, target_params, normalisation, draws):
    model, params = model_and_params
    state, buffer, chunk = make_update_inputs(model, params, target_params, 0.0)
    priorities = np.array([0.05, 0.5, 2.0, 8.0], np.float32)  # unequal, so the weights are too
    buffer = q.buffer_update(q.buffer_add(buffer, chunk), jnp.arange(4), jnp.asarray(priorities), alpha=0.6)
    key = jax.random.PRNGKey(3)
    index = np.asarray(
        q.buffer_sample(buffer, jax.random.split(key)[0], 16, True, 0.2, stratified=draws == "stratified")[0]
    )  # the update's draws
    cfg = config(q.Budget(0, 0, 0, 0), importance_normalisation=normalisation, prioritized_draws=draws)
    _, _, metrics = q.update(model, state, buffer, no_new(chunk), key, cfg)
    probability = priorities**0.6 / np.sum(priorities**0.6)
    weights = (4 * probability[index]) ** -0.2
    weights /= weights.max() if normalisation == "batch" else (4 * probability.min()) ** -0.2
    td_error = np.asarray(td_errors(params, target_params, chunk, UPDATE["gamma"], 0.0))[index]
    assert len(set(np.round(weights, 6))) > 1
    np.testing.assert_allclose(metrics["losses/td_loss"], np.mean(weights * td_error**2), rtol=1e-4)


@pytest.mark.parametrize("predictor_target", ["refreshed", "cached"])
def test_the_refreshed_argmax_is_written_back_and_trains_the_predictors(
    model_and_params, target_params, predictor_target
):
    model, params = model_and_params
    params = jax.tree_util.tree_map_with_path(  # predictors far from uniform, so their losses tell goals apart
        lambda path, x: x * 30
        if "head" in jax.tree_util.keystr(path) and "q_head" not in jax.tree_util.keystr(path)
        else x,
        params,
    )
    state, buffer, chunk = make_update_inputs(model, params, target_params, 0.0)
    grid = jnp.array(list(itertools.product([-1.0, 0.0, 1.0], repeat=ACTION_DIM)))
    values = jax.vmap(lambda o: q_reference(target_params, o, grid))(chunk["next_obs"])  # [4, 9] under Q-
    chunk["argmax"] = np.asarray(grid[values.argmin(1)])  # a stale cache: the worst grid action at each s'
    best = np.asarray(grid[values.argmax(1)])  # 300 grid samples cover all 9 actions: the refreshed arg-max
    buffer = q.buffer_add(buffer, chunk)
    key = jax.random.PRNGKey(4)
    index = np.asarray(q.buffer_sample(buffer, jax.random.split(key)[0], 16, False, 0.2)[0])
    cfg = config(q.Budget(0, 300, 0, 0), predictor_target=predictor_target, prioritized_replay=False)
    _, buffer, metrics = q.update(model, state, buffer, no_new(chunk), key, cfg)
    assert len(set(index.tolist())) == 4  # every transition was replayed and refreshed
    np.testing.assert_allclose(buffer.storage["argmax"][:4], best)
    _, delta, logits = (np.asarray(x) for x in model.apply(params, chunk["next_obs"], method=q.QMLENetwork.heads))
    goal = {"refreshed": best, "cached": chunk["argmax"]}
    expected = {k: np.mean((delta[index] - g[index]) ** 2) for k, g in goal.items()}
    logits = logits[index]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for k, g in goal.items():  # -1, 0, 1 -> bins 0, 1, 2
        bins = np.rint(g[index] + 1).astype(int)
        expected[k] = (expected[k], -np.take_along_axis(log_p, bins[..., None], -1).mean())
    assert np.all(np.abs(np.subtract(*expected.values())) > 0.05)  # the two goals are told apart
    np.testing.assert_allclose(
        [metrics["losses/delta_mle_loss"], metrics["losses/categorical_mle_loss"]],
        expected[predictor_target],
        rtol=1e-5,
    )


@pytest.mark.parametrize("categorical_loss", ["logits", "softmax-twice"])
def test_the_categorical_loss_is_the_papers_or_the_releases(model_and_params, target_params, categorical_loss):
    """logits: cross-entropy of the head's log-softmax (the paper); softmax-twice: of the log-softmax of its
    softmax (the release's head), which can only lie between log(e + 2) - 1 and log(e + 2) per dimension."""
    model, params = model_and_params
    params = jax.tree_util.tree_map_with_path(  # a categorical head far from uniform, so the losses differ
        lambda path, x: x * 30 if "categorical_head" in jax.tree_util.keystr(path) else x, params
    )
    state, buffer, chunk = make_update_inputs(model, params, target_params, 0.0)
    chunk["argmax"] = np.array([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0], [1.0, 1.0]], np.float32)
    buffer = q.buffer_add(buffer, chunk)
    key = jax.random.PRNGKey(6)
    index = np.asarray(q.buffer_sample(buffer, jax.random.split(key)[0], 16, False, 0.2)[0])
    cfg = config(q.Budget(0, 0, 0, 0), categorical_loss=categorical_loss, prioritized_replay=False)
    _, _, metrics = q.update(model, state, buffer, no_new(chunk), key, cfg)  # empty budget: the goal is the cache
    logits = np.asarray(model.apply(params, chunk["next_obs"], method=q.QMLENetwork.heads)[2], np.float64)[index]
    log_softmax = lambda x: x - np.logaddexp.reduce(x, axis=-1, keepdims=True)  # noqa: E731
    bins = np.rint(chunk["argmax"][index] + 1).astype(int)[..., None]
    paper = -np.take_along_axis(log_softmax(logits), bins, -1).mean()
    release = -np.take_along_axis(log_softmax(np.exp(log_softmax(logits))), bins, -1).mean()
    assert abs(paper - release) > 0.1 and np.log(np.e + 2) - 1 <= release <= np.log(np.e + 2)
    np.testing.assert_allclose(
        metrics["losses/categorical_mle_loss"], {"logits": paper, "softmax-twice": release}[categorical_loss], rtol=1e-4
    )


def test_mle_steps_move_both_predictors_toward_their_target(model_and_params, target_params):
    model, params = model_and_params
    state, buffer, chunk = make_update_inputs(model, params, target_params, 0.0)
    chunk["argmax"] = np.array([[0.6, -0.8]] * 4, np.float32)  # bins: high (index 2) and low (index 0)

    def predictions(p):
        _, delta, logits = model.apply(p, jnp.asarray(chunk["next_obs"]), method=q.QMLENetwork.heads)
        probs = jax.nn.softmax(logits)
        return delta, probs[:, 0, 2] * probs[:, 1, 0]

    delta_before, prob_before = predictions(state.params)
    buffer = q.buffer_add(buffer, chunk)
    for i in range(30):
        state, buffer, _ = q.update(
            model, state, buffer, no_new(chunk), jax.random.PRNGKey(i), config(q.Budget(0, 0, 0, 0))
        )
    delta_after, prob_after = predictions(state.params)
    target = chunk["argmax"]
    assert np.mean((delta_after - target) ** 2) < 0.5 * np.mean((delta_before - target) ** 2)
    assert bool(jnp.all(prob_after > prob_before)) and float(prob_after.min()) > 0.5


def test_several_updates_in_one_call_equal_the_same_updates_one_by_one(model_and_params, target_params):
    model, params = model_and_params
    state, buffer, chunk = make_update_inputs(model, params, target_params, 0.0)
    together = q.update(
        model,
        state,
        jax.tree.map(jnp.copy, buffer),
        chunk,
        jax.random.PRNGKey(5),
        config(q.Budget(2, 2, 1, 1), updates=3),
    )
    for i, key in enumerate(jax.random.split(jax.random.PRNGKey(5), 3)):
        new = chunk if i == 0 else no_new(chunk)
        state, buffer, metrics = q.update(model, state, buffer, new, key, config(q.Budget(2, 2, 1, 1)))
    assert int(together[0].step) == int(state.step) == 3
    for a, b in zip(jax.tree.leaves((together[0].params, together[1])), jax.tree.leaves((state.params, buffer))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_act_is_greedy_over_its_candidates_or_random_and_counts_the_winners_sources(model_and_params):
    model, params = model_and_params
    obs = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (3, OBS_DIM)))  # three environments' states
    budget = q.Budget(450, 450, 10, 90)
    action, _, _, wins = q.act(model, params, obs, jax.random.PRNGKey(0), jnp.zeros(5), 0.0, budget, 0.1)
    _, delta, logits = model.apply(params, obs, method=q.QMLENetwork.heads)
    k_act = jax.random.split(jax.random.PRNGKey(0), 3)[1]
    candidates = q.sample_candidates(jax.random.split(k_act, 3)[0], delta, logits, budget, 0.1)  # act's own keys
    best = [int(q_reference(params, obs[i], candidates[i]).argmax()) for i in range(3)]  # the written-out Q
    np.testing.assert_allclose(action, candidates[np.arange(3), best])
    np.testing.assert_array_equal(wins, q.source_counts(jnp.array(best), budget))
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    randoms = [q.act(model, params, obs, k, jnp.zeros(5), 1.0, budget, 0.1) for k in keys]
    assert all(float(r[3].sum()) == 0 for r in randoms)  # a random action is counted for no source
    assert len({float(r[0][0, 0]) for r in randoms}) == 5


def test_curriculum_phase_acts_on_the_bin_grid_only(model_and_params):
    model, params = model_and_params
    obs = np.ones((2, OBS_DIM), np.float32)
    budget = q.Budget(45, 45, 1, 9)
    for epsilon in (0.0, 1.0):  # greedy, then random
        for key in jax.random.split(jax.random.PRNGKey(epsilon == 1.0), 4):
            action = q.act(model, params, obs, key, jnp.zeros(5), epsilon, budget, 0.1, discrete=True)[0]
            assert set(np.asarray(action).ravel().tolist()) <= {-1.0, 0.0, 1.0}


# --- argument checking: one clear line, non-zero exit, no traceback ------------------------------------------


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(m_target=0), "--m-target"),
        (dict(m_greedy=-3), "--m-greedy"),
        (dict(total_timesteps=-1), "--total-timesteps"),
        (dict(learning_starts=-5), "--learning-starts"),
        (dict(rho_uniform=0.5), "--rho-uniform"),
        (dict(epsilon=1.5), "--epsilon"),
        (dict(learning_rate=0.0), "--learning-rate"),
        (dict(learning_rate=-1e-3), "--learning-rate"),
        (dict(priority_epsilon=0.0), "--priority-epsilon"),
        (dict(num_bins=1), "--num-bins"),
        (dict(num_envs=4, train_frequency=6, buffer_size=11), "--buffer-size"),
    ],
)
def test_bad_arguments_are_rejected_with_one_line(overrides, flag):
    with pytest.raises(SystemExit) as exit_info:
        q.check_args(q.Args(**overrides))
    text = str(exit_info.value)
    assert text.startswith("error: ") and flag in text and "\n" not in text
    q.check_args(q.Args(priority_epsilon=0.0, prioritized_replay=False))  # no priorities, no epsilon needed
    q.check_args(q.Args(num_envs=4, train_frequency=6, buffer_size=12))  # exactly one update's transitions


def test_unknown_env_and_bad_budget_are_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for settings, flag in [(dict(env_id="walker-wlak"), "--env-id"), (dict(env_id="CartPole-v1"), "--env-id")]:
        assert flag in refusal(q.main, q.Args(**settings))
    assert "--m-target" in refusal(q.main, q.Args(env_id="cartpole-swingup", m_target=0))
    assert not os.path.exists(tmp_path / "runs")  # refused before anything was started


# --- whole runs ----------------------------------------------------------------------------------------------

SMOKE = dict(
    total_timesteps=1100,
    learning_starts=200,
    buffer_size=2000,
    batch_size=32,
    m_greedy=50,
    m_target=20,
    eval_frequency=600,
    log_frequency=100,
    target_network_frequency=100,
)


def test_smoke_run_writes_metrics_and_a_model_that_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # trained here; the saved model is then evaluated from the command line
    q.main(q.Args(save_model=True, env_id="cartpole-swingup", **SMOKE))
    printed = capsys.readouterr().out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "cartpole-swingup__qmle_dmc__1__*"))
    rows = read_metrics(run_dir)
    episodes = [r for r in rows if r["charts/episodic_return"]]
    assert len(episodes) == 1 and episodes[0]["charts/episodic_length"] == "1000.0"  # one 1000-step DMC episode
    assert 0.0 <= float(episodes[0]["charts/episodic_return"]) <= 1000.0
    updates = [r for r in rows if r["losses/td_loss"]]
    assert len(updates) >= 8 and all(np.isfinite(float(r["losses/td_loss"])) for r in updates)
    evaluations = [float(r["eval/episodic_return"]) for r in rows if r["eval/episodic_return"]]
    assert len(evaluations) == 2  # at step 600 and at the end
    assert "step     1100" in printed and "compiling the update" in printed

    model_path = os.path.join(run_dir, "qmle_dmc.npz")
    meta, arrays = load_saved(model_path)
    assert meta["script"] == "qmle_dmc.py" and meta["args"]["env_id"] == "cartpole-swingup"
    q.main(q.Args(load_model=model_path))  # what `python qmle_dmc.py --load-model ...` runs: its task and settings
    evaluation = capsys.readouterr().out
    # the task comes from the model (--env-id given at its default cannot be told from none given): it is named
    assert f"{model_path} on cartpole-swingup  greedy evaluation return" in evaluation
    # The run's own evaluation seeds and budget: the saved model scores what the run logged at its end.
    assert f"greedy evaluation return {evaluations[-1]:.1f} over 1 episode(s)" in evaluation
    for settings, flag in [(dict(env_id="cartpole-balance"), "--env-id"), (dict(num_bins=5), "--num-bins")]:
        wrong = refusal(q.main, q.Args(load_model=model_path, **settings))  # what gives the model its meaning
        assert wrong.startswith("error: --load-model") and flag in wrong
    elsewhere = str(tmp_path / "elsewhere.npz")  # a checkpoint is no model: its arrays are the whole run's
    q.save_arrays(elsewhere, dict(x=np.zeros(3)), dict(args=meta["args"]))
    assert refusal(q.main, q.Args(load_model=elsewhere)).startswith("error: --load-model")


FAST = dict(
    env_id="Pendulum-v1",
    learning_starts=100,
    buffer_size=2000,
    batch_size=16,
    m_greedy=8,
    m_target=4,
    eval_frequency=0,
    log_frequency=100,
)


def train_in_process(directory, monkeypatch, **overrides):
    return run_in_process(q, directory, monkeypatch, **dict(FAST, **overrides))


def test_an_evaluation_at_the_end_judges_the_phase_the_last_step_acted_in():
    grid_throughout = q.Args(discrete_steps=100_000)
    assert q.acted_on_grid(100_000, grid_throughout)  # its last step, 99,999, was on the grid
    half = q.Args(discrete_steps=50_000)
    assert q.acted_on_grid(50_000, half) and not q.acted_on_grid(50_001, half) and not q.acted_on_grid(100_000, half)
    four = q.Args(discrete_steps=100, num_envs=4)  # a vector step from 96 covers 96..99, from 100 is continuous
    assert q.acted_on_grid(100, four) and not q.acted_on_grid(104, four)
    assert not any(q.acted_on_grid(step, q.Args()) for step in (0, 1, 100_000))  # no curriculum: never
    assert q.acted_on_grid(0, half)  # a model saved before its first step would have started on the grid


def test_transitions_periods_curriculum_and_resume_on_a_time_limited_task(tmp_path, monkeypatch):
    # Pendulum-v1 ends every 200 steps by its time limit; the grid phase lasts 150 steps; targets copy every 400.
    # The run stops at 400, resumes to 600 and then to 700.
    run_dir, (meta, arrays) = train_in_process(
        tmp_path,
        monkeypatch,
        total_timesteps=400,
        discrete_steps=150,
        target_network_frequency=400,
        checkpoint_frequency=600,
        exp_name="pendulum",
    )
    params, target = saved(arrays, "['state'].params"), saved(arrays, "['state'].target_params")
    assert all(np.array_equal(params[k], target[k]) for k in params)  # copied at step 400, after its update
    at_400 = params

    _, (meta, arrays) = train_in_process(tmp_path, monkeypatch, total_timesteps=600, resume=run_dir)
    buffer = {k: v[: arrays["['buffer'].size"]] for k, v in saved(arrays, "['buffer'].storage").items()}
    obs, next_obs, action = buffer["['obs']"], buffer["['next_obs']"], buffer["['action']"]
    assert meta["global_step"] == 600 and len(obs) == 600
    np.testing.assert_array_equal(buffer["['terminated']"], 0.0)  # a time limit is not a termination
    ends = np.flatnonzero(np.any(next_obs[:-1] != obs[1:], axis=1))
    np.testing.assert_array_equal(ends, [199, 399])  # the stored next_obs is the episode's own, never a reset
    assert set(np.unique(action[:150])) <= {-1.0, 0.0, 1.0} and len(np.unique(action[150:])) > 100
    params, target = saved(arrays, "['state'].params"), saved(arrays, "['state'].target_params")
    assert all(np.array_equal(target[k], at_400[k]) for k in params)  # no copy in (400, 600] ...
    assert not all(np.array_equal(params[k], at_400[k]) for k in params)  # ... although training went on
    assert int(arrays["['state'].step"]) == (600 - 100) // 10 + 1  # one update per 10 steps from step 100

    _, (meta, resumed) = train_in_process(tmp_path, monkeypatch, total_timesteps=700, resume=run_dir)
    assert meta["global_step"] == 700 and int(resumed["['state'].step"]) == 61
    assert all(np.array_equal(saved(resumed, "['state'].target_params")[k], at_400[k]) for k in params)  # nor to 700
    assert not all(np.array_equal(saved(resumed, "['state'].params")[k], params[k]) for k in params)
    # A copy at 400 and none from 401 to 700: the period is 400, not a divisor (200, 100) nor a multiple (800).
    steps = [int(r["global_step"]) for r in read_metrics(run_dir) if r["charts/SPS"]]
    assert steps == list(range(100, 701, 100))  # metrics.csv continued where the checkpoint was taken


# InvertedPendulum-v5 terminates once the pole leans past 0.2 rad, which an untrained agent soon lets it do: with 3
# environments (lcm(3, 10) = 30 rows a call, 21 left pending at 501) its terminations are stored as terminal.
@pytest.mark.parametrize("env_id, num_envs", [("Pendulum-v1", 1), ("InvertedPendulum-v5", 3)])
def test_vector_env_transitions_equal_single_envs_and_updates_keep_their_ratio(tmp_path, monkeypatch, env_id, num_envs):
    _, (meta, arrays) = train_in_process(
        tmp_path,
        monkeypatch,
        env_id=env_id,
        total_timesteps=500,
        num_envs=num_envs,
        checkpoint_frequency=10_000,
        exp_name=f"vector{num_envs}",
    )
    final, rows = meta["global_step"], np.lcm(num_envs, 10)  # rows: transitions per update call
    stored, pending = saved(arrays, "['buffer'].storage"), saved(arrays, "['pending']")
    stored = {k: v[: arrays["['buffer'].size"]] for k, v in stored.items()}
    assert final == -(-500 // num_envs) * num_envs and len(stored["['obs']"]) == final // rows * rows
    buffer = {k: np.concatenate([stored[k], v[: final % rows]]) for k, v in pending.items()}  # not yet sent
    for i in range(num_envs):  # env i's transitions sit at rows i, i + N, ...; replay its actions alone
        env = q.make_env(env_id, 1 + i)
        obs, _ = env.reset(seed=1 + i)
        for row in range(i, final, num_envs):
            np.testing.assert_array_equal(buffer["['obs']"][row], obs)
            obs, reward, terminated, truncated, _ = env.step(buffer["['action']"][row])
            np.testing.assert_allclose(buffer["['reward']"][row], reward, rtol=1e-6)
            np.testing.assert_array_equal(buffer["['next_obs']"][row], obs)
            assert buffer["['terminated']"][row] == terminated
            if terminated or truncated:
                obs, _ = env.reset()
    if env_id == "InvertedPendulum-v5":  # terminal exactly where the pole had leant past 0.2 rad
        fallen = np.abs(buffer["['next_obs']"][:, 1]) > 0.2
        assert len(fallen) == final and fallen.sum() >= 3
        np.testing.assert_array_equal(buffer["['terminated']"], fallen.astype(np.float32))
    # one update per 10 environment steps, from the first update call at or after step 100
    first, last = -(-100 // rows) * rows, final // rows * rows
    assert int(arrays["['state'].step"]) == (last - first) // 10 + rows // 10
    assert abs(int(arrays["['state'].step"]) - (final - 100) / 10) <= rows / 10


def run_state(model, params, target_params, capacity=64):
    state = jax.tree.map(
        jnp.asarray,
        q.QMLEState.create(apply_fn=model.apply, params=params, target_params=target_params, tx=optax.adam(1e-3)),
    )
    example = dict(
        obs=np.zeros(OBS_DIM, np.float32),
        action=np.zeros(ACTION_DIM, np.float32),
        reward=np.float32(0),
        next_obs=np.zeros(OBS_DIM, np.float32),
        terminated=np.float32(0),
        argmax=np.zeros(ACTION_DIM, np.float32),
    )
    return dict(
        state=state,
        buffer=q.buffer_init(example, capacity),
        key=jax.random.PRNGKey(0),
        wins=jnp.zeros(5),
        pending={k: np.zeros((10, *np.shape(v)), np.float32) for k, v in example.items()},
    )


def chunks(count):
    rng = np.random.default_rng(7)
    return [
        dict(
            obs=rng.normal(size=(10, OBS_DIM)),
            action=rng.uniform(-1, 1, (10, ACTION_DIM)),
            reward=rng.normal(size=10),
            next_obs=rng.normal(size=(10, OBS_DIM)),
            terminated=np.zeros(10),
            argmax=rng.uniform(-1, 1, (10, ACTION_DIM)),
        )
        for _ in range(count)
    ]


def test_a_checkpointed_run_continues_exactly_as_one_that_never_stopped(model_and_params, target_params, tmp_path):
    model, params = model_and_params
    cfg = config(q.Budget(3, 3, 1, 1), batch_size=8)
    steps, keys = chunks(6), jax.random.split(jax.random.PRNGKey(1), 6)

    def train(run, first, last):
        for chunk, key in zip(steps[first:last], keys[first:last]):
            chunk = {k: np.asarray(v, np.float32) for k, v in chunk.items() if k != "argmax"}  # update caches it
            state, buffer, _ = q.update(model, run["state"], run["buffer"], chunk, key, cfg)
            run = dict(run, state=state, buffer=buffer)
        return run

    uninterrupted = train(run_state(model, params, target_params), 0, 6)
    stopped = train(run_state(model, params, target_params), 0, 3)
    stopped["pending"]["obs"][:4] = 1.5  # steps taken since the last update travel with the checkpoint too
    path = q.save_arrays(str(tmp_path / "checkpoint.npz"), stopped, dict(global_step=30))
    meta, arrays = load_saved(path)
    assert meta == dict(global_step=30, script="qmle_dmc.py")
    resumed = q.restore(run_state(model, params, target_params), arrays, "--resume")
    for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(resumed)):  # the resume point is the checkpoint
        np.testing.assert_array_equal(a, b)
    resumed = train(resumed, 3, 6)
    for a, b in zip(jax.tree.leaves(uninterrupted["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(uninterrupted["buffer"].tree, resumed["buffer"].tree)


def test_damaged_missing_or_foreign_checkpoints_are_refused_with_one_line(model_and_params, target_params, tmp_path):
    model, params = model_and_params
    run = run_state(model, params, target_params)
    data = open(q.save_arrays(str(tmp_path / "checkpoint.npz"), run, dict(args=vars(q.Args()))), "rb").read()
    for name, content in [("cut", data[: len(data) // 2]), ("noise", b"not a checkpoint"), ("missing", None)]:
        os.makedirs(tmp_path / name)
        if content is not None:
            (tmp_path / name / "checkpoint.npz").write_bytes(content)
        with pytest.raises(SystemExit, match=r"^error: --resume: [^\n]*$"):
            q.saved_settings(q.Args(resume=str(tmp_path / name)))
    _, meta, arrays = q.saved_settings(q.Args(resume=str(tmp_path)))
    assert meta["script"] == "qmle_dmc.py"
    with pytest.raises(SystemExit, match=r"^error: --resume: [^\n]*$"):  # the arrays of another kind of run
        q.restore(dict(run, extra=jnp.zeros(3)), arrays, "--resume")
    q.restore(run, arrays, "--resume")  # its own kind


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(q.time, "time", lambda: 1_700_000_000.0)
    first, second = q.new_run_dir(q.Args()), q.new_run_dir(q.Args())
    assert first != second and os.path.isdir(first) and os.path.isdir(second)


def test_sigint_saves_the_model_and_a_checkpoint_and_says_how_to_resume(tmp_path):
    flags = command_line(**dict(FAST, total_timesteps=1_000_000, checkpoint_frequency=5000))  # FAST: compiled
    returncode, stdout, stderr = interrupt("qmle_dmc.py", flags, tmp_path)
    assert returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "interrupted at step" in stdout and f"--resume runs/{os.path.basename(run_dir)}" in stdout
    meta, _ = load_saved(os.path.join(run_dir, "checkpoint.npz"))
    assert 300 <= meta["global_step"] < 1_000_000
    assert load_saved(os.path.join(run_dir, "qmle_dmc.npz"))[0]["global_step"] == meta["global_step"]
    wrong = refusal(q.main, q.Args(resume=run_dir, seed=2))
    assert wrong.startswith("error: --resume") and "--seed" in wrong

    # The printed command runs as printed, from where the run was started, ...
    (command,) = [line.removeprefix("continue with: ") for line in stdout.splitlines() if line.startswith("continue")]
    python, script, *flags = shlex.split(command)
    assert python == "python" and os.path.samefile(os.path.join(tmp_path, script), os.path.join(ROOT, "qmle_dmc.py"))
    end = str(meta["global_step"] + 200)
    more = [*flags, "--total-timesteps", end, "--eval-frequency", "100000"]  # evaluated at its end only
    resumed = subprocess.run([sys.executable, script, *more], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0 and f"finished at step {end}" in resumed.stdout, resumed.stderr[-2000:]
    # ... and the model the interrupt saved is replaced by the finished run's, not left behind at the interrupt's step
    assert load_saved(os.path.join(run_dir, "qmle_dmc.npz"))[0]["global_step"] == int(end)
    rows = read_metrics(run_dir)
    steps = [int(r["global_step"]) for r in rows if r["charts/SPS"]]
    assert steps == list(range(100, int(end) + 1, 100))  # one curve: the rows up to the checkpoint, then the rest
    assert [int(r["global_step"]) for r in rows if r["eval/episodic_return"]] == [int(end)]
    # A finished run resumed without more steps trains nothing and logs nothing, not even one more evaluation.
    metrics = open(os.path.join(run_dir, "metrics.csv")).read()
    q.main(q.Args(resume=run_dir, total_timesteps=int(end), eval_frequency=100_000))
    assert open(os.path.join(run_dir, "metrics.csv")).read() == metrics


def test_sigint_during_start_up_stops_without_a_traceback_and_without_checkpoints_says_it_cannot_continue(tmp_path):
    flags = command_line(**dict(FAST, total_timesteps=1_000_000))
    # The header is printed after the first compilation and before the greedy action's: start-up is still going.
    returncode, stdout, stderr = interrupt("qmle_dmc.py", flags, tmp_path, after="runs/Pendulum-v1__")
    assert returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted at step 0" in stdout, stdout[-2000:]
    assert "--resume" not in stdout and "cannot be continued" in stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert sorted(os.listdir(run_dir)) == ["metrics.csv", "qmle_dmc.npz"]  # its model is saved, and no checkpoint


def test_a_run_that_lost_a_worker_process_ends_the_others_with_it():
    # A worker killed (out of memory, a simulator crash): closing the rest fails on its pipe, and they ignore SIGTERM
    # (the trainer saves them first), so a run that did not kill them hung at its exit.
    envs = q.make_envs("Pendulum-v1", 0, 2)
    envs.reset(seed=0)
    os.kill(envs.processes[0].pid, signal.SIGKILL)
    envs.processes[0].join(10)
    with pytest.raises((BrokenPipeError, EOFError)):
        envs.step(np.zeros((2, 1), np.float32))
    q.close_envs(envs)
    for process in envs.processes:
        process.join(10)
    assert not any(process.is_alive() for process in envs.processes)


def wandb_history(path):
    """History rows from a W&B offline run file: LevelDB-style log blocks holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, rows = open(path, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == 0 and length == 0:
            break
    return rows


def test_seeds_reproduce_a_second_run_compiles_nothing_new_and_track_sends_the_metrics_to_wandb(tmp_path):
    # JAX names each program it looks up in the persistent compilation cache (the suite's), found or not
    env = dict(
        os.environ, JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1", WANDB_MODE="offline", WANDB_SILENT="true"
    )
    flags = command_line(**dict(FAST, total_timesteps=400, eval_frequency=200))  # two episodes
    for run, track in (("a", ["--track", "--wandb-project-name", "qmle-test"]), ("b", [])):
        os.makedirs(tmp_path / run)
        result = run_script("qmle_dmc.py", *flags, *track, cwd=tmp_path / run, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    # the second run took every program from the cache: the first one's, or the in-process runs' of the same shapes
    assert "PERSISTENT COMPILATION CACHE MISS" not in result.stderr
    assert result.stderr.count("Persistent compilation cache hit") >= 3
    rows = [read_metrics(glob.glob(str(tmp_path / run / "runs" / "*"))[0]) for run in ("a", "b")]
    for column in ("charts/episodic_return", "losses/td_loss", "eval/episodic_return"):  # W&B changes nothing
        values = [[r[column] for r in rs if r[column]] for rs in rows]
        assert values[0] and values[0] == values[1], column
    assert len([r for r in rows[0] if r["charts/episodic_return"]]) == 2
    (run_file,) = glob.glob(str(tmp_path / "a" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = {row["_step"]: row for row in wandb_history(run_file)}
    assert len(history) >= 4
    for row in rows[0]:  # run a's metrics.csv, row by row, in its W&B run
        logged = history[int(row["global_step"])]
        for key, value in row.items():
            if key != "global_step" and value:
                assert logged[key] == pytest.approx(float(value), rel=1e-6), key


def test_evaluation_records_a_video_offscreen(tmp_path):
    # InvertedPendulum (Gymnasium MuJoCo) falls within a few dozen steps untrained: a short video to render.
    model = q.QMLENetwork(1, 3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4)), jnp.zeros((1, 1, 1)))
    policy = functools.partial(q.act, model, budget=q.Budget(5, 5, 1, 1), noise_std=0.1)
    args = q.Args(env_id="InvertedPendulum-v5", eval_episodes=1)
    returns = [q.evaluate(policy, params, args, "video", video_dir=str(tmp_path / "videos"))]
    (video,) = glob.glob(str(tmp_path / "videos" / "*.mp4"))
    reader = imageio.get_reader(video)
    frame = reader.get_data(0)
    # a frame per step plus the reset frame (the encoder may pad one); InvertedPendulum pays 1 per step
    assert int(returns[0]) + 1 <= reader.count_frames() <= int(returns[0]) + 2
    assert frame.ndim == 3 and frame.shape[-1] == 3 and frame.std() > 1  # a rendered image, not a blank


def test_a_saved_models_evaluation_records_its_video_beside_the_model(tmp_path, monkeypatch, capsys):
    run_dir, _ = train_in_process(tmp_path, monkeypatch, total_timesteps=200, save_model=True, checkpoint_frequency=200)
    model = os.path.join(tmp_path, run_dir, "qmle_dmc.npz")
    q.main(q.Args(load_model=model, capture_video=True, eval_episodes=1))
    videos = os.path.join(tmp_path, run_dir, "videos", "evaluation")
    assert f"videos in {videos}" in capsys.readouterr().out
    (video,) = glob.glob(os.path.join(videos, "*.mp4"))
    assert imageio.get_reader(video).count_frames() == 201  # one Pendulum-v1 episode: the reset frame and 200 steps


@pytest.mark.parametrize("env_id, fps", [("cartpole-swingup", 100), ("Pendulum-v1", 20)])  # Pendulum steps 0.05 s
def test_videos_play_at_the_tasks_own_speed(tmp_path, env_id, fps):
    # DeepMind Control: one frame per 0.01 s control step of cartpole; Gymnasium's classic control: its declared 30.
    env = q.make_env(env_id, 0, video_dir=str(tmp_path))
    env.reset(seed=0)
    for _ in range(20):
        env.step(env.action_space.sample())
    env.close()  # an unfinished episode's video is written on close
    (video,) = glob.glob(str(tmp_path / "*.mp4"))
    reader = imageio.get_reader(video)
    assert reader.get_meta_data()["fps"] == fps and reader.count_frames() == 21  # the reset frame and 20 steps


def test_a_second_run_in_one_process_compiles_nothing(tmp_path, monkeypatch):
    # The optimizer and the init are keyed on their settings, not on one run's objects, so a second main() with the
    # same settings finds every program compiled (what keeps the many in-process runs of these tests fast).
    train_in_process(tmp_path, monkeypatch, total_timesteps=300, checkpoint_frequency=300, exp_name="first")
    with counting_compiles() as compiled:
        train_in_process(tmp_path, monkeypatch, total_timesteps=300, checkpoint_frequency=300, exp_name="second")
    assert compiled == []


def test_the_first_updates_and_greedy_actions_match_the_golden_recording():
    """tests/golden/qmle_dmc.json holds what the script computed before its redesign (its "source"), on the same
    inputs: the greedy actions of four states, and the metrics of three update calls of ten gradient steps each.
    Float32 rounding differs between CPU kinds and with this suite's XLA flags (bit for bit without them), and
    training amplifies it, hence a tolerance that widens with each call; the arg-max fractions must agree too."""
    golden = json.load(open(os.path.join(ROOT, "tests", "golden", "qmle_dmc.json")))
    rs = np.random.RandomState(0)
    obs = rs.randn(4, 24).astype(np.float32)
    model = q.QMLENetwork(6, 3)
    key, k_init = jax.random.split(jax.random.PRNGKey(3))
    params = jax.jit(model.init)(k_init, obs[:1], jnp.zeros((1, 1, 6)))
    params = q.release_init(params, jax.random.fold_in(k_init, 1), "uniform", "whole")
    greedy = q.Budget.split(1000, 0.9, 0.01, 0.09, 0.5)
    actions = q.act(model, params, obs, key, jnp.zeros(5), 0.0, greedy, 0.1)[0]
    np.testing.assert_allclose(actions, golden["greedy_actions"], atol=1e-6)
    n = 300
    data = dict(
        obs=rs.randn(n, 24),
        action=rs.uniform(-1, 1, (n, 6)),
        reward=rs.rand(n),
        next_obs=rs.randn(n, 24),
        terminated=rs.rand(n) < 0.1,
    )
    data = {k: v.astype(np.float32) for k, v in data.items()}
    state = q.QMLEState.create(apply_fn=None, params=params, target_params=params, tx=q.adam(5e-4))
    state = jax.tree.map(jnp.asarray, state)
    buffer = q.buffer_init(dict({k: v[0] for k, v in data.items()}, argmax=data["action"][0]), 1000)
    cfg = config(q.Budget.split(100, 0.9, 0.01, 0.09, 0.5), updates=10, gamma=0.99, batch_size=64)
    for i, expected in enumerate(golden["update_metrics"]):
        chunk = {k: v[i * 100 : (i + 1) * 100] for k, v in data.items()}
        state, buffer, metrics = q.update(model, state, buffer, chunk, jax.random.PRNGKey(10 + i), cfg)
        assert set(metrics) == set(expected)
        for name, value in expected.items():  # rounding's drift grows with every step (1e-2 by the 30th here)
            assert float(metrics[name]) == pytest.approx(value, rel=5e-3 * 4**i, abs=1e-6), (i, name)


@pytest.mark.parametrize("num_envs", [1, 2])  # in this process, or in one worker process each
def test_a_run_stopped_in_the_middle_of_an_episode_resumes_as_if_it_never_stopped(tmp_path, monkeypatch, num_envs):
    resumes_as_if_it_never_stopped(q, tmp_path, monkeypatch, **dict(FAST, num_envs=num_envs))


def test_a_checkpoint_holds_a_dmc_environment_whole_and_remakes_a_gymnasium_mujoco_one(monkeypatch):
    # DeepMind Control through Shimmy: the restored environment goes on as the original does, to the bit ...
    envs, other = (q.make_envs("cartpole-swingup", 3, 1) for _ in range(2))
    obs = envs.reset(seed=3)[0]
    actions = np.random.default_rng(0).uniform(-1, 1, (1100, 1, 1)).astype(np.float32)
    for action in actions[:10]:
        obs = envs.step(action)[0]
    saved, pickled = q.saved_envs(envs, obs), []
    with monkeypatch.context() as m:  # loading snapshots nothing (set_attr reads the attribute before setting it)
        m.setattr(q.cloudpickle, "dumps", lambda *args, **kwargs: pickled.append(args))
        restored_obs = q.continued_envs(other, saved, seed=4)
    assert pickled == []
    np.testing.assert_array_equal(restored_obs, obs)
    ended = 0
    for action in actions[10:]:  # through the episode's end at 1000 and the task's random start of the next one
        mine, theirs = envs.step(action)[:4], other.step(action)[:4]  # observations, rewards, terminated, truncated
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)
        ended += int(mine[3][0])
    assert ended == 1
    # ... while Gymnasium's MuJoCo tasks pickle as a fresh copy (EzPickle): nothing saved, and a resume starts anew
    envs, fresh = (q.make_envs("InvertedPendulum-v5", 3, 1) for _ in range(2))
    envs.reset(seed=5)
    envs.step(np.zeros((1, 1), np.float32))  # in the middle of an episode
    saved = q.saved_envs(envs, np.full((1, 4), 7.0))
    assert pickle.loads(saved["envs"].tobytes()) == (b"",)
    np.testing.assert_array_equal(q.continued_envs(envs, saved, 3), fresh.reset(seed=3)[0])


def test_a_crash_saves_a_checkpoint_whose_resume_starts_new_episodes(tmp_path, monkeypatch):
    # An exception can leave the environments a step ahead of the observation the loop holds: the checkpoint a crash
    # writes keeps no environment, and its resume starts new episodes.
    update, calls = q.update, []

    def failing_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("a failure in the middle of a run")
        return update(*args, **kwargs)

    monkeypatch.setattr(q, "update", failing_update)
    with pytest.raises(RuntimeError, match="a failure in the middle"):
        train_in_process(tmp_path, monkeypatch, total_timesteps=1000, checkpoint_frequency=10_000)
    monkeypatch.setattr(q, "update", update)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    meta, arrays = load_saved(os.path.join(run_dir, "checkpoint.npz"))
    assert meta["global_step"] == 50 and pickle.loads(arrays["['envs']['envs']"].tobytes()) == ()
    _, (meta, _) = train_in_process(tmp_path, monkeypatch, resume=run_dir, total_timesteps=100)
    assert meta["global_step"] == 100
