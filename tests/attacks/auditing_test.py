"""DP auditing statistics: Clopper-Pearson, epsilon lower bounds from counts and from scores."""

import numpy as np
import pytest

from fedjax_med.attacks import auditing

DELTA = 1e-5


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


def test_audit_scores_separation_and_orientation():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(3, 1, 1000), rng.normal(0, 1, 1000)
    eps = auditing.audit_scores(pos, neg, DELTA)
    assert eps > 1.0
    # Higher scores mean IN: with the orientation reversed the attack shows nothing.
    assert auditing.audit_scores(-pos, -neg, DELTA) == 0.0
    assert auditing.audit_scores(pos, neg, DELTA, one_sided=False) > 1.0
    assert auditing.audit_scores(neg[:500], neg[500:], DELTA) < 0.5
    assert auditing.audit_scores(pos, neg, DELTA, threshold="bonferroni") > 1.0


def test_counts_bound_equals_jax_privacy_at_a_fixed_threshold():
    """Our epsilon_lower_bound and jax_privacy's auditor are the same statistic."""
    from jax_privacy import auditing as jp_auditing

    rng = np.random.default_rng(1)
    for _ in range(5):
        pos, neg = rng.normal(2, 1, 400), rng.normal(0, 1, 300)
        t = float(rng.uniform(0.5, 2.5))
        fn, fp = int(np.sum(pos < t)), int(np.sum(neg >= t))
        ours = float(auditing.epsilon_lower_bound(fp, fn, neg.size, pos.size, DELTA, 0.95))
        theirs = jp_auditing.CanaryScoreAuditor(pos, neg).epsilon_clopper_pearson(
            0.05, DELTA, one_sided=False, threshold_strategy=jp_auditing.Explicit(t)
        )
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_audit_scores_errors_name_the_argument():
    with pytest.raises(ValueError, match="threshold"):
        auditing.audit_scores(np.ones(4), np.zeros(4), DELTA, threshold="best")
    with pytest.raises(ValueError, match="confidence"):
        auditing.audit_scores(np.ones(4), np.zeros(4), DELTA, confidence=1.5)
    with pytest.raises(ValueError, match="trials"):
        auditing.audit_scores(np.ones(1), np.zeros(4), DELTA)
    with pytest.raises(ValueError, match="finite"):
        auditing.audit_scores(np.array([1.0, np.nan]), np.zeros(4), DELTA)
