"""Classification metrics over predicted probabilities, computed on the host in NumPy.

The evaluation loop gathers probabilities and labels for a whole split, then calls
:func:`classification_metrics` once (or :func:`grouped_metrics` for per-site and per-subgroup
results, summarised with :func:`summarize_groups`). All results are plain Python numbers, so a
metrics dict can be written with ``json.dump`` directly; undefined values (for example AUROC when
only one class is present) are ``float("nan")``, which ``json`` writes as ``NaN``.

Label conventions follow :mod:`fedjax_med.data.dataset`:

* ``"multiclass"``: ``probs`` ``(N, K)`` softmax probabilities, ``labels`` ``(N,)`` in ``[0, K)``.
* ``"binary"``: ``probs`` ``(N,)`` or ``(N, 1)``, the probability of class 1; ``labels`` ``(N,)``
  in ``{0, 1}``. The predicted class is 1 when the probability is at least 0.5.
* ``"multilabel"``: ``probs`` ``(N, K)`` sigmoid probabilities, ``labels`` ``(N, K)`` in
  ``{0, 1}``; each of the ``N * K`` entries is a binary prediction at threshold 0.5.
* ``"segmentation"``: ``probs`` ``(N, H, W, K)`` per-pixel softmax, ``labels`` masks ``(N, H, W)``;
  :func:`classification_metrics` hands them to
  :func:`fedjax_med.training.segmentation.segmentation_metrics` (Dice, IoU, HD95).

References:
  Hanley, McNeil (1982), "The meaning and use of the area under a receiver operating
  characteristic (ROC) curve", Radiology 143(1). Mann, Whitney (1947), Ann. Math. Statist. 18(1).
  Guo, Pleiss, Sun, Weinberger (2017), "On Calibration of Modern Neural Networks",
  https://arxiv.org/abs/1706.04599.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedjax_med.training import segmentation

TASKS = ("multiclass", "binary", "multilabel", "segmentation")
# The metric that ranks sites (site_summary) and the metrics of the final log line, per task.
PRIMARY = {"segmentation": "dice"}
HEADLINE = {
    "segmentation": ("dice", "iou", "hd95", "accuracy"),
    "": ("accuracy", "auroc", "balanced_accuracy", "ece"),
}

# Softmax and sigmoid in float32 can land a few ulps outside [0, 1].
_PROB_TOLERANCE = 1e-5
# Keys where a smaller value is better; everything else is higher-is-better.
_LOWER_IS_BETTER = ("loss", "ece", "hd95")


def primary_metric(task: str) -> str:
    """The metric :func:`summarize_groups` ranks sites by: ``dice`` for segmentation, else
    ``accuracy``."""
    return PRIMARY.get(task, "accuracy")


def headline(values: dict[str, float], task: str, prefix: str = "") -> str:
    """``"accuracy 0.9000, auroc 0.9500, ..."``: the task's main metrics, for a log line.

    Examples:
      >>> headline({"test_dice": 0.5, "test_iou": 0.4, "test_hd95": 3.0}, "segmentation", "test_")
      'dice 0.5000, iou 0.4000, hd95 3.0000, accuracy nan'
    """
    keys = HEADLINE.get(task, HEADLINE[""])
    return ", ".join(f"{k} {float(values.get(prefix + k, float('nan'))):.4f}" for k in keys)


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    task: str,
    *,
    losses: np.ndarray | None = None,
    num_bins: int = 15,
) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUROC and calibration error of predicted probabilities.

    * ``accuracy``: fraction of correct predictions (argmax for multiclass, threshold 0.5 for
      binary). For multilabel it is the mean label-wise accuracy at threshold 0.5, i.e. the
      fraction of the ``N * K`` label entries predicted correctly.
    * ``balanced_accuracy``: mean per-class recall over the classes present in ``labels``. For
      multilabel, each label's binary balanced accuracy (mean of its recall on the positives and
      on the negatives that are present) averaged over labels.
    * ``auroc``: area under the ROC curve computed as the Mann-Whitney statistic
      ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``, where ``R_pos`` is the sum of
      the positives' ranks among all scores with ties given their average rank (Hanley & McNeil
      1982). It equals the fraction of (positive, negative) pairs in which the positive scores
      higher, a tie counting one half. Multiclass: macro average of one-vs-rest AUROCs over the
      classes that have both positives and negatives. Multilabel: macro average over labels,
      each label's AUROC also reported as ``auroc_label_{k}``. ``nan`` when undefined (a single
      class only, or no class with both positives and negatives).
    * ``ece``: expected calibration error (Guo et al. 2017, arXiv:1706.04599) over ``num_bins``
      equal-width bins ``((m - 1) / M, m / M]`` of the confidence of the predicted class,
      ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``. Binary confidence is
      ``max(p, 1 - p)``; multilabel pools all ``N * K`` label-wise binary predictions.
    * ``loss``: mean of ``losses``; present only when ``losses`` is given.
    * ``num_examples``: ``N`` (an ``int``).

    Args:
      probs: predicted probabilities, shaped as in the module docstring.
      labels: integer labels, shaped as in the module docstring.
      task: one of ``"multiclass"``, ``"binary"``, ``"multilabel"``.
      losses: optional per-example losses of shape ``(N,)``.
      num_bins: number of equal-width confidence bins for the ECE.

    Returns:
      A flat dict of Python floats (and ``num_examples`` as an int).

    Examples:
      >>> import numpy as np
      >>> probs = np.array([0.9, 0.8, 0.3, 0.6])
      >>> labels = np.array([1, 1, 0, 0])
      >>> m = classification_metrics(probs, labels, "binary")
      >>> m["accuracy"], m["auroc"], m["num_examples"]
      (0.75, 1.0, 4)
    """
    probs, labels = _validate(probs, labels, task)
    if num_bins < 1:
        raise ValueError(f"{num_bins=} must be >= 1")
    n = labels.shape[0]
    if n == 0:
        raise ValueError("probs and labels hold 0 examples; metrics need at least 1")
    out: dict[str, float] = {}
    if task == "segmentation":
        out.update(segmentation.segmentation_metrics(probs, labels))
    elif task == "multiclass":
        num_classes = probs.shape[1]
        pred = np.argmax(probs, axis=1)
        correct = pred == labels
        out["accuracy"] = float(np.mean(correct))
        out["balanced_accuracy"] = _balanced_accuracy(pred, labels, num_classes)
        per_class = [_binary_auroc(probs[:, k], labels == k) for k in range(num_classes)]
        out["auroc"] = _nanmean(per_class)
        out["ece"] = _ece(np.max(probs, axis=1), correct, num_bins)
    elif task == "binary":
        pred = (probs >= 0.5).astype(labels.dtype)
        correct = pred == labels
        out["accuracy"] = float(np.mean(correct))
        out["balanced_accuracy"] = _balanced_accuracy(pred, labels, 2)
        out["auroc"] = _binary_auroc(probs, labels == 1)
        out["ece"] = _ece(np.maximum(probs, 1.0 - probs), correct, num_bins)
    else:
        pred = (probs >= 0.5).astype(labels.dtype)
        correct = pred == labels
        num_labels = probs.shape[1]
        out["accuracy"] = float(np.mean(correct))
        out["balanced_accuracy"] = float(
            np.mean([_balanced_accuracy(pred[:, k], labels[:, k], 2) for k in range(num_labels)])
        )
        per_label = [_binary_auroc(probs[:, k], labels[:, k] == 1) for k in range(num_labels)]
        out["auroc"] = _nanmean(per_label)
        out["ece"] = _ece(np.maximum(probs, 1.0 - probs).ravel(), correct.ravel(), num_bins)
        for k, value in enumerate(per_label):
            out[f"auroc_label_{k}"] = value
    if losses is not None:
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape != (n,):
            raise ValueError(f"losses must have shape ({n},) to match labels, got {losses.shape}")
        out["loss"] = float(np.mean(losses))
    out["num_examples"] = int(n)
    return out


def grouped_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    task: str,
    groups: np.ndarray,
    group_names: Sequence[str],
    *,
    losses: np.ndarray | None = None,
    num_bins: int = 15,
) -> dict[str, dict[str, float]]:
    """:func:`classification_metrics` on each group of examples (per site, per subgroup).

    Args:
      probs, labels, task, losses, num_bins: as in :func:`classification_metrics`.
      groups: integer codes of shape ``(N,)`` in ``[0, len(group_names))``, e.g.
        ``dataset.sites`` or ``dataset.subgroups["sex"]``.
      group_names: the name of each code.

    Returns:
      ``{group_name: metrics}`` for every group with at least one example, in code order; groups
      without examples are left out.
    """
    probs, labels = _validate(probs, labels, task)
    n = labels.shape[0]
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) to match labels, got {groups.shape}")
    if not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups dtype {groups.dtype} must be an integer type")
    if n and (groups.min() < 0 or groups.max() >= len(group_names)):
        raise ValueError(
            f"groups must lie in [0, {len(group_names)}) (one per group name), found range "
            f"[{groups.min()}, {groups.max()}]"
        )
    if losses is not None:
        losses = np.asarray(losses)
        if losses.shape != (n,):
            raise ValueError(f"losses must have shape ({n},) to match labels, got {losses.shape}")
    out: dict[str, dict[str, float]] = {}
    for code, name in enumerate(group_names):
        idx = np.flatnonzero(groups == code)
        if idx.size == 0:
            continue
        out[name] = classification_metrics(
            probs[idx],
            labels[idx],
            task,
            losses=None if losses is None else losses[idx],
            num_bins=num_bins,
        )
    return out


def summarize_groups(
    per_group: dict[str, dict[str, float]], key: str, *, higher_is_better: bool | None = None
) -> dict[str, float]:
    """Worst, mean and spread (max - min) of one metric across groups, ignoring NaNs.

    Args:
      per_group: output of :func:`grouped_metrics`.
      key: the metric to summarise, e.g. ``"accuracy"`` or ``"auroc"``.
      higher_is_better: whether larger values are better; the worst group is the minimum when
        true and the maximum when false. ``None`` infers it from ``key``: ``"loss"`` and
        ``"ece"`` are lower-is-better, every other metric higher-is-better.

    Returns:
      ``{f"worst_{key}", f"mean_{key}", f"spread_{key}"}``; all ``nan`` when no group has a
      finite value.
    """
    if not per_group:
        raise ValueError("per_group is empty; there is nothing to summarise")
    missing = [name for name, m in per_group.items() if key not in m]
    if missing:
        available = sorted(next(iter(per_group.values())))
        raise ValueError(f"{key=} is missing from groups {missing}; available keys: {available}")
    if higher_is_better is None:
        higher_is_better = key not in _LOWER_IS_BETTER
    values = np.array([float(m[key]) for m in per_group.values()])
    values = values[~np.isnan(values)]
    if values.size == 0:
        nan = float("nan")
        return {f"worst_{key}": nan, f"mean_{key}": nan, f"spread_{key}": nan}
    worst = values.min() if higher_is_better else values.max()
    return {
        f"worst_{key}": float(worst),
        f"mean_{key}": float(values.mean()),
        f"spread_{key}": float(values.max() - values.min()),
    }


def _validate(probs: np.ndarray, labels: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Checks shapes and ranges; returns float64 probs (binary squeezed to (N,)) and labels."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    if task == "segmentation":
        return segmentation.validate(probs, labels)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise ValueError(f"labels dtype {labels.dtype} must be an integer type")
    labels = labels.astype(np.int64)
    if task == "binary":
        if probs.ndim == 2 and probs.shape[1] == 1:
            probs = probs[:, 0]
        ok = probs.ndim == 1 and labels.shape == probs.shape
        expected = "probs (N,) or (N, 1) and labels (N,)"
    elif task == "multiclass":
        ok = probs.ndim == 2 and labels.shape == probs.shape[:1]
        expected = "probs (N, K) and labels (N,)"
    else:
        ok = probs.ndim == 2 and labels.shape == probs.shape
        expected = "probs (N, K) and labels (N, K)"
    if not ok:
        raise ValueError(
            f"probs shape {probs.shape} and labels shape {labels.shape} do not match for "
            f"task={task!r}: expected {expected}"
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or inf")
    if probs.size and (probs.min() < -_PROB_TOLERANCE or probs.max() > 1 + _PROB_TOLERANCE):
        raise ValueError(
            f"probs must be probabilities in [0, 1], found range [{probs.min()}, {probs.max()}]"
        )
    probs = np.clip(probs, 0.0, 1.0)
    hi = probs.shape[1] if task == "multiclass" else 2
    if labels.size and (labels.min() < 0 or labels.max() >= hi):
        raise ValueError(
            f"labels must lie in [0, {hi}) for task={task!r}, found range "
            f"[{labels.min()}, {labels.max()}]"
        )
    return probs, labels


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_group = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.concatenate([starts[1:], [x.size]])
    # A tie block occupies 1-based ranks starts+1 .. ends; its mean rank is their midpoint.
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def _binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``scores`` for the boolean ``positive``; nan with one class only."""
    n_pos = int(np.sum(positive))
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _balanced_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes that occur in ``labels``."""
    recalls = [np.mean(pred[labels == k] == k) for k in range(num_classes) if np.any(labels == k)]
    return float(np.mean(recalls))


def _ece(confidence: np.ndarray, correct: np.ndarray, num_bins: int) -> float:
    """Expected calibration error over equal-width, right-closed confidence bins.

    ``sum_m |B_m| / n * |acc(B_m) - conf(B_m)|`` equals ``sum_m |sum_{B_m} (correct - conf)| / n``,
    so only per-bin sums are needed.
    """
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # searchsorted(side="left") puts c in bin m when edges[m] < c <= edges[m + 1]; c = 0 -> bin 0.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    acc_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=num_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / confidence.size)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")
