"""qtopt_cem.py: CEM and the clipped double-Q target against independent computations, then whole runs."""

import csv
import functools
import glob
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qmle_dmc
import qtopt_cem as q
from conftest import q_reference, run_script

OBS_DIM, ACTION_DIM = 5, 2


MODEL = q.QNetwork(ACTION_DIM)  # one instance and one optimiser: a new one would be a new static arg to jit
TX = optax.adam(1e-3)
_init = jax.jit(MODEL.init)


@functools.lru_cache
def init_params(seed):
    return MODEL, _init(jax.random.PRNGKey(seed), jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, ACTION_DIM)))


QMLE = qmle_dmc.QMLENetwork(ACTION_DIM, num_bins=3)


@jax.jit
def q_four_ways(params, qmle_params, obs, actions):
    """This Q, qmle_dmc.py's Q on the same layers' parameters, the written-out Q, and the chunked evaluation."""
    shared = {"params": {k: v for k, v in qmle_params["params"].items() if k in params["params"]}}
    embedding = MODEL.apply(params, obs, method=q.QNetwork.observation_stream)
    chunked = q.q_over_candidates(MODEL, params, embedding, actions, states_per_chunk=2)  # 2 does not divide 3
    return (MODEL.apply(params, obs, actions), MODEL.apply(shared, obs, actions),
            QMLE.apply(qmle_params, obs, actions)[0], jax.vmap(q_reference, (None, 0, 0))(params, obs, actions), chunked)


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
CENTRES = jnp.concatenate([jax.random.uniform(jax.random.PRNGKey(1), (STATES - 2, ACTION_DIM), minval=-0.5, maxval=0.5),
                           jnp.array([[1.5, -2.0], [0.3, 1.2]])])  # the last two peak outside the box
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


def test_select_action_is_cem_s_argmax_or_random():
    model, params = init_params(0)
    obs = np.ones(OBS_DIM, np.float32)
    cem = q.CEM(32, 4, 3, 0.01)
    action, std = q.select_action(model, params, obs, jax.random.PRNGKey(0), 0.0, cem)
    k_cem = jax.random.split(jax.random.PRNGKey(0), 3)[0]  # select_action's own split
    direct = lambda a: q_reference(params, obs, a[0])[None]  # noqa: E731
    cem_maximise = jax.jit(q.cem_maximise, static_argnums=(0, 2, 3, 4))
    expected, _, expected_std, _ = cem_maximise(direct, k_cem, 1, ACTION_DIM, cem)
    np.testing.assert_allclose(action, expected[0], atol=1e-6)
    assert float(std) == pytest.approx(float(expected_std.mean()), rel=1e-5)
    randoms = [q.select_action(model, params, obs, k, 1.0, cem) for k in jax.random.split(jax.random.PRNGKey(1), 5)]
    assert all(float(s) == -1.0 for _, s in randoms) and len({float(a[0]) for a, _ in randoms}) == 5


# --- the clipped double-Q target ---------------------------------------------------------------------------------

TD_CEM = q.CEM(16, 4, 2, 0.01)


@functools.partial(jax.jit, static_argnums=(5,))
def hand_td_errors(online, target1, target2, batch, key, cem, gamma):
    """r + gamma (1 - d) min(Q1, Q2)(s', a*) - Q(s, a), with a* CEM's arg-max of Q1 evaluated by q_reference."""
    per_state = jax.vmap(q_reference, (None, 0, 0))
    argmax = q.cem_maximise(lambda a: per_state(target1, batch["next_obs"], a), key, batch["obs"].shape[0],
                            ACTION_DIM, cem)[0]
    q1, q2 = (per_state(p, batch["next_obs"], argmax[:, None])[:, 0] for p in (target1, target2))
    now = per_state(online, batch["obs"], batch["action"][:, None])[:, 0]
    not_done = 1.0 - batch["terminated"]
    return {name: batch["reward"] + gamma * not_done * v - now
            for name, v in dict(clipped=jnp.minimum(q1, q2), q1=q1, q2=q2).items()}


@pytest.mark.parametrize("terminated", [0.0, 1.0])
@pytest.mark.parametrize("prioritized", [True, False])
def test_clipped_double_q_target_matches_a_hand_computation(terminated, prioritized):
    model, online = init_params(0)
    target1, target2 = init_params(1)[1], init_params(3)[1]  # three different networks
    state = q.QTOptState.create(apply_fn=model.apply, params=online, target_params=target1, lagged_params=target2,
                                tx=TX)
    rng = np.random.default_rng(0)
    chunk = dict(obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
                 action=rng.uniform(-1, 1, (8, ACTION_DIM)).astype(np.float32),
                 reward=np.array([1.0, -0.5, 0.25, 2.0, 0.0, -1.0, 0.5, 3.0], np.float32),
                 next_obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
                 terminated=np.full(8, terminated, np.float32))
    empty = lambda: q.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8)  # noqa: E731
    gamma, alpha, eps, key = 0.9, 0.6, 1e-6, jax.random.PRNGKey(3)
    batch_size = 8 if prioritized else 32  # uniform draws repeat transitions; 32 rows cover all 8 of them
    _, buffer, metrics = q.update(model, state, empty(), chunk, key, gamma=gamma, batch_size=batch_size, cem=TD_CEM,
                                  prioritized=prioritized, alpha=alpha, beta=0.2, priority_epsilon=eps)

    # The same rows, in the same order, as update's own sample (its key split: sample, then target).
    k_sample, k_target = jax.random.split(key)
    index, batch, _ = q.buffer_sample(q.buffer_add(empty(), chunk), k_sample, batch_size, prioritized, 0.2)
    if prioritized:  # equal priorities and 8 strata over 8 transitions: each one exactly once
        np.testing.assert_array_equal(index, np.arange(8))
    td = hand_td_errors(online, target1, target2, batch, k_target, TD_CEM, gamma)
    # all weights are 1: uniform replay, or equal priorities
    assert float(metrics["losses/td_loss"]) == pytest.approx(float(jnp.mean(td["clipped"] ** 2)), rel=1e-4)
    if prioritized:
        np.testing.assert_allclose(buffer.tree[8:], (np.abs(td["clipped"]) + eps) ** alpha, rtol=1e-4)
    else:
        np.testing.assert_array_equal(buffer.tree[8:], 1.0)  # uniform replay leaves the priorities alone
    assert int(buffer.size) == 8
    if not terminated:  # the check can tell the clipped target from either network's own
        for other in ("q1", "q2"):
            assert not np.allclose(td["clipped"], td[other], rtol=1e-3), other
        assert float(metrics["losses/clip_gap"]) > 0


# --- argument checking: one clear line, non-zero exit, no traceback ------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(cem_samples=0), "--cem-samples must be >= 1, got 0"),
    (dict(cem_elites=0), "--cem-elites must be >= 1, got 0"),
    (dict(cem_iterations=-1), "--cem-iterations must be >= 1, got -1"),
    (dict(cem_elites=65), "--cem-elites must be <= --cem-samples (64), got 65"),
    (dict(cem_min_std=-0.1), "--cem-min-std must be >= 0.0, got -0.1"),
    (dict(total_timesteps=-1), "--total-timesteps must be >= 1, got -1"),
    (dict(learning_starts=-5), "--learning-starts must be >= 0, got -5"),
    (dict(epsilon=1.5), "--epsilon must be in [0, 1], got 1.5"),
    (dict(load_model="/no/such/model.flax"), "--load-model: no such file: /no/such/model.flax"),
])
def test_bad_arguments_are_rejected_with_one_line(overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        q.check_args(q.Args(**overrides))
    text = str(exit_info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_unknown_env_and_bad_cem_budget_exit_cleanly_from_the_command_line(tmp_path):
    for flags, expected in [(["--env-id", "walker-wlak"], "error: unknown --env-id 'walker-wlak'"),
                            (["--cem-samples", "4"], "error: --cem-elites must be <= --cem-samples (4), got 6")]:
        result = run_script("qtopt_cem.py", *flags, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0]
        assert ("dog-walk" in errors[0]) == ("--env-id" in flags)  # the valid ids are listed


# --- a whole run -------------------------------------------------------------------------------------------------

SMOKE = dict(total_timesteps=1100, learning_starts=200, buffer_size=2000, batch_size=32, cem_samples=16, cem_elites=4,
             eval_frequency=600, log_frequency=100, target_network_frequency=100)


def test_smoke_run_writes_metrics_and_a_model_that_loads(tmp_path):
    flags = ["--env-id", "cartpole-swingup"]
    for name, value in SMOKE.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    result = run_script("qtopt_cem.py", "--save-model", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "cartpole-swingup__qtopt_cem__1__*"))
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))
    episodes = [r for r in rows if r["charts/episodic_return"]]
    assert len(episodes) == 1 and episodes[0]["charts/episodic_length"] == "1000.0"  # one 1000-step DMC episode
    assert 0.0 <= float(episodes[0]["charts/episodic_return"]) <= 1000.0
    updates = [r for r in rows if r["losses/td_loss"]]
    assert len(updates) == 10  # logged at steps 200, 300, ..., 1100; the first update ran at step 200
    for r in updates:
        assert np.isfinite(float(r["losses/td_loss"])) and np.isfinite(float(r["losses/q_values"]))
        assert float(r["losses/clip_gap"]) >= 0.0 and float(r["cem/target_gain"]) >= 0.0
        assert 0.01 <= float(r["cem/target_final_std"]) <= 1.0  # at or above the floor
    assert any(float(r["losses/clip_gap"]) > 0 for r in updates)  # the two targets came apart
    greedy = [float(r["cem/greedy_final_std"]) for r in rows if r["cem/greedy_final_std"]]
    assert len(greedy) == 11 and min(greedy) >= 0.01
    assert len([r for r in rows if r["eval/episodic_return"]]) == 2  # at step 600 and at the end
    assert "step     1100" in result.stdout and "16 samples, 4 elites, 2 iterations" in result.stdout

    model_path = os.path.join(run_dir, "qtopt_cem.flax")
    model = q.QNetwork(1)
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 1, 1)))
    loaded = flax.serialization.from_bytes(template, open(model_path, "rb").read())
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)))
    evaluation = run_script("qtopt_cem.py", "--env-id", "cartpole-swingup", "--load-model", model_path, cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "greedy return over 1 episode(s)" in evaluation.stdout
