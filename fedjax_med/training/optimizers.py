"""Optax optimizers and learning-rate schedules built from ``config.optimizer``."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Constant or cosine-decayed learning rate, with optional linear warmup.

    The warmup rises linearly from 0 to ``learning_rate`` over ``warmup_steps``; the cosine decay
    then spans the remaining ``total_steps - warmup_steps``.

    Raises:
      ValueError: ``optimizer.schedule=... must be 'constant' or 'cosine'``.
    """
    peak = config.learning_rate
    warmup = config.warmup_steps
    if config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
    else:
        raise ValueError(f"optimizer.schedule={config.schedule!r} must be 'constant' or 'cosine'")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """The optimizer named by ``config.name`` with the configured schedule.

    ``weight_decay > 0`` adds decayed weights before ``sgd``, ``momentum`` and ``adam``; ``adamw``
    applies it decoupled (Loshchilov and Hutter, ICLR 2019, https://arxiv.org/abs/1711.05101).

    Raises:
      ValueError: if ``config.name`` is not ``sgd``, ``momentum``, ``adam`` or ``adamw``, or the
        schedule is unknown.
    """
    lr = learning_rate_schedule(config, total_steps)
    if config.name == "sgd":
        tx = optax.sgd(lr)
    elif config.name == "momentum":
        tx = optax.sgd(lr, momentum=config.momentum)
    elif config.name == "adam":
        tx = optax.adam(lr)
    elif config.name == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(
            f"optimizer.name={config.name!r} must be one of 'sgd', 'momentum', 'adam', 'adamw'"
        )
    if config.weight_decay > 0:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx
