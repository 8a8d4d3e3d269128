"""Empirical lower bounds on epsilon from a distinguishing attack (DP auditing).

An ``(epsilon, delta)``-DP mechanism bounds every test that tells neighbouring inputs apart: its
false-positive and false-negative rates satisfy ``FPR + e^eps FNR >= 1 - delta`` and the same with
the two swapped, hence ``eps >= log((1 - delta - FNR) / FPR)`` (Jagielski, Ullman, Oprea,
NeurIPS 2020, https://arxiv.org/abs/2006.07709; Nasr et al., IEEE S&P 2021,
https://arxiv.org/abs/2101.04535). Rates measured on finitely many trials are replaced by their
Clopper-Pearson upper bounds, so the bound holds with the stated confidence.

:func:`audit_gaussian_sum` audits the noisy clipped sum of one DP-SGD step with a white-box
gradient canary (Nasr et al., USENIX Security 2023, https://arxiv.org/abs/2302.07956): the
attacker inserts a gradient of norm ``C`` in a fixed direction and reads the release's projection
on it. A correct mechanism gives a lower bound below the accountant's epsilon; a broken one
(no noise, noise scaled down) gives a bound above it.

Statistics run on the host in NumPy/SciPy; trials are sampled in JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

MECHANISMS = ("correct", "no_noise", "wrong_scale")


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


def _threshold_counts(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray):
    """False negatives and false positives of "guess IN when score >= t" at each ``t``."""
    fn = np.searchsorted(np.sort(pos), thresholds, side="left")
    fp = neg.size - np.searchsorted(np.sort(neg), thresholds, side="left")
    return fp, fn


def _as_trials(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(scores_in, np.float64).ravel()
    neg = np.asarray(scores_out, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need both kinds of trials, got {pos.size=} and {neg.size=}")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("attack scores must be finite")
    return pos, neg


def _best_threshold(pos, neg, delta, confidence) -> tuple[float, float, bool]:
    """``(epsilon, threshold, guess_in_above)`` maximising the bound on these trials."""
    thresholds = np.unique(np.concatenate([pos, neg]))
    fp, fn = _threshold_counts(pos, neg, thresholds)
    # The swapped roles are covered by the second term of epsilon_lower_bound; the reversed
    # orientation (guess IN when score < t) flips both counts.
    eps_fwd = epsilon_lower_bound(fp, fn, neg.size, pos.size, delta, confidence)
    eps_rev = epsilon_lower_bound(
        neg.size - fp, pos.size - fn, neg.size, pos.size, delta, confidence
    )
    forward = eps_fwd >= eps_rev
    eps = np.where(forward, eps_fwd, eps_rev)
    best = int(np.argmax(eps))
    return float(eps[best]), float(thresholds[best]), bool(forward[best])


def audit_from_scores(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    delta: float,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Best epsilon lower bound over all thresholds "guess IN when score >= t" (and the reverse).

    Picking the best threshold on the same trials that measure it is slightly optimistic; for a
    bound that holds at ``confidence`` use :func:`audit_held_out`.

    Args:
      scores_in: attack scores of trials with the canary (positives).
      scores_out: attack scores of trials without it (negatives).
      delta: the ``delta`` of the claim under audit.
      confidence: level of the Clopper-Pearson intervals.

    Returns:
      ``(epsilon_lower_bound, threshold)``.

    Examples:
      >>> eps, t = audit_from_scores(np.ones(500), np.zeros(500), 1e-5)
      >>> round(eps, 2), t
      (4.91, 1.0)
    """
    pos, neg = _as_trials(scores_in, scores_out)
    eps, threshold, _ = _best_threshold(pos, neg, delta, confidence)
    return eps, threshold


def audit_held_out(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    delta: float,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Epsilon lower bound, threshold chosen on one half of the trials and measured on the other.

    The first half of each kind of trial picks the threshold and its orientation
    (:func:`audit_from_scores`); the counts of the second half, at that fixed threshold, go
    through :func:`epsilon_lower_bound`. The result therefore exceeds the true epsilon with
    probability at most ``1 - confidence`` (Jagielski et al. 2020, Section 4). Trials must be
    independent and in an order unrelated to their scores.

    Returns:
      ``(epsilon_lower_bound, threshold)``.

    Examples:
      >>> eps, t = audit_held_out(np.ones(1000), np.zeros(1000), 1e-5)
      >>> round(eps, 2), t
      (4.91, 1.0)
    """
    pos, neg = _as_trials(scores_in, scores_out)
    if pos.size < 2 or neg.size < 2:
        raise ValueError(f"need >= 2 trials of each kind, got {pos.size=} and {neg.size=}")
    pos_pick, pos_eval = pos[: pos.size // 2], pos[pos.size // 2 :]
    neg_pick, neg_eval = neg[: neg.size // 2], neg[neg.size // 2 :]
    _, threshold, forward = _best_threshold(pos_pick, neg_pick, delta, confidence)
    fp, fn = _threshold_counts(pos_eval, neg_eval, np.array([threshold]))
    if not forward:
        fp, fn = neg_eval.size - fp, pos_eval.size - fn
    eps = epsilon_lower_bound(fp, fn, neg_eval.size, pos_eval.size, delta, confidence)
    return float(eps[0]), threshold


def audit_gaussian_sum(
    clip_norm: float,
    noise_multiplier: float,
    num_trials: int,
    key: jax.Array,
    mechanism: str = "correct",
    batch_size: int = 8,
    dim: int = 16,
    delta: float = 1e-5,
    confidence: float = 0.95,
) -> float:
    """White-box gradient-canary audit of one noisy clipped-sum release (a DP-SGD step).

    Half the trials add a canary gradient ``C e_0`` to a batch of ``batch_size`` random gradients;
    each trial releases ``sum_i clip(g_i) + N(0, s^2 I)`` with ``s = sigma C`` ("correct"),
    ``s = 0`` ("no_noise") or ``s = sigma C / 10`` ("wrong_scale"). The attacker is the worst case
    of add/remove-one DP: it knows the other gradients and scores ``<release - sum_others, e_0>``.

    Args:
      clip_norm: ``C``, the per-example clipping norm.
      noise_multiplier: ``sigma`` of the mechanism under audit.
      num_trials: total trials, split evenly between canary present and absent.
      key: PRNG key for gradients and noise.
      mechanism: one of :data:`MECHANISMS`.
      batch_size, dim: other examples per trial and gradient dimension.
      delta, confidence: as in :func:`epsilon_lower_bound`.

    Returns:
      The empirical epsilon lower bound (best threshold, see :func:`audit_from_scores`).
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"{mechanism=} must be one of {MECHANISMS}")
    if clip_norm <= 0:
        raise ValueError(f"{clip_norm=} must be > 0")
    if noise_multiplier < 0:
        raise ValueError(f"{noise_multiplier=} must be >= 0")
    if num_trials < 2:
        raise ValueError(f"{num_trials=} must be >= 2")
    noise_std = {
        "correct": noise_multiplier * clip_norm,
        "no_noise": 0.0,
        "wrong_scale": noise_multiplier * clip_norm / 10,
    }[mechanism]
    n_in = num_trials // 2
    has_canary = jnp.arange(num_trials) < n_in
    grad_key, noise_key = jax.random.split(key)
    # Other gradients are deliberately larger than C so that clipping is exercised.
    grads = 3 * clip_norm * jax.random.normal(grad_key, (num_trials, batch_size, dim))
    norms = jnp.linalg.norm(grads, axis=-1, keepdims=True)
    clipped = grads * jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
    others = clipped.sum(axis=1)
    canary = jnp.zeros(dim).at[0].set(clip_norm)
    release = others + has_canary[:, None] * canary
    release = release + noise_std * jax.random.normal(noise_key, release.shape)
    scores = np.asarray((release - others)[:, 0], np.float64)
    return audit_from_scores(scores[:n_in], scores[n_in:], delta, confidence)[0]
