"""Segmentation metrics on the host: Dice, IoU and 95th-percentile Hausdorff distance.

For image ``i`` and foreground class ``c >= 1`` let ``P`` be the predicted pixels of class ``c``
(argmax of the per-pixel probabilities) and ``G`` the mask's pixels of class ``c``:

* ``Dice = 2 |P & G| / (|P| + |G|)`` (Dice 1945), ``IoU = |P & G| / |P | G|`` (Jaccard);
* ``HD95``: the 95th percentile (NumPy's linear interpolation) of the symmetric surface distances,
  i.e. of the Euclidean distances (in pixels) from every border pixel of ``P`` to the nearest
  border pixel of ``G`` pooled with those from ``G`` to ``P``; a border pixel is a pixel of the set
  with a 4-neighbour outside it or on the image edge. This is the definition of MedPy's ``hd95``
  used by the medical segmentation challenges (Taha & Hanbury, BMC Medical Imaging 2015,
  https://doi.org/10.1186/s12880-015-0068-x).

Empty-mask conventions (per image and class):

* ``P`` and ``G`` both empty: Dice 1, IoU 1, HD95 0 (nothing to find, nothing found);
* exactly one empty: Dice 0, IoU 0, HD95 ``sqrt(H^2 + W^2)``, the image diagonal, larger than any
  distance inside the image (a missed or hallucinated structure scores as the worst finite case).

Aggregates, as :func:`segmentation_metrics` returns them:

* ``dice``, ``iou``, ``hd95``: the mean over images of each image's mean over the foreground
  classes present in ``P`` or ``G``; an image where every class is empty in both (a normal image
  predicted empty) contributes the both-empty value. Predicting all background therefore scores
  the fraction of images without any structure (the baseline to beat).
* ``dice_class_<c>``, ``iou_class_<c>``, ``hd95_class_<c>``: the mean over the images where class
  ``c`` is in ``P`` or ``G`` (``nan`` when it is in none).
* ``dice_all_background``: the ``dice`` of predicting background everywhere, for comparison.
* ``accuracy``: pixel accuracy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_CROSS = ndimage.generate_binary_structure(2, 1)


def border(mask: np.ndarray) -> np.ndarray:
    """Pixels of the boolean ``mask`` with a 4-neighbour outside it (the image edge counts as
    outside).

    Examples:
      >>> import numpy as np
      >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
      >>> int(border(m).sum())  # the 3x3 square minus its centre
      8
    """
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance of two boolean masks (module docstring).

    Examples:
      >>> import numpy as np
      >>> a = np.zeros((8, 8), bool); a[2, 2] = True
      >>> b = np.zeros((8, 8), bool); b[2, 5] = True
      >>> hd95(a, b), hd95(a, a), hd95(a, np.zeros_like(a)) == float(np.hypot(8, 8))
      (3.0, 0.0, True)
    """
    if not pred.any() and not true.any():
        return 0.0
    if not pred.any() or not true.any():
        return float(np.hypot(*pred.shape))
    bp, bt = border(pred), border(true)
    to_true = ndimage.distance_transform_edt(~bt)[bp]
    to_pred = ndimage.distance_transform_edt(~bp)[bt]
    return float(np.percentile(np.concatenate([to_true, to_pred]), 95))


def per_image_scores(
    pred: np.ndarray, masks: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
    """Dice, IoU, HD95 of every image and foreground class, with the empty-mask conventions.

    Args:
      pred: predicted class ids ``(N, H, W)``.
      masks: true class ids ``(N, H, W)``.
      num_classes: ``K``, background included.

    Returns:
      ``{"dice", "iou", "hd95", "present"}``, each ``(N, K - 1)`` (column ``c - 1`` is class
      ``c``); ``present`` is true where class ``c`` is in the prediction or the mask.

    Examples:
      >>> import numpy as np
      >>> pred = np.array([[[1, 1], [0, 0]]]); true = np.array([[[1, 0], [0, 0]]])
      >>> s = per_image_scores(pred, true, 3)
      >>> s["dice"].round(4).tolist(), s["iou"].tolist(), s["present"].tolist()
      ([[0.6667, 1.0]], [[0.5, 1.0]], [[True, False]])
    """
    n = pred.shape[0]
    out = {k: np.zeros((n, num_classes - 1)) for k in ("dice", "iou", "hd95")}
    out["present"] = np.zeros((n, num_classes - 1), bool)
    for c in range(1, num_classes):
        p, g = pred == c, masks == c
        inter = (p & g).sum(axis=(1, 2))
        sp, sg = p.sum(axis=(1, 2)), g.sum(axis=(1, 2))
        union = sp + sg - inter
        present = (sp + sg) > 0
        out["present"][:, c - 1] = present
        out["dice"][:, c - 1] = np.where(present, 2 * inter / np.maximum(sp + sg, 1), 1.0)
        out["iou"][:, c - 1] = np.where(present, inter / np.maximum(union, 1), 1.0)
        out["hd95"][:, c - 1] = [hd95(p[i], g[i]) if present[i] else 0.0 for i in range(n)]
    return out


def validate(probs: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checks ``probs`` ``(N, H, W, K)`` against integer ``masks`` ``(N, H, W)`` in ``[0, K)``."""
    probs, masks = np.asarray(probs), np.asarray(masks)
    if probs.ndim != 4 or masks.shape != probs.shape[:3]:
        raise ValueError(
            f"probs shape {probs.shape} and masks shape {masks.shape} do not match for "
            "task='segmentation': expected probs (N, H, W, K) and masks (N, H, W)"
        )
    if not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"masks dtype {masks.dtype} must be an integer type")
    if masks.size and (masks.min() < 0 or masks.max() >= probs.shape[-1]):
        raise ValueError(
            f"mask values must lie in [0, {probs.shape[-1]}) for task='segmentation', found "
            f"[{masks.min()}, {masks.max()}]"
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or inf")
    return probs, masks


def segmentation_metrics(probs: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The aggregates of the module docstring for per-pixel ``probs`` and ``masks`` (the loss and
    the number of examples are added by
    :func:`fedjax_med.training.metrics.classification_metrics`).

    Examples:
      >>> import numpy as np
      >>> masks = np.zeros((2, 4, 4), int); masks[0, :2, :2] = 1  # image 1 is empty
      >>> probs = np.stack([masks == 0, masks == 1], -1).astype(float)  # a perfect prediction
      >>> m = segmentation_metrics(probs, masks)
      >>> m["dice"], m["hd95"], m["dice_class_1"], m["accuracy"]
      (1.0, 0.0, 1.0, 1.0)
      >>> background = np.stack([np.ones((2, 4, 4)), np.zeros((2, 4, 4))], -1)
      >>> empty = segmentation_metrics(background, masks)
      >>> empty["dice"], empty["dice_class_1"]  # 1 on the empty image, 0 on the other
      (0.5, 0.0)
      >>> m["dice_all_background"]  # the baseline: the fraction of images without structure
      0.5
    """
    probs, masks = validate(probs, masks)
    n, num_classes = masks.shape[0], probs.shape[-1]
    if n == 0:
        raise ValueError("probs and masks hold 0 examples; metrics need at least 1")
    pred = np.argmax(probs, axis=-1)
    scores = per_image_scores(pred, masks, num_classes)
    present = scores["present"]
    count = present.sum(axis=1)
    empty_value = {"dice": 1.0, "iou": 1.0, "hd95": 0.0}
    out: dict[str, float] = {}
    for key, default in empty_value.items():
        summed = np.where(present, scores[key], 0.0).sum(axis=1)
        per_image = np.where(count > 0, summed / np.maximum(count, 1), default)
        out[key] = float(per_image.mean())
    for c in range(1, num_classes):
        rows = present[:, c - 1]
        for key in empty_value:
            value = scores[key][rows, c - 1].mean() if rows.any() else float("nan")
            out[f"{key}_class_{c}"] = float(value)
    out["dice_all_background"] = float(np.mean(~masks.reshape(n, -1).any(axis=1)))
    out["accuracy"] = float(np.mean(pred == masks))
    return out
