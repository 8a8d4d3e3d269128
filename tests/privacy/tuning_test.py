"""Tuning's privacy cost: Papernot & Steinke 2022, Theorem 2, against its formula computed
directly for the Gaussian mechanism (RDP lambda / (2 sigma^2))."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import special, stats

from fedjax_med.privacy import tuning

SIGMA = 2.0


def _pmf(k, eta, gamma):
    """P[K = k] of the truncated negative binomial, from the paper's definition."""
    if eta == 0:
        return (1 - gamma) ** k / (k * math.log(1 / gamma))
    log_prod = special.gammaln(k + eta) - special.gammaln(eta) - special.gammaln(k + 1)
    return (1 - gamma) ** k * np.exp(log_prod) / (gamma**-eta - 1)


@pytest.mark.parametrize(("eta", "gamma"), [(0.0, 0.1), (1.0, 0.2), (0.5, 0.05)])
def test_expected_trials_and_draws_follow_the_distribution(eta, gamma):
    k = np.arange(1, 4000)
    pmf = _pmf(k, eta, gamma)
    assert pmf.sum() == pytest.approx(1.0, rel=1e-9)
    assert tuning.expected_trials(eta, gamma) == pytest.approx(float((k * pmf).sum()), rel=1e-9)
    rng = np.random.default_rng(0)
    draws = np.array([tuning.draw_num_trials(rng, eta, gamma) for _ in range(4000)])
    assert draws.min() >= 1
    counts = np.bincount(draws, minlength=4)[1:4] / draws.size
    np.testing.assert_allclose(counts, pmf[:3], atol=0.03)


@pytest.mark.parametrize(("eta", "gamma"), [(0.0, 0.1), (1.0, 0.05)])
def test_search_rdp_is_theorem_2_for_the_gaussian_mechanism(eta, gamma):
    orders, rdp = tuning.trial_rdp(dp_accounting.GaussianDpEvent(SIGMA))
    np.testing.assert_allclose(rdp, orders / (2 * SIGMA**2), rtol=1e-9)
    bound = tuning.search_rdp(orders, rdp, eta, gamma)
    # The paper's formula, minimised over a fine grid of lambda_hat in [1, 100] (closed form).
    lam_hat = np.linspace(1.0, 100.0, 200_001)
    inner = (1 + eta) * ((lam_hat - 1) / (2 * SIGMA**2) + math.log(1 / gamma) / lam_hat)
    log_ek = math.log(tuning.expected_trials(eta, gamma))
    direct = orders / (2 * SIGMA**2) + inner.min() + log_ek / (orders - 1)
    assert np.all(bound >= direct - 1e-9)  # the orders grid is coarser than the fine grid
    np.testing.assert_allclose(bound, direct, rtol=0.02)


def test_search_costs_more_than_one_trial_and_less_than_composing_e_k():
    event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0))
    event = dp_accounting.SelfComposedDpEvent(event, 200)
    one = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    search = tuning.search_epsilon(event, 1e-5, eta=1.0, gamma=0.1)  # E[K] = 10 trials
    composed = dp_accounting.rdp.RdpAccountant().compose(event, 10).get_epsilon(1e-5)
    assert one < search < composed


def test_bad_distribution_names_the_range():
    with pytest.raises(ValueError, match=r"gamma=1.5 must be in \(0, 1\)"):
        tuning.expected_trials(1.0, 1.5)
    with pytest.raises(ValueError, match="eta=-0.5 must be a finite number >= 0"):
        tuning.draw_num_trials(np.random.default_rng(0), -0.5, 0.1)


def _gaussian_delta(eps, sigma):
    """The exact delta(eps) of the Gaussian mechanism of noise multiplier sigma (Balle & Wang,
    ICML 2018, Theorem 8)."""
    a, b = 1 / (2 * sigma), eps * sigma
    return stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b)


@pytest.mark.parametrize("mu", [1.0, 5.0, 30.0])
def test_poisson_search_rdp_is_theorem_6_for_the_gaussian_mechanism(mu):
    orders, rdp = tuning.trial_rdp(dp_accounting.GaussianDpEvent(SIGMA))
    bound = tuning.poisson_search_rdp(orders, rdp, mu)
    eps_hat = np.log1p(1 / (orders - 1))  # the largest eps_hat with e^eps_hat <= 1 + 1/(l - 1)
    exact = np.array([_gaussian_delta(e, SIGMA) for e in eps_hat])
    # Theorem 6 with the tightest delta_hat: the bound may only be looser (RDP-to-DP conversion).
    direct = orders / (2 * SIGMA**2) + mu * exact + np.log(mu) / (orders - 1)
    assert np.all(bound >= direct - 1e-12)
    # Its delta_hat term is mu times one delta_hat per order, the same for every mu.
    delta_hat = (bound - rdp - np.log(mu) / (orders - 1)) / mu
    one = tuning.poisson_search_rdp(orders, rdp, 1.0) - rdp
    np.testing.assert_allclose(delta_hat, one, rtol=1e-9, atol=1e-15)
    assert np.all(delta_hat >= exact - 1e-12) and np.all(delta_hat <= 1)


def test_poisson_search_costs_more_than_one_trial_and_less_than_composing_mu():
    event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0))
    event = dp_accounting.SelfComposedDpEvent(event, 200)
    one = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    poisson = tuning.poisson_search_epsilon(event, 1e-5, mu=10.0)
    composed = dp_accounting.rdp.RdpAccountant().compose(event, 10).get_epsilon(1e-5)
    assert one < poisson < composed
    # The paper's Figure 7: at the same E[K] the truncated negative binomial is cheaper.
    assert tuning.search_epsilon(event, 1e-5, eta=1.0, gamma=0.1) < poisson


def test_poisson_draws_and_range():
    rng = np.random.default_rng(0)
    draws = np.array([tuning.draw_poisson_trials(rng, 3.0) for _ in range(4000)])
    counts = np.bincount(draws, minlength=3)[:3] / draws.size
    np.testing.assert_allclose(counts, stats.poisson.pmf([0, 1, 2], 3.0), atol=0.03)
    for mu in (0.5, float("inf")):
        with pytest.raises(ValueError, match="mean number of Poisson trials\\) must be a finite"):
            tuning.poisson_search_rdp([2.0], [0.1], mu)
