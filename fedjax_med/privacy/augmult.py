"""Augmentation multiplicity: each example's gradient is the mean over K augmented views of it.

De et al. 2022 ("Unlocking high-accuracy differentially private image classification through
scale", https://arxiv.org/abs/2204.13650, Section 3.1, following Fort et al. 2021) replace the
per-example gradient of DP-SGD by

    g_i = (1 / K) sum_{k=1..K} grad loss(params, A(image_i; xi_ik), label_i)

with ``A`` a random augmentation and ``xi_ik`` its randomness, and clip ``g_i`` *once*. One
example still contributes a single vector of norm ``<= C``, so the sensitivity of the clipped sum,
and hence the privacy accounting, is that of K = 1: K buys accuracy with compute, not privacy.

:func:`augmult_loss_fn` builds that mean as a single-example loss (by linearity of the gradient,
the gradient of the mean loss over the K views is the mean of their gradients), vmapped over the
views inside the per-example function, so it plugs into
:func:`fedjax_med.privacy.clipping.clipped_grad_sum` (and the unit-level variant) unchanged. Its
``inputs`` are ``(image, key)`` pairs; :func:`example_keys` derives each example's key from the
run's augmentation key, the step and the example's index. Augmentations are public,
data-independent randomness: the guarantee does not rely on them being secret.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_med.privacy import per_example

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]  # (key, image) -> image


def augmult_loss_fn(
    loss_fn: per_example.LossFn, augment_fn: AugmentFn, multiplicity: int
) -> per_example.LossFn:
    """``loss(params, (image, key), label) = mean_k loss_fn(params, augment_fn(key_k, image),
    label)`` with ``key_1..key_K = split(key, K)``.

    Args:
      loss_fn: loss of one example, ``loss_fn(params, image, label) -> scalar``.
      augment_fn: ``(key, image) -> image``, one random view.
      multiplicity: ``K >= 1``.

    Raises:
      ValueError: ``privacy.augmult=... must be an integer >= 1``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w, x, y: jnp.sum(w * x)
      >>> fn = augmult_loss_fn(loss, lambda key, x: x, 3)  # identical views: the plain loss
      >>> float(fn(jnp.ones(2), (jnp.ones(2), jax.random.key(0)), 0.0))
      2.0
    """
    if isinstance(multiplicity, bool) or not isinstance(multiplicity, int) or multiplicity < 1:
        raise ValueError(f"privacy.augmult={multiplicity!r} must be an integer >= 1")

    def loss(params: Any, inputs: tuple[jax.Array, jax.Array], label: Any) -> jax.Array:
        image, key = inputs
        views = jax.vmap(augment_fn, in_axes=(0, None))(jax.random.split(key, multiplicity), image)
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, None))(params, views, label))

    return loss


def example_keys(key: jax.Array, step: jax.Array, indices: jax.Array) -> jax.Array:
    """``fold_in(fold_in(key, step), index)`` for every example index of a batch."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(indices)
