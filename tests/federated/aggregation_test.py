"""Aggregation: exact weighted means, clipping bounds, screening and dropout counts."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.federated import aggregation
from fedjax_med.privacy import clipping


def test_weighted_mean_hand_numbers():
    updates = {
        "a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        "b": jnp.array([1.0, 2.0, 3.0]),
    }
    mean = aggregation.weighted_mean(updates, jnp.array([1.0, 2.0, 1.0]))
    # (1*1 + 2*3 + 1*5) / 4 = 3, (2 + 8 + 6) / 4 = 4, (1 + 4 + 3) / 4 = 2
    assert mean["a"].tolist() == [3.0, 4.0]
    assert mean["b"].tolist() == 2.0
    assert aggregation.uniform_mean(updates, jnp.array([True, False, True]))["a"].tolist() == [
        3.0,
        4.0,
    ]


def test_zero_weight_clients_never_contribute_even_nan():
    updates = jnp.array([[2.0], [jnp.nan], [jnp.inf]])
    assert aggregation.weighted_mean(updates, jnp.array([5.0, 0.0, 0.0])).tolist() == [2.0]
    assert aggregation.masked_sum(updates, jnp.array([True, False, False])).tolist() == [2.0]
    # Nobody contributes: zeros, not NaN.
    assert aggregation.weighted_mean(updates, jnp.zeros(3)).tolist() == [0.0]


@pytest.mark.parametrize(
    "clip_norm,scale,dtype",
    list(itertools.product([0.1, 1.0, 7.5], [1e-3, 1.0, 100.0], [jnp.float32, jnp.bfloat16])),
)
def test_clipped_norm_is_at_most_clip_norm(clip_norm, scale, dtype):
    key = jax.random.key(0)
    tree = {
        "w": scale * jax.random.normal(key, (4, 3, 5)).astype(dtype),
        "b": scale * jax.random.normal(jax.random.fold_in(key, 1), (4, 2)).astype(dtype),
    }
    clipped = aggregation.clip_updates(tree, clip_norm)
    norms = clipping.global_norms(jax.tree.map(lambda x: x.astype(jnp.float32), clipped))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    assert bool(jnp.all(norms <= clip_norm * (1 + tol)))
    # Updates already inside the ball are unchanged.
    before = clipping.global_norms(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
    inside = before <= clip_norm
    np.testing.assert_allclose(np.asarray(norms)[inside], np.asarray(before)[inside], rtol=tol)


def test_clip_update_edge_cases():
    zero = {"w": jnp.zeros(3)}
    assert aggregation.clip_update(zero, 1.0)["w"].tolist() == [0.0, 0.0, 0.0]
    big = {"w": jnp.array([3.0, 4.0])}
    assert aggregation.clip_update(big, jnp.inf)["w"].tolist() == [3.0, 4.0]


def test_screen_excludes_and_counts_nonfinite_and_huge():
    updates = {"w": jnp.array([[1.0, 0.0], [jnp.nan, 0.0], [0.0, jnp.inf], [30.0, 40.0], [0, 9.0]])}
    mask = jnp.array([True, True, True, True, False])
    kept, excluded = aggregation.screen(updates, mask, max_update_norm=10.0)
    assert kept.tolist() == [True, False, False, False, False]
    assert int(excluded) == 3  # the padding slot is not counted
    kept, excluded = aggregation.screen(updates, mask)
    assert kept.tolist() == [True, False, False, True, False] and int(excluded) == 2


def test_dropout_rate_and_count():
    mask = jnp.arange(2000) < 1500
    reporting, dropped = aggregation.dropout(jax.random.key(3), mask, 0.2)
    assert not bool(jnp.any(reporting & ~mask))
    assert int(dropped) == int(jnp.sum(mask & ~reporting))
    assert abs(int(dropped) / 1500 - 0.2) < 0.04
    same, _ = aggregation.dropout(jax.random.key(3), mask, 0.2)
    assert bool(jnp.all(same == reporting))
    none, zero = aggregation.dropout(jax.random.key(3), mask, 0.0)
    assert bool(jnp.all(none == mask)) and int(zero) == 0


def test_update_clipping_is_the_privacy_clipping_primitive():
    # One norm and one clip in the library: the federated names call privacy.clipping.
    key = jax.random.key(3)
    tree = {"w": 5.0 * jax.random.normal(key, (6, 4)), "b": jnp.zeros((6, 2))}
    tree["w"] = tree["w"].at[0].set(0.0)  # a zero update stays exactly zero
    expected, norms = clipping.clip_per_example(tree, 1.5)
    got = aggregation.clip_updates(tree, 1.5)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    np.testing.assert_array_equal(clipping.global_norms(tree), norms)
    one = aggregation.clip_update(jax.tree.map(lambda x: x[2], tree), 1.5)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[2]), one, expected)
    assert aggregation.clip_updates(tree, 1.5)["w"][0].tolist() == [0.0] * 4


def test_clip_updates_names_the_clip_norm_when_not_positive():
    with pytest.raises(ValueError, match="clip_norm=0.0 must be > 0"):
        aggregation.clip_updates({"w": jnp.ones((2, 3))}, 0.0)
