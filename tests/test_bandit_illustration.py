"""bandit_illustration.py: exact gradients against independent numpy computations, the 2-D bandit's shape, the
candidate set, the documented outcomes on fixed seeds (asserted on the JSON), and clean failures on bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from conftest import OPTIMISED, refusal, run_script

import bandit_illustration as bi


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_softmax_policy_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    rewards = rng.uniform(-1, 1, 7)
    logits = rng.normal(size=7)
    objective = lambda th: np_softmax(th) @ rewards  # noqa: E731  independent float64 numpy computation
    h = 1e-6
    numeric = np.array([(objective(logits + h * e) - objective(logits - h * e)) / (2 * h) for e in np.eye(7)])
    exact = np.asarray(bi.softmax_policy_gradient(jnp.asarray(logits, jnp.float32), jnp.asarray(rewards, jnp.float32)))
    np.testing.assert_allclose(exact, numeric, atol=1e-5)
    # and it is the score-function form sum_a pi(a) r(a) grad log pi(a)
    pi = np_softmax(logits)
    score = sum(pi[a] * rewards[a] * (np.eye(7)[a] - pi) for a in range(7))
    np.testing.assert_allclose(exact, score, atol=1e-5)


def test_gaussian_policy_objective_matches_quadrature():
    a = np.linspace(-4, 4, 160001)
    reward = sum(h * np.exp(-((a - c) ** 2) / (2 * w**2)) for h, c, w in bi.BUMPS_1D)
    std = bi.GAUSSIAN_POLICY_STD
    for mu in (-0.9, -0.45, 0.0, 0.3, 0.55):
        density = np.exp(-((a - mu) ** 2) / (2 * std**2)) / np.sqrt(2 * np.pi * std**2)
        expected = np.trapezoid(reward * density, a)
        assert float(bi.gaussian_policy_objective(mu, std)) == pytest.approx(expected, abs=1e-5)
        # the gradient the figure follows is E[r(a) d/dmu log N(a; mu, std)]
        expected_grad = np.trapezoid(reward * density * (a - mu) / std**2, a)
        grad = float(jax.grad(bi.gaussian_policy_objective)(jnp.float32(mu), std))
        assert grad == pytest.approx(expected_grad, abs=1e-4)


def test_figure1_policies():
    probs, mu_delta, mu_gauss = bi.figure1_trajectories(jax.random.PRNGKey(1), 400)
    probs = np.asarray(probs)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # the softmax policy ends (nearly) deterministic on the best arm
    assert probs[-1].argmax() == int(np.argmax(np.asarray(bi.ARM_REWARDS))) and probs[-1].max() > 0.95
    # the delta and Gaussian policies end on the local mode at -0.45, far below the optimum at +0.55
    for mu in (float(mu_delta[-1]), float(mu_gauss[-1])):
        assert abs(mu - (-0.45)) < 0.05
        assert float(bi.reward_1d(mu)) < 0.65 < float(bi.reward_1d(0.55))


def test_reward_2d_modes_and_starting_basin():
    g = np.linspace(-1, 1, 201)
    grid = np.stack(np.meshgrid(g, g), -1)
    r = np.asarray(bi.reward_2d(jnp.asarray(grid)))
    best = grid.reshape(-1, 2)[r.argmax()]
    assert np.linalg.norm(best - np.asarray(bi.OPT_CENTRE)) < 0.02 and r.max() > 1.0
    # a strict local maximum near the sub-optimal centre, lower than the optimum
    i, j = 100 + int(round(-0.35 * 100)), 100 + int(round(-0.35 * 100))
    assert r[i, j] == r[i - 1 : i + 2, j - 1 : j + 2].max() and 0.55 < r[i, j] < 0.65
    # every start on the boundary of the initial disc climbs to the sub-optimal mode (finite differences, 12 at once)
    reward = jax.jit(bi.reward_2d)
    f = lambda x: np.asarray(reward(jnp.asarray(x, jnp.float32)))  # noqa: E731
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    x = np.asarray(bi.SUB_CENTRE) + bi.Args().init_radius * np.stack([np.cos(angles), np.sin(angles)], -1)
    for _ in range(300):
        grad = np.stack([(f(x + 1e-3 * e) - f(x - 1e-3 * e)) / 2e-3 for e in np.eye(2)], -1)
        x = x + 0.05 * grad
    assert np.all(np.linalg.norm(x - np.asarray(bi.SUB_CENTRE), axis=-1) < 0.05)
    assert not np.any(np.asarray(bi.in_optimal_mode(jnp.asarray(x))))


def test_qmle_candidates():
    delta = jnp.array([0.999, -0.3])
    c = np.asarray(bi.qmle_candidates(jax.random.PRNGKey(0), delta, 50, 0.001, 500))
    assert c.shape == (551, 2) and np.all(np.abs(c) <= 1)
    np.testing.assert_array_equal(c[0], np.asarray(delta))  # the delta itself is a candidate
    local, uniform = c[1:51], c[51:]
    assert np.all(np.abs(local - np.asarray(delta)) < 0.006)  # within 6 std of the delta
    assert 0.0007 < (local[:, 1] - (-0.3)).std() < 0.0013  # std 0.001 (unclipped coordinate)
    assert local[:, 0].max() == 1.0  # samples past the edge are clipped back into [-1, 1]
    assert uniform.min() < -0.9 and uniform.max() > 0.9 and abs(uniform.mean()) < 0.1


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bandit")
    result = run_script("bandit_illustration.py", "--num-seeds", "3", "--output-dir", str(out), env=OPTIMISED)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "bandit_results.json") as f:
        return out, json.load(f)


def test_results_file_and_figures(results):
    out, res = results
    assert set(res) == {
        f"{lrn}/{s}" for lrn in ("dpg", "qmle_local", "qmle_global") for s in ("epsilon", "gaussian", "ou")
    }
    for cell in res.values():
        assert set(cell) == {"fraction_global", "final_reward"}
        k = cell["fraction_global"] * 3  # a fraction of 3 seeds
        assert 0 <= k <= 3 and abs(k - round(k)) < 1e-6
    for name in ("bandit_fig1.png", "bandit_fig2.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_documented_outcomes_on_fixed_seeds(results):
    _, res = results
    for s in ("epsilon", "gaussian", "ou"):
        # QMLE with uniform sampling reaches the optimal mode (peak about 1.01) on every seed ...
        assert res[f"qmle_global/{s}"]["fraction_global"] == 1.0
        assert res[f"qmle_global/{s}"]["final_reward"] > 0.95
        # ... DPG and QMLE with local sampling only stay on the sub-optimal mode (peak 0.6)
        for lrn in ("dpg", "qmle_local"):
            assert res[f"{lrn}/{s}"]["fraction_global"] == 0.0
            assert 0.55 < res[f"{lrn}/{s}"]["final_reward"] < 0.65


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--num-seeds", "0"], "--num-seeds"),
        (["--output-dir", __file__], "--output-dir"),
        (["--ou-theta", "inf"], "--ou-theta"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--init-radius", "0.7"], "--init-radius"),  # the delta would start outside the action box
        (["--buffer-size", "4"], "--buffer-size"),
    ],
)
def test_bad_arguments_fail_with_one_line(argv, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # parsed as the command line is, refused before anything is written
    assert flag in refusal(bi.main, tyro.cli(bi.Args, args=argv))
