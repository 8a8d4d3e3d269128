"""Combine a cohort's client updates: weighted and uniform means, clipping, screening, dropout.

Every function takes stacked updates, a pytree whose leaves have a leading client axis ``C``, and
a ``(C,)`` weight or mask; padding and excluded clients have weight zero and never contribute,
even when their update holds NaN (they are selected away with ``where``, never multiplied by 0).

* Example-weighted mean (FedAvg, McMahan et al. 2017, https://arxiv.org/abs/1602.05629):
  ``sum_k n_k delta_k / sum_k n_k``.
* Uniform mean (SCAFFOLD, FedOpt's Algorithm 2): ``sum_k delta_k / |S|``.
* Update clipping (DP-FedAvg, McMahan et al. 2018, https://arxiv.org/abs/1710.06963):
  ``delta * min(1, S / ||delta||_2)``.
* Screening: a client whose update is non-finite or has norm above ``max_update_norm`` is
  excluded from the round and counted.
* Dropout: each sampled client fails to report with probability ``p``, independently per round.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_med.privacy import clipping

Params = Any


def _expand(per_client: jax.Array, leaf: jax.Array) -> jax.Array:
    """Reshapes a ``(C,)`` vector to broadcast against a ``(C, ...)`` leaf."""
    return per_client.reshape(per_client.shape + (1,) * (leaf.ndim - 1))


def masked_sum(updates: Params, weights: jax.Array) -> Params:
    """``sum_k w_k u_k`` over the client axis, taking clients with ``w_k == 0`` as absent.

    Args:
      updates: stacked updates, leading axis ``C``.
      weights: ``(C,)`` weights; bool masks are taken as 0/1.
    """
    weights = jnp.asarray(weights, jnp.float32)

    def leaf_sum(x):
        w = _expand(weights, x)
        return jnp.sum(jnp.where(w != 0, w * x, 0.0), axis=0)

    return jax.tree.map(leaf_sum, updates)


def weighted_mean(updates: Params, weights: jax.Array) -> Params:
    """``sum_k w_k u_k / sum_k w_k``; zeros when every weight is zero.

    Args:
      updates: stacked updates, leading axis ``C``.
      weights: ``(C,)`` non-negative weights, e.g. ``num_examples * included``.

    Examples:
      >>> import jax.numpy as jnp
      >>> weighted_mean(jnp.array([[1.0], [4.0], [jnp.nan]]), jnp.array([3.0, 1.0, 0.0])).tolist()
      [1.75]
    """
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(weights)
    summed = masked_sum(updates, weights)
    return jax.tree.map(
        lambda s: jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 0.0), summed
    )


def uniform_mean(updates: Params, mask: jax.Array) -> Params:
    """``sum_{k in mask} u_k / |mask|``; zeros for an empty mask.

    Examples:
      >>> import jax.numpy as jnp
      >>> uniform_mean(jnp.array([[1.0], [4.0], [9.0]]), jnp.array([True, True, False])).tolist()
      [2.5]
    """
    return weighted_mean(updates, jnp.asarray(mask, jnp.float32))


def clip_update(update: Params, clip_norm: jax.Array | float) -> Params:
    """One client's update scaled to L2 norm at most ``clip_norm``: ``u * min(1, S / ||u||)``.

    A zero update stays zero; ``clip_norm = inf`` leaves the update unchanged. This is
    :func:`clip_updates` of a cohort of one.

    Examples:
      >>> import jax.numpy as jnp
      >>> clip_update({"w": jnp.array([3.0, 4.0])}, 1.0)["w"].tolist()
      [0.6000000238418579, 0.800000011920929]
    """
    clipped = clip_updates(jax.tree.map(lambda x: jnp.asarray(x)[None], update), clip_norm)
    return jax.tree.map(lambda x: x[0], clipped)


def clip_updates(updates: Params, clip_norm: jax.Array | float) -> Params:
    """Each client's update of stacked ``updates`` clipped to L2 norm at most ``clip_norm``.

    DP-FedAvg's update clipping (McMahan et al. 2018, arXiv:1710.06963) is per-example clipping
    with clients as the examples, so it is :func:`fedjax_med.privacy.clipping.clip_per_example`
    (one clip implementation, one epsilon in the norm's denominator).
    """
    clipped, _ = clipping.clip_per_example(updates, clip_norm)
    return clipped


def screen(
    updates: Params, mask: jax.Array, max_update_norm: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Excludes clients whose update is non-finite or, if given, has norm > ``max_update_norm``.

    Args:
      updates: stacked updates, leading axis ``C``.
      mask: ``(C,)`` bool, clients currently included.
      max_update_norm: largest plausible update norm; ``None`` checks finiteness only.

    Returns:
      ``(kept, num_excluded)``: the ``(C,)`` mask of clients still included and the number of
      included clients that were excluded here (int32).

    Examples:
      >>> import jax.numpy as jnp
      >>> u = jnp.array([[1.0], [jnp.nan], [100.0], [2.0]])
      >>> kept, excluded = screen(u, jnp.array([True, True, True, False]), max_update_norm=10.0)
      >>> kept.tolist(), int(excluded)
      ([True, False, False, False], 2)
    """
    mask = jnp.asarray(mask, bool)
    norms = clipping.global_norms(updates)
    valid = jnp.isfinite(norms)  # a NaN or inf anywhere makes the norm non-finite
    if max_update_norm is not None:
        valid = valid & (norms <= max_update_norm)
    kept = mask & valid
    return kept, jnp.sum(mask & ~valid).astype(jnp.int32)


def dropout(key: jax.Array, mask: jax.Array, rate: float) -> tuple[jax.Array, jax.Array]:
    """Each included client independently drops out with probability ``rate``.

    Args:
      key: PRNG key of this round's dropout.
      mask: ``(C,)`` bool, clients sampled this round.
      rate: drop probability ``p`` in ``[0, 1]``.

    Returns:
      ``(reporting, num_dropped)``: clients that report, and how many sampled clients dropped.
    """
    mask = jnp.asarray(mask, bool)
    if rate == 0:
        return mask, jnp.zeros((), jnp.int32)
    drops = jax.random.bernoulli(key, rate, mask.shape)
    return mask & ~drops, jnp.sum(mask & drops).astype(jnp.int32)
