"""Metrics checked against brute-force definitions and hand-computed numbers."""

import json
import math

import numpy as np
import pytest

from fedjax_med.training import metrics


def brute_force_auroc(scores, positive):
    """Fraction of (positive, negative) pairs ranked correctly, ties counting one half."""
    pos = scores[positive]
    neg = scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def brute_force_ece(confidence, correct, num_bins):
    total = 0.0
    for m in range(num_bins):
        lo, hi = m / num_bins, (m + 1) / num_bins
        in_bin = (confidence > lo) & (confidence <= hi)
        if m == 0:
            in_bin |= confidence == 0
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            total += in_bin.sum() / confidence.size * gap
    return total


@pytest.mark.parametrize("seed", range(5))
def test_binary_auroc_matches_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    labels = rng.integers(0, 2, size=n)
    # Rounding to one decimal creates many ties, within and across the two classes.
    probs = np.round(np.clip(0.5 + 0.2 * (labels - 0.5) + 0.3 * rng.normal(size=n), 0, 1), 1)
    got = metrics.classification_metrics(probs, labels, "binary")["auroc"]
    assert got == pytest.approx(brute_force_auroc(probs, labels == 1), abs=1e-12)


def test_multiclass_auroc_is_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(80, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=80)
    expected = np.mean([brute_force_auroc(probs[:, k], labels == k) for k in range(4)])
    got = metrics.classification_metrics(probs, labels, "multiclass")["auroc"]
    assert got == pytest.approx(expected, abs=1e-12)


def test_multiclass_auroc_skips_absent_classes():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=30)
    labels = rng.integers(0, 2, size=30)  # class 2 never occurs
    expected = np.mean([brute_force_auroc(probs[:, k], labels == k) for k in range(2)])
    got = metrics.classification_metrics(probs, labels, "multiclass")["auroc"]
    assert got == pytest.approx(expected, abs=1e-12)


def test_perfect_and_inverted_classifiers():
    labels = np.array([0, 0, 1, 1, 0, 1])
    perfect = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    good = metrics.classification_metrics(perfect, labels, "binary")
    bad = metrics.classification_metrics(1 - perfect, labels, "binary")
    assert good["auroc"] == 1.0 and good["accuracy"] == 1.0
    assert bad["auroc"] == 0.0 and bad["accuracy"] == 0.0


def test_binary_accepts_column_probs():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([0.2, 0.7, 0.4, 0.6])
    flat = metrics.classification_metrics(probs, labels, "binary")
    column = metrics.classification_metrics(probs[:, None], labels, "binary")
    assert flat == column


def test_single_class_auroc_is_nan_and_json_serialisable():
    out = metrics.classification_metrics(np.array([0.2, 0.9]), np.array([1, 1]), "binary")
    assert isinstance(out["auroc"], float) and math.isnan(out["auroc"])
    assert all(isinstance(v, (float, int)) for v in out.values())
    assert "NaN" in json.dumps(out)


def test_balanced_accuracy_on_imbalanced_labels_by_hand():
    # 8 examples of class 0 (6 right), 2 of class 1 (1 right), 0 of class 2.
    labels = np.array([0] * 8 + [1] * 2)
    pred = np.array([0] * 6 + [1, 2] + [1, 0])
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), pred] = 0.8
    out = metrics.classification_metrics(probs, labels, "multiclass")
    assert out["accuracy"] == pytest.approx(7 / 10)
    assert out["balanced_accuracy"] == pytest.approx((6 / 8 + 1 / 2) / 2)


def test_ece_of_calibrated_case_is_zero():
    # Ten predictions at confidence 0.7 for class 1, seven of them right; ten at 0.9, nine right.
    probs = np.array([0.7] * 10 + [0.9] * 10)
    labels = np.array([1] * 7 + [0] * 3 + [1] * 9 + [0])
    out = metrics.classification_metrics(probs, labels, "binary")
    assert out["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_of_overconfident_case_equals_gap():
    # Confidence 0.9 in every prediction, accuracy 0.6: the gap is 0.3.
    probs = np.full((10, 2), 0.1)
    probs[:, 0] = 0.9
    labels = np.array([0] * 6 + [1] * 4)
    out = metrics.classification_metrics(probs, labels, "multiclass")
    assert out["ece"] == pytest.approx(0.3)
    # Two bins: 4 at confidence 0.95 (all right, gap 0.05), 6 at 0.6 (half right, gap 0.1).
    probs = np.array([0.95] * 4 + [0.6] * 6)
    labels = np.array([1] * 4 + [1, 1, 1, 0, 0, 0])
    out = metrics.classification_metrics(probs, labels, "binary")
    assert out["ece"] == pytest.approx(0.4 * 0.05 + 0.6 * 0.1)


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_brute_force(num_bins):
    rng = np.random.default_rng(num_bins)
    probs = rng.dirichlet(np.ones(5) * 0.5, size=200)
    labels = rng.integers(0, 5, size=200)
    correct = (probs.argmax(1) == labels).astype(float)
    expected = brute_force_ece(probs.max(1), correct, num_bins)
    got = metrics.classification_metrics(probs, labels, "multiclass", num_bins=num_bins)["ece"]
    assert got == pytest.approx(expected, abs=1e-12)


def test_multilabel_per_label_auroc_accuracy_and_ece():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=(50, 3))
    labels[:, 2] = 0  # label 2 has no positives: its AUROC is undefined
    probs = np.clip(0.3 * labels + 0.7 * rng.uniform(size=(50, 3)), 0, 1)
    out = metrics.classification_metrics(probs, labels, "multilabel")
    per_label = [brute_force_auroc(probs[:, k], labels[:, k] == 1) for k in range(2)]
    assert out["auroc_label_0"] == pytest.approx(per_label[0])
    assert out["auroc_label_1"] == pytest.approx(per_label[1])
    assert math.isnan(out["auroc_label_2"])
    assert out["auroc"] == pytest.approx(np.mean(per_label))
    pred = probs >= 0.5
    assert out["accuracy"] == pytest.approx(np.mean(pred == labels))
    confidence = np.maximum(probs, 1 - probs).ravel()
    expected_ece = brute_force_ece(confidence, (pred == labels).ravel().astype(float), 15)
    assert out["ece"] == pytest.approx(expected_ece)
    label_bal = []
    for k in range(3):
        recalls = [
            np.mean(pred[labels[:, k] == c, k] == c) for c in (0, 1) if (labels[:, k] == c).any()
        ]
        label_bal.append(np.mean(recalls))
    assert out["balanced_accuracy"] == pytest.approx(np.mean(label_bal))


def test_loss_and_num_examples():
    out = metrics.classification_metrics(
        np.array([0.2, 0.8]), np.array([0, 1]), "binary", losses=np.array([1.0, 3.0])
    )
    assert out["loss"] == 2.0 and out["num_examples"] == 2
    assert "loss" not in metrics.classification_metrics(np.array([0.2]), np.array([0]), "binary")


def test_grouped_metrics_equal_metrics_on_subsets():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(3), size=90)
    labels = rng.integers(0, 3, size=90)
    losses = rng.uniform(size=90)
    groups = rng.integers(0, 2, size=90)  # code 2 ("c") is empty and must be skipped
    out = metrics.grouped_metrics(
        probs, labels, "multiclass", groups, ["a", "b", "c"], losses=losses
    )
    assert list(out) == ["a", "b"]
    for code, name in enumerate(["a", "b"]):
        idx = groups == code
        expected = metrics.classification_metrics(
            probs[idx], labels[idx], "multiclass", losses=losses[idx]
        )
        assert out[name] == expected


def test_summarize_groups_ignores_nan():
    per_group = {
        "a": {"auroc": 0.9, "loss": 0.2},
        "b": {"auroc": float("nan"), "loss": 0.5},
        "c": {"auroc": 0.6, "loss": 0.4},
    }
    assert metrics.summarize_groups(per_group, "auroc") == pytest.approx(
        {"worst_auroc": 0.6, "mean_auroc": 0.75, "spread_auroc": 0.3}
    )
    # Loss is lower-is-better: the worst group has the largest loss.
    assert metrics.summarize_groups(per_group, "loss")["worst_loss"] == 0.5
    all_nan = metrics.summarize_groups({"a": {"auroc": float("nan")}}, "auroc")
    assert all(math.isnan(v) for v in all_nan.values())
    with pytest.raises(ValueError, match="accuracy"):
        metrics.summarize_groups(per_group, "accuracy")


def test_errors():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5,\)"):
        metrics.classification_metrics(np.full((4, 3), 1 / 3), np.zeros(5, int), "multiclass")
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4,\)"):
        metrics.classification_metrics(np.full((4, 2), 0.5), np.zeros(4, int), "multilabel")
    with pytest.raises(ValueError, match="multiclass.*binary.*multilabel"):
        metrics.classification_metrics(np.zeros(2), np.zeros(2, int), "regression")
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.classification_metrics(np.full((2, 2), 0.5), np.array([0, 2]), "multiclass")
    with pytest.raises(ValueError, match="probabilities"):
        metrics.classification_metrics(np.array([0.5, 1.5]), np.array([0, 1]), "binary")
    with pytest.raises(ValueError, match="losses"):
        metrics.classification_metrics(
            np.array([0.5, 0.5]), np.array([0, 1]), "binary", losses=np.zeros(3)
        )
    with pytest.raises(ValueError, match="groups must lie"):
        metrics.grouped_metrics(np.array([0.5, 0.5]), np.array([0, 1]), "binary", [0, 2], ["a"])
