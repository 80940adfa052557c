"""aql_discrete.py: its parts against independent computations, then whole runs judged by what they write."""

import csv
import functools
import glob
import itertools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aql_discrete as aql
from conftest import q_reference, run_script

OBS_DIM, DIM, BINS = 5, 2, 3
ALL_ACTIONS = np.array(list(itertools.product(range(BINS), repeat=DIM)), np.int32)  # the whole 9-action space
TX = optax.adam(1e-2)  # one optimiser object, so every test below reuses one compiled update
# N + M = 208 candidates cover all 9 actions (each missed with probability (8/9) ** 200 < 1e-10 per state).
UPDATE = dict(gamma=0.9, batch_size=16, n_proposal=8, m_uniform=200, entropy_coef=0.1, prioritized=True,
              alpha=0.6, beta=0.2, priority_epsilon=1e-6, amortisation_states=16)


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
    q_values = jax.jit(lambda p, o, a: model.apply(p, model.apply(p, o, method=aql.AQLNetwork.observation_stream),
                                                   a, method=aql.AQLNetwork.q_values))
    ours = q_values(params, obs, jnp.asarray(ALL_ACTIONS))
    np.testing.assert_allclose(ours, q_reference(params, obs, bins_of(ALL_ACTIONS)), rtol=1e-4, atol=1e-5)


# --- the autoregressive proposal ----------------------------------------------------------------------------

def hand_made_proposal(dim=3, bins=3, hidden=16, embed=4, scale=2.0):
    """A proposal with large random weights set by hand, so later sub-actions depend strongly on earlier ones."""
    rng = np.random.default_rng(0)

    def normal(*shape):  # scaled by the fan-in, so every layer's outputs are of order `scale`
        return (scale * rng.normal(size=shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(np.float32)

    p = {"state_in": {"kernel": normal(embed, hidden), "bias": normal(hidden)},
         "chosen_in": normal(dim, bins, hidden), "dim_in": normal(dim, hidden),
         "out_kernel": normal(dim, hidden, bins), "out_bias": normal(dim, bins)}
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
    forced, _ = proposal.apply(params, jnp.asarray(embedding), jnp.asarray(actions)[None],
                               method=aql.AutoregressiveProposal.log_prob)
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
    forced, _ = proposal.apply(params, jnp.asarray(embedding), samples[:, :500],
                               method=aql.AutoregressiveProposal.log_prob)
    np.testing.assert_allclose(sampled_log_prob[:, :500], forced, rtol=1e-5, atol=1e-5)


def test_the_first_proposal_is_uniform_and_does_not_train_the_observation_stream(model_and_params):
    model, params, _ = model_and_params
    obs = jnp.ones((3, OBS_DIM))
    _, (log_prob, entropy) = jax.jit(model.apply)(params, obs, jnp.asarray(ALL_ACTIONS)[None].repeat(3, 0))
    np.testing.assert_allclose(log_prob[1], np.full(9, -np.log(9)), rtol=1e-6)
    np.testing.assert_allclose(entropy, DIM * np.log(BINS), rtol=1e-6)

    def proposal_loss(p):
        e = model.apply(p, obs, method=aql.AQLNetwork.observation_stream)
        return model.apply(p, e, jnp.asarray(ALL_ACTIONS[None, :2]).repeat(3, 0),
                           method=aql.AQLNetwork.proposal_log_prob)[0].sum()

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
    chunk = dict(obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
                 action=rng.integers(0, BINS, (4, DIM)).astype(np.int32),
                 reward=np.array([1.0, -0.5, 0.25, 2.0], np.float32),
                 next_obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
                 terminated=np.full(4, terminated, np.float32))
    return state, aql.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8), chunk


@pytest.mark.parametrize("terminated", [0.0, 1.0])
def test_td_errors_written_back_as_priorities_match_a_hand_computation(model_and_params, terminated):
    model, params, target_params = model_and_params
    state, buffer, chunk = update_inputs(params, target_params, terminated)
    _, buffer, metrics = aql.update(model, state, buffer, chunk, jax.random.PRNGKey(0), **UPDATE)
    # By hand: r + gamma (1 - terminated) max_a Q_target(s', a) over all 9 actions, minus Q_online(s, a).
    next_max = np.array([q_reference(target_params, o, bins_of(ALL_ACTIONS)).max() for o in chunk["next_obs"]])
    now = np.array([q_reference(params, o, bins_of(a)[None])[0] for o, a in zip(chunk["obs"], chunk["action"])])
    td_error = chunk["reward"] + 0.9 * (1.0 - terminated) * next_max - now
    np.testing.assert_allclose(buffer.tree[8:12], (np.abs(td_error) + 1e-6) ** 0.6, rtol=1e-4)
    assert int(buffer.size) == 4 and np.isfinite(float(metrics["losses/proposal_nll"]))
    # Both search sets cover the whole space here, so the proposal cannot beat uniform search.
    assert float(metrics["charts/amortisation_gap"]) == 0.0
    assert float(metrics["charts/amortisation_win_fraction"]) == 0.0
    assert 0.0 <= float(metrics["charts/argmax_from_proposal"]) <= 1.0


def test_one_mle_step_raises_the_log_probability_of_the_target_argmax(model_and_params):
    model, params, target_params = model_and_params
    state, buffer, chunk = update_inputs(params, target_params, 0.0)
    target = np.stack([ALL_ACTIONS[q_reference(target_params, o, bins_of(ALL_ACTIONS)).argmax()]
                       for o in chunk["next_obs"]])  # the arg-max the update's search finds (brute force)

    @jax.jit
    def log_prob(p):
        e = model.apply(p, jnp.asarray(chunk["next_obs"]), method=aql.AQLNetwork.observation_stream)
        return model.apply(p, e, jnp.asarray(target)[:, None], method=aql.AQLNetwork.proposal_log_prob)[0][:, 0]

    before = log_prob(state.params)
    state, _, _ = aql.update(model, state, buffer, chunk, jax.random.PRNGKey(1), **UPDATE)
    assert float(log_prob(state.params).mean()) > float(before.mean()) + 0.01


def test_uniformql_leaves_the_proposal_untouched(model_and_params):
    model, params, target_params = model_and_params
    state, buffer, chunk = update_inputs(params, target_params, 0.0)
    new_state, _, metrics = aql.update(model, state, buffer, chunk, jax.random.PRNGKey(2),
                                       **dict(UPDATE, n_proposal=0, amortisation_states=0))
    for before, after in zip(jax.tree.leaves(params["params"]["proposal"]),
                             jax.tree.leaves(new_state.params["params"]["proposal"])):
        np.testing.assert_array_equal(before, after)
    assert "losses/proposal_nll" not in metrics and float(metrics["charts/argmax_from_proposal"]) == 0.0
    assert not np.allclose(params["params"]["q_head"]["kernel"], new_state.params["params"]["q_head"]["kernel"])


def test_select_action_is_the_search_argmax_or_random(model_and_params):
    model, params, _ = model_and_params
    obs = np.ones(OBS_DIM, np.float32)
    action, best = aql.select_action(model, params, obs, jax.random.PRNGKey(0), 0.0, 8, 200)
    assert int(best) >= 0
    np.testing.assert_array_equal(action, ALL_ACTIONS[q_reference(params, obs, bins_of(ALL_ACTIONS)).argmax()])
    keys = jax.random.split(jax.random.PRNGKey(1), 20)
    randoms = [aql.select_action(model, params, obs, k, 1.0, 8, 200) for k in keys]
    assert all(int(b) == -1 for _, b in randoms) and len({tuple(np.asarray(a)) for a, _ in randoms}) > 3


# --- argument checking: one clear line, exit status 1, no traceback ----------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(num_bins=1), "--num-bins must be >= 2, got 1"),
    (dict(n_proposal=-1), "--n-proposal must be >= 0, got -1"),
    (dict(m_uniform=0, n_proposal=0), "--n-proposal + --m-uniform must be >= 1"),
    (dict(entropy_coef=-0.1), "--entropy-coef must be >= 0.0, got -0.1"),
])
def test_bad_arguments_are_rejected_with_one_line(overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        aql.check_args(aql.Args(**overrides))
    text = exit_info.value.code  # a string code: Python prints it and exits with status 1
    assert isinstance(text, str) and text.startswith("error: ") and message in text and "\n" not in text
    aql.check_args(aql.Args(m_uniform=0))  # pure proposal search is allowed


def test_unknown_env_and_empty_search_exit_cleanly_from_the_command_line(tmp_path):
    for flags, expected in [(["--env-id", "walker-wlak"], "error: unknown --env-id 'walker-wlak'"),
                            (["--n-proposal", "0", "--m-uniform", "0"], "error: --n-proposal + --m-uniform")]:
        result = run_script("aql_discrete.py", *flags, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0]
        if "--env-id" in flags:
            assert "humanoid-walk" in errors[0]  # the valid DeepMind Control ids are listed


# --- whole runs ----------------------------------------------------------------------------------------------

def cached_env(tmp_path):
    """Runs share compiled functions through JAX's persistent cache, and XLA skips LLVM's optimisations: at
    these tiny sizes compilation is most of a run's time. The code that runs is the same."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS="--xla_backend_optimization_level=0")


def read_metrics(run_dir):
    return list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))


def test_smoke_run_on_cartpole_swingup_writes_metrics_and_a_model_that_loads(tmp_path):
    search = ["--n-proposal", "8", "--m-uniform", "16"]
    flags = ["--env-id", "cartpole-swingup", "--total-timesteps", "1500", "--learning-starts", "500", *search,
             "--eval-frequency", "0", "--batch-size", "32", "--buffer-size", "2000", "--log-frequency", "250"]
    result = run_script("aql_discrete.py", "--save-model", *flags, cwd=tmp_path, env=cached_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "cartpole-swingup__aql_discrete__1__*"))
    rows = read_metrics(run_dir)
    for column in ("charts/amortisation_gap", "charts/amortisation_win_fraction", "charts/argmax_from_proposal",
                   "losses/td_loss", "losses/proposal_nll", "losses/entropy", "losses/q_values", "charts/SPS",
                   "charts/episodic_return", "charts/episodic_length", "eval/episodic_return"):
        assert column in rows[0]
    episodes = [r for r in rows if r["charts/episodic_return"]]
    assert len(episodes) == 1 and episodes[0]["charts/episodic_length"] == "1000.0"  # one 1000-step DMC episode
    updates = [r for r in rows if r["losses/td_loss"]]
    assert len(updates) == 5  # logged at steps 500 (the first update), 750, 1000, 1250, 1500
    for r in updates:
        assert np.isfinite(float(r["charts/amortisation_gap"])) and np.isfinite(float(r["losses/proposal_nll"]))
        assert 0.0 <= float(r["charts/argmax_from_proposal"]) <= 1.0
        assert 0.0 <= float(r["losses/entropy"]) <= np.log(11) + 1e-4  # one sub-action of 11 bins

    model_path = os.path.join(run_dir, "aql_discrete.flax")
    model = aql.AQLNetwork(1, 11)
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 1, 1), jnp.int32))
    loaded = flax.serialization.from_bytes(template, open(model_path, "rb").read())
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)))
    evaluation = run_script("aql_discrete.py", "--env-id", "cartpole-swingup", *search, "--load-model", model_path,
                            cwd=tmp_path, env=cached_env(tmp_path))
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "greedy return over 1 episode(s)" in evaluation.stdout


def test_cartpole_runs_as_one_sub_action_and_seeds_reproduce(tmp_path):
    flags = ["--env-id", "CartPole-v1", "--total-timesteps", "400", "--learning-starts", "100", "--n-proposal", "2",
             "--m-uniform", "4", "--batch-size", "32", "--buffer-size", "1000", "--eval-frequency", "400",
             "--log-frequency", "100"]
    for run in ("a", "b"):  # the second run takes its compiled functions from the first one's cache
        os.makedirs(tmp_path / run)
        result = run_script("aql_discrete.py", *flags, cwd=tmp_path / run, env=cached_env(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "1 sub-actions x 2 bins" in result.stdout
    rows = [read_metrics(glob.glob(str(tmp_path / run / "runs" / "*"))[0]) for run in ("a", "b")]
    assert len([r for r in rows[0] if r["charts/episodic_return"]]) >= 5  # CartPole episodes are short early on
    assert len([r for r in rows[0] if r["eval/episodic_return"]]) == 1
    for column in ("charts/episodic_return", "losses/td_loss", "charts/amortisation_gap", "eval/episodic_return"):
        values = [[r[column] for r in rs if r[column]] for rs in rows]
        assert values[0] and values[0] == values[1]
