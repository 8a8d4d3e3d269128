"""The privacy cost of hyperparameter tuning with a random number of trials.

Papernot and Steinke, "Hyperparameter tuning with Renyi differential privacy", ICLR 2022
(https://arxiv.org/abs/2110.03620). Running ``K`` private trials and releasing only the best one
costs far less than ``K`` compositions *if* ``K`` is random. With ``K`` drawn from the truncated
negative binomial distribution ``D_{eta, gamma}`` (``eta > -1``, ``gamma in (0, 1)``),

    P[K = k] = (1 - gamma)^k / (gamma^-eta - 1) * prod_{l=0}^{k-1} (l + eta) / (l + 1),  k >= 1

(``eta = 0`` is the logarithmic distribution, ``P[K = k] = (1 - gamma)^k / (k log(1/gamma))``;
``eta = 1`` the geometric), their Theorem 2: if each trial is ``(lambda, eps)``-RDP and
``(lambda_hat, eps_hat)``-RDP, releasing the best of the ``K`` trials is ``(lambda, eps')``-RDP with

    eps' = eps + (1 + eta) (1 - 1 / lambda_hat) eps_hat + (1 + eta) log(1 / gamma) / lambda_hat
           + log(E[K]) / (lambda - 1),

    E[K] = eta (1 - gamma) / (gamma (1 - gamma^eta))   (eta != 0),
    E[K] = (1 / gamma - 1) / log(1 / gamma)            (eta = 0).

:func:`search_rdp` evaluates that bound at every order of the trial's RDP curve (from
``dp_accounting``'s RDP accountant, the same curve the trainer's ledger uses), minimising over
``lambda_hat`` among the same orders; :func:`search_epsilon` converts it to ``(epsilon, delta)``
with ``dp_accounting``'s conversion. The adversary sees the best trial's model and its score
(and the number of trials is not released); the unit and neighbouring relation are those of
each trial. Only ``eta >= 0`` can be sampled here (:func:`draw_num_trials`).

The paper's other choice, ``K ~ Poisson(mu)`` (``P[K = k] = e^-mu mu^k / k!``, ``k >= 0``; for
``K = 0`` nothing data-dependent is released), is their Theorem 6: if each trial is
``(lambda, eps)``-RDP and ``(eps_hat, delta_hat)``-DP with ``e^eps_hat <= 1 + 1 / (lambda - 1)``,
the best of the ``K`` trials is ``(lambda, eps')``-RDP with

    eps' = eps + mu delta_hat + log(mu) / (lambda - 1).

:func:`poisson_search_rdp` takes at each order ``lambda`` the largest allowed
``eps_hat = log(1 + 1 / (lambda - 1))`` and the trial's ``delta_hat`` at that ``eps_hat`` from
the same RDP curve (``dp_accounting``'s RDP-to-DP conversion), as the authors' own evaluation does
(``research/hyperparameters_2022`` of tensorflow/privacy). Only ``mu >= 1`` is accepted: for
``mu < 1`` the ``log(mu)`` term is negative and the bound of a trial that is 0-DP (``eps =
delta_hat = 0``) would fall below 0, which no Renyi divergence can; with ``mu >= 1`` every term
is ``>= 0``. It needs ``delta_hat`` small at small ``eps_hat``, so it is usually looser than the
truncated negative binomial at the same ``E[K]`` (the paper's Figure 7; tested).
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_med.privacy import accounting


def check_distribution(eta: float, gamma: float) -> None:
    """Raises ``ValueError`` naming the allowed ranges of ``eta`` and ``gamma``."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta={eta!r} must be a finite number >= 0")
    if not (0 < gamma < 1):
        raise ValueError(f"gamma={gamma!r} must be in (0, 1)")


def expected_trials(eta: float, gamma: float) -> float:
    """``E[K]`` of the truncated negative binomial ``D_{eta, gamma}``.

    Examples:
      >>> round(expected_trials(1.0, 0.1), 6)  # geometric: 1 / gamma
      10.0
    """
    check_distribution(eta, gamma)
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def draw_num_trials(rng: np.random.Generator, eta: float, gamma: float) -> int:
    """One draw of ``K ~ D_{eta, gamma}`` (numpy's negative binomial, or logarithmic series at
    ``eta = 0``, conditioned on ``K >= 1``)."""
    check_distribution(eta, gamma)
    if eta == 0:
        return int(rng.logseries(1 - gamma))
    while True:
        k = int(rng.negative_binomial(eta, gamma))
        if k >= 1:
            return k


def check_poisson(mu: float) -> None:
    """Raises ``ValueError`` unless ``mu`` is a finite number ``>= 1`` (see module docstring)."""
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 1):
        raise ValueError(
            f"mu={mu!r} (the mean number of Poisson trials) must be a finite number >= 1"
        )


def draw_poisson_trials(rng: np.random.Generator, mu: float) -> int:
    """One draw of ``K ~ Poisson(mu)`` (may be 0: then no trial runs and nothing is released)."""
    check_poisson(mu)
    return int(rng.poisson(mu))


def trial_rdp(event: dp_accounting.DpEvent) -> tuple[np.ndarray, np.ndarray]:
    """The orders and RDP values of one trial's event (``dp_accounting``'s RDP accountant)."""
    accountant = accounting.make_accountant("rdp")
    accountant.compose(event)
    return np.asarray(accountant.orders, float), np.asarray(accountant.rdp, float)


def search_rdp(orders, rdp, eta: float, gamma: float) -> np.ndarray:
    """Theorem 2's ``eps'(lambda)`` at each of ``orders`` (see module docstring)."""
    check_distribution(eta, gamma)
    orders, rdp = np.asarray(orders, float), np.asarray(rdp, float)
    if orders.shape != rdp.shape or np.any(orders <= 1):
        raise ValueError("orders must be > 1, one per RDP value")
    hat = (1 + eta) * (1 - 1 / orders) * rdp + (1 + eta) * math.log(1 / gamma) / orders
    return rdp + np.min(hat) + math.log(expected_trials(eta, gamma)) / (orders - 1)


def search_epsilon(event: dp_accounting.DpEvent, delta: float, eta: float, gamma: float) -> float:
    """``epsilon`` at ``delta`` of releasing the best of ``K ~ D_{eta, gamma}`` trials of
    ``event``."""
    accounting.check_delta(delta)
    orders, rdp = trial_rdp(event)
    eps, _ = rdp_privacy_accountant.compute_epsilon(
        orders, search_rdp(orders, rdp, eta, gamma), delta
    )
    return float(eps)


def poisson_search_rdp(orders, rdp, mu: float) -> np.ndarray:
    """Theorem 6's ``eps'(lambda)`` at each of ``orders`` for ``K ~ Poisson(mu)``.

    ``delta_hat(lambda)`` is the trial's ``delta`` at ``eps_hat = log(1 + 1 / (lambda - 1))``,
    converted from its whole RDP curve ``(orders, rdp)``.

    Examples:
      >>> orders = np.array([2.0, 8.0, 32.0])
      >>> np.round(poisson_search_rdp(orders, 0 * orders, 1.0), 6)  # a 0-DP trial, mu = 1
      array([0., 0., 0.])
    """
    check_poisson(mu)
    orders, rdp = np.asarray(orders, float), np.asarray(rdp, float)
    if orders.shape != rdp.shape or np.any(orders <= 1):
        raise ValueError("orders must be > 1, one per RDP value")
    delta_hat = np.array(
        [
            rdp_privacy_accountant.compute_delta(orders, rdp, math.log1p(1 / (lam - 1)))[0]
            for lam in orders
        ]
    )
    return rdp + mu * delta_hat + math.log(mu) / (orders - 1)


def poisson_search_epsilon(event: dp_accounting.DpEvent, delta: float, mu: float) -> float:
    """``epsilon`` at ``delta`` of releasing the best of ``K ~ Poisson(mu)`` trials of ``event``."""
    accounting.check_delta(delta)
    orders, rdp = trial_rdp(event)
    eps, _ = rdp_privacy_accountant.compute_epsilon(
        orders, poisson_search_rdp(orders, rdp, mu), delta
    )
    return float(eps)
