"""MedMNIST v2/v3 ``.npz`` files as a :class:`DatasetSplits`.

The public format (Yang et al., MedMNIST v2, https://arxiv.org/abs/2110.14795) stores six arrays:
``{train,val,test}_images`` uint8 of shape ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)``, and
``{train,val,test}_labels`` of shape ``(N, 1)`` (one class index) or ``(N, K)`` (K binary
findings, as ChestMNIST). The 3-D datasets (OrganMNIST3D, NoduleMNIST3D, AdrenalMNIST3D,
FractureMNIST3D, VesselMNIST3D, SynapseMNIST3D) store volumes ``(N, D, H, W)`` (28 or 64 per
side), read as ``(N, D, H, W, 1)``, with the same labels.

The files carry no patient or site information: everything is one site named ``"medmnist"`` and
each image gets its own patient id (a running index over train, val and test), so example-level
and patient-level privacy coincide for these datasets even where the source had several images
per patient.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from fedjax_med.data import dataset

SPLITS = ("train", "val", "test")
SITE_NAME = "medmnist"


def load_medmnist(
    path: str,
    *,
    task: str | None = None,
    max_examples: int | None = None,
    num_classes: int | None = None,
    sparse_labels: bool = False,
) -> dataset.DatasetSplits:
    """Reads a MedMNIST ``.npz`` file into validated train / val / test splits.

    Args:
      path: the ``.npz`` file, e.g. ``pathmnist.npz`` or ``chestmnist_64.npz``.
      task: None infers it from the labels: ``(N, 1)`` with at most two classes is "binary",
        with more "multiclass", ``(N, K > 1)`` is "multilabel". Pass "multiclass" to train a
        two-class file with a softmax head.
      max_examples: keep only the first ``max_examples`` of each split (for quick runs). Task and
        ``num_classes`` are inferred from the full file, so they do not change with truncation.
      num_classes: the declared number of classes (``data.num_classes``): a label outside
        ``[0, num_classes)`` is refused, naming the value and how many examples carry it; for
        multi-label files it must equal the label width K. None infers it as the largest label + 1,
        and then every class id below it must occur (a stray label 99 in a 4-class file would
        otherwise make a 100-class task) unless ``sparse_labels``.
      sparse_labels: accept inferred class ids with gaps (the head still has largest id + 1
        outputs; the unused ones are never a target).

    Returns:
      Validated splits named after the file stem; uint8 images ``(N, H, W, C)`` (volumes
      ``(N, D, H, W, 1)``), int32 labels ``(N,)`` (binary, multiclass) or ``(N, K)``
      (multilabel).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> tmp = tempfile.TemporaryDirectory()
      >>> path = os.path.join(tmp.name, "toymnist.npz")
      >>> arrays = {}
      >>> for split, n in (("train", 6), ("val", 2), ("test", 3)):
      ...     arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
      ...     arrays[f"{split}_labels"] = (np.arange(n) % 3)[:, None].astype(np.uint8)
      >>> np.savez(path, **arrays)
      >>> splits = load_medmnist(path)
      >>> splits.info.name, splits.info.task, splits.info.num_classes, splits.info.image_shape
      ('toymnist', 'multiclass', 3, (28, 28, 1))
      >>> splits.train.labels
      array([0, 1, 2, 0, 1, 2], dtype=int32)
      >>> volumes = dict(arrays, **{f"{s}_images": np.zeros((len(arrays[f"{s}_labels"]), 28, 28,
      ...     28), np.uint8) for s in SPLITS})
      >>> np.savez(path, **volumes)
      >>> load_medmnist(path).info.image_shape
      (28, 28, 28, 1)
      >>> tmp.cleanup()
    """
    if task is not None and task not in dataset.TASKS:
        raise ValueError(f"{task=} must be None (infer) or one of {dataset.TASKS}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"{max_examples=} must be a positive integer or None")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MedMNIST file path={path!r} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file: {e}") from e
    with npz:
        keys = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(
                f"{path}: missing key(s) {missing}; a MedMNIST file holds {keys}, "
                f"this one holds {sorted(npz.files)}"
            )
        arrays = {k: npz[k] for k in keys}

    images = {s: _check_images(arrays[f"{s}_images"], f"{s}_images") for s in SPLITS}
    labels = {
        s: _check_labels(arrays[f"{s}_labels"], len(images[s]), f"{s}_labels") for s in SPLITS
    }
    shapes = {f"{s}_images": images[s].shape[1:] for s in SPLITS}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{path}: image shapes differ between splits: {shapes}")
    widths = {f"{s}_labels": labels[s].shape[1] for s in SPLITS}
    if len(set(widths.values())) > 1:
        raise ValueError(f"{path}: label widths differ between splits: {widths}")

    if num_classes is not None and num_classes < 2:
        raise ValueError(f"{num_classes=} must be None (infer) or >= 2")
    task, num_classes = _infer_task(labels, task, path, num_classes, sparse_labels)
    if task != "multilabel":
        labels = {s: y[:, 0] for s, y in labels.items()}

    parts = {}
    offset = 0
    for s in SPLITS:
        n = len(images[s]) if max_examples is None else min(max_examples, len(images[s]))
        parts[s] = dataset.ImageDataset(
            images=images[s][:n],
            labels=labels[s][:n].astype(np.int32),
            sites=np.zeros(n, np.int32),
            # One patient per image; offsets keep ids distinct across splits.
            patient_ids=np.arange(offset, offset + n, dtype=np.int64),
        )
        offset += len(images[s])
    info = dataset.DatasetInfo(
        name=os.path.splitext(os.path.basename(path))[0],
        task=task,
        num_classes=num_classes,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        site_names=(SITE_NAME,),
        image_shape=tuple(int(d) for d in images["train"].shape[1:]),
    )
    return dataset.validate_splits(dataset.DatasetSplits(info=info, **parts))


def _check_images(images: np.ndarray, key: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"{key}: dtype {images.dtype} must be uint8")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images
    if images.ndim == 4:  # MedMNIST3D volumes (N, D, H, W); no 3-D file has a channel axis
        return images[..., None]
    if images.ndim == 5 and images.shape[-1] == 1:
        return images
    raise ValueError(
        f"{key}: shape {images.shape} must be images (N, H, W) or (N, H, W, 1|3), or volumes "
        "(N, D, H, W) or (N, D, H, W, 1)"
    )


def _check_labels(labels: np.ndarray, n: int, key: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{key}: dtype {labels.dtype} must be an integer type")
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != n:
        raise ValueError(f"{key}: shape {labels.shape} must be ({n}, 1) or ({n}, K)")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{key}: labels must be >= 0, found {labels.min()}")
    return labels


def _infer_task(
    labels: dict[str, np.ndarray],
    task: str | None,
    path: str,
    declared: int | None,
    sparse_labels: bool,
) -> tuple[str, int]:
    """``(task, num_classes)`` from each split's labels ``(N, K)`` and the requested ``task``."""
    everything = np.concatenate(list(labels.values()))
    width = everything.shape[1]
    top = int(everything.max()) if everything.size else 0
    if task is None:
        if width > 1:
            task = "multilabel"
        elif declared is not None:
            task = "binary" if declared == 2 else "multiclass"
        else:
            task = "binary" if top <= 1 else "multiclass"
    if task == "multilabel":
        if top > 1:
            raise ValueError(f"{path}: task='multilabel' needs 0/1 labels, found value {top}")
        if declared is not None and declared != width:
            raise ValueError(
                f"{path}: data.num_classes={declared} but the multi-label file has {width} "
                "labels per example"
            )
        return task, width
    if width != 1:
        raise ValueError(
            f"{path}: {task=} needs labels of shape (N, 1), got (N, {width}); "
            "use task='multilabel' or None"
        )
    if task == "binary":
        if declared not in (None, 2):
            raise ValueError(f"{path}: task='binary' has 2 classes, data.num_classes={declared}")
        if top > 1:
            stray = _describe_values(labels, lambda v: v > 1)
            raise ValueError(f"{path}: task='binary' needs labels in {{0, 1}}, found {stray}")
        return task, 2
    if declared is not None:
        stray = _describe_values(labels, lambda v: v >= declared)
        if stray:
            raise ValueError(
                f"{path}: labels must lie in [0, {declared}) (data.num_classes={declared}); "
                f"found {stray}"
            )
        return task, declared
    num_classes = max(top + 1, 2)
    present = np.unique(everything)
    missing = np.setdiff1d(np.arange(num_classes), present)
    if missing.size and not sparse_labels and top > 1:
        first_gap = int(missing[0])
        stray = _describe_values(labels, lambda v: v > first_gap)
        raise ValueError(
            f"{path}: inferring the number of classes as {num_classes} (largest label + 1) leaves "
            f"class ids {_ranges(missing)} with no example; labels above the gap: {stray}. A "
            "stray label would make this a "
            f"{num_classes}-class task: fix the file, declare data.num_classes (labels outside "
            "it are refused), or set data.sparse_labels=True if the class ids really are sparse"
        )
    return task, num_classes


def _describe_values(labels: dict[str, np.ndarray], offending) -> str:
    """``"value 99 (1 example: train 1)"`` for every label value where ``offending(value)``."""
    parts = []
    values = np.unique(np.concatenate([y.ravel() for y in labels.values()]))
    for value in (int(v) for v in values if offending(int(v))):
        per_split = {s: int((y == value).sum()) for s, y in labels.items()}
        total = sum(per_split.values())
        where = ", ".join(f"{s}_labels {c}" for s, c in per_split.items() if c)
        parts.append(f"value {value} on {total} example{'s' if total != 1 else ''} ({where})")
    if len(parts) > 5:
        parts = parts[:5] + [f"and {len(parts) - 5} more values"]
    return "; ".join(parts)


def _ranges(ids: np.ndarray) -> str:
    """``"4..98"`` style list of runs of consecutive ids."""
    runs, start = [], int(ids[0])
    for prev, cur in zip(ids[:-1], ids[1:], strict=True):
        if cur != prev + 1:
            runs.append((start, int(prev)))
            start = int(cur)
    runs.append((start, int(ids[-1])))
    text = [f"{a}" if a == b else f"{a}..{b}" for a, b in runs[:5]]
    return ", ".join(text) + (", ..." if len(runs) > 5 else "")
