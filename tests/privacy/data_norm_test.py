"""Private DataNorm statistics (Tramer & Boneh 2021): the formula, the noise, the events."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.privacy import data_norm

FEATURES = np.random.default_rng(0).normal(1.0, 2.0, size=(50, 3, 4, 6)).astype(np.float32)
MASK = jnp.ones(50, bool)


def test_exact_statistics_are_the_per_channel_mean_and_variance():
    sums = data_norm.clipped_sums(*data_norm.channel_moments(FEATURES), MASK, math.inf, math.inf)
    mean, var = data_norm.release(*sums, 50, math.inf, math.inf, 0.0, jax.random.key(0))
    np.testing.assert_allclose(mean, FEATURES.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(var, FEATURES.var(axis=(0, 1, 2)), rtol=1e-4)
    normalized = data_norm.normalize(FEATURES, mean, var, 1e-5)
    np.testing.assert_allclose(normalized.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(axis=(0, 1, 2)), 1.0, rtol=1e-4)


def test_clipping_bounds_each_example_and_padding_adds_nothing():
    first, second = data_norm.channel_moments(FEATURES)
    mask = jnp.arange(50) < 40
    sum_a, sum_b = data_norm.clipped_sums(first, second, mask, 0.5, 2.0)
    norms_a = np.linalg.norm(first[:40], axis=1, keepdims=True)
    norms_b = np.linalg.norm(second[:40], axis=1, keepdims=True)
    expected_a = (first[:40] * np.minimum(1, 0.5 / norms_a)).sum(0)
    expected_b = (second[:40] * np.minimum(1, 2.0 / norms_b)).sum(0)
    np.testing.assert_allclose(sum_a, expected_a, rtol=1e-5)
    np.testing.assert_allclose(sum_b, expected_b, rtol=1e-5)


@pytest.mark.parametrize(("relation", "factor"), [("add_or_remove_one", 1), ("replace_one", 2)])
def test_noise_is_sigma_times_the_sensitivity(relation, factor):
    k = 4000
    sum_a, sum_b = jnp.zeros(k), jnp.full(k, 5.0)
    key = jax.random.key(3)

    def mean_of(sigma, ca=0.5):
        return data_norm.release(sum_a, sum_b, 10, ca, 2.0, sigma, key, relation)[0]

    # Exact scaling: noise at sigma is sigma times the noise at 1, from the same key.
    np.testing.assert_allclose(mean_of(3.0), 3.0 * mean_of(1.0), rtol=1e-5, atol=1e-7)
    # The stddev of the mean's noise is sigma * S / N with S = factor * C_a.
    expected = 3.0 * factor * 0.5 / 10
    assert float(jnp.std(mean_of(3.0))) == pytest.approx(expected, rel=0.05)
    assert float(jnp.std(mean_of(3.0, ca=1.0))) == pytest.approx(2 * expected, rel=0.05)


def test_two_gaussian_events():
    assert data_norm.events(4.0) == (dp_accounting.GaussianDpEvent(4.0),) * 2
