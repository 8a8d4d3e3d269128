"""Averages of the parameter iterates, kept beside the optimizer: EMA and Polyak averaging.

Polyak & Juditsky (SIAM J. Control Optim. 1992) average the iterates of SGD; De et al. 2022
("Unlocking high-accuracy differentially private image classification through scale",
https://arxiv.org/abs/2204.13650, Section 3.1) evaluate an exponential moving average (EMA) of
the DP-SGD parameters. Both are functions of the released iterates only, so under DP they are
post-processing: they cost no privacy and leave the ledger unchanged.

:func:`parameter_averages` is an optax transformation placed *last* in the optimizer chain: it
passes the updates through unchanged (the raw trajectory is bit-identical with or without it) and
keeps, in its state, with ``theta_t`` the parameters after step ``t``:

* EMA: ``e_t = d_t e_{t-1} + (1 - d_t) theta_t``, ``e_0 = theta_0``, with the warm-up
  ``d_t = min(d, (1 + t) / (10 + t))`` (the ``num_updates`` rule of TensorFlow's
  ``ExponentialMovingAverage``) so that early averages are not dominated by the initialisation;
* Polyak: ``p_t = mean(theta_{s+1}, ..., theta_t)`` for ``t > s`` (``s = polyak_start``), and
  ``p_t = theta_t`` before.

Being in the optimizer state, the averages are checkpointed and resume exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class AveragesState(NamedTuple):
    """Steps seen and the averages (``()`` for an average that is off)."""

    count: jax.Array
    ema: PyTree
    polyak: PyTree


def parameter_averages(
    ema_decay: float = 0.0, polyak_start: int = -1
) -> optax.GradientTransformation:
    """EMA (``ema_decay`` in ``(0, 1)``; 0 = off) and Polyak (``polyak_start >= 0``; -1 = off)
    averages of the parameters (see the module docstring); the updates pass unchanged.

    Raises:
      ValueError: ``train.ema_decay`` outside ``[0, 1)`` or ``train.polyak_start < -1``.
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={ema_decay} must be in [0, 1) (0 = off)")
    if polyak_start < -1:
        raise ValueError(f"train.polyak_start={polyak_start} must be >= -1 (-1 = off)")

    def init(params):
        copy = lambda: jax.tree.map(jnp.asarray, params)  # noqa: E731
        return AveragesState(
            count=jnp.zeros((), jnp.int32),
            ema=copy() if ema_decay > 0 else (),
            polyak=copy() if polyak_start >= 0 else (),
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("parameter_averages needs the parameters: update(..., params)")
        new = optax.apply_updates(params, updates)
        t = state.count + 1
        ema, polyak = state.ema, state.polyak
        if ema_decay > 0:
            tf = t.astype(jnp.float32)
            d = jnp.minimum(ema_decay, (1.0 + tf) / (10.0 + tf))
            ema = jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(p.dtype), ema, new)
        if polyak_start >= 0:
            n = jnp.maximum(t - polyak_start, 1).astype(jnp.float32)
            polyak = jax.tree.map(
                lambda a, p: jnp.where(t > polyak_start, a + (p - a) / n, p).astype(p.dtype),
                polyak,
                new,
            )
        return updates, AveragesState(count=t, ema=ema, polyak=polyak)

    return optax.GradientTransformation(init, update)


def with_averages(
    optimizer: optax.GradientTransformation, ema_decay: float, polyak_start: int
) -> optax.GradientTransformation:
    """``optimizer`` followed by :func:`parameter_averages` (``optimizer`` itself if both off)."""
    if ema_decay == 0 and polyak_start < 0:
        return optimizer
    return optax.chain(optimizer, parameter_averages(ema_decay, polyak_start))


def averaged_params(opt_state: PyTree) -> dict[str, PyTree]:
    """``{"ema": ..., "polyak": ...}``: the averages held in ``opt_state`` (only those on)."""
    states = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AveragesState))
        if isinstance(s, AveragesState)
    ]
    if not states:
        return {}
    (state,) = states
    pairs = (("ema", state.ema), ("polyak", state.polyak))
    return {name: value for name, value in pairs if not isinstance(value, tuple)}
