"""In-memory image datasets with per-example metadata, and their validation.

Every source (synthetic, MedMNIST ``.npz``, tensorflow-datasets, image folders) returns a
:class:`DatasetSplits` of :class:`ImageDataset` arrays on the host (NumPy). Each example carries
its ``site`` (hospital), ``patient_id`` and optional subgroup codes, so that federated splits,
patient-level privacy and subgroup metrics can be computed later without going back to the source.

Label conventions (``DatasetInfo.task``):

* ``"multiclass"``: ``labels`` int32 of shape ``(N,)`` in ``[0, num_classes)``; softmax head.
* ``"binary"``: ``labels`` int32 of shape ``(N,)`` in ``{0, 1}``; one sigmoid logit.
* ``"multilabel"``: ``labels`` int32 of shape ``(N, K)`` in ``{0, 1}``; K sigmoid logits.
* ``"segmentation"``: ``labels`` are masks, integers of shape ``(N, H, W)`` (the images' height
  and width) in ``[0, num_classes)``, one class per pixel, 0 the background; K logits per pixel.
  Masks are the labels, so every split, partition, shuffle and padding that moves a label moves
  its mask with its image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

TASKS = ("multiclass", "binary", "multilabel", "segmentation")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description shared by all splits of a dataset."""

    name: str
    task: str
    num_classes: int
    class_names: tuple[str, ...]
    site_names: tuple[str, ...]
    image_shape: tuple[int, ...]  # (H, W, C) images or (D, H, W, C) volumes
    subgroup_names: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        """Width of the model head: one logit for binary, one per class otherwise."""
        return 1 if self.task == "binary" else self.num_classes


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """One split: images ``(N, H, W, C)`` or volumes ``(N, D, H, W, C)`` (uint8 or float32),
    labels and metadata."""

    images: np.ndarray
    labels: np.ndarray
    sites: np.ndarray
    patient_ids: np.ndarray
    subgroups: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, indices: np.ndarray) -> ImageDataset:
        """The examples at ``indices`` (a new dataset; metadata follows the images)."""
        indices = np.asarray(indices)
        return ImageDataset(
            images=self.images[indices],
            labels=self.labels[indices],
            sites=self.sites[indices],
            patient_ids=self.patient_ids[indices],
            subgroups={k: v[indices] for k, v in self.subgroups.items()},
        )


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """Train / validation / test splits of one dataset with their shared info."""

    info: DatasetInfo
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset

    def split(self, name: str) -> ImageDataset:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split={name!r} must be one of 'train', 'val', 'test'")
        return getattr(self, name)


def concatenate(datasets: list[ImageDataset]) -> ImageDataset:
    """Concatenates datasets with identical metadata keys."""
    keys = set(datasets[0].subgroups)
    for d in datasets:
        if set(d.subgroups) != keys:
            raise ValueError("subgroups keys differ between the datasets to concatenate")
    return ImageDataset(
        images=np.concatenate([d.images for d in datasets]),
        labels=np.concatenate([d.labels for d in datasets]),
        sites=np.concatenate([d.sites for d in datasets]),
        patient_ids=np.concatenate([d.patient_ids for d in datasets]),
        subgroups={k: np.concatenate([d.subgroups[k] for d in datasets]) for k in keys},
    )


def validate_dataset(data: ImageDataset, info: DatasetInfo, split: str) -> None:
    """Raises ``ValueError`` naming the split and field when ``data`` breaks a convention."""
    where = f"{info.name}/{split}"
    n = len(data)
    if n == 0:
        raise ValueError(f"{where}: split is empty (0 examples); it must hold at least 1")
    if data.images.ndim not in (4, 5):
        raise ValueError(
            f"{where}: images must have shape (N, H, W, C) or volumes (N, D, H, W, C), got "
            f"{data.images.shape}"
        )
    if tuple(data.images.shape[1:]) != tuple(info.image_shape):
        raise ValueError(
            f"{where}: images have shape {data.images.shape[1:]}, info says {info.image_shape}"
        )
    if data.images.dtype not in (np.uint8, np.float32):
        raise ValueError(f"{where}: images dtype {data.images.dtype} must be uint8 or float32")
    if data.images.dtype == np.float32 and not np.all(np.isfinite(data.images)):
        raise ValueError(f"{where}: images contain NaN or inf")
    if info.task not in TASKS:
        raise ValueError(f"{where}: task={info.task!r} must be one of {TASKS}")
    labels = data.labels
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels dtype {labels.dtype} must be an integer type")
    if info.task == "multilabel":
        if labels.shape != (n, info.num_classes):
            raise ValueError(
                f"{where}: multilabel labels must have shape (N, {info.num_classes}), "
                f"got {labels.shape}"
            )
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{where}: multilabel labels must be 0 or 1")
    elif info.task == "segmentation":
        expected = (n, *data.images.shape[1:3])
        if labels.shape != expected:
            raise ValueError(
                f"{where}: segmentation masks must have shape (N, H, W) = {expected}, got "
                f"{labels.shape}"
            )
        if labels.min() < 0 or labels.max() >= info.num_classes:
            raise ValueError(
                f"{where}: mask values must lie in [0, {info.num_classes}) (one per class, 0 the "
                f"background), found [{labels.min()}, {labels.max()}]"
            )
    else:
        if labels.shape != (n,):
            raise ValueError(f"{where}: labels must have shape (N,) = ({n},), got {labels.shape}")
        hi = 2 if info.task == "binary" else info.num_classes
        if labels.min() < 0 or labels.max() >= hi:
            values, counts = np.unique(labels[(labels < 0) | (labels >= hi)], return_counts=True)
            found = ", ".join(f"{v} on {c} example(s)" for v, c in zip(values, counts, strict=True))
            raise ValueError(f"{where}: labels must lie in [0, {hi}), found {found}")
    for field in ("sites", "patient_ids"):
        arr = getattr(data, field)
        if arr.shape != (n,):
            raise ValueError(f"{where}: {field} must have shape ({n},), got {arr.shape}")
    if data.sites.min() < 0 or data.sites.max() >= len(info.site_names):
        raise ValueError(
            f"{where}: sites must lie in [0, {len(info.site_names)}) (one per site name)"
        )
    for name, codes in data.subgroups.items():
        if codes.shape != (n,):
            raise ValueError(f"{where}: subgroup {name!r} must have shape ({n},)")
        values = info.subgroup_names.get(name)
        if values is None:
            raise ValueError(f"{where}: subgroup {name!r} is not described in info")
        if codes.min() < 0 or codes.max() >= len(values):
            raise ValueError(f"{where}: subgroup {name!r} codes must lie in [0, {len(values)})")


def validate_splits(splits: DatasetSplits) -> DatasetSplits:
    """Validates every split; returns ``splits`` unchanged for chaining."""
    for name in ("train", "val", "test"):
        validate_dataset(splits.split(name), splits.info, name)
    return splits


def split_by_patient(
    data: ImageDataset, fractions: tuple[float, ...], rng: np.random.Generator
) -> list[ImageDataset]:
    """Splits ``data`` into parts of the given fractions with no patient in two parts.

    Patients are shuffled within each site and cut by cumulative image count, so each site keeps
    roughly the same proportions in every part (a held-out set per hospital).
    """
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions={fractions} must sum to 1")
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)
    for site in np.unique(data.sites):
        idx = np.flatnonzero(data.sites == site)
        patients, inverse = np.unique(data.patient_ids[idx], return_inverse=True)
        order = rng.permutation(len(patients))
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        # Position of each patient's block in the shuffled order, by cumulative image count.
        counts = np.bincount(inverse, minlength=len(patients))[order]
        ends = np.cumsum(counts) / counts.sum()
        which = np.searchsorted(bounds, ends - 1e-9, side="left")
        which = np.minimum(which, len(fractions) - 1)
        example_part = which[rank[inverse]]
        for p in range(len(fractions)):
            parts[p].append(idx[example_part == p])
    result = [data.take(np.sort(np.concatenate(p))) for p in parts]
    _check_patient_split(data, fractions, result)
    return result


def _check_patient_split(
    data: ImageDataset, fractions: tuple[float, ...], parts: list[ImageDataset]
) -> None:
    """Names the cause when a part due images got none: too few patients to divide."""
    names = ("train", "val", "test")[: len(fractions)]
    empty = [n for n, f, part in zip(names, fractions, parts, strict=False) if f > 0 and not part]
    if not empty:
        return
    patients = len(np.unique(data.patient_ids))
    sites = len(np.unique(data.sites))
    raise ValueError(
        f"{empty[0]} split is empty: splits are drawn by patient (no patient's images are in two "
        f"splits) and the {len(data)} images belong to only {patients} patient(s) across "
        f"{sites} site(s), too few to divide into fractions {tuple(float(f) for f in fractions)}; "
        "give more patients their own patient_id"
    )


def cap_per_split(splits: DatasetSplits, max_examples: int) -> DatasetSplits:
    """Keeps at most ``max_examples`` of each split, drawn round-robin over sites.

    Taking each site's first examples in turn keeps every site in a capped split (a federated
    run on a capped benchmark still has all its clients) and is deterministic.
    """
    if max_examples < 1:
        raise ValueError(f"{max_examples=} must be >= 1")

    def cap(data: ImageDataset) -> ImageDataset:
        if len(data) <= max_examples:
            return data
        rank = np.empty(len(data), np.int64)
        for site in np.unique(data.sites):
            idx = np.flatnonzero(data.sites == site)
            rank[idx] = np.arange(len(idx))
        keep = np.sort(np.argsort(rank, kind="stable")[:max_examples])
        return data.take(keep)

    return dataclasses.replace(
        splits, train=cap(splits.train), val=cap(splits.val), test=cap(splits.test)
    )


def with_task(splits: DatasetSplits, task: str) -> DatasetSplits:
    """``splits`` under the requested ``task``; only a two-class binary/multiclass switch exists.

    Binary and two-class multiclass labels are the same ids in ``{0, 1}``; only the head differs
    (one sigmoid logit or two softmax logits). Any other change would need other labels.
    """
    info = splits.info
    if task == info.task:
        return splits
    if {task, info.task} == {"binary", "multiclass"} and info.num_classes == 2:
        return dataclasses.replace(splits, info=dataclasses.replace(info, task=task))
    raise ValueError(
        f"data.task={task!r} does not fit {info.name}: its labels are {info.task} with "
        f"{info.num_classes} classes (only a two-class dataset switches between binary and "
        "multiclass); leave data.task empty to use the source's task"
    )


def check_num_classes(splits: DatasetSplits, declared: int) -> DatasetSplits:
    """Refuses ``splits`` whose number of classes differs from the declared ``data.num_classes``."""
    info = splits.info
    if declared != info.num_classes:
        names = ", ".join(info.class_names[:8]) + (", ..." if info.num_classes > 8 else "")
        raise ValueError(
            f"data.num_classes={declared} but {info.name} has {info.num_classes} classes ({names})"
        )
    return splits
