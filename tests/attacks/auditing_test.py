"""Tests for DP auditing: Clopper-Pearson, epsilon lower bounds and the gradient-canary audit."""

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import pld

from fedjax_med.attacks import auditing

DELTA = 1e-5


def _accountant_epsilon(noise_multiplier):
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    return accountant.get_epsilon(DELTA)


def test_clopper_pearson_covers_true_rate():
    rng = np.random.default_rng(0)
    n, p, reps = 50, 0.1, 2000
    k = rng.binomial(n, p, size=reps)
    lo, hi = auditing.clopper_pearson(k, n, 0.05)
    coverage = np.mean((lo <= p) & (p <= hi))
    assert coverage >= 0.95  # exact intervals are conservative
    assert np.all(lo <= k / n) and np.all(k / n <= hi)


def test_clopper_pearson_edges_and_errors():
    lo, hi = auditing.clopper_pearson(np.array([0, 10]), 10, 0.05)
    assert lo[0] == 0.0 and hi[1] == 1.0
    with pytest.raises(ValueError, match="alpha"):
        auditing.clopper_pearson(1, 10, 1.5)
    with pytest.raises(ValueError):
        auditing.clopper_pearson(11, 10)


def test_epsilon_lower_bound_properties():
    # Chance-level attack implies nothing.
    assert auditing.epsilon_lower_bound(500, 500, 1000, 1000, DELTA) == 0.0
    # More trials with the same perfect attack give a larger bound.
    small = auditing.epsilon_lower_bound(0, 0, 100, 100, DELTA)
    large = auditing.epsilon_lower_bound(0, 0, 10_000, 10_000, DELTA)
    assert 0 < small < large
    # Symmetric in the roles of FP and FN when the trial counts are equal.
    a = auditing.epsilon_lower_bound(3, 200, 1000, 1000, DELTA)
    b = auditing.epsilon_lower_bound(200, 3, 1000, 1000, DELTA)
    assert a == pytest.approx(b)
    # Without confidence correction the bound would be log((1 - 0.2) / 0.003) ~ 5.6.
    assert 0 < a < np.log(0.8 / 0.003)


def test_audit_from_scores_orientation():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(3, 1, 1000), rng.normal(0, 1, 1000)
    eps, threshold = auditing.audit_from_scores(pos, neg, DELTA)
    eps_flipped, _ = auditing.audit_from_scores(-pos, -neg, DELTA)
    assert eps > 1.0 and eps == pytest.approx(eps_flipped)
    assert 0 < threshold < 6
    assert auditing.audit_from_scores(neg[:500], neg[500:], DELTA)[0] < 0.5


def test_audit_correct_mechanism_stays_below_accountant():
    eps_theory = _accountant_epsilon(1.0)
    eps_lb = auditing.audit_gaussian_sum(1.0, 1.0, 2000, jax.random.key(0), "correct")
    print(f"correct: {eps_lb=:.3f} {eps_theory=:.3f}")
    assert 0 < eps_lb <= eps_theory


@pytest.mark.parametrize("mechanism", ["no_noise", "wrong_scale"])
def test_audit_detects_broken_mechanism(mechanism):
    eps_theory = _accountant_epsilon(1.0)
    eps_lb = auditing.audit_gaussian_sum(1.0, 1.0, 10_000, jax.random.key(0), mechanism)
    print(f"{mechanism}: {eps_lb=:.3f} {eps_theory=:.3f}")
    assert eps_lb > eps_theory + 2


def test_audit_rejects_unknown_mechanism():
    with pytest.raises(ValueError, match="mechanism"):
        auditing.audit_gaussian_sum(1.0, 1.0, 100, jax.random.key(0), "bogus")
