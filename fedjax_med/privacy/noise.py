"""Gaussian noise for DP-SGD, as an optax ``GradientTransformation``, and the noise key.

DP-SGD (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133) releases, at every step,

    (sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / L,

where the sum runs over a Poisson-sampled batch (each example kept with probability ``q``),
``C`` is the sensitivity of the clipped sum (:func:`fedjax_med.privacy.clipping.sensitivity`),
``sigma`` the noise multiplier calibrated by :mod:`fedjax_med.privacy.accounting`, and ``L = q N``
the *expected* batch size. :func:`privatize_sum` is this release, the only implementation of it
in the library: :func:`dp_aggregate` (the central trainer's optax step), local DP-SGD inside a
federated client (:func:`fedjax_med.federated.client.private_step_release`) and the private
feature statistics (:func:`fedjax_med.privacy.data_norm.release`) call it.

Why the expected and not the realised batch size: with Poisson sampling the realised size
``|B|`` depends on whether a given example was sampled, so it is itself private; dividing by it
would release a data-dependent quantity that the accountant does not cover. ``L`` is a public
constant, so dividing by it is post-processing. The result is an unbiased estimate of the mean
clipped gradient, and when ``|B| != L`` it is the realised mean times ``|B| / L``.

The noise key lives in the transformation state and is split at every update (as optax's
``add_noise`` does), so no key is ever used twice. :func:`make_noise_key` creates it either
reproducibly from the run's seed or from the operating system's entropy.

Known limitation: noise is drawn as float32 Gaussians; floating-point samplers do not exactly
realise the continuous Gaussian mechanism (Mironov, CCS 2012), an effect this library does not
correct.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med import randomness
from fedjax_med.privacy import clipping

PyTree = Any

# The named stream of the run's root key that the noise key is derived from:
# fold_in(key(seed), NOISE_STREAM). Other consumers of the seed use other streams.
NOISE_STREAM = randomness.NOISE
SEED_MODES = ("reproducible", "secure", "auto")


def make_noise_key(seed: int | None, mode: str = "reproducible") -> tuple[jax.Array, str]:
    """Creates the DP noise key; returns ``(key, mode_used)`` for the privacy report.

    Args:
      seed: the run's integer seed (used only in reproducible mode).
      mode: ``"reproducible"``: ``fold_in(jax.random.key(seed), NOISE_STREAM)``, so a rerun with
        the same seed draws the same noise (anyone who knows the seed can also subtract the noise,
        so use it for experiments, not for releasing models); ``"secure"``: all 128 bits of the key
        come from the operating system's CSPRNG (:func:`fedjax_med.randomness.secure_key`), never
        from ``seed``; ``"auto"``: reproducible if ``seed`` is given, secure otherwise.

    Returns:
      ``(key, mode_used)`` with ``mode_used`` in ``("reproducible", "secure")``.

    Examples:
      >>> key, used = make_noise_key(0, "reproducible")
      >>> used, bool((jax.random.key_data(key) == jax.random.key_data(make_noise_key(0)[0])).all())
      ('reproducible', True)
      >>> make_noise_key(0, "secure")[1]
      'secure'
    """
    if mode == "auto":
        mode = "reproducible" if seed is not None else "secure"
    if mode == "reproducible":
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"{seed=} must be an integer in reproducible mode")
        return jax.random.fold_in(jax.random.key(int(seed)), NOISE_STREAM), mode
    if mode == "secure":
        return randomness.secure_key(), mode
    raise ValueError(f"{mode=} must be one of {SEED_MODES}")


def _as_key(seed_or_key: int | jax.Array) -> jax.Array:
    if isinstance(seed_or_key, (int, np.integer)) and not isinstance(seed_or_key, bool):
        return make_noise_key(int(seed_or_key), "reproducible")[0]
    return seed_or_key


def add_gaussian_noise(tree: PyTree, key: jax.Array, stddev: float | jax.Array) -> PyTree:
    """Adds independent ``N(0, stddev^2)`` noise to every coordinate of every leaf.

    One draw of ``n = sum_leaves size`` standard normals from ``key``,
    ``z = jax.random.normal(key, (n,))``, is cut into the leaves in flatten order (leaf ``l``
    gets ``z[o_l : o_l + size_l]``, ``o_l`` the sizes of the leaves before it), so every
    coordinate of the tree gets its own independent Gaussian; the noise is drawn in float32 (or
    the widest float dtype among the leaves, if wider) as ``stddev * z``, so the noise at
    ``stddev = s`` is exactly ``s`` times the noise at ``stddev = 1`` from the same key. One draw
    compiles to one random-bits kernel however many leaves the tree has (a draw per leaf
    compiled one kernel per leaf: tens of seconds for a U-Net's 47 leaves on a CPU).

    Args:
      tree: pytree of float arrays (e.g. a clipped gradient sum).
      key: a JAX PRNG key, used once.
      stddev: standard deviation, ``>= 0``.

    Returns:
      A pytree like ``tree`` (same dtypes) with noise added.

    Examples:
      >>> noisy = add_gaussian_noise({"w": jnp.zeros(3)}, jax.random.key(0), 0.0)
      >>> noisy["w"]
      Array([0., 0., 0.], dtype=float32)
    """
    if isinstance(stddev, (int, float)) and not stddev >= 0:
        raise ValueError(f"{stddev=} must be >= 0")
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    dtypes = [jnp.promote_types(jnp.result_type(leaf), jnp.float32) for leaf in leaves]
    draw_dtype = functools.reduce(jnp.promote_types, dtypes)
    sizes = [int(np.prod(jnp.shape(leaf), dtype=np.int64)) for leaf in leaves]
    unit = jax.random.normal(key, (sum(sizes),), draw_dtype)
    offsets = np.cumsum([0, *sizes[:-1]])
    noisy = []
    for leaf, dtype, offset, size in zip(leaves, dtypes, offsets, sizes, strict=True):
        part = jax.lax.slice_in_dim(unit, int(offset), int(offset) + size)
        noise = stddev * part.reshape(jnp.shape(leaf)).astype(dtype)
        noisy.append((leaf + noise).astype(jnp.result_type(leaf)))
    return jax.tree.unflatten(treedef, noisy)


def privatize_sum(
    clipped_sum: PyTree,
    key: jax.Array,
    noise_multiplier: float,
    sensitivity: float,
    expected_batch_size: float | jax.Array,
) -> PyTree:
    """The DP-SGD release of a clipped sum: ``(sum + N(0, (sigma S)^2 I)) / L``.

    Abadi et al. 2016 (arXiv:1607.00133), Algorithm 1: the Gaussian mechanism on the sum of
    clipped contributions, followed by division by the public expected batch size ``L``.

    Args:
      clipped_sum: the *sum* of clipped contributions, e.g. from
        :func:`fedjax_med.privacy.clipping.clipped_grad_sum`, nothing rescaled in between.
      key: the noise key, used once and for nothing else (never the key that drew the batch).
      noise_multiplier: ``sigma >= 0``, a Python number; 0 adds no noise (no privacy).
      sensitivity: ``S > 0``, the L2 sensitivity of the sum (``ClippedGradSum.sensitivity()``).
      expected_batch_size: ``L > 0``, a public constant (or an array holding one per client,
        such as a site's ``min(B, n)``); never the realised, private, batch size.

    Returns:
      The release, a pytree like ``clipped_sum`` (same dtypes).

    Guarantees:
      The Gaussian mechanism with standard deviation ``sigma * S`` on a sum of sensitivity
      ``S``; the division by ``L`` is post-processing.

    Examples:
      >>> release = privatize_sum({"w": jnp.array([2.0, 4.0])}, jax.random.key(0), 0.0, 1.0, 4.0)
      >>> release["w"]
      Array([0.5, 1. ], dtype=float32)
    """
    if not (
        isinstance(noise_multiplier, numbers.Real)
        and math.isfinite(noise_multiplier)
        and noise_multiplier >= 0
    ):
        raise ValueError(f"{noise_multiplier=} must be a finite Python number >= 0")
    if not (isinstance(sensitivity, numbers.Real) and sensitivity > 0):
        raise ValueError(f"{sensitivity=} must be a Python number > 0")
    if noise_multiplier > 0 and not math.isfinite(sensitivity):
        raise ValueError(f"{sensitivity=} must be finite when noise_multiplier > 0")
    if isinstance(expected_batch_size, numbers.Real) and not (
        math.isfinite(expected_batch_size) and expected_batch_size > 0
    ):
        raise ValueError(f"{expected_batch_size=} must be finite and > 0")
    if noise_multiplier > 0:
        clipped_sum = add_gaussian_noise(clipped_sum, key, noise_multiplier * sensitivity)
    return jax.tree.map(lambda s: s / expected_batch_size, clipped_sum)


class DpAggregateState(NamedTuple):
    """State of :func:`dp_aggregate`: number of updates so far and the next noise key."""

    count: jax.Array
    rng_key: jax.Array


def dp_aggregate(
    noise_multiplier: float,
    clip_norm: float,
    expected_batch_size: float,
    seed_or_key: int | jax.Array,
    *,
    relation: str = "add_or_remove_one",
) -> optax.GradientTransformation:
    """The DP-SGD aggregation step: noise the clipped sum once, divide by the expected size.

    ``update(clipped_sum, state)`` returns :func:`privatize_sum`,
    ``(clipped_sum + N(0, (sigma S)^2 I)) / L``, with
    ``S = sensitivity(clip_norm, relation=relation)`` (``C`` for add/remove one unit), ``sigma``
    the noise multiplier and ``L`` the expected batch size (Abadi et al. 2016). The input must be
    the *sum* from :func:`fedjax_med.privacy.clipping.clipped_grad_sum` (or the per-unit variant)
    with nothing rescaled in between; chain an optimizer after it, e.g.
    ``optax.chain(dp_aggregate(...), optax.sgd(lr))``.

    Args:
      noise_multiplier: ``sigma >= 0``; 0 adds no noise and gives no privacy (for tests and
        non-private baselines).
      clip_norm: the clipping norm ``C`` used for the sum.
      expected_batch_size: ``L = q N`` (or ``q`` times the number of units), a public constant
        ``> 0``; never the realised batch size, which is private (see the module docstring).
      seed_or_key: a key from :func:`make_noise_key`, or an int seed (reproducible mode).
      relation: neighbouring relation for the sensitivity, ``"add_or_remove_one"`` (Poisson
        sampling) or ``"replace_one"`` (fixed-size batches).

    Returns:
      An optax ``GradientTransformation`` with state :class:`DpAggregateState`.

    Guarantees:
      Each update is the Gaussian mechanism with standard deviation ``sigma * S`` applied to a
      sum of sensitivity ``S``, followed by post-processing; the privacy of the whole run is what
      :func:`fedjax_med.privacy.accounting.dpsgd_event` describes, provided the batches were
      sampled as that event says.

    Examples:
      >>> tx = dp_aggregate(0.0, 1.0, expected_batch_size=4.0, seed_or_key=0)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> update, state = tx.update({"w": jnp.array([2.0, 4.0])}, state)
      >>> update["w"], int(state.count)
      (Array([0.5, 1. ], dtype=float32), 1)
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"{noise_multiplier=} must be finite and >= 0")
    if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
        raise ValueError(f"{expected_batch_size=} must be finite and > 0")
    sensitivity = clipping.sensitivity(clip_norm, relation=relation)
    if noise_multiplier > 0 and not math.isfinite(sensitivity):
        raise ValueError(f"{clip_norm=} must be finite when noise_multiplier > 0")
    key = _as_key(seed_or_key)

    def init_fn(params):
        del params
        return DpAggregateState(count=jnp.zeros([], jnp.int32), rng_key=key)

    def update_fn(updates, state, params=None):
        del params
        next_key, noise_key = jax.random.split(state.rng_key)
        updates = privatize_sum(
            updates, noise_key, noise_multiplier, sensitivity, expected_batch_size
        )
        return updates, DpAggregateState(count=state.count + 1, rng_key=next_key)

    return optax.GradientTransformation(init_fn, update_fn)
