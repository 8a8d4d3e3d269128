"""MedMNIST v2/v3 ``.npz`` files as a :class:`DatasetSplits`.

The public format (Yang et al., MedMNIST v2, https://arxiv.org/abs/2110.14795) stores six arrays:
``{train,val,test}_images`` uint8 of shape ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)``, and
``{train,val,test}_labels`` of shape ``(N, 1)`` (one class index) or ``(N, K)`` (K binary
findings, as ChestMNIST).

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
    path: str, *, task: str | None = None, max_examples: int | None = None
) -> dataset.DatasetSplits:
    """Reads a MedMNIST ``.npz`` file into validated train / val / test splits.

    Args:
      path: the ``.npz`` file, e.g. ``pathmnist.npz`` or ``chestmnist_64.npz``.
      task: None infers it from the labels: ``(N, 1)`` with at most two classes is "binary",
        with more "multiclass", ``(N, K > 1)`` is "multilabel". Pass "multiclass" to train a
        two-class file with a softmax head.
      max_examples: keep only the first ``max_examples`` of each split (for quick runs). Task and
        ``num_classes`` are inferred from the full file, so they do not change with truncation.

    Returns:
      Validated splits named after the file stem; uint8 images ``(N, H, W, C)``, int32 labels
      ``(N,)`` (binary, multiclass) or ``(N, K)`` (multilabel).

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

    task, num_classes = _infer_task(np.concatenate(list(labels.values())), task, path)
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
    raise ValueError(
        f"{key}: shape {images.shape} must be (N, H, W) or (N, H, W, 1|3); "
        "3-D volumes (MedMNIST3D) are not supported"
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


def _infer_task(labels: np.ndarray, task: str | None, path: str) -> tuple[str, int]:
    """``(task, num_classes)`` from all labels ``(N, K)`` and the requested ``task``."""
    width = labels.shape[1]
    top = int(labels.max()) if labels.size else 0
    if task is None:
        task = "multilabel" if width > 1 else ("binary" if top <= 1 else "multiclass")
    if task == "multilabel":
        if top > 1:
            raise ValueError(f"{path}: task='multilabel' needs 0/1 labels, found value {top}")
        return task, width
    if width != 1:
        raise ValueError(
            f"{path}: {task=} needs labels of shape (N, 1), got (N, {width}); "
            "use task='multilabel' or None"
        )
    if task == "binary":
        if top > 1:
            raise ValueError(f"{path}: task='binary' needs labels in {{0, 1}}, found {top}")
        return task, 2
    return task, max(top + 1, 2)
