"""Empirical lower bounds on epsilon from a distinguishing attack (DP auditing).

An ``(epsilon, delta)``-DP mechanism bounds every test that tells neighbouring inputs apart: its
false-positive and false-negative rates satisfy ``FPR + e^eps FNR >= 1 - delta`` and the same with
the two swapped, hence ``eps >= log((1 - delta - FNR) / FPR)`` (Jagielski, Ullman, Oprea,
NeurIPS 2020, https://arxiv.org/abs/2006.07709; Nasr et al., IEEE S&P 2021,
https://arxiv.org/abs/2101.04535). Rates measured on finitely many trials are replaced by their
Clopper-Pearson upper bounds, so the bound holds with the stated confidence.

:func:`audit_scores` turns an attack's scores into a bound with the statistics of
``jax_privacy.auditing`` (the DeepMind library), whose threshold strategies keep the confidence
honest; :func:`clopper_pearson` and :func:`epsilon_lower_bound` are the same statistic for
counts at a fixed threshold (the tests check the two agree). The canaries are in
:mod:`fedjax_med.attacks.canaries`, which audits the library's own DP-SGD and DP-FedAvg code.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def clopper_pearson(
    k: np.ndarray | int, n: np.ndarray | int, alpha: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided ``1 - alpha`` confidence interval for a binomial rate from ``k`` of ``n``.

    Examples:
      >>> lo, hi = clopper_pearson(0, 10, 0.05)
      >>> float(lo), round(float(hi), 4)
      (0.0, 0.3085)
    """
    if not 0 < alpha < 1:
        raise ValueError(f"{alpha=} must be in (0, 1)")
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= k <= n and n >= 1")
    with np.errstate(invalid="ignore"):
        lo = stats.beta.ppf(alpha / 2, k, n - k + 1)
        hi = stats.beta.ppf(1 - alpha / 2, k + 1, n - k)
    lo = np.where(k == 0, 0.0, lo)
    hi = np.where(k == n, 1.0, hi)
    return lo, hi


def epsilon_lower_bound(
    fp: np.ndarray | int,
    fn: np.ndarray | int,
    n_neg: int,
    n_pos: int,
    delta: float,
    confidence: float = 0.95,
) -> np.ndarray:
    """Epsilon implied by an attack with ``fp`` false positives and ``fn`` false negatives.

    ``max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi), 0)`` with
    Clopper-Pearson upper bounds ``FPR_hi`` and ``FNR_hi`` at level ``confidence``.

    Guarantees:
      If the mechanism is ``(eps, delta)``-DP for the neighbouring pair behind the negatives
      (canary absent) and positives (canary present), the returned value exceeds ``eps`` with
      probability at most ``1 - confidence`` over the trials (for a threshold fixed in advance).

    Args:
      fp, fn: counts, scalars or arrays of equal shape (one entry per threshold).
      n_neg, n_pos: number of negative and positive trials.
      delta: the ``delta`` of the claim under audit.
      confidence: level of each Clopper-Pearson interval.

    Examples:
      >>> round(float(epsilon_lower_bound(0, 0, 1000, 1000, 1e-5)), 2)
      5.6
    """
    if not 0 <= delta < 1:
        raise ValueError(f"{delta=} must be in [0, 1)")
    if not 0 < confidence < 1:
        raise ValueError(f"{confidence=} must be in (0, 1)")
    alpha = 1 - confidence
    _, fpr_hi = clopper_pearson(fp, n_neg, alpha)
    _, fnr_hi = clopper_pearson(fn, n_pos, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps1 = np.log((1 - delta - fnr_hi) / fpr_hi)
        eps2 = np.log((1 - delta - fpr_hi) / fnr_hi)
    eps = np.fmax(eps1, eps2)
    return np.where(np.isfinite(eps) & (eps > 0), eps, 0.0)


THRESHOLD_STRATEGIES = ("split", "bonferroni")


def audit_scores(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    *,
    threshold: str = "split",
    seed: int = 0,
    one_sided: bool = True,
) -> float:
    """Epsilon lower bound from attack scores, by ``jax_privacy.auditing`` (Nasr et al. 2021).

    The statistics are those of ``jax_privacy.auditing.CanaryScoreAuditor
    .epsilon_clopper_pearson``: the test "guess IN when score >= t" and the bound of
    :func:`epsilon_lower_bound` at significance ``1 - confidence``. The threshold is chosen so
    that the bound still holds at ``confidence``: on a random half of the trials and measured
    on the other half (``"split"``, seeded by ``seed``), or over all thresholds with a
    Bonferroni correction (``"bonferroni"``).

    Args:
      scores_in: attack scores of trials with the canary (positives); higher must mean IN
        (negate both if the attack's IN trials score lower).
      scores_out: attack scores of trials without it (negatives).
      delta: the ``delta`` of the claim under audit.
      confidence: probability that the bound does not exceed the true epsilon.
      threshold: ``"split"`` or ``"bonferroni"``.
      seed: seed of the random split.
      one_sided: only the test above (``False`` also tries its complement, "guess OUT").

    Returns:
      The epsilon lower bound (0 when the attack shows nothing).

    Examples:
      >>> round(audit_scores(np.ones(1000), np.zeros(1000), 1e-5), 2)  # 500 held-out each
      4.91
    """
    from jax_privacy import auditing as jp_auditing

    pos = np.asarray(scores_in, np.float64).ravel()
    neg = np.asarray(scores_out, np.float64).ravel()
    if pos.size < 2 or neg.size < 2:
        raise ValueError(f"need >= 2 trials of each kind, got {pos.size=} and {neg.size=}")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("attack scores must be finite")
    if not 0 <= delta < 1:
        raise ValueError(f"{delta=} must be in [0, 1)")
    if not 0.5 < confidence < 1:
        raise ValueError(f"{confidence=} must be in (0.5, 1)")
    strategies = {
        "split": jp_auditing.Split(threshold_estimation_frac=0.5, seed=seed),
        "bonferroni": jp_auditing.Bonferroni(),
    }
    if threshold not in strategies:
        raise ValueError(f"threshold={threshold!r} must be one of {THRESHOLD_STRATEGIES}")
    auditor = jp_auditing.CanaryScoreAuditor(pos, neg)
    eps = auditor.epsilon_clopper_pearson(
        1 - confidence, delta, one_sided, threshold_strategy=strategies[threshold]
    )
    return float(eps)
