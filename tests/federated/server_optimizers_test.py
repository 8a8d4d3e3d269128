"""Reddi et al. Algorithm 2 server steps, checked against the formulas written out in NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.federated import server_optimizers


def reddi_steps(kind, deltas, eta, b1, b2, tau):
    """x_{t+1} - x_t for each Delta_t, straight from the paper (m_{-1} = 0, v_{-1} = tau^2)."""
    m = np.zeros_like(deltas[0])
    v = np.full_like(deltas[0], tau**2)
    steps = []
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "adagrad":
            v = v + d**2
        elif kind == "yogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = b2 * v + (1 - b2) * d**2
        steps.append(eta * m / (np.sqrt(v) + tau))
    return steps


@pytest.mark.parametrize("kind", ["adagrad", "yogi", "adam"])
def test_fedopt_transforms_follow_algorithm_two(kind):
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=5).astype(np.float64) * s for s in (1.0, 0.1, 3.0, 0.01)]
    eta, b1, b2, tau = 0.3, 0.9, 0.99, 1e-2
    tx = {
        "adagrad": lambda: server_optimizers.fedadagrad(eta, b1, tau),
        "yogi": lambda: server_optimizers.fedyogi(eta, b1, b2, tau),
        "adam": lambda: server_optimizers.fedadam(eta, b1, b2, tau),
    }[kind]()
    state = tx.init(jnp.zeros(5))
    for d, expected in zip(deltas, reddi_steps(kind, deltas, eta, b1, b2, tau), strict=True):
        step, state = tx.update(-jnp.asarray(d, jnp.float32), state)  # pseudo-gradient -Delta
        np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-7)


def test_fedavgm_is_server_momentum():
    tx = server_optimizers.fedavgm(learning_rate=0.5, momentum=0.9)
    state = tx.init(jnp.zeros(2))
    v = np.zeros(2)
    for d in (np.array([1.0, -2.0]), np.array([0.5, 0.5])):
        step, state = tx.update(-jnp.asarray(d), state)
        v = 0.9 * v - d  # v <- beta v + g with g = -Delta
        np.testing.assert_allclose(step, -0.5 * v, rtol=1e-6)


def test_argument_checks():
    with pytest.raises(ValueError, match="tau"):
        server_optimizers.scale_by_fedopt("adam", tau=0.0)
    with pytest.raises(ValueError, match="kind"):
        server_optimizers.scale_by_fedopt("sgd")
