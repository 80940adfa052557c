"""climbing_game.py: the continuous payoff against the table, VDN's decomposition and decentralised acting, QMLE's
arg-max targets against brute force, the documented outcomes on fixed seeds (asserted on the JSON), and clean
failures on bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from conftest import refusal

import climbing_game as cg

TABLE = [[11, -30, 0], [-30, 7, 6], [0, 0, 5]]  # Claus & Boutilier (1998), rows agent 1, columns agent 2
THIRDS = [(-1.0, -1 / 3), (-1 / 3, 1 / 3), (1 / 3, 1.0)]


def test_payoff_mapping_matches_table():
    rng = np.random.default_rng(0)
    for i, (lo1, hi1) in enumerate(THIRDS):
        for j, (lo2, hi2) in enumerate(THIRDS):
            a1 = rng.uniform(lo1 + 1e-4, hi1 - 1e-4, 50)
            a2 = rng.uniform(lo2 + 1e-4, hi2 - 1e-4, 50)
            np.testing.assert_array_equal(np.asarray(cg.payoff(jnp.asarray(a1), jnp.asarray(a2))), TABLE[i][j])
    # the ends of the interval belong to the outer thirds
    assert float(cg.payoff(jnp.float32(-1.0), jnp.float32(-1.0))) == 11
    assert float(cg.payoff(jnp.float32(1.0), jnp.float32(1.0))) == 5
    assert float(cg.payoff(jnp.float32(-1.0), jnp.float32(1.0))) == 0


def _obs(key, n=8, d=2):
    return jax.random.uniform(key, (2, n, d), minval=-1, maxval=1)


def test_vdn_is_a_sum_of_per_agent_utilities_and_acts_decentralised():
    o1, o2 = _obs(jax.random.PRNGKey(0))
    zeros = jnp.zeros((1, 2)), jnp.zeros((1,))
    params = jax.jit(cg.VDN().init)(jax.random.PRNGKey(1), zeros[0], zeros[0], zeros[1], zeros[1])
    a1, a1b, a2, a2b = jax.random.uniform(jax.random.PRNGKey(2), (4, 8), minval=-1, maxval=1)
    apply = jax.jit(cg.VDN().apply)  # jitted: one compile instead of one per operation
    q = lambda x1, x2: np.asarray(apply(params, o1, o2, x1, x2))  # noqa: E731
    # additivity: changing agent 2's action shifts Q by the same amount whatever agent 1 does
    np.testing.assert_allclose(q(a1, a2) - q(a1, a2b), q(a1b, a2) - q(a1b, a2b), atol=1e-5)
    # agent 1's greedy action does not depend on agent 2's observation
    key = jax.random.PRNGKey(3)
    greedy = jax.jit(cg.vdn_greedy, static_argnums=4)
    g1, _ = greedy(params, key, o1, o2, 32)
    g1_other, _ = greedy(params, key, o1, -o2, 32)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g1_other))


def test_qmle_argmax_targets_against_brute_force():
    o1, o2 = _obs(jax.random.PRNGKey(0), n=4)
    zeros = jnp.zeros((1, 2)), jnp.zeros((1,))
    params = jax.jit(cg.JointQNetwork().init)(jax.random.PRNGKey(1), zeros[0], zeros[0], zeros[1], zeros[1])
    d1, d2 = jnp.full(4, 0.2), jnp.full(4, -0.7)
    targets = jax.jit(cg.qmle_argmax_targets, static_argnums=(6, 7))
    t1, t2 = targets(params, jax.random.PRNGKey(2), o1, o2, d1, d2, 4096, 16, 0.05)
    apply = jax.jit(cg.JointQNetwork().apply)
    q = lambda x1, x2: np.asarray(apply(params, o1, o2, x1, x2))  # noqa: E731
    g = np.linspace(-1, 1, 101)
    grid1, grid2 = np.meshgrid(g, g)
    for n in range(4):
        rep = lambda o, n=n: jnp.broadcast_to(o[n], (grid1.size, 2))  # noqa: E731
        q_grid = np.asarray(apply(params, rep(o1), rep(o2), jnp.asarray(grid1.ravel()), jnp.asarray(grid2.ravel())))
        q_target = q(t1, t2)[n]
        assert q_target >= q(d1, d2)[n] - 1e-6  # never worse than the predictors' own joint action
        assert q_target >= q_grid.max() - 0.05 * (q_grid.max() - q_grid.min())  # near the brute-force max
    assert np.all(np.abs(np.asarray(t1)) <= 1) and np.all(np.abs(np.asarray(t2)) <= 1)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("climbing")
    cg.main(cg.Args(num_seeds=3, output_dir=str(out)))
    with open(out / "climbing_results.json") as f:
        return out, json.load(f)


def test_results_file_and_figure(results):
    out, res = results
    assert set(res) == {"vdn", "qmle"}
    assert all(len(v) == 3 and all(isinstance(r, float) for r in v) for v in res.values())
    with open(out / "climbing_game.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_documented_outcomes_on_fixed_seeds(results):
    _, res = results
    # The reward of each seed's final greedy joint action; payoffs differ by at least 1, so a tolerance of 0.5
    # names the joint action: linear decomposition settles on the safe one (5), QMLE reaches the optimum (11).
    np.testing.assert_allclose(res["vdn"], 5.0, atol=0.5)
    np.testing.assert_allclose(res["qmle"], 11.0, atol=0.5)
    assert len(res["vdn"]) == len(res["qmle"]) == 3


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--num-seeds", "0"], "--num-seeds"),
        (["--output-dir", __file__], "--output-dir"),
        (["--local-std", "nan"], "--local-std"),
        (["--learning-rate", "-inf"], "--learning-rate"),
        (["--buffer-size", "15"], "--buffer-size"),
    ],
)
def test_bad_arguments_fail_with_one_line(argv, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # parsed as the command line is, refused before anything is written
    assert flag in refusal(cg.main, tyro.cli(cg.Args, args=argv))
