"""Private per-channel normalisation statistics of features (Tramer & Boneh's DataNorm).

Tramer and Boneh, "Differentially private learning needs better features (or much more data)",
ICLR 2021 (https://arxiv.org/abs/2011.11660), Section 3.1: ScatterNet features are normalised per
channel with a mean and variance *estimated privately* from the training set. For each training
example ``i`` let ``a_i`` be the spatial mean of each of its ``K`` feature channels and ``b_i`` the
spatial mean of their squares (both in ``R^K``). Each vector is clipped to L2 norm ``C_a``
(resp. ``C_b``), summed over the ``N`` examples, and released once with the Gaussian mechanism:

    mu   = (sum_i clip(a_i, C_a) + N(0, (sigma S_a)^2 I)) / N,
    m2   = (sum_i clip(b_i, C_b) + N(0, (sigma S_b)^2 I)) / N,
    var  = max(m2 - mu^2, 0),

``S = C`` under add/remove-one and ``2 C`` under replace-one neighbouring
(:func:`fedjax_med.privacy.clipping.sensitivity`); features are then ``(x - mu) / sqrt(var +
eps)``. The two releases are two ``GaussianDpEvent(sigma)`` on the whole training set (no
sampling), composed with the DP-SGD steps that follow (:func:`events`; the trainer's ledger
composes them, :class:`~fedjax_med.privacy.budget.PrivacyLedger`). Unlike their code, which sets
``C`` to the median norm (a data-dependent choice they note leaks a little), the clip norms here
are public constants from the config. The alternative that spends no privacy is GroupNorm
(per-example statistics), the ScatterNet models' default.
"""

from __future__ import annotations

import dp_accounting
import jax
import jax.numpy as jnp

from fedjax_med.privacy import clipping, noise

# How many Gaussian releases DataNorm makes: the sum of channel means and of channel squares.
NUM_RELEASES = 2


def channel_moments(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example spatial means of each channel and of its square: ``(B, K)`` twice.

    Examples:
      >>> a, b = channel_moments(jnp.arange(8.0).reshape(1, 2, 2, 2))
      >>> a, b
      (Array([[3., 4.]], dtype=float32), Array([[14., 21.]], dtype=float32))
    """
    axes = tuple(range(1, features.ndim - 1))
    return features.mean(axis=axes), jnp.square(features).mean(axis=axes)


def clipped_sums(
    first: jax.Array, second: jax.Array, mask: jax.Array, clip_first: float, clip_second: float
) -> tuple[jax.Array, jax.Array]:
    """``sum_i mask_i clip(first_i, C_a)`` and ``sum_i mask_i clip(second_i, C_b)`` (``(K,)``).

    ``math.inf`` clip norms leave the vectors unclipped (the non-private, exact statistics).
    """
    clipped_a, _ = clipping.clip_per_example(first, clip_first)
    clipped_b, _ = clipping.clip_per_example(second, clip_second)
    weights = mask.astype(first.dtype)
    return weights @ clipped_a, weights @ clipped_b


def release(
    sum_first: jax.Array,
    sum_second: jax.Array,
    num_units: int,
    clip_first: float,
    clip_second: float,
    noise_multiplier: float,
    key: jax.Array,
    relation: str = "add_or_remove_one",
) -> tuple[jax.Array, jax.Array]:
    """The private ``(mean, var)`` of the module docstring from the two clipped sums.

    Args:
      sum_first: ``sum_i clip(a_i, C_a)`` from :func:`clipped_sums`, nothing rescaled.
      sum_second: ``sum_i clip(b_i, C_b)``.
      num_units: ``N``, the number of training examples (public, as in the run's claim).
      clip_first: ``C_a``.
      clip_second: ``C_b``.
      noise_multiplier: ``sigma >= 0`` (0: no noise, no privacy).
      key: the noise key, used once (split in two, one per release).
      relation: the neighbouring relation the sensitivities are taken under.

    Guarantees:
      Two Gaussian mechanisms of noise multiplier ``sigma`` (stddev ``sigma S``) on sums of
      sensitivity ``S = clipping.sensitivity(C, relation=relation)``, i.e. the events of
      :func:`events`; the division by ``N``, the variance and its floor at 0 are
      post-processing.

    Examples:
      >>> mean, var = release(jnp.array([2.0]), jnp.array([8.0]), 2, 1.0, 1.0, 0.0,
      ...                     jax.random.key(0))
      >>> mean, var
      (Array([1.], dtype=float32), Array([3.], dtype=float32))
    """
    key_first, key_second = jax.random.split(key)
    sens_first = clipping.sensitivity(clip_first, relation=relation)
    sens_second = clipping.sensitivity(clip_second, relation=relation)
    mean = noise.privatize_sum(sum_first, key_first, noise_multiplier, sens_first, num_units)
    square = noise.privatize_sum(sum_second, key_second, noise_multiplier, sens_second, num_units)
    return mean, jnp.maximum(square - jnp.square(mean), 0.0)


def events(noise_multiplier: float) -> tuple[dp_accounting.DpEvent, ...]:
    """The ``DpEvent`` of each release: ``GaussianDpEvent(sigma)`` twice.

    Examples:
      >>> events(4.0)
      (GaussianDpEvent(noise_multiplier=4.0), GaussianDpEvent(noise_multiplier=4.0))
    """
    return (dp_accounting.GaussianDpEvent(float(noise_multiplier)),) * NUM_RELEASES


def normalize(features: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` per channel (the last axis)."""
    return (features - mean) / jnp.sqrt(var + eps)
