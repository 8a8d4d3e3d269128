"""Segmentation sources: image folders with a mask per image, and ``.npz`` files with ``*_masks``.

A mask is an image of class ids, one per pixel (0 the background, ``1 .. K - 1`` the structures),
stored as the labels of a ``"segmentation"`` :class:`~fedjax_med.data.dataset.DatasetSplits`.

**Folders** (``data.name = "image_folder"``, ``data.task = "segmentation"``)::

    root/<site>/images/<name>.png      the image (any format the image folder reads)
    root/<site>/masks/<name>.png       its mask: 8-bit single channel, pixel value = class id

Every image needs a mask with the same file stem, and every mask an image; ``root/metadata.csv``
(paths like ``<site>/images/<name>.png``) groups images per patient and adds subgroups, as for
classification folders. Splits are drawn by patient within each site.

**Arrays** (``data.name = "medmnist"``, ``data.task = "segmentation"``): a ``.npz`` with
``{train,val,test}_images`` ``(N, H, W[, C])`` uint8 and ``{train,val,test}_masks`` ``(N, H, W)``
integers; optional ``{split}_sites`` (integer site codes, sites named ``site_<code>``) and
``{split}_patient_ids``.

``num_classes`` is declared (``data.num_classes``) or inferred as the largest mask value + 1 (at
least 2); class names are ``background, class_1, ...``. Resizing (``data.image_size``) is bilinear
for images and nearest-neighbour for masks, so a mask keeps only its class ids.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile

import numpy as np
from PIL import Image

from fedjax_med.data import dataset, dicom, image_folder, medmnist

IMAGES, MASKS = "images", "masks"
SPLITS = ("train", "val", "test")


def class_names(num_classes: int) -> tuple[str, ...]:
    """``("background", "class_1", ...)``.

    Examples:
      >>> class_names(3)
      ('background', 'class_1', 'class_2')
    """
    return ("background", *(f"class_{k}" for k in range(1, num_classes)))


def resize_masks(masks: np.ndarray, image_size: int) -> np.ndarray:
    """Masks ``(N, H, W)`` resized to ``image_size`` square by nearest neighbour (ids kept)."""
    if masks.shape[1:] == (image_size, image_size):
        return masks
    out = [
        np.asarray(
            Image.fromarray(m.astype(np.uint8)).resize(
                (image_size, image_size), Image.Resampling.NEAREST
            )
        )
        for m in masks
    ]
    return np.stack(out).astype(masks.dtype)


def check_num_classes(masks: list[np.ndarray], declared: int | None, where: str) -> int:
    """The number of classes: ``declared`` (checked against the masks) or the largest value + 1."""
    top = max(int(m.max()) for m in masks if m.size)
    low = min(int(m.min()) for m in masks if m.size)
    if low < 0:
        raise ValueError(f"{where}: mask values must be >= 0 (class ids), found {low}")
    if declared is None:
        return max(2, top + 1)
    if declared < 2 or top >= declared:
        raise ValueError(
            f"{where}: config field 'data.num_classes'={declared} must be >= 2 and exceed every "
            f"mask value (found {top})"
        )
    return declared


def load_mask_npz(
    path: str, *, num_classes: int | None = None, max_examples: int | None = None
) -> dataset.DatasetSplits:
    """Reads ``{split}_images`` and ``{split}_masks`` (module docstring) into validated splits."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config field 'data.path'={path!r} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file: {e}") from e
    with npz:
        keys = [f"{s}_{kind}" for s in SPLITS for kind in (IMAGES, MASKS)]
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(
                f"{path}: missing key(s) {missing}; a segmentation .npz holds {keys}, this one "
                f"holds {sorted(npz.files)}"
            )
        arrays = {k: npz[k] for k in npz.files}
    parts, offset = {}, 0
    for s in SPLITS:
        images = medmnist._check_images(arrays[f"{s}_images"], f"{s}_images")
        masks = arrays[f"{s}_masks"]
        if not np.issubdtype(masks.dtype, np.integer) or masks.shape != images.shape[:3]:
            raise ValueError(
                f"{path}: {s}_masks must be integers of shape {images.shape[:3]} (one class id "
                f"per pixel of {s}_images), got {masks.dtype} {masks.shape}"
            )
        n = len(images) if max_examples is None else min(max_examples, len(images))
        sites = arrays.get(f"{s}_sites", np.zeros(len(images), np.int32))
        patients = arrays.get(f"{s}_patient_ids", np.arange(offset, offset + len(images)))
        for name, values in ((f"{s}_sites", sites), (f"{s}_patient_ids", patients)):
            if values.shape != (len(images),) or not np.issubdtype(values.dtype, np.integer):
                raise ValueError(f"{path}: {name} must be integers of shape ({len(images)},)")
        parts[s] = dataset.ImageDataset(
            images=images[:n],
            labels=masks[:n].astype(np.uint8 if masks.max(initial=0) < 256 else np.int32),
            sites=sites[:n].astype(np.int32),
            patient_ids=patients[:n].astype(np.int64),
        )
        offset += len(images)
    k = check_num_classes([p.labels for p in parts.values()], num_classes, path)
    codes = sorted({int(c) for p in parts.values() for c in np.unique(p.sites)})
    if codes and codes[0] < 0:
        raise ValueError(f"{path}: *_sites must be >= 0, found {codes[0]}")
    info = dataset.DatasetInfo(
        name=os.path.splitext(os.path.basename(path))[0],
        task="segmentation",
        num_classes=k,
        class_names=class_names(k),
        site_names=tuple(f"site_{c}" for c in range(codes[-1] + 1)),
        image_shape=tuple(int(d) for d in parts["train"].images.shape[1:]),
    )
    return dataset.validate_splits(dataset.DatasetSplits(info=info, **parts))


def _pairs(root: pathlib.Path) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
    """``(site, image, mask)`` for every image of ``root/<site>/images``, sorted."""
    sites = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise ValueError(f"{root}: no site folders; expected {root}/<site>/{IMAGES}/*.png")
    pairs = []
    for site in sites:

        def stems(folder: pathlib.Path) -> dict[str, pathlib.Path]:
            if not folder.is_dir():
                raise ValueError(
                    f"{folder} is missing: a segmentation site folder holds {IMAGES}/ and "
                    f"{MASKS}/ with one mask per image (same file name)"
                )
            files = sorted(
                p
                for p in folder.iterdir()
                if p.is_file()
                and not p.name.startswith(".")
                and p.suffix.lower() in image_folder.IMAGE_SUFFIXES
            )
            return {p.stem: p for p in files}

        images, masks = stems(site / IMAGES), stems(site / MASKS)
        if not images:
            raise ValueError(f"{site / IMAGES} holds no images")
        for unmatched, there, missing in ((images, IMAGES, MASKS), (masks, MASKS, IMAGES)):
            lonely = sorted(set(unmatched) - set(masks if there == IMAGES else images))
            if lonely:
                raise ValueError(
                    f"{site / there}: {len(lonely)} file(s) without a partner in "
                    f"{site / missing}, e.g. {lonely[:3]}; every image needs a mask of the same "
                    "name"
                )
        pairs += [(site.name, images[stem], masks[stem]) for stem in sorted(images)]
    return pairs


def _read_mask(path: pathlib.Path) -> np.ndarray:
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("L", "P", "1", "I", "I;16"):
                raise ValueError(f"mode {mask.mode!r}; a mask is one channel of class ids")
            return np.asarray(mask).astype(np.int32)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read mask file {path}: {e}") from e


def load_mask_folder(
    root: str,
    *,
    image_size: int | None = None,
    channels: int = 1,
    num_classes: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    dicom_window: str = "header",
) -> dataset.DatasetSplits:
    """Reads ``root/<site>/{images,masks}/`` (module docstring) into validated splits.

    ``.dcm`` images are read as :func:`fedjax_med.data.image_folder.load_image_folder` reads them
    (``dicom_window`` is ``data.window``).
    """
    rootp = pathlib.Path(root)
    if not rootp.is_dir():
        raise FileNotFoundError(f"config field 'data.path'={root!r} is not a folder")
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ValueError(f"{val_fraction=} and {test_fraction=} must be > 0 and sum to less than 1")
    pairs = _pairs(rootp)
    image_paths = [image for _, image, _ in pairs]
    window = dicom.parse_window(dicom_window)
    images, dicom_patients = image_folder._decode_all(
        image_paths, channels=channels, image_size=image_size, window=window
    )
    masks = [_read_mask(mask) for _, _, mask in pairs]
    for (_, image, mask), m in zip(pairs, masks, strict=True):
        if image_size is None and m.shape != images.shape[1:3]:
            raise ValueError(f"{mask} is {m.shape}, its image {image} is {images.shape[1:3]}")
    if image_size is not None:
        masks = [resize_masks(m[None], image_size)[0] for m in masks]
    k = check_num_classes(masks, num_classes, root)
    patient_ids, subgroups, subgroup_names = image_folder.read_metadata(rootp, image_paths)
    if not (rootp / image_folder.METADATA_FILE).is_file() and any(dicom_patients):
        patient_ids = image_folder.patient_keys([site for site, _, _ in pairs], dicom_patients)
    site_names = tuple(sorted({site for site, _, _ in pairs}))
    everything = dataset.ImageDataset(
        images=images,
        labels=np.stack(masks).astype(np.uint8 if k <= 256 else np.int32),
        sites=np.array([site_names.index(s) for s, _, _ in pairs], np.int32),
        patient_ids=patient_ids,
        subgroups=subgroups,
    )
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    train, val, test = dataset.split_by_patient(everything, fractions, np.random.default_rng(seed))
    info = dataset.DatasetInfo(
        name=rootp.resolve().name,
        task="segmentation",
        num_classes=k,
        class_names=class_names(k),
        site_names=site_names,
        image_shape=tuple(int(d) for d in images.shape[1:]),
        subgroup_names=subgroup_names,
    )
    return dataset.validate_splits(
        dataset.DatasetSplits(info=info, train=train, val=val, test=test)
    )


def with_resized_masks(
    splits: dataset.DatasetSplits, image_size: int | None
) -> dataset.DatasetSplits:
    """``splits`` with every mask resized to ``image_size`` (nearest); unchanged when None."""
    if image_size is None or splits.info.task != "segmentation":
        return splits
    parts = {
        name: dataclasses.replace(d, labels=resize_masks(d.labels, image_size))
        for name in SPLITS
        for d in (splits.split(name),)
    }
    return dataclasses.replace(splits, **parts)
