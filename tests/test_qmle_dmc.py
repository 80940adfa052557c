"""qmle_dmc.py: its parts against independent computations, then whole runs judged by what they write."""

import csv
import functools
import glob
import itertools
import json
import os
import struct

import flax
import imageio
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qmle_dmc as q
from conftest import q_reference, run_script

OBS_DIM, ACTION_DIM = 5, 2


@pytest.fixture(scope="module")
def model_and_params():
    model = q.QMLENetwork(ACTION_DIM, num_bins=3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, ACTION_DIM)))
    return model, params


def test_split_joint_layer_equals_the_network_on_the_concatenation(model_and_params):
    model, params = model_and_params
    obs = jax.random.normal(jax.random.PRNGKey(1), (OBS_DIM,))
    actions = jax.random.uniform(jax.random.PRNGKey(2), (7, ACTION_DIM), minval=-1, maxval=1)
    embedding = model.apply(params, obs, method=q.QMLENetwork.observation_stream)
    ours = model.apply(params, embedding, actions, method=q.QMLENetwork.q_values)
    np.testing.assert_allclose(ours, q_reference(params, obs, actions), rtol=1e-4, atol=1e-5)


def test_layers_start_at_pytorchs_default_scale(model_and_params):
    """The release's nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): bounded there, with that uniform's std."""
    _, params = model_and_params
    kernels = {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key == "kernel"}
    assert len(kernels) == 12  # 8 in Q (its joint block's first layer split in two), 2 per predictor
    for name, kernel in kernels.items():
        bound = kernel.shape[0] ** -0.5
        assert float(jnp.abs(kernel).max()) <= bound, name
        if kernel.size >= 128 * 128:
            assert float(kernel.std()) == pytest.approx(bound / np.sqrt(3), rel=0.02), name


def test_chunked_candidate_evaluation_equals_one_pass(model_and_params):
    model, params = model_and_params
    embedding = jax.random.normal(jax.random.PRNGKey(3), (96, 128))
    candidates = jax.random.uniform(jax.random.PRNGKey(4), (96, 13, ACTION_DIM), minval=-1, maxval=1)
    one_pass = model.apply(params, embedding, candidates, method=q.QMLENetwork.q_values)
    for chunk in (32, 7, 96):  # 7 does not divide 96: falls back to a divisor
        chunked = q.q_over_candidates(model, params, embedding, candidates, states_per_chunk=chunk)
        np.testing.assert_allclose(chunked, one_pass, rtol=1e-5, atol=1e-5)


def test_predictors_do_not_train_the_observation_stream(model_and_params):
    model, params = model_and_params
    obs = jnp.ones((3, OBS_DIM))

    def predictor_loss(p):
        e = model.apply(p, obs, method=q.QMLENetwork.observation_stream)
        return (model.apply(p, e, method=q.QMLENetwork.delta).sum()
                + model.apply(p, e, method=q.QMLENetwork.categorical_logits).sum())

    grads = jax.grad(predictor_loss)(params)["params"]
    for name in ("obs_embed", "obs_block", "obs_norm"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[name]))
    assert float(jnp.abs(grads["delta_head"]["kernel"]).max()) > 0


@pytest.mark.parametrize("m, expected", [(100, (45, 45, 1, 9)), (1000, (450, 450, 10, 90)), (2, (1, 1, 0, 0))])
def test_budget_split_follows_the_ratios_and_adds_up(m, expected):
    budget = q.Budget.split(m, 0.9, 0.01, 0.09)
    assert tuple(budget) == expected and sum(budget) == m
    assert sum(q.Budget.split(7, 1.0, 0.0, 0.0)) == 7  # the all-uniform ablation


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
    bins = np.asarray(q.bin_values(4))
    index = np.abs(np.asarray(c)[..., None] - bins).argmin(-1)  # [2, 40000, 3]
    grid, cat = index[:, :20_000], index[:, 20_000:]
    for state, dim in itertools.product(range(2), range(3)):
        np.testing.assert_allclose(np.bincount(grid[state, :, dim], minlength=4) / 20_000, 0.25, atol=0.012)
        expected = np.exp(logits[state, dim]) / np.exp(logits[state, dim]).sum()
        np.testing.assert_allclose(np.bincount(cat[state, :, dim], minlength=4) / 20_000, expected, atol=0.012)


def test_source_fractions_count_the_winning_segments():
    budget = q.Budget(3, 2, 1, 4)  # indices 0-2 uniform, 3-4 grid, 5 delta, 6-9 categorical, 10 cached
    best = jnp.array([0, 2, 3, 5, 6, 9, 10, 10])
    np.testing.assert_allclose(q.source_fractions(best, budget), np.array([2, 1, 1, 2, 2]) / 8)


def test_target_argmax_matches_brute_force_on_a_small_discrete_space(model_and_params):
    model, params = model_and_params
    next_obs = jax.random.normal(jax.random.PRNGKey(5), (4, OBS_DIM))
    grid = jnp.array(list(itertools.product([-1.0, 0.0, 1.0], repeat=ACTION_DIM)))  # all 9 grid actions
    brute = jax.vmap(lambda o: q_reference(params, o, grid))(next_obs)
    # On the grid, 300 candidates cover all 9 actions (miss chance < 1e-14 per state).
    budget = q.Budget(0, 200, 10, 90)
    prior = jnp.full((4, ACTION_DIM), 0.5)  # off the grid, so it can only win when it is the true max
    target_argmax = jax.jit(q.target_argmax, static_argnums=(0, 5, 6, 7))
    argmax, value, best = target_argmax(model, params, next_obs, prior, jax.random.PRNGKey(6), budget, 0.1, True)
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
    argmax, value, best = target_argmax(model, params, next_obs, prior, jax.random.PRNGKey(8), q.Budget(0, 0, 0, 0), 0.1)
    np.testing.assert_array_equal(argmax, prior)  # the only candidate
    np.testing.assert_array_equal(best, 0)
    with_others = target_argmax(model, params, next_obs, prior, jax.random.PRNGKey(8), q.Budget(45, 45, 1, 9), 0.1)
    assert bool(jnp.all(with_others[1] >= value - 1e-6))  # more candidates never lower the max


def make_update_inputs(model, params, terminated):
    state = q.QMLEState.create(apply_fn=model.apply, params=params, target_params=params, tx=optax.adam(1e-3))
    rng = np.random.default_rng(0)
    chunk = dict(obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
                 action=rng.uniform(-1, 1, (4, ACTION_DIM)).astype(np.float32),
                 reward=np.array([1.0, -0.5, 0.25, 2.0], np.float32),
                 next_obs=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
                 terminated=np.full(4, terminated, np.float32),
                 argmax=rng.uniform(-1, 1, (4, ACTION_DIM)).astype(np.float32))
    buffer = q.buffer_init(jax.tree.map(lambda x: x[0], chunk), capacity=8)
    return state, buffer, chunk


@pytest.mark.parametrize("terminated", [0.0, 1.0])
def test_td_errors_written_back_as_priorities_match_a_hand_computation(model_and_params, terminated):
    model, params = model_and_params
    state, buffer, chunk = make_update_inputs(model, params, terminated)
    gamma, alpha, eps = 0.9, 0.6, 1e-6
    # With an empty budget the target arg-max is the cached prior, so the target is deterministic.
    _, buffer, metrics = q.update(model, state, buffer, chunk, jax.random.PRNGKey(0), gamma=gamma, batch_size=16,
                                  budget=q.Budget(0, 0, 0, 0), noise_std=0.1, prioritized=True, alpha=alpha,
                                  beta=0.2, priority_epsilon=eps)
    pairwise = jax.vmap(lambda o, a: q_reference(params, o, a[None])[0])
    next_q, now_q = pairwise(chunk["next_obs"], chunk["argmax"]), pairwise(chunk["obs"], chunk["action"])
    td_error = chunk["reward"] + gamma * (1 - terminated) * next_q - now_q
    np.testing.assert_allclose(buffer.tree[8:12], (np.abs(td_error) + eps) ** alpha, rtol=1e-4)
    np.testing.assert_allclose(buffer.storage["argmax"][:4], chunk["argmax"])  # the prior won and was kept
    assert int(buffer.size) == 4


def test_mle_steps_move_both_predictors_toward_the_refreshed_argmax(model_and_params):
    model, params = model_and_params
    state, buffer, chunk = make_update_inputs(model, params, 0.0)
    chunk["argmax"] = np.array([[0.6, -0.8]] * 4, np.float32)  # bins: high (index 2) and low (index 0)

    def predictions(p):
        e = model.apply(p, jnp.asarray(chunk["next_obs"]), method=q.QMLENetwork.observation_stream)
        probs = jax.nn.softmax(model.apply(p, e, method=q.QMLENetwork.categorical_logits))
        return model.apply(p, e, method=q.QMLENetwork.delta), probs[:, 0, 2] * probs[:, 1, 0]

    delta_before, prob_before = predictions(state.params)
    step = jax.jit(functools.partial(q.update, model, gamma=0.99, batch_size=16, budget=q.Budget(0, 0, 0, 0),
                                     noise_std=0.1, prioritized=True, alpha=0.6, beta=0.2, priority_epsilon=1e-6))
    buffer = q.buffer_add(buffer, chunk)
    no_new = jax.tree.map(lambda x: x[:0], chunk)
    for i in range(30):
        state, buffer, _ = step(state, buffer, no_new, jax.random.PRNGKey(i))
    delta_after, prob_after = predictions(state.params)
    target = chunk["argmax"]
    assert np.mean((delta_after - target) ** 2) < 0.5 * np.mean((delta_before - target) ** 2)
    assert bool(jnp.all(prob_after > prob_before)) and float(prob_after.min()) > 0.5


def test_select_action_is_greedy_over_its_candidates_or_random(model_and_params):
    model, params = model_and_params
    obs = np.ones(OBS_DIM, np.float32)
    budget = q.Budget(450, 450, 10, 90)
    action, best = q.select_action(model, params, obs, jax.random.PRNGKey(0), 0.0, budget, 0.1)
    e = model.apply(params, obs[None], method=q.QMLENetwork.observation_stream)
    delta = model.apply(params, e, method=q.QMLENetwork.delta)
    logits = model.apply(params, e, method=q.QMLENetwork.categorical_logits)
    k_candidates = jax.random.split(jax.random.PRNGKey(0), 3)[0]  # select_action's own split
    candidates = q.sample_candidates(k_candidates, delta, logits, budget, 0.1)[0]
    values = q_reference(params, obs, candidates)
    assert int(best) == int(values.argmax())
    np.testing.assert_allclose(action, candidates[int(best)])
    randoms = [q.select_action(model, params, obs, k, 1.0, budget, 0.1) for k in jax.random.split(jax.random.PRNGKey(1), 5)]
    assert all(int(b) == -1 for _, b in randoms) and len({float(a[0]) for a, _ in randoms}) == 5


def test_every_deepmind_control_suite_task_has_an_env_id():
    from dm_control import suite
    import gymnasium as gym

    ids = [f"{domain}-{task}" for domain, task in suite.ALL_TASKS]
    assert {"dog-walk", "humanoid-run", "cartpole-swingup", "walker-walk"} <= set(ids)
    assert all(q.dmc_gym_id(i) in gym.registry for i in ids)
    assert q.dmc_gym_id("Pendulum-v1") is None and q.dmc_gym_id("walker-wlak") is None


def test_curriculum_phase_acts_on_the_bin_grid_only(model_and_params):
    model, params = model_and_params
    obs = np.ones(OBS_DIM, np.float32)
    budget = q.Budget(45, 45, 1, 9)
    for epsilon in (0.0, 1.0):  # greedy, then random
        for key in jax.random.split(jax.random.PRNGKey(epsilon == 1.0), 4):
            action, _ = q.select_action(model, params, obs, key, epsilon, budget, 0.1, discrete=True)
            assert set(np.asarray(action).tolist()) <= {-1.0, 0.0, 1.0}


# --- argument checking: one clear line, non-zero exit, no traceback ------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(m_target=0), "--m-target must be >= 1, got 0"),
    (dict(m_greedy=-3), "--m-greedy must be >= 1, got -3"),
    (dict(total_timesteps=-1), "--total-timesteps must be >= 1, got -1"),
    (dict(learning_starts=-5), "--learning-starts must be >= 0, got -5"),
    (dict(rho_uniform=0.5), "must sum to 1, got 0.6"),
    (dict(epsilon=1.5), "--epsilon must be in [0, 1], got 1.5"),
    (dict(load_model="/no/such/model.flax"), "--load-model: no such file: /no/such/model.flax"),
])
def test_bad_arguments_are_rejected_with_one_line(overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        q.check_args(q.Args(**overrides))
    text = str(exit_info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_unknown_env_and_bad_budget_exit_cleanly_from_the_command_line(tmp_path):
    for flags, expected in [(["--env-id", "walker-wlak"], "error: unknown --env-id 'walker-wlak'"),
                            (["--env-id", "CartPole-v1"], "has Discrete actions"),
                            (["--m-target", "0"], "error: --m-target must be >= 1, got 0")]:
        result = run_script("qmle_dmc.py", *flags, cwd=tmp_path)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0]
    assert "dog-walk" in run_script("qmle_dmc.py", "--env-id", "nope", cwd=tmp_path).stderr  # the valid ids are listed


# --- whole runs ----------------------------------------------------------------------------------------------

SMOKE = dict(total_timesteps=1100, learning_starts=200, buffer_size=2000, batch_size=32, m_greedy=50, m_target=20,
             eval_frequency=600, log_frequency=100, target_network_frequency=100)


def smoke_flags(env_id, **overrides):
    flags = ["--env-id", env_id]
    for name, value in dict(SMOKE, **overrides).items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def read_metrics(run_dir):
    return list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))


def test_smoke_run_writes_metrics_and_a_model_that_loads(tmp_path):
    result = run_script("qmle_dmc.py", "--save-model", *smoke_flags("cartpole-swingup"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "cartpole-swingup__qmle_dmc__1__*"))
    rows = read_metrics(run_dir)
    episodes = [r for r in rows if r["charts/episodic_return"]]
    assert len(episodes) == 1 and episodes[0]["charts/episodic_length"] == "1000.0"  # one 1000-step DMC episode
    assert 0.0 <= float(episodes[0]["charts/episodic_return"]) <= 1000.0
    updates = [r for r in rows if r["losses/td_loss"]]
    assert len(updates) >= 8 and all(np.isfinite(float(r["losses/td_loss"])) for r in updates)
    fractions = [sum(float(r[f"argmax/target_{s}"]) for s in q.SOURCES) for r in updates]
    np.testing.assert_allclose(fractions, 1.0, rtol=1e-5)
    assert len([r for r in rows if r["eval/episodic_return"]]) == 2  # at step 600 and at the end
    assert "step     1100" in result.stdout

    model_path = os.path.join(run_dir, "qmle_dmc.flax")
    model = q.QMLENetwork(1, 3)
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 1, 1)))
    loaded = flax.serialization.from_bytes(template, open(model_path, "rb").read())
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)))
    evaluation = run_script("qmle_dmc.py", "--env-id", "cartpole-swingup", "--load-model", model_path, cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "greedy return over 1 episode(s)" in evaluation.stdout


def test_seeds_reproduce_on_a_gymnasium_task(tmp_path):
    flags = smoke_flags("Pendulum-v1", total_timesteps=400, eval_frequency=0)  # two 200-step episodes
    for run in ("a", "b"):
        os.makedirs(tmp_path / run)
        assert run_script("qmle_dmc.py", *flags, cwd=tmp_path / run).returncode == 0
    rows = [read_metrics(glob.glob(str(tmp_path / run / "runs" / "*"))[0]) for run in ("a", "b")]
    returns = [[r["charts/episodic_return"] for r in rs if r["charts/episodic_return"]] for rs in rows]
    losses = [[r["losses/td_loss"] for r in rs if r["losses/td_loss"]] for rs in rows]
    assert len(returns[0]) == 2 and returns[0] == returns[1] and losses[0] == losses[1]


def wandb_history(path):
    """History rows from a W&B offline run file: LevelDB-style log blocks holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, rows = open(path, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
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


def test_track_sends_the_metrics_to_a_wandb_run(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    result = run_script("qmle_dmc.py", "--track", "--wandb-project-name", "qmle-test",
                        *smoke_flags("Pendulum-v1", total_timesteps=400, eval_frequency=200), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = {row["_step"]: row for row in wandb_history(run_file)}
    csv_rows = read_metrics(glob.glob(str(tmp_path / "runs" / "*"))[0])
    assert len(history) >= 4
    for row in csv_rows:
        logged = history[int(row["global_step"])]
        for key, value in row.items():
            if key != "global_step" and value:
                assert logged[key] == pytest.approx(float(value), rel=1e-6), key


def test_evaluation_records_a_video_offscreen(tmp_path):
    # InvertedPendulum (Gymnasium MuJoCo) falls within a few dozen steps untrained: a short video to render.
    model = q.QMLENetwork(1, 3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4)), jnp.zeros((1, 1, 1)))
    returns = q.evaluate(model, params, "InvertedPendulum-v5", 0, 1, q.Budget(5, 5, 1, 1), 0.1,
                         video_dir=str(tmp_path / "videos"))
    (video,) = glob.glob(str(tmp_path / "videos" / "*.mp4"))
    reader = imageio.get_reader(video)
    frame = reader.get_data(0)
    # a frame per step plus the reset frame (the encoder may pad one); InvertedPendulum pays 1 per step
    assert int(returns[0]) + 1 <= reader.count_frames() <= int(returns[0]) + 2
    assert frame.ndim == 3 and frame.shape[-1] == 3 and frame.std() > 1  # a rendered image, not a blank
