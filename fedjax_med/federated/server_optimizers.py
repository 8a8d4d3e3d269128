"""Server optimizers as optax transformations of the pseudo-gradient ``-Delta_t``.

The server treats the negative averaged client delta as a gradient (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295). Their Algorithm 2, with
``Delta_t`` the averaged delta, ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the algorithm asks
``v_{-1} >= tau^2``)::

    m_t = b1 m_{t-1} + (1 - b1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                  (FedAdagrad)
    v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2) (FedYogi)
    v_t = b2 v_{t-1} + (1 - b2) Delta_t^2                      (FedAdam)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

There is no bias correction, and ``tau`` sits outside the square root; both differ from
``optax.adam`` / ``optax.yogi`` / ``optax.adagrad``, hence the transformations here. Fed on the
pseudo-gradient ``g = -Delta_t`` they keep ``m`` with the opposite sign and ``v`` unchanged, so
``-eta m(g) / (sqrt(v) + tau)`` is the paper's step.

FedAvg is ``optax.sgd(1.0)`` (``x + Delta_t``); FedAvgM (Hsu, Qi, Brown 2019,
https://arxiv.org/abs/1909.06335) is ``optax.sgd(eta, momentum=beta)``: ``v <- beta v + g``,
``x <- x - eta v``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

KINDS = ("adagrad", "yogi", "adam")


class ScaleByFedOptState(NamedTuple):
    """First moment ``m`` and second moment ``v`` of Reddi et al.'s Algorithm 2."""

    m: Any
    v: Any


def scale_by_fedopt(
    kind: str, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3, initial_v: float | None = None
) -> optax.GradientTransformation:
    """Rescales the pseudo-gradient to ``m_t / (sqrt(v_t) + tau)`` (Reddi et al. Algorithm 2).

    Args:
      kind: ``"adagrad"``, ``"yogi"`` or ``"adam"`` (the rule for ``v_t``, module docstring).
      b1: first-moment decay ``beta_1``.
      b2: second-moment decay ``beta_2`` (unused by ``"adagrad"``).
      tau: adaptivity ``tau`` (the paper's epsilon), > 0.
      initial_v: ``v_{-1}``; ``None`` = ``tau^2``, the smallest value the paper allows.

    Returns:
      An optax transformation; chain it with ``optax.scale(-eta)``.
    """
    if kind not in KINDS:
        raise ValueError(f"{kind=} must be one of {KINDS}")
    if not tau > 0:
        raise ValueError(f"{tau=} must be > 0")
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"{b1=} and {b2=} must lie in [0, 1)")
    v0 = tau**2 if initial_v is None else float(initial_v)

    def init_fn(params):
        return ScaleByFedOptState(
            m=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(lambda p: jnp.full_like(p, v0), params),
        )

    def update_v(v, g2):
        if kind == "adagrad":
            return v + g2
        if kind == "yogi":
            return v - (1 - b2) * g2 * jnp.sign(v - g2)
        return b2 * v + (1 - b2) * g2

    def update_fn(updates, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
        v = jax.tree.map(lambda v, g: update_v(v, jnp.square(g)), state.v, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
        return out, ScaleByFedOptState(m=m, v=v)

    return optax.GradientTransformation(init_fn, update_fn)


def fedadagrad(
    learning_rate: float, b1: float = 0.9, tau: float = 1e-3, initial_v: float | None = None
) -> optax.GradientTransformation:
    """FedAdagrad's server step (Reddi et al. 2021, Algorithm 2)."""
    return optax.chain(
        scale_by_fedopt("adagrad", b1, 0.0, tau, initial_v), optax.scale(-learning_rate)
    )


def fedyogi(
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    initial_v: float | None = None,
) -> optax.GradientTransformation:
    """FedYogi's server step (Reddi et al. 2021, Algorithm 2)."""
    return optax.chain(scale_by_fedopt("yogi", b1, b2, tau, initial_v), optax.scale(-learning_rate))


def fedadam(
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    initial_v: float | None = None,
) -> optax.GradientTransformation:
    """FedAdam's server step (Reddi et al. 2021, Algorithm 2).

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = fedadam(learning_rate=1.0, b1=0.0, b2=0.0, tau=1e-3)
      >>> step, _ = tx.update(jnp.array([-2.0]), tx.init(jnp.zeros(1)))  # Delta = 2
      >>> [round(float(s), 4) for s in step]  # Delta / (|Delta| + tau)
      [0.9995]
    """
    return optax.chain(scale_by_fedopt("adam", b1, b2, tau, initial_v), optax.scale(-learning_rate))


def fedavg(learning_rate: float = 1.0) -> optax.GradientTransformation:
    """FedAvg's server step ``x + eta Delta_t`` (``eta = 1`` in McMahan et al. 2017)."""
    return optax.sgd(learning_rate)


def fedavgm(learning_rate: float = 1.0, momentum: float = 0.9) -> optax.GradientTransformation:
    """FedAvgM's server step: SGD with momentum on ``-Delta_t`` (Hsu et al. 2019)."""
    return optax.sgd(learning_rate, momentum=momentum)
