"""Robust aggregators: equal to NumPy loops, and bounded by the honest updates below breakdown."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.federated import robust_aggregation as ra

C, D = 9, 5


def _stack(seed=0, c=C, d=D):
    rng = np.random.default_rng(seed)
    updates = rng.normal(size=(c, d)).astype(np.float32)
    mask = np.ones(c, bool)
    mask[[2, 6]] = False
    updates[2] = np.nan  # an absent client's garbage never counts
    return updates, mask


# ---- NumPy references, one client at a time ------------------------------------------------
def np_median(u, mask):
    return np.median(u[mask], axis=0)


def np_trimmed(u, mask, f):
    s = np.sort(u[mask], axis=0)
    return s[f : len(s) - f].mean(axis=0)


def np_krum_scores(u, f):
    n = len(u)
    scores = []
    for i in range(n):
        dist = sorted(float(np.sum((u[i] - u[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dist[: max(n - f - 2, 0)]))
    return np.array(scores)


def np_multi_krum(u, mask, f, m):
    present = u[mask]
    order = np.argsort(np_krum_scores(present, f), kind="stable")
    return present[order[:m]].mean(axis=0)


def np_bulyan(u, mask, f):
    remaining = list(u[mask])
    theta = len(remaining) - 2 * f
    selected = []
    for _ in range(theta):
        best = int(np.argmin(np_krum_scores(np.array(remaining), f)))
        selected.append(remaining.pop(best))
    selected = np.array(selected)
    beta = theta - 2 * f
    med = np.median(selected, axis=0)
    out = np.empty(selected.shape[1])
    for j in range(selected.shape[1]):
        closest = np.argsort(np.abs(selected[:, j] - med[j]), kind="stable")[:beta]
        out[j] = selected[closest, j].mean()
    return out


def np_norm_bound(u, weights, bound):
    rows = [
        w * x * min(1.0, bound / max(np.linalg.norm(x), 1e-30))
        for x, w in zip(u, weights, strict=True)
        if w > 0
    ]
    return np.sum(rows, axis=0) / weights[weights > 0].sum()


# Every rule is jitted once, for one (C, D) shape, and reused by the tests below.
RULES = {
    "median": (dict(), lambda u, m, w: np_median(u, m)),
    "trimmed_mean": (dict(num_byzantine=2), lambda u, m, w: np_trimmed(u, m, 2)),
    "krum": (dict(num_byzantine=1), lambda u, m, w: np_multi_krum(u, m, 1, 1)),
    "multi_krum": (
        dict(num_byzantine=1, num_selected=3),
        lambda u, m, w: np_multi_krum(u, m, 1, 3),
    ),
    "bulyan": (dict(num_byzantine=1), lambda u, m, w: np_bulyan(u, m, 1)),
    "norm_bound": (dict(norm_bound=0.7), lambda u, m, w: np_norm_bound(u, w, 0.7)),
}


@functools.cache
def jitted(method):
    return jax.jit(ra.make_aggregator(method, **RULES[method][0]).aggregate)


def test_each_rule_equals_its_numpy_reference():
    key = jax.random.key(0)
    for seed in (0, 1):
        u, mask = _stack(seed)
        weights = mask * np.arange(1.0, C + 1)
        for method, (_, reference) in RULES.items():
            np.testing.assert_allclose(
                jitted(method)(jnp.asarray(u), jnp.asarray(weights), key),
                reference(u, mask, weights),
                rtol=1e-5,
                atol=1e-6,
                err_msg=method,
            )
    # Multi-Krum's m = 0 selects n - f.
    u, mask = _stack(0)
    np.testing.assert_allclose(
        ra.multi_krum(jnp.asarray(u), mask, 1, 0), np_multi_krum(u, mask, 1, 6), rtol=1e-5
    )


def test_all_identical_honest_updates_give_the_mean():
    u = jnp.tile(jnp.array([[0.5, -1.0, 2.0, 0.1, 0.0]], jnp.float32), (C, 1))  # norm < 0.7
    u = u * 0.2
    weights = jnp.asarray(np.arange(C) != 4, jnp.float32) * jnp.arange(1.0, C + 1)
    for method in RULES:
        out = jitted(method)(u, weights, jax.random.key(0))
        np.testing.assert_allclose(out, u[0], rtol=1e-6, err_msg=method)
    mean = ra.make_aggregator("mean")
    assert mean is ra.MEAN
    np.testing.assert_allclose(mean.aggregate(u, weights, None), u[0], rtol=1e-6)


def test_even_count_median_and_pytrees_under_jit():
    u = {"a": jnp.array([[1.0, 0.0], [3.0, 2.0], [10.0, 4.0], [4.0, 6.0]]), "b": jnp.arange(4.0)}
    mask = jnp.array([True, True, True, True])
    out = jax.jit(ra.coordinate_median)(u, mask)
    np.testing.assert_allclose(out["a"], [3.5, 3.0])
    np.testing.assert_allclose(out["b"], 1.5)
    flat = jax.jit(ra.bulyan, static_argnums=2)(u, mask, 0)  # f = 0: theta = beta = n
    np.testing.assert_allclose(flat["a"], np.mean(np.asarray(u["a"]), axis=0), rtol=1e-6)


def test_breakdown_number_of_arbitrary_updates_is_ignored():
    rng = np.random.default_rng(3)
    honest = rng.normal(size=(6, D)).astype(np.float32)
    lo, hi = honest.min(0), honest.max(0)
    # 6 honest clients and f attackers (f = the rule's own, or 3 for the median) in C = 9 slots.
    for method, f in (("median", 3), ("trimmed_mean", 2), ("krum", 1), ("multi_krum", 1)):
        weights = jnp.asarray(np.arange(C) < 6 + f, jnp.float32)
        ra.check_breakdown(method, 6 + f, f)
        for value in (np.inf, -np.inf, 1e30, -1e30):
            u = np.concatenate([honest, np.full((C - 6, D), value, np.float32)])
            u[6 + f - 1, 0] = -value  # attackers need not agree with one another
            out = np.asarray(jitted(method)(jnp.asarray(u), weights, jax.random.key(0)))
            assert np.all(np.isfinite(out)), (method, value)
            assert np.all((out >= lo - 1e-6) & (out <= hi + 1e-6)), (method, value)
            if method == "krum":  # Krum returns one of the honest updates itself
                assert np.any(np.all(np.isclose(honest, out), axis=1))
    # Bulyan: n = 7 = 4f + 3 with f = 1.
    weights = jnp.asarray(np.arange(C) < 7, jnp.float32)
    for value in (np.inf, -1e30):
        u = np.concatenate([honest, np.full((C - 6, D), value, np.float32)])
        out = np.asarray(jitted("bulyan")(jnp.asarray(u), weights, jax.random.key(0)))
        assert np.all((out >= lo - 1e-6) & (out <= hi + 1e-6)), value
    # Norm bounding has no breakdown point: it bounds each client's pull instead.
    u = np.concatenate([honest, np.full((C - 6, D), 1e30, np.float32)])
    out = jitted("norm_bound")(jnp.asarray(u), jnp.ones(C), jax.random.key(0))
    assert float(jnp.linalg.norm(out)) <= 0.7 + 1e-5


def test_median_ignores_one_arbitrarily_large_outlier():
    honest = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    median = jax.jit(ra.coordinate_median)
    for outlier in (1e3, 1e20, 3e38, np.inf):
        u = jnp.asarray(np.concatenate([honest, [[outlier]]]))
        assert float(median(u, jnp.ones(5, bool))[0]) == 3.0


def test_breakdown_points_are_refused_by_name():
    for method, n in (("krum", 4), ("multi_krum", 4), ("bulyan", 6), ("median", 2)):
        with pytest.raises(ValueError, match=method):
            ra.check_breakdown(method, n, 1)
    for method, n in (("krum", 5), ("bulyan", 7), ("median", 3), ("trimmed_mean", 3)):
        ra.check_breakdown(method, n, 1)
    with pytest.raises(ValueError, match="num_selected"):
        ra.check_breakdown("multi_krum", 6, 1, num_selected=6)
    with pytest.raises(ValueError, match="method"):
        ra.make_aggregator("geometric_median")
    # Below breakdown at run time (dropouts) is reported, not hidden.
    agg = ra.make_aggregator("krum", num_byzantine=1)
    assert bool(agg.below_breakdown(jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])))


def test_weak_dp_noise_is_gaussian_around_the_bounded_mean():
    u = jnp.zeros((3, 20_000))
    rule = jax.jit(ra.make_aggregator("norm_bound", norm_bound=1.0, noise_std=0.05).aggregate)
    out = rule(u, jnp.ones(3), jax.random.key(1))
    assert abs(float(jnp.std(out)) - 0.05) < 0.002 and abs(float(jnp.mean(out))) < 0.002
