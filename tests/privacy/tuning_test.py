"""Tuning's privacy cost: Papernot & Steinke 2022, Theorem 2, against its formula computed
directly for the Gaussian mechanism (RDP lambda / (2 sigma^2))."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import special

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
