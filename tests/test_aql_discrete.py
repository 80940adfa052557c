"""aql_discrete.py: its parts against independent computations, then whole runs judged by what they write."""

import functools
import glob
import itertools
import json
import os
import re

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
    q_reference,
    read_metrics,
    refusal,
    resumes_as_if_it_never_stopped,
    run_in_process,
    saved,
)

import aql_discrete as aql

OBS_DIM, DIM, BINS = 5, 2, 3
ALL_ACTIONS = np.array(list(itertools.product(range(BINS), repeat=DIM)), np.int32)  # the whole 9-action space
TX = optax.adam(1e-2)  # one optimiser object, so every test below reuses one compiled update
# N + M = 208 candidates cover all 9 actions (each missed with probability (8/9) ** 200 < 1e-10 per state).
CFG = aql.UpdateConfig(
    updates=1,
    amortisation_states=16,
    gamma=0.9,
    batch_size=16,
    n_proposal=8,
    m_uniform=200,
    entropy_coef=0.1,
    prioritized_replay=True,
    priority_exponent=0.6,
    importance_exponent=0.2,
    priority_epsilon=1e-6,
)


@pytest.fixture(scope="module")
def model_and_params():
    model = aql.AQLNetwork(DIM, BINS)
    init = jax.jit(model.init)
    obs, actions = jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, DIM), jnp.int32)
    return model, init(jax.random.PRNGKey(0), obs, actions), init(jax.random.PRNGKey(1), obs, actions)


def bins_of(actions):
    return np.linspace(-1.0, 1.0, BINS, dtype=np.float32)[actions]


def test_q_network_is_appendix_b1_on_the_bins_values(model_and_params):
    model, params, _ = model_and_params
    obs = jax.random.normal(jax.random.PRNGKey(2), (OBS_DIM,))
    q_values = jax.jit(
        lambda p, o, a: model.apply(
            p, model.apply(p, o, method=aql.AQLNetwork.observation_stream), a, method=aql.AQLNetwork.q_values
        )
    )
    ours = q_values(params, obs, jnp.asarray(ALL_ACTIONS))
    np.testing.assert_allclose(ours, q_reference(params, obs, bins_of(ALL_ACTIONS)), rtol=1e-4, atol=1e-5)


# --- the autoregressive proposal ----------------------------------------------------------------------------


def hand_made_proposal(dim=3, bins=3, hidden=16, embed=4, scale=2.0):
    """A proposal with large random weights set by hand, so later sub-actions depend strongly on earlier ones."""
    rng = np.random.default_rng(0)

    def normal(*shape):  # scaled by the fan-in, so every layer's outputs are of order `scale`
        return (scale * rng.normal(size=shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(np.float32)

    p = {
        "state_in": {"kernel": normal(embed, hidden), "bias": normal(hidden)},
        "chosen_in": normal(dim, bins, hidden),
        "dim_in": normal(dim, hidden),
        "out_kernel": normal(dim, hidden, bins),
        "out_bias": normal(dim, bins),
    }
    embedding = rng.normal(size=(1, embed)).astype(np.float32)
    return aql.AutoregressiveProposal(dim, bins, hidden), {"params": p}, embedding


def numpy_log_prob(params, embedding, action, bins):
    """The MLP as written in the docstring: input [e, one-hot(a_<d) with zeros for dims >= d, one-hot(d)]."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params["params"])
    dim = len(action)
    kernel = np.concatenate([p["state_in"]["kernel"], p["chosen_in"].reshape(dim * bins, -1), p["dim_in"]])
    total = 0.0
    for d in range(dim):
        chosen = np.zeros((dim, bins))
        chosen[np.arange(d), action[:d]] = 1.0
        x = np.concatenate([embedding, chosen.ravel(), np.eye(dim)[d]])
        logits = np.maximum(x @ kernel + p["state_in"]["bias"], 0.0) @ p["out_kernel"][d] + p["out_bias"][d]
        total += logits[action[d]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    return total


def test_sampling_follows_the_autoregressive_joint_and_teacher_forcing_matches_the_path():
    proposal, params, embedding = hand_made_proposal()
    actions = np.array(list(itertools.product(range(3), repeat=3)), np.int32)  # 27 actions
    exact = np.exp([numpy_log_prob(params, embedding[0], a, 3) for a in actions])
    assert abs(exact.sum() - 1.0) < 1e-9
    forced, _ = proposal.apply(
        params, jnp.asarray(embedding), jnp.asarray(actions)[None], method=aql.AutoregressiveProposal.log_prob
    )
    np.testing.assert_allclose(np.exp(forced[0]), exact, rtol=1e-4, atol=1e-7)
    # The constructed joint is far from the product of its marginals, so a sampler that ignored the earlier
    # sub-actions (or took them in another order) would fail the comparison below.
    joint = exact.reshape(3, 3, 3)
    independent = np.einsum("i,j,k->ijk", joint.sum((1, 2)), joint.sum((0, 2)), joint.sum((0, 1)))
    assert 0.5 * np.abs(joint - independent).sum() > 0.1

    sample = jax.jit(functools.partial(proposal.apply, method=aql.AutoregressiveProposal.sample), static_argnums=3)
    samples, sampled_log_prob = sample(params, jnp.asarray(embedding), jax.random.PRNGKey(3), 50_000)
    assert samples.shape == (1, 50_000, 3) and samples.dtype == jnp.int32
    codes = (np.asarray(samples[0]) * np.array([9, 3, 1])).sum(1)
    counts = np.bincount(codes, minlength=27)
    assert 0.5 * np.abs(counts / 50_000 - exact).sum() < 0.02
    # The log-probability accumulated along each sampled path equals teacher forcing on the finished action.
    forced, _ = proposal.apply(
        params, jnp.asarray(embedding), samples[:, :500], method=aql.AutoregressiveProposal.log_prob
    )
    np.testing.assert_allclose(sampled_log_prob[:, :500], forced, rtol=1e-5, atol=1e-5)


def test_the_first_proposal_is_uniform_and_does_not_train_the_observation_stream(model_and_params):
    model, params, _ = model_and_params
    obs = jnp.ones((3, OBS_DIM))
    _, (log_prob, entropy) = jax.jit(model.apply)(params, obs, jnp.asarray(ALL_ACTIONS)[None].repeat(3, 0))
    np.testing.assert_allclose(log_prob[1], np.full(9, -np.log(9)), rtol=1e-6)
    np.testing.assert_allclose(entropy, DIM * np.log(BINS), rtol=1e-6)

    def proposal_loss(p):
        e = model.apply(p, obs, method=aql.AQLNetwork.observation_stream)
        return model.apply(
            p, e, jnp.asarray(ALL_ACTIONS[None, :2]).repeat(3, 0), method=aql.AQLNetwork.proposal_log_prob
        )[0].sum()

    grads = jax.jit(jax.grad(proposal_loss))(params)["params"]
    for name in ("obs_embed", "obs_block", "obs_norm"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[name]))
    assert float(jnp.abs(grads["proposal"]["out_bias"]).max()) > 0


# --- search, targets, training -------------------------------------------------------------------------------


def test_approximate_argmax_equals_brute_force_when_the_samples_cover_the_space(model_and_params):
    model, params, _ = model_and_params
    obs = jax.random.normal(jax.random.PRNGKey(4), (6, OBS_DIM))
    search = jax.jit(aql.search_argmax, static_argnums=(0, 4, 5))
    action, value, best = search(model, params, obs, jax.random.PRNGKey(5), 8, 200)
    brute = np.stack([q_reference(params, o, bins_of(ALL_ACTIONS)) for o in obs])
    np.testing.assert_array_equal(action, ALL_ACTIONS[brute.argmax(1)])
    np.testing.assert_allclose(value, brute.max(1), rtol=1e-4, atol=1e-5)
    assert action.dtype == jnp.int32 and best.shape == (6,)


@pytest.mark.parametrize("per_state", [5, 20])  # fewer candidates than the 9 actions, and more: one Q per action
def test_q_over_candidates_matches_q_of_each_candidate(model_and_params, per_state):
    model, params, _ = model_and_params
    obs = jax.random.normal(jax.random.PRNGKey(6), (4, OBS_DIM))
    candidates = jax.random.randint(jax.random.PRNGKey(7), (4, per_state, DIM), 0, BINS)
    embedding = model.apply(params, obs, method=aql.AQLNetwork.observation_stream)
    q = jax.jit(aql.q_over_candidates, static_argnums=0)(model, params, embedding, candidates)
    expected = np.stack([q_reference(params, o, bins_of(c)) for o, c in zip(obs, np.asarray(candidates))])
    np.testing.assert_allclose(q, expected, rtol=1e-4, atol=1e-5)


def update_inputs(params, target_params, terminated):
    state = aql.AQLState.create(apply_fn=None, params=params, target_params=target_params, tx=TX)
    rng = np.random.default_rng(0)
    chunk = dict(
        obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
        action=rng.integers(0, BINS, (4, DIM)).astype(np.int32),
        reward=np.array([1.0, -0.5, 0.25, 2.0], np.float32),
        next_obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
        terminated=np.full(4, terminated, np.float32),
    )
    return state, aql.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8), chunk


def td_errors(params, target_params, chunk, terminated):
    """By hand: r + gamma (1 - terminated) max_a Q_target(s', a) over all 9 actions, minus Q_online(s, a)."""
    next_max = np.array([q_reference(target_params, o, bins_of(ALL_ACTIONS)).max() for o in chunk["next_obs"]])
    now = np.array([q_reference(params, o, bins_of(a)[None])[0] for o, a in zip(chunk["obs"], chunk["action"])])
    return chunk["reward"] + CFG.gamma * (1.0 - terminated) * next_max - now


@pytest.mark.parametrize("terminated", [0.0, 1.0])
def test_td_errors_written_back_as_priorities_match_a_hand_computation(model_and_params, terminated):
    model, params, target_params = model_and_params
    state, buffer, chunk = update_inputs(params, target_params, terminated)
    _, buffer, metrics = aql.update(model, state, buffer, chunk, jax.random.PRNGKey(0), CFG)
    td_error = td_errors(params, target_params, chunk, terminated)
    np.testing.assert_allclose(buffer.tree[8:12], (np.abs(td_error) + 1e-6) ** 0.6, rtol=1e-4)
    assert int(buffer.size) == 4 and np.isfinite(float(metrics["losses/proposal_nll"]))
    # Both search sets cover the whole space here, so the proposal cannot beat uniform search.
    assert float(metrics["charts/amortisation_gap"]) == 0.0
    assert float(metrics["charts/amortisation_win_fraction"]) == 0.0
    assert 0.0 <= float(metrics["charts/argmax_from_proposal"]) <= 1.0


def test_one_mle_step_raises_the_log_probability_of_the_target_argmax(model_and_params):
    model, params, target_params = model_and_params
    state, buffer, chunk = update_inputs(params, target_params, 0.0)
    target = np.stack(
        [ALL_ACTIONS[q_reference(target_params, o, bins_of(ALL_ACTIONS)).argmax()] for o in chunk["next_obs"]]
    )  # the arg-max the update's search finds (brute force)

    @jax.jit
    def log_prob(p):
        e = model.apply(p, jnp.asarray(chunk["next_obs"]), method=aql.AQLNetwork.observation_stream)
        return model.apply(p, e, jnp.asarray(target)[:, None], method=aql.AQLNetwork.proposal_log_prob)[0][:, 0]

    before = log_prob(state.params)
    state, _, _ = aql.update(model, state, buffer, chunk, jax.random.PRNGKey(1), CFG)
    assert float(log_prob(state.params).mean()) > float(before.mean()) + 0.01


def test_uniformql_leaves_the_proposal_untouched(model_and_params):
    model, params, target_params = model_and_params
    state, buffer, chunk = update_inputs(params, target_params, 0.0)
    new_state, _, metrics = aql.update(
        model, state, buffer, chunk, jax.random.PRNGKey(2), CFG._replace(n_proposal=0, amortisation_states=0)
    )
    for before, after in zip(
        jax.tree.leaves(params["params"]["proposal"]), jax.tree.leaves(new_state.params["params"]["proposal"])
    ):
        np.testing.assert_array_equal(before, after)
    assert "losses/proposal_nll" not in metrics and float(metrics["charts/argmax_from_proposal"]) == 0.0
    assert not np.allclose(params["params"]["q_head"]["kernel"], new_state.params["params"]["q_head"]["kernel"])


def test_importance_weights_scale_the_td_loss(model_and_params):
    model, params, target_params = model_and_params
    state, buffer, chunk = update_inputs(params, target_params, 0.0)
    priorities = np.array([0.05, 0.5, 2.0, 8.0], np.float32)  # unequal, so the weights are too
    buffer = aql.buffer_update(aql.buffer_add(buffer, chunk), jnp.arange(4), jnp.asarray(priorities), alpha=0.6)
    key = jax.random.PRNGKey(3)
    index = np.asarray(aql.buffer_sample(buffer, jax.random.split(key, 3)[0], 16, True, 0.2)[0])  # the update's draws
    _, _, metrics = aql.update(model, state, buffer, jax.tree.map(lambda x: x[:0], chunk), key, CFG)
    probability = priorities**0.6 / np.sum(priorities**0.6)
    weights = (4 * probability[index]) ** -0.2
    weights /= weights.max()
    assert len(set(np.round(weights, 6))) > 1
    td_error = td_errors(params, target_params, chunk, 0.0)[index]
    np.testing.assert_allclose(metrics["losses/td_loss"], np.mean(weights * td_error**2), rtol=1e-4)
    # The target network matters here: the same computation with the online one as target is far off.
    assert (
        abs(np.mean(weights * td_errors(params, params, chunk, 0.0)[index] ** 2) / np.mean(weights * td_error**2) - 1)
        > 0.01
    )


def test_the_entropy_bonus_raises_the_proposals_entropy(model_and_params):
    model, params, target_params = model_and_params
    # A peaked proposal: the first one is uniform, where the entropy is at its maximum and its gradient zero.
    rng = np.random.default_rng(1)
    proposal = dict(
        params["params"]["proposal"],
        out_bias=jnp.asarray(3 * rng.normal(size=(DIM, BINS)), jnp.float32),
        out_kernel=jnp.asarray(0.3 * rng.normal(size=(DIM, 128, BINS)), jnp.float32),
    )
    peaked = {"params": dict(params["params"], proposal=proposal)}
    state, buffer, chunk = update_inputs(peaked, target_params, 0.0)
    # Adam's first step moves every parameter by about the learning rate: small here, so that the step stays
    # in the region where the gradient tells which way the entropy goes.
    state = state.replace(tx=optax.adam(1e-4), opt_state=optax.adam(1e-4).init(peaked))

    @jax.jit
    def joint_entropy(p):  # exact, over the whole 9-action space, at the replayed states s'
        e = model.apply(p, jnp.asarray(chunk["next_obs"]), method=aql.AQLNetwork.observation_stream)
        every = jnp.broadcast_to(jnp.asarray(ALL_ACTIONS), (4, *ALL_ACTIONS.shape))
        log_p = model.apply(p, e, every, method=aql.AQLNetwork.proposal_log_prob)[0]
        return -(jnp.exp(log_p) * log_p).sum(-1).mean()

    before = float(joint_entropy(peaked))
    assert before < 0.8 * np.log(9)
    after = {}
    for coef in (0.0, 5.0):  # the same start and key; only the bonus' weight differs
        new_state, _, _ = aql.update(
            model, state, jax.tree.map(jnp.copy, buffer), chunk, jax.random.PRNGKey(4), CFG._replace(entropy_coef=coef)
        )
        after[coef] = float(joint_entropy(new_state.params))
    assert after[5.0] > before + 0.01 and after[5.0] > after[0.0] + 0.005, (before, after)


def test_several_updates_in_one_call_equal_the_same_updates_one_by_one(model_and_params):
    model, params, target_params = model_and_params
    state, buffer, chunk = update_inputs(params, target_params, 0.0)
    together = aql.update(
        model, state, jax.tree.map(jnp.copy, buffer), chunk, jax.random.PRNGKey(5), CFG._replace(updates=3)
    )
    no_new = jax.tree.map(lambda x: x[:0], chunk)
    for i, key in enumerate(jax.random.split(jax.random.PRNGKey(5), 3)):  # the gap is measured by the last only
        measured = CFG.amortisation_states if i == 2 else 0
        state, buffer, metrics = aql.update(
            model, state, buffer, chunk if i == 0 else no_new, key, CFG._replace(amortisation_states=measured)
        )
    assert int(together[0].step) == int(state.step) == 3
    for a, b in zip(jax.tree.leaves((together[0].params, together[1])), jax.tree.leaves((state.params, buffer))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(together[2]) == set(metrics)
    for name, value in metrics.items():
        np.testing.assert_allclose(together[2][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_act_is_the_search_argmax_or_random_and_counts_on_the_device(model_and_params):
    model, params, _ = model_and_params
    obs = np.asarray(jax.random.normal(jax.random.PRNGKey(8), (3, OBS_DIM)))  # a batch of states, one per env
    action, _, _, greedy = aql.act(model, params, obs, jax.random.PRNGKey(0), jnp.zeros(2), 0.0, 8, 200)
    brute = np.stack([ALL_ACTIONS[q_reference(params, o, bins_of(ALL_ACTIONS)).argmax()] for o in obs])
    assert len({tuple(a) for a in brute}) > 1  # the states want different actions
    np.testing.assert_array_equal(action, brute)
    assert float(greedy[0]) == 3 and 0 <= float(greedy[1]) <= 3  # every action greedy
    # Proposal samples alone, or uniform samples alone: every greedy action is, or none is, a proposal's.
    np.testing.assert_array_equal(
        aql.act(model, params, obs, jax.random.PRNGKey(0), jnp.zeros(2), 0.0, 8, 0)[3], [3, 3]
    )
    np.testing.assert_array_equal(
        aql.act(model, params, obs, jax.random.PRNGKey(0), jnp.zeros(2), 0.0, 0, 8)[3], [3, 0]
    )
    keys = jax.random.split(jax.random.PRNGKey(1), 20)
    randoms = [aql.act(model, params, obs[:1], k, jnp.zeros(2), 1.0, 8, 200) for k in keys]
    assert all(float(r[3][0]) == 0.0 for r in randoms) and len({tuple(np.asarray(r[0][0])) for r in randoms}) > 3
    # Counts accumulate over calls, the loop key moves on, and about half of the actions are random at 0.5.
    key, greedy = jax.random.PRNGKey(10), jnp.zeros(2)
    many = jax.random.normal(jax.random.PRNGKey(9), (200, OBS_DIM))
    for _ in range(3):
        _, next_key, k_update, greedy = aql.act(model, params, many, key, greedy, 0.5, 8, 4)
        assert not np.array_equal(next_key, key) and not np.array_equal(k_update, key)
        key = next_key
    assert 240 < float(greedy[0]) < 360 and 0 < float(greedy[1]) < float(greedy[0])


# --- argument checking: one clear line, exit status 1, no traceback ----------------------------------------------


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(num_bins=1), "--num-bins"),
        (dict(n_proposal=-1), "--n-proposal"),
        (dict(m_uniform=0, n_proposal=0), "--n-proposal"),
        (dict(entropy_coef=-0.1), "--entropy-coef"),
        (dict(entropy_coef=float("nan")), "--entropy-coef"),
        (dict(gamma=float("inf")), "--gamma"),
        (dict(learning_rate=0.0), "--learning-rate"),
        (dict(learning_rate=-1e-3), "--learning-rate"),
        (dict(priority_epsilon=0.0), "--priority-epsilon"),
        (dict(num_envs=0), "--num-envs"),
        (dict(num_envs=4, buffer_size=10), "--buffer-size"),
        (dict(checkpoint_frequency=-1), "--checkpoint-frequency"),
        (dict(proposal_hidden=0), "--proposal-hidden"),
        (dict(amortisation_states=-1), "--amortisation-states"),
    ],
)
def test_bad_arguments_are_rejected_with_one_line(overrides, flag):
    with pytest.raises(SystemExit) as exit_info:
        aql.check_args(aql.Args(**overrides))
    text = exit_info.value.code  # a string code: Python prints it and exits with status 1
    assert isinstance(text, str) and text.startswith("error: ") and flag in text and "\n" not in text
    aql.check_args(aql.Args(m_uniform=0))  # pure proposal search is allowed
    aql.check_args(aql.Args(priority_epsilon=0.0, prioritized_replay=False))  # no priorities, no epsilon needed
    aql.check_args(aql.Args(num_envs=4, buffer_size=20))  # exactly one update call's transitions


class TwoDimensionalBox(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (3,))
    action_space = gym.spaces.Box(-1.0, 1.0, (2, 2))

    def __init__(self, render_mode=None):  # gym.make passes the render mode
        pass


class SetObservations(TwoDimensionalBox):
    observation_space = gym.spaces.Sequence(gym.spaces.Discrete(3))
    action_space = gym.spaces.Discrete(2)


@pytest.mark.parametrize(
    "env_class, expected",
    [
        (TwoDimensionalBox, "has Box(-1.0, 1.0, (2, 2), float32) actions"),
        (SetObservations, "cannot be made"),  # the observations do not flatten to a vector
    ],
)
def test_spaces_it_cannot_handle_are_refused_with_one_line(env_class, expected):
    env_id = f"test/{env_class.__name__}-v0"
    gym.register(env_id, entry_point=env_class)
    try:
        with pytest.raises(SystemExit) as exit_info:
            aql.make_env(env_id, 0)
    finally:
        gym.registry.pop(env_id)
    text = exit_info.value.code
    assert text.startswith(f"error: --env-id '{env_id}' ") and expected in text and "\n" not in text


def test_a_proposal_too_large_for_memory_is_refused_in_one_line_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = refusal(aql.main, aql.Args(env_id="Pendulum-v1", num_bins=100_000_000))
    # 4 bytes x (5 x 1 x 1e8 x 257 weights + 4 x 256 states x 100 samples x 1e8 bins) = 4.1e13 bytes, 38,600 GiB
    assert text.startswith("error: ") and "--num-bins 100000000" in text
    needed = float(re.search(r"needs ([0-9.e+]+) GiB", text).group(1))
    assert needed == pytest.approx(4 * (5 * 1e8 * 257 + 4 * 256 * 100 * 1e8) / 2**30, rel=0.01)
    assert not os.path.exists(tmp_path / "runs")


def test_the_proposal_memory_estimate_counts_its_per_bin_parameters():
    # The estimate's weight term against the parameters a real proposal has (5 copies in an update), and its
    # activation term: one sub-action's [states, samples, bins] logits, log-softmax, probabilities, cumulative sum.
    dim, bins, hidden = 3, 7, 16
    params = jax.jit(aql.AQLNetwork(dim, bins, hidden).init)(
        jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 1, dim), jnp.int32)
    )
    per_bin = sum(x.size for x in jax.tree.leaves(params["params"]["proposal"]) if bins in x.shape)
    args = aql.Args(proposal_hidden=hidden, batch_size=256, n_proposal=100)
    assert aql.proposal_bytes(dim, bins, args) == 4 * (5 * per_bin + 4 * 256 * 100 * bins)


def test_unknown_env_empty_search_and_missing_model_are_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for settings, expected in [
        (dict(env_id="walker-wlak"), "error: unknown --env-id 'walker-wlak'"),
        (dict(n_proposal=0, m_uniform=0), "error: --n-proposal + --m-uniform"),
        (dict(load_model="no/such/model.npz"), "error: --load-model: no/such/model.npz"),
    ]:
        assert refusal(aql.main, aql.Args(**settings)).startswith(expected)
    assert not os.path.exists(tmp_path / "runs")  # refused before anything was started


# --- whole runs ----------------------------------------------------------------------------------------------


def test_smoke_run_on_cartpole_swingup_writes_metrics_and_a_model_that_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    settings = dict(env_id="cartpole-swingup", total_timesteps=1500, learning_starts=500, n_proposal=8, m_uniform=16)
    aql.main(
        aql.Args(save_model=True, eval_frequency=1500, batch_size=32, buffer_size=2000, log_frequency=250, **settings)
    )
    printed = capsys.readouterr().out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "cartpole-swingup__aql_discrete__1__*"))
    rows = read_metrics(run_dir)
    for column in (
        "charts/amortisation_gap",
        "charts/amortisation_win_fraction",
        "charts/argmax_from_proposal",
        "charts/greedy_from_proposal",
        "losses/td_loss",
        "losses/proposal_nll",
        "losses/entropy",
        "losses/q_values",
        "charts/SPS",
        "charts/episodic_return",
        "charts/episodic_length",
        "eval/episodic_return",
    ):
        assert column in rows[0]
    episodes = [r for r in rows if r["charts/episodic_return"]]
    assert len(episodes) == 1 and episodes[0]["charts/episodic_length"] == "1000.0"  # one 1000-step DMC episode
    updates = [r for r in rows if r["losses/td_loss"]]
    assert len(updates) == 5  # logged at steps 500 (the first update), 750, 1000, 1250, 1500
    for r in updates:
        assert np.isfinite(float(r["charts/amortisation_gap"])) and np.isfinite(float(r["losses/proposal_nll"]))
        assert 0.0 <= float(r["charts/argmax_from_proposal"]) <= 1.0
        assert 0.0 <= float(r["charts/greedy_from_proposal"]) <= 1.0
        assert 0.0 <= float(r["losses/entropy"]) <= np.log(11) + 1e-4  # one sub-action of 11 bins
    evaluations = [float(r["eval/episodic_return"]) for r in rows if r["eval/episodic_return"]]
    assert len(evaluations) == 1  # at the end
    assert "step     1500" in printed and "compiling the update" in printed

    model_path = os.path.join(run_dir, "aql_discrete.npz")
    meta, arrays = load_saved(model_path)
    assert meta["script"] == "aql_discrete.py" and meta["args"]["env_id"] == "cartpole-swingup"
    model = aql.AQLNetwork(1, 11)
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 1, 1), jnp.int32))
    loaded = aql.restore(template, arrays, "--load-model")
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)))
    aql.main(aql.Args(load_model=model_path))
    # The run's own evaluation seeds and search: the saved model scores what the run logged at its end.
    assert f"greedy evaluation return {evaluations[-1]:.1f} over 1 episode(s)" in capsys.readouterr().out
    for overrides in (dict(env_id="cartpole-balance"), dict(num_bins=5), dict(proposal_hidden=64)):
        with pytest.raises(SystemExit) as exit_info:  # what gives the parameters their meaning must agree
            aql.main(aql.Args(load_model=model_path, **overrides))
        flag = "--" + next(iter(overrides)).replace("_", "-")
        assert exit_info.value.code.startswith(f"error: --load-model: {flag} ")


FAST = dict(
    env_id="Pendulum-v1",
    learning_starts=100,
    buffer_size=2000,
    batch_size=16,
    n_proposal=4,
    m_uniform=4,
    amortisation_states=8,
    proposal_hidden=16,
    eval_frequency=0,
    log_frequency=100,
)


def train_in_process(directory, monkeypatch, **overrides):
    return run_in_process(aql, directory, monkeypatch, **dict(FAST, **overrides))


def stored(arrays):  # the replay storage's filled rows (a checkpoint holds its whole capacity)
    return {k: v[: int(arrays["['buffer'].size"])] for k, v in saved(arrays, "['buffer'].storage").items()}


def test_time_limits_target_copies_and_resume_on_pendulum(tmp_path, monkeypatch):
    # Pendulum-v1 ends every 200 steps by its time limit; targets copy every 300.
    run_dir, (meta, arrays) = train_in_process(
        tmp_path,
        monkeypatch,
        total_timesteps=600,
        target_network_frequency=300,
        checkpoint_frequency=600,
        exp_name="pendulum",
    )
    buffer = stored(arrays)
    obs, next_obs = buffer["['obs']"], buffer["['next_obs']"]
    assert meta["global_step"] == 600 and len(obs) == 600
    np.testing.assert_array_equal(buffer["['terminated']"], 0.0)  # a time limit is not a termination
    ends = np.flatnonzero(np.any(next_obs[:-1] != obs[1:], axis=1))
    np.testing.assert_array_equal(ends, [199, 399])  # the stored next_obs is the episode's own, never a reset
    assert buffer["['action']"].dtype == np.int32 and len(np.unique(buffer["['action']"])) == 11  # bin indices
    params, target = saved(arrays, "['state'].params"), saved(arrays, "['state'].target_params")
    assert all(np.array_equal(params[k], target[k]) for k in params)  # copied at step 600, after its update
    assert int(arrays["['state'].step"]) == (600 - 100) // 10 + 1  # one update per 10 steps from step 100

    with open(os.path.join(run_dir, "metrics.csv"), "a") as f:  # as a run killed after its last checkpoint writes
        f.write("650,-1.0,200.0,1.0" + "," * 9 + "\n")
    _, (meta, resumed) = train_in_process(tmp_path, monkeypatch, total_timesteps=700, resume=run_dir)
    assert meta["global_step"] == 700 and int(resumed["['state'].step"]) == 61
    assert all(np.array_equal(saved(resumed, "['state'].target_params")[k], params[k]) for k in params)  # no copy
    assert not all(np.array_equal(saved(resumed, "['state'].params")[k], params[k]) for k in params)  # at 700
    rows = read_metrics(run_dir)
    steps = [int(r["global_step"]) for r in rows if r["charts/SPS"]]
    assert steps == list(range(100, 701, 100))  # metrics.csv continued where the checkpoint was taken
    assert all(int(r["global_step"]) != 650 for r in rows)  # rows past the checkpoint are dropped
    assert [int(r["global_step"]) for r in rows if r["charts/episodic_return"]] == [200, 400, 600]
    assert all(r["charts/greedy_from_proposal"] and r["charts/amortisation_gap"] for r in rows if r["charts/SPS"])


def replay_single_envs(buffer, env_id, num_envs, final, num_bins=11):
    """Env i's transitions sit at rows i, i + N, ...: replay its actions alone, from seed 1 + i, and compare."""
    for i in range(num_envs):
        env = aql.make_env(env_id, 1 + i)
        obs, _ = env.reset(seed=1 + i)
        for row in range(i, final, num_envs):
            np.testing.assert_array_equal(buffer["['obs']"][row], obs)
            action = aql.env_action(env.action_space, buffer["['action']"][row], num_bins)
            obs, reward, terminated, truncated, _ = env.step(action)
            np.testing.assert_allclose(buffer["['reward']"][row], reward, rtol=1e-6)
            np.testing.assert_array_equal(buffer["['next_obs']"][row], obs)
            assert buffer["['terminated']"][row] == terminated
            if terminated or truncated:
                obs, _ = env.reset()


# Pendulum with 1 environment shares its compiled programs with the time-limit test, CartPole with 3 (lcm(3, 10) = 30
# rows a call, 21 left pending at 501) with the CartPole test below.
@pytest.mark.parametrize("env_id, num_envs", [("Pendulum-v1", 1), ("CartPole-v1", 3)])
def test_vector_env_transitions_equal_single_envs_and_updates_keep_their_ratio(tmp_path, monkeypatch, env_id, num_envs):
    run_dir, (meta, arrays) = train_in_process(
        tmp_path,
        monkeypatch,
        env_id=env_id,
        total_timesteps=500,
        num_envs=num_envs,
        checkpoint_frequency=10_000,
        exp_name=f"vector{num_envs}",
    )
    final, rows = meta["global_step"], np.lcm(num_envs, 10)  # rows: transitions per update call
    sent, pending = stored(arrays), saved(arrays, "['pending']")
    assert final == -(-500 // num_envs) * num_envs and len(sent["['obs']"]) == final // rows * rows
    buffer = {k: np.concatenate([v, pending[k][: final % rows]]) for k, v in sent.items()}  # not yet sent
    replay_single_envs(buffer, env_id, num_envs, final)
    # one update per 10 environment steps, from the first update call at or after step 100
    first, last = -(-100 // rows) * rows, final // rows * rows
    assert int(arrays["['state'].step"]) == (last - first) // 10 + rows // 10
    assert abs(int(arrays["['state'].step"]) - (final - 100) / 10) <= rows / 10
    # The update before each log line measured the amortisation gap: every line after the first update shows
    # one, and a new one each time.
    gaps = [r["charts/amortisation_gap"] for r in read_metrics(run_dir) if r["losses/td_loss"]]
    assert len(gaps) >= 3 and all(gaps), gaps
    if env_id == "Pendulum-v1":  # with CartPole's two actions the search finds the best one: the gap is always 0
        assert all(a != b for a, b in zip(gaps, gaps[1:])), gaps


def test_cartpole_runs_as_one_sub_action_stores_terminations_and_its_seed_reproduces_it(tmp_path, monkeypatch, capsys):
    # CartPole-v1 (Discrete(2): actions [N] for a vector env) terminates once the pole falls, within a few dozen steps.
    runs = []
    for run in ("a", "b"):
        os.makedirs(tmp_path / run)
        settings = dict(env_id="CartPole-v1", num_envs=3, total_timesteps=300, checkpoint_frequency=300)
        run_dir, saved_run = train_in_process(
            tmp_path / run, monkeypatch, eval_frequency=300, exp_name="falls", **settings
        )
        runs.append((str(tmp_path / run / run_dir), saved_run))
        assert "1 sub-actions x 2 bins" in capsys.readouterr().out
    (run_dir, (meta, arrays)), (other_dir, _) = runs
    sent, pending = stored(arrays), saved(arrays, "['pending']")
    buffer = {k: np.concatenate([v, pending[k][: 300 % 30]]) for k, v in sent.items()}
    assert meta["global_step"] == 300 and buffer["['action']"].shape == (300, 1)
    terminated = buffer["['terminated']"]
    assert terminated.sum() >= 8 and set(np.unique(terminated)) == {0.0, 1.0}
    replay_single_envs(buffer, "CartPole-v1", 3, 300)  # terminal where the env terminated, its own last obs
    rows = [read_metrics(d) for d in (run_dir, other_dir)]
    assert len([r for r in rows[0] if r["eval/episodic_return"]]) == 1
    for column in ("charts/episodic_return", "losses/td_loss", "charts/amortisation_gap", "eval/episodic_return"):
        values = [[r[column] for r in rs if r[column]] for rs in rows]
        assert values[0] and values[0] == values[1], column


def run_state(model, params, target_params, capacity=64):
    state = jax.tree.map(
        jnp.asarray, aql.AQLState.create(apply_fn=model.apply, params=params, target_params=target_params, tx=TX)
    )
    example = dict(
        obs=np.zeros(OBS_DIM, np.float32),
        action=np.zeros(DIM, np.int32),
        reward=np.float32(0),
        next_obs=np.zeros(OBS_DIM, np.float32),
        terminated=np.float32(0),
    )
    return dict(
        state=state,
        buffer=aql.buffer_init(example, capacity),
        key=jax.random.PRNGKey(0),
        greedy=jnp.zeros(2),
        pending={k: np.zeros((10, *np.shape(v)), np.asarray(v).dtype) for k, v in example.items()},
    )


def chunks(count):
    rng = np.random.default_rng(7)
    return [
        dict(
            obs=rng.normal(size=(10, OBS_DIM)).astype(np.float32),
            action=rng.integers(0, BINS, (10, DIM)).astype(np.int32),
            reward=rng.normal(size=10).astype(np.float32),
            next_obs=rng.normal(size=(10, OBS_DIM)).astype(np.float32),
            terminated=(rng.uniform(size=10) < 0.2).astype(np.float32),
        )
        for _ in range(count)
    ]


def test_a_checkpointed_run_continues_exactly_as_one_that_never_stopped(model_and_params, tmp_path):
    model, params, target_params = model_and_params
    cfg = CFG._replace(batch_size=8)
    steps, keys = chunks(6), jax.random.split(jax.random.PRNGKey(1), 6)

    def train(run, first, last):
        for chunk, key in zip(steps[first:last], keys[first:last]):
            state, buffer, _ = aql.update(model, run["state"], run["buffer"], chunk, key, cfg)
            run = dict(run, state=state, buffer=buffer)
        return run

    uninterrupted = train(run_state(model, params, target_params), 0, 6)
    stopped = train(run_state(model, params, target_params), 0, 3)
    stopped["pending"]["obs"][:4] = 1.5  # steps taken since the last update travel with the checkpoint too
    stopped["greedy"] = jnp.array([7.0, 3.0])  # and the acting counts of the current log period
    path = aql.save_arrays(str(tmp_path / "checkpoint.npz"), stopped, dict(global_step=30))
    meta, arrays = load_saved(path)
    assert meta == dict(global_step=30, script="aql_discrete.py")
    resumed = aql.restore(run_state(model, params, target_params), arrays, "--resume")
    assert jax.tree.structure(stopped) == jax.tree.structure(resumed)
    for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(resumed)):  # the resume point is the checkpoint
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a, b)
    resumed = train(resumed, 3, 6)
    for a, b in zip(jax.tree.leaves(uninterrupted["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(uninterrupted["buffer"]), jax.tree.leaves(resumed["buffer"])):
        np.testing.assert_array_equal(a, b)


def test_damaged_missing_or_foreign_checkpoints_are_refused_with_one_line(model_and_params, tmp_path):
    model, params, target_params = model_and_params
    run = run_state(model, params, target_params)
    data = open(aql.save_arrays(str(tmp_path / "checkpoint.npz"), run, dict(args=vars(aql.Args()))), "rb").read()
    for name, content in [("cut", data[: len(data) // 2]), ("noise", b"not a checkpoint"), ("missing", None)]:
        os.makedirs(tmp_path / name)
        if content is not None:
            (tmp_path / name / "checkpoint.npz").write_bytes(content)
        with pytest.raises(SystemExit, match=r"^error: --resume: [^\n]*$"):
            aql.saved_settings(aql.Args(resume=str(tmp_path / name)))
    _, meta, arrays = aql.saved_settings(aql.Args(resume=str(tmp_path)))
    assert meta["script"] == "aql_discrete.py"
    with pytest.raises(SystemExit, match=r"^error: --resume: [^\n]*$"):  # the arrays of another kind of run
        aql.restore(dict(run, wins=jnp.zeros(5)), arrays, "--resume")
    aql.restore(run, arrays, "--resume")  # its own kind


def test_sigint_saves_the_model_and_a_checkpoint_and_says_how_to_resume(tmp_path):
    flags = command_line(**dict(FAST, total_timesteps=1_000_000, checkpoint_frequency=5000))  # FAST: compiled
    returncode, stdout, stderr = interrupt("aql_discrete.py", flags, tmp_path)
    assert returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "interrupted at step" in stdout and f"--resume runs/{os.path.basename(run_dir)}" in stdout
    meta, _ = load_saved(os.path.join(run_dir, "checkpoint.npz"))
    assert 300 <= meta["global_step"] < 1_000_000
    assert load_saved(os.path.join(run_dir, "aql_discrete.npz"))[0]["global_step"] == meta["global_step"]
    assert refusal(aql.main, aql.Args(resume=run_dir, seed=2)).startswith("error: --resume: --seed 2 ")


def test_a_second_run_in_one_process_compiles_nothing(tmp_path, monkeypatch):
    # The optimizer and the init are keyed on their settings, not on one run's objects, so a second main() with the
    # same settings finds every program compiled (what keeps the many in-process runs of these tests fast).
    train_in_process(tmp_path, monkeypatch, total_timesteps=300, checkpoint_frequency=300, exp_name="first")
    with counting_compiles() as compiled:
        train_in_process(tmp_path, monkeypatch, total_timesteps=300, checkpoint_frequency=300, exp_name="second")
    assert compiled == []


def test_the_first_updates_and_greedy_actions_match_the_golden_recording():
    """tests/golden/aql_discrete.json holds what the script computed before its redesign (its "source"), on the same
    inputs: the greedy actions of four states (bin indices) and the metrics of three update calls of ten gradient
    steps each, the last measuring the amortisation gap. Float32 rounding differs between CPU kinds and with this
    suite's XLA flags (bit for bit without them), and training amplifies it, hence a tolerance that widens with
    each call."""
    golden = json.load(open(os.path.join(ROOT, "tests", "golden", "aql_discrete.json")))
    rs = np.random.RandomState(0)
    obs = rs.randn(4, 24).astype(np.float32)
    model = aql.AQLNetwork(6, 11, 128)
    key, k_init = jax.random.split(jax.random.PRNGKey(3))
    params = jax.jit(model.init)(k_init, obs[:1], jnp.zeros((1, 1, 6), jnp.int32))
    actions, _, _, greedy = aql.act(model, params, obs, key, jnp.zeros(2), 0.0, 100, 400)
    np.testing.assert_array_equal(actions, golden["greedy_actions"])  # drawn from the candidates: exact
    np.testing.assert_array_equal(greedy, golden["greedy_counts"])
    n = 300
    data = dict(
        obs=rs.randn(n, 24).astype(np.float32),
        action=rs.randint(0, 11, (n, 6)).astype(np.int32),
        reward=rs.rand(n).astype(np.float32),
        next_obs=rs.randn(n, 24).astype(np.float32),
        terminated=(rs.rand(n) < 0.1).astype(np.float32),
    )
    state = aql.AQLState.create(apply_fn=None, params=params, target_params=params, tx=aql.adam(5e-4))
    state = jax.tree.map(jnp.asarray, state)
    buffer = aql.buffer_init({k: v[0] for k, v in data.items()}, 1000)
    cfg = aql.UpdateConfig(10, 0, 0.99, 64, 16, 48, 0.1, True, 0.6, 0.2, 1e-6)
    for i, expected in enumerate(golden["update_metrics"]):
        chunk = {k: v[i * 100 : (i + 1) * 100] for k, v in data.items()}
        measured = cfg._replace(amortisation_states=32 if i == 2 else 0)
        state, buffer, metrics = aql.update(model, state, buffer, chunk, jax.random.PRNGKey(10 + i), measured)
        assert set(metrics) == set(expected)
        for name, value in expected.items():  # rounding's drift grows with every step
            assert float(metrics[name]) == pytest.approx(value, rel=5e-3 * 4**i, abs=1e-6), (i, name)


def test_a_run_stopped_in_the_middle_of_an_episode_resumes_as_if_it_never_stopped(tmp_path, monkeypatch):
    resumes_as_if_it_never_stopped(aql, tmp_path, monkeypatch, **FAST)
