"""The replay-buffer block, checked through qmle_dmc.py (test_shared_helpers.py holds every agent's copy to it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qmle_dmc as q


def transitions(values):
    values = np.asarray(values, np.float32)
    return dict(x=values, pair=np.stack([values, -values], 1))


def test_wraps_around_keeping_the_newest():
    buffer = q.buffer_init(dict(x=np.float32(0), pair=np.zeros(2, np.float32)), capacity=5)
    buffer = q.buffer_add(buffer, transitions([1, 2, 3]))
    buffer = q.buffer_add(buffer, transitions([4, 5, 6, 7]))
    # 7 writes into 5 slots: slots 0 and 1 were overwritten by the 6th and 7th transitions.
    np.testing.assert_array_equal(buffer.storage["x"], [6, 7, 3, 4, 5])
    np.testing.assert_array_equal(buffer.storage["pair"][:, 1], [-6, -7, -3, -4, -5])
    assert int(buffer.size) == 5 and int(buffer.cursor) == 2
    assert float(buffer.tree[1]) == pytest.approx(5.0)  # every live transition at the initial weight 1


def test_sum_tree_stays_consistent_with_its_leaves():
    capacity = 11  # not a power of two: the tree has 16 leaves, 5 of them never used
    buffer = q.buffer_init(dict(x=np.float32(0), pair=np.zeros(2, np.float32)), capacity)
    buffer = q.buffer_add(buffer, transitions(np.arange(capacity)))
    rng = np.random.default_rng(0)
    for _ in range(5):
        index = rng.integers(0, capacity, 4)
        buffer = q.buffer_update(buffer, jnp.asarray(index), jnp.asarray(rng.random(4) * 3), alpha=0.6)
    tree = np.asarray(buffer.tree)
    for node in range(1, 16):
        assert tree[node] == pytest.approx(tree[2 * node] + tree[2 * node + 1], rel=1e-5)


@pytest.mark.parametrize("stratified", [True, False])
def test_proportional_sampling_frequencies_and_importance_weights(stratified):
    priorities = np.array([1.0, 2.0, 0.5, 4.0, 0.0001, 2.5, 1.0])
    alpha, beta = 0.6, 0.4
    buffer = q.buffer_init(dict(x=np.float32(0), pair=np.zeros(2, np.float32)), capacity=len(priorities))
    buffer = q.buffer_add(buffer, transitions(np.arange(len(priorities))))
    buffer = q.buffer_update(buffer, jnp.arange(len(priorities)), jnp.asarray(priorities), alpha=alpha)
    expected = priorities**alpha / np.sum(priorities**alpha)

    sample = jax.jit(lambda k: q.buffer_sample(buffer, k, 64, True, beta, stratified))
    counts = np.zeros(len(priorities))
    for key in jax.random.split(jax.random.PRNGKey(0), 300):
        index, batch, weights = sample(key)
        counts += np.bincount(np.asarray(index), minlength=len(priorities))
        np.testing.assert_array_equal(batch["x"], index)  # the batch is the stored transitions at index
        w = (len(priorities) * expected[np.asarray(index)]) ** -beta
        np.testing.assert_allclose(weights, w / w.max(), rtol=1e-4)
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.01)


def test_stratified_draws_spread_a_batch_and_independent_draws_are_multinomial():
    """Equal priorities and a batch as large as the buffer: stratified draws take every transition once;
    independent draws repeat some, each transition's count in a batch binomial(n, 1/n), variance 1 - 1/n."""
    n = 16
    buffer = q.buffer_init(dict(x=np.float32(0), pair=np.zeros(2, np.float32)), capacity=n)
    buffer = q.buffer_add(buffer, transitions(np.arange(n)))
    keys = jax.random.split(jax.random.PRNGKey(2), 500)
    draw = jax.jit(
        jax.vmap(lambda k, stratified: q.buffer_sample(buffer, k, n, True, 0.4, stratified)[0], in_axes=(0, None)),
        static_argnums=1,
    )
    for index in np.asarray(draw(keys, True)):
        np.testing.assert_array_equal(np.sort(index), np.arange(n))
    counts = np.stack([np.bincount(index, minlength=n) for index in np.asarray(draw(keys, False))])
    assert counts.mean() == pytest.approx(1.0)
    assert counts.var() == pytest.approx(1 - 1 / n, rel=0.1)  # 8000 counts: the estimate's spread is ~2%


def test_uniform_sampling_covers_only_filled_slots_with_unit_weights():
    buffer = q.buffer_init(dict(x=np.float32(0), pair=np.zeros(2, np.float32)), capacity=100)
    buffer = q.buffer_add(buffer, transitions(np.arange(10)))
    index, batch, weights = q.buffer_sample(buffer, jax.random.PRNGKey(1), 5000, False, 0.4)
    assert set(np.asarray(index).tolist()) == set(range(10))
    np.testing.assert_array_equal(weights, 1.0)


def test_field_write_back_and_new_transitions_get_the_max_weight():
    buffer = q.buffer_init(dict(x=np.float32(0), pair=np.zeros(2, np.float32)), capacity=8)
    buffer = q.buffer_add(buffer, transitions([1, 2, 3, 4]))
    buffer = q.buffer_update(
        buffer, jnp.array([1, 3]), jnp.array([9.0, 0.5]), alpha=0.5, pair=jnp.array([[10.0, 11.0], [30.0, 31.0]])
    )
    np.testing.assert_array_equal(buffer.storage["pair"][:4], [[1, -1], [10, 11], [3, -3], [30, 31]])
    np.testing.assert_array_equal(buffer.storage["x"][:4], [1, 2, 3, 4])  # untouched field
    leaves = np.asarray(buffer.tree[8:])
    np.testing.assert_allclose(leaves[:4], [1.0, 3.0, 1.0, 0.5**0.5], rtol=1e-6)
    buffer = q.buffer_add(buffer, transitions([5]))
    assert float(buffer.tree[8 + 4]) == pytest.approx(3.0)  # the largest weight so far
    buffer = q.buffer_update(buffer, jnp.array([0]), None, pair=jnp.array([[7.0, 7.0]]))
    assert float(buffer.tree[8]) == pytest.approx(1.0)  # no priority given: the tree is left alone
