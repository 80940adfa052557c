"""qtopt_cem.py: CEM and the clipped double-Q target against independent computations, then whole runs."""

import csv
import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qmle_dmc
import qtopt_cem as q
from conftest import counting_compiles, interrupt, q_reference, run_in_process, run_script, saved

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
    obs = jax.random.normal(jax.random.PRNGKey(5), (3, OBS_DIM))  # a batch of states, one search each
    cem = q.CEM(32, 4, 3, 0.01)
    actions, std = q.select_action(model, params, obs, jax.random.PRNGKey(0), 0.0, cem)
    k_cem = jax.random.split(jax.random.PRNGKey(0), 3)[0]  # select_action's own split
    direct = lambda a: jax.vmap(q_reference, (None, 0, 0))(params, obs, a)  # noqa: E731
    cem_maximise = jax.jit(q.cem_maximise, static_argnums=(0, 2, 3, 4))
    expected, _, expected_std, _ = cem_maximise(direct, k_cem, 3, ACTION_DIM, cem)
    assert actions.shape == (3, ACTION_DIM) and std.shape == (3,)
    np.testing.assert_allclose(actions, expected, atol=1e-6)
    np.testing.assert_allclose(std, expected_std.mean(-1), rtol=1e-5)
    assert len({float(a) for a in actions[:, 0]}) == 3  # three states, three searches
    randoms = [q.select_action(model, params, obs[:1], k, 1.0, cem) for k in jax.random.split(jax.random.PRNGKey(1), 5)]
    assert all(float(s[0]) == -1.0 for _, s in randoms) and len({float(a[0, 0]) for a, _ in randoms}) == 5


def test_act_sums_cem_s_final_std_over_greedy_actions_only():
    model, params = init_params(0)
    obs = jax.random.normal(jax.random.PRNGKey(6), (8, OBS_DIM))
    cem, key = q.CEM(16, 4, 2, 0.01), jax.random.PRNGKey(2)
    actions, next_key, k_update, greedy = q.act(model, params, obs, key, jnp.array([0.25, 3.0]), 0.5, cem)
    loop_key, k_act, update_key = jax.random.split(key, 3)  # the old loop's split
    expected_actions, std = q.select_action(model, params, obs, k_act, 0.5, cem)
    std = np.asarray(std)
    was_greedy = std >= 0
    assert 0 < was_greedy.sum() < 8  # both kinds of step in this batch
    np.testing.assert_array_equal(actions, expected_actions)
    np.testing.assert_array_equal(next_key, loop_key)
    np.testing.assert_array_equal(k_update, update_key)
    assert np.all(std[was_greedy] >= 0.01)  # at or above the floor: a random step's -1 is not among them
    np.testing.assert_allclose(greedy, [0.25 + std[was_greedy].sum(), 3.0 + was_greedy.sum()], rtol=1e-6)


# --- the clipped double-Q target ---------------------------------------------------------------------------------

TD_CEM = q.CEM(16, 4, 2, 0.01)


@functools.partial(jax.jit, static_argnums=(5,))
def hand_td_errors(online, target1, target2, batch, key, cem, gamma):
    """r + gamma (1 - d) min(Q1, Q2)(s', a*) - Q(s, a), with a* CEM's arg-max of Q1 evaluated by q_reference;
    also Q1 and Q2 at a*."""
    per_state = jax.vmap(q_reference, (None, 0, 0))
    argmax = q.cem_maximise(lambda a: per_state(target1, batch["next_obs"], a), key, batch["obs"].shape[0],
                            ACTION_DIM, cem)[0]
    q1, q2 = (per_state(p, batch["next_obs"], argmax[:, None])[:, 0] for p in (target1, target2))
    now = per_state(online, batch["obs"], batch["action"][:, None])[:, 0]
    not_done = 1.0 - batch["terminated"]
    return {name: batch["reward"] + gamma * not_done * v - now
            for name, v in dict(clipped=jnp.minimum(q1, q2), q1=q1, q2=q2).items()}, q1, q2


def td_inputs(terminated):
    """Online, target and lagged parameters of three different networks, and eight transitions."""
    model, online = init_params(0)
    target1, target2 = init_params(1)[1], init_params(3)[1]
    state = q.QTOptState.create(apply_fn=model.apply, params=online, target_params=target1, lagged_params=target2,
                                tx=TX)
    rng = np.random.default_rng(0)
    chunk = dict(obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
                 action=rng.uniform(-1, 1, (8, ACTION_DIM)).astype(np.float32),
                 reward=np.array([1.0, -0.5, 0.25, 2.0, 0.0, -1.0, 0.5, 3.0], np.float32),
                 next_obs=rng.normal(size=(8, OBS_DIM)).astype(np.float32),
                 terminated=np.full(8, terminated, np.float32))
    return model, state, chunk, q.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8)


UPDATE = dict(gamma=0.9, cem=TD_CEM, alpha=0.6, beta=0.2, priority_epsilon=1e-6)


@pytest.mark.parametrize("terminated", [0.0, 1.0])
@pytest.mark.parametrize("prioritized", [True, False])
def test_clipped_double_q_target_matches_a_hand_computation(terminated, prioritized):
    model, state, chunk, empty = td_inputs(terminated)  # online, target and lagged: three different networks
    gamma, alpha, eps, key = 0.9, 0.6, 1e-6, jax.random.PRNGKey(3)
    batch_size = 8 if prioritized else 32  # uniform draws repeat transitions; 32 rows cover all 8 of them
    # The same rows, in the same order, as update's own sample (its key split: sample, then target).
    k_sample, k_target = jax.random.split(key)
    index, batch, _ = q.buffer_sample(q.buffer_add(empty, chunk), k_sample, batch_size, prioritized, 0.2)
    _, buffer, metrics = q.update(model, state, empty, chunk, key, batch_size=batch_size, prioritized=prioritized,
                                  **UPDATE)

    if prioritized:  # equal priorities and 8 strata over 8 transitions: each one exactly once
        np.testing.assert_array_equal(index, np.arange(8))
    td, q1, q2 = hand_td_errors(state.params, state.target_params, state.lagged_params, batch, k_target, TD_CEM, gamma)
    # all weights are 1: uniform replay, or equal priorities
    assert float(metrics["losses/td_loss"]) == pytest.approx(float(jnp.mean(td["clipped"] ** 2)), rel=1e-4)
    if prioritized:
        np.testing.assert_allclose(buffer.tree[8:], (np.abs(td["clipped"]) + eps) ** alpha, rtol=1e-4)
    else:
        np.testing.assert_array_equal(buffer.tree[8:], 1.0)  # uniform replay leaves the priorities alone
    assert int(buffer.size) == 8
    # The clip gap is how far the clipping pulled the target below Q1: Q1 - min(Q1, Q2), zero where Q2 >= Q1.
    assert np.any(q1 > q2) and np.any(q1 < q2)  # both cases occur, so neither |Q1 - Q2| nor Q1 - Q2 passes
    assert float(metrics["losses/clip_gap"]) == pytest.approx(float(np.mean(np.maximum(q1 - q2, 0.0))), rel=1e-4)
    if not terminated:  # the check can tell the clipped target from either network's own
        for other in ("q1", "q2"):
            assert not np.allclose(td["clipped"], td[other], rtol=1e-3), other


def test_importance_weights_scale_the_td_loss():
    model, state, chunk, buffer = td_inputs(0.0)
    priorities = np.array([0.05, 0.5, 2.0, 8.0, 0.2, 1.0, 4.0, 0.1], np.float32)  # unequal, so the weights are too
    buffer = q.buffer_update(q.buffer_add(buffer, chunk), jnp.arange(8), jnp.asarray(priorities), alpha=0.6)
    key = jax.random.PRNGKey(3)
    k_sample, k_target = jax.random.split(key)  # the update's own split
    index, batch, _ = q.buffer_sample(buffer, k_sample, 16, True, 0.2)  # the update's draws
    _, _, metrics = q.update(model, state, buffer, jax.tree.map(lambda x: x[:0], chunk), key, batch_size=16,
                             prioritized=True, **UPDATE)
    probability = priorities**0.6 / np.sum(priorities**0.6)
    weights = (8 * probability[np.asarray(index)]) ** -0.2
    weights /= weights.max()
    td = np.asarray(hand_td_errors(state.params, state.target_params, state.lagged_params, batch, k_target, TD_CEM,
                                   UPDATE["gamma"])[0]["clipped"])
    assert len(set(np.round(weights, 6))) > 1
    assert np.mean(td**2) > 1.05 * np.mean(weights * td**2)  # the unweighted loss would fail the check below
    np.testing.assert_allclose(metrics["losses/td_loss"], np.mean(weights * td**2), rtol=1e-4)


def test_several_updates_in_one_call_equal_the_same_updates_one_by_one():
    model, state, chunk, buffer = td_inputs(0.0)
    settings = dict(batch_size=8, prioritized=True, **UPDATE)
    together = q.update(model, state, jax.tree.map(jnp.copy, buffer), chunk, jax.random.PRNGKey(5), updates=3,
                        **settings)
    no_new = jax.tree.map(lambda x: x[:0], chunk)
    for i, key in enumerate(jax.random.split(jax.random.PRNGKey(5), 3)):
        state, buffer, metrics = q.update(model, state, buffer, chunk if i == 0 else no_new, key, **settings)
    assert int(together[0].step) == int(state.step) == 3
    for a, b in zip(jax.tree.leaves((together[0].params, together[1])), jax.tree.leaves((state.params, buffer))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together[2]["losses/td_loss"], metrics["losses/td_loss"], rtol=1e-5)  # the last's


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
    (dict(num_envs=0), "--num-envs must be >= 1, got 0"),
    (dict(checkpoint_frequency=-1), "--checkpoint-frequency must be >= 0, got -1"),
    (dict(learning_rate=float("nan")), "--learning-rate must be a finite number, got nan"),
    (dict(cem_min_std=float("inf")), "--cem-min-std must be a finite number, got inf"),
    (dict(learning_rate=0.0), "--learning-rate must be > 0, got 0.0"),
    (dict(learning_rate=-1e-3), "--learning-rate must be > 0, got -0.001"),
    (dict(priority_epsilon=0.0), "--priority-epsilon must be > 0 with prioritised replay, got 0.0"),
    (dict(buffer_size=15, num_envs=4), "--buffer-size must hold the 20 transitions written per update"),
    (dict(load_model="/no/such/model.npz"), "--load-model: no such file: /no/such/model.npz"),
])
def test_bad_arguments_are_rejected_with_one_line(overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        q.check_args(q.Args(**overrides))
    text = str(exit_info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_unknown_env_and_bad_cem_budget_exit_cleanly_from_the_command_line(tmp_path):
    for flags, expected in [(["--env-id", "walker-wlak"], "error: unknown --env-id 'walker-wlak'"),
                            (["--env-id", "CartPole-v1"], "has Discrete(2) actions; qtopt_cem.py needs a one-dim"),
                            (["--cem-samples", "4"], "error: --cem-elites must be <= --cem-samples (4), got 6")]:
        result = run_script("qtopt_cem.py", *flags, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0]
        assert ("dog-walk" in errors[0]) == ("walker-wlak" in flags)  # the valid ids are listed


# --- whole runs ----------------------------------------------------------------------------------------------

SMOKE = dict(total_timesteps=1100, learning_starts=200, buffer_size=2000, batch_size=32, cem_samples=16, cem_elites=4,
             eval_frequency=600, log_frequency=100, target_network_frequency=100)


def smoke_flags(env_id, **overrides):
    flags = ["--env-id", env_id]
    for name, value in dict(SMOKE, **overrides).items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def read_metrics(run_dir):
    return list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))


def test_smoke_run_writes_metrics_and_a_model_that_loads(tmp_path):
    result = run_script("qtopt_cem.py", "--save-model", *smoke_flags("cartpole-swingup"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "cartpole-swingup__qtopt_cem__1__*"))
    rows = read_metrics(run_dir)
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
    assert len(greedy) == 11 and min(greedy) >= 0.01 and max(greedy) <= 1.0  # random steps' -1 never in the mean
    evaluations = [float(r["eval/episodic_return"]) for r in rows if r["eval/episodic_return"]]
    assert len(evaluations) == 2  # at step 600 and at the end
    assert "step     1100" in result.stdout and "16 samples, 4 elites, 2 iterations" in result.stdout
    assert "compiling the update" in result.stdout

    model_path = os.path.join(run_dir, "qtopt_cem.npz")
    meta, arrays = q.load_arrays(model_path, "--load-model")
    assert meta["script"] == "qtopt_cem.py" and meta["args"]["env_id"] == "cartpole-swingup"
    template = jax.jit(q.QNetwork(1).init)(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 1, 1)))
    loaded = q.restore(template, arrays, "--load-model")
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)))
    evaluation = run_script("qtopt_cem.py", "--load-model", model_path, cwd=tmp_path)  # its task and settings
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    # The run's own evaluation seeds and CEM: the saved model scores what the run logged at its end.
    assert f"greedy evaluation return {evaluations[-1]:.1f} over 1 episode(s)" in evaluation.stdout
    wrong = run_script("qtopt_cem.py", "--env-id", "cartpole-balance", "--load-model", model_path, cwd=tmp_path)
    assert wrong.returncode == 1 and wrong.stderr.strip() == (
        "error: --load-model: --env-id 'cartpole-balance' differs from the saved run's 'cartpole-swingup'")
    elsewhere = str(tmp_path / "elsewhere.npz")  # a checkpoint is no model: its arrays are the whole run's
    q.save_arrays(elsewhere, dict(x=np.zeros(3)), dict(args=meta["args"]))
    wrong = run_script("qtopt_cem.py", "--load-model", elsewhere, cwd=tmp_path)
    assert wrong.returncode == 1 and wrong.stderr.strip().startswith("error: --load-model: the file holds 1 arrays")


FAST = dict(env_id="Pendulum-v1", learning_starts=100, buffer_size=2000, batch_size=16, cem_samples=8, cem_elites=2,
            eval_frequency=0, log_frequency=50)


def train_in_process(directory, monkeypatch, **overrides):
    return run_in_process(q, directory, monkeypatch, **dict(FAST, **overrides))


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_targets_rotate_at_each_copy_and_resume_continues_the_run(tmp_path, monkeypatch):
    # Copies every 100 steps; the run stops at each copy and resumes from its checkpoint, so the parameters of
    # every copy point are on disk: at a copy the lagged target takes the target's and the target the online's.
    run_dir, (meta, first) = train_in_process(tmp_path, monkeypatch, total_timesteps=100,
                                              target_network_frequency=100, checkpoint_frequency=100, exp_name="copies")
    checkpoints = [first]
    for total in (200, 300):
        _, (meta, arrays) = train_in_process(tmp_path, monkeypatch, total_timesteps=total, resume=run_dir)
        assert meta["global_step"] == total and meta["args"]["target_network_frequency"] == 100
        checkpoints.append(arrays)
    params, target, lagged = ([saved(c, f"['state'].{name}") for c in checkpoints]
                              for name in ("params", "target_params", "lagged_params"))
    env = q.make_env("Pendulum-v1", 1)
    obs, _ = env.reset(seed=1)
    initial = q.named_leaves(jax.jit(q.QNetwork(1).init)(jax.random.split(jax.random.PRNGKey(1))[1], obs[None],
                                                         jnp.zeros((1, 1, 1))))
    assert same(lagged[0], dict(initial))  # at the first copy the target handed on its initial parameters
    for i in range(3):
        assert same(target[i], params[i])  # copied after the update of the copy step
        assert int(checkpoints[i]["['state'].step"]) == 100 * i // 10 + 1  # one update per 10 steps from step 100
    for i in (1, 2):
        assert same(lagged[i], params[i - 1])  # the target of the copy before
        assert not same(params[i], params[i - 1])  # trained in between, so the check can tell them apart
    steps = [int(r["global_step"]) for r in read_metrics(run_dir) if r["charts/SPS"]]
    assert steps == list(range(50, 301, 50))  # metrics.csv continued where each checkpoint was taken
    assert all(r["cem/greedy_final_std"] for r in read_metrics(run_dir) if r["charts/SPS"])


@pytest.mark.parametrize("num_envs, total", [(1, 500), (4, 1000), (16, 500)])
def test_vector_env_transitions_equal_single_envs_and_updates_keep_their_ratio(tmp_path, monkeypatch,
                                                                               num_envs, total):
    _, (meta, arrays) = train_in_process(tmp_path, monkeypatch, total_timesteps=total, num_envs=num_envs,
                                         checkpoint_frequency=10_000, exp_name=f"vector{num_envs}")
    final, rows = meta["global_step"], np.lcm(num_envs, 10)  # rows: transitions per update call
    stored, pending = saved(arrays, "['buffer'].storage"), saved(arrays, "['pending']")
    assert final == -(-total // num_envs) * num_envs and len(stored["['obs']"]) == final // rows * rows
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
    assert abs(int(arrays["['state'].step"]) - (final - 100) / 10) <= rows / 10


def test_a_termination_is_stored_as_terminal(tmp_path, monkeypatch):
    # InvertedPendulum-v5 terminates once the pole leans past 0.2 rad, which an untrained agent soon lets it do.
    _, (_, arrays) = train_in_process(tmp_path, monkeypatch, env_id="InvertedPendulum-v5",
                                      total_timesteps=200, checkpoint_frequency=200, exp_name="falls")
    buffer = saved(arrays, "['buffer'].storage")
    terminated, next_obs, obs = buffer["['terminated']"], buffer["['next_obs']"], buffer["['obs']"]
    fallen = np.abs(next_obs[:, 1]) > 0.2
    assert fallen.sum() >= 3
    np.testing.assert_array_equal(terminated, fallen.astype(np.float32))
    np.testing.assert_array_equal(np.flatnonzero(np.any(next_obs[:-1] != obs[1:], axis=1)),
                                  np.flatnonzero(fallen[:-1]))


def run_state(state, capacity=64):
    example = dict(obs=np.zeros(OBS_DIM, np.float32), action=np.zeros(ACTION_DIM, np.float32),
                   reward=np.float32(0), next_obs=np.zeros(OBS_DIM, np.float32), terminated=np.float32(0))
    return dict(state=jax.tree.map(jnp.asarray, state), buffer=q.buffer_init(example, capacity),
                key=jax.random.PRNGKey(0), greedy=jnp.zeros(2),
                pending={k: np.zeros((10, *np.shape(v)), np.float32) for k, v in example.items()})


def chunks(count):
    rng = np.random.default_rng(7)
    return [dict(obs=rng.normal(size=(10, OBS_DIM)), action=rng.uniform(-1, 1, (10, ACTION_DIM)),
                 reward=rng.normal(size=10), next_obs=rng.normal(size=(10, OBS_DIM)), terminated=np.zeros(10))
            for _ in range(count)]


def test_a_checkpointed_run_continues_exactly_as_one_that_never_stopped(tmp_path):
    model, state, _, _ = td_inputs(0.0)  # online, target and lagged parameters all different
    settings = dict(batch_size=8, prioritized=True, **UPDATE)
    steps, keys = chunks(6), jax.random.split(jax.random.PRNGKey(1), 6)

    def train(run, first, last):
        for chunk, key in zip(steps[first:last], keys[first:last]):
            chunk = jax.tree.map(lambda x: np.asarray(x, np.float32), chunk)
            new_state, buffer, _ = q.update(model, run["state"], run["buffer"], chunk, key, **settings)
            run = dict(run, state=new_state, buffer=buffer)
        return run

    uninterrupted = train(run_state(state), 0, 6)
    stopped = train(run_state(state), 0, 3)
    stopped["pending"]["obs"][:4] = 1.5  # steps taken since the last update travel with the checkpoint too
    stopped["greedy"] = jnp.array([1.25, 7.0])  # and so do the acting statistics not yet logged
    path = q.save_arrays(str(tmp_path / "checkpoint" / "state.npz"), stopped, dict(global_step=30))
    meta, arrays = q.load_arrays(path, "--resume")
    assert meta == dict(global_step=30, script="qtopt_cem.py")
    assert len(arrays["['buffer'].storage['obs']"]) == 30  # the filled rows of 64
    resumed = q.restore(run_state(state), arrays, "--resume")
    for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(resumed)):  # the resume point is the checkpoint
        np.testing.assert_array_equal(a, b)
    resumed = train(resumed, 3, 6)
    for a, b in zip(jax.tree.leaves(uninterrupted["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(uninterrupted["buffer"].tree, resumed["buffer"].tree)


def test_damaged_missing_or_foreign_checkpoints_are_refused_with_one_line(tmp_path):
    _, state, _, _ = td_inputs(0.0)
    path = q.save_arrays(str(tmp_path / "state.npz"), run_state(state), {})
    with open(path, "rb") as f:
        data = f.read()
    for name, content in [("cut.npz", data[: len(data) // 2]), ("noise.npz", b"not a checkpoint")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit, match=r"^error: --resume: .* is damaged or was not saved by qtopt_cem.py"):
            q.load_arrays(str(tmp_path / name), "--resume")
    with pytest.raises(SystemExit, match=r"^error: --resume: no such file: .*nowhere"):
        q.load_arrays(str(tmp_path / "nowhere" / "state.npz"), "--resume")
    foreign = qmle_dmc.save_arrays(str(tmp_path / "qmle.npz"), dict(x=np.zeros(3)), {})
    with pytest.raises(SystemExit, match=r"^error: --resume: .* was saved by qmle_dmc.py, not qtopt_cem.py"):
        q.load_arrays(foreign, "--resume")
    _, arrays = q.load_arrays(path, "--resume")
    with pytest.raises(SystemExit, match=r"^error: --resume: the saved \['buffer'\].storage\['obs'\] is float32\[0, 5\], "
                                         r"this run's float32\[64, 7\]"):
        smaller = run_state(state)
        smaller["buffer"] = smaller["buffer"]._replace(storage=dict(smaller["buffer"].storage, obs=jnp.zeros((64, 7))))
        q.restore(smaller, arrays, "--resume")


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(q.time, "time", lambda: 1_700_000_000.0)
    first, second = q.new_run_dir(q.Args()), q.new_run_dir(q.Args())
    assert first != second and os.path.isdir(first) and os.path.isdir(second)


def test_sigint_saves_the_model_and_a_checkpoint_and_says_how_to_resume(tmp_path):
    flags = smoke_flags("Pendulum-v1", total_timesteps=1_000_000, checkpoint_frequency=5000, eval_frequency=0)
    returncode, stdout, stderr = interrupt("qtopt_cem.py", flags, tmp_path)
    assert returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "interrupted at step" in stdout and f"--resume runs/{os.path.basename(run_dir)}" in stdout
    meta, _ = q.load_arrays(q.checkpoint_file(run_dir), "--resume")
    assert 300 <= meta["global_step"] < 1_000_000
    assert q.load_arrays(os.path.join(run_dir, "qtopt_cem.npz"), "--load-model")[0]["global_step"] == meta["global_step"]
    wrong = run_script("qtopt_cem.py", "--resume", os.path.relpath(run_dir, tmp_path), "--seed", "2", cwd=tmp_path)
    assert wrong.returncode == 1 and wrong.stderr.strip() == "error: --resume: --seed 2 differs from the saved run's 1"


def test_a_second_run_in_one_process_compiles_nothing(tmp_path, monkeypatch):
    # The optimizer and the init are keyed on their settings, not on one run's objects, so a second main() with the
    # same settings finds every program compiled (what keeps the many in-process runs of these tests fast).
    train_in_process(tmp_path, monkeypatch, total_timesteps=300, checkpoint_frequency=300, exp_name="first")
    with counting_compiles() as compiled:
        train_in_process(tmp_path, monkeypatch, total_timesteps=300, checkpoint_frequency=300, exp_name="second")
    assert compiled == []
