"""One entry point from ``config.data`` to validated :class:`DatasetSplits`.

``data.name`` selects the source: ``synthetic`` (embedded, no download), ``medmnist`` (a local
``.npz``, 2-D or 3-D), ``tfds`` (tensorflow-datasets by name, random access), ``image_folder``
(``root/<site>/<class>/*.png``) or ``volume_folder`` (``root/<site>/<class>/<volume>``, NIfTI or
DICOM; :mod:`fedjax_med.data.volumes`). Each loader lives in its own module and is imported
lazily so that, e.g., tensorflow-datasets is only imported when used. ``data.task =
"segmentation"`` reads masks as labels (:mod:`fedjax_med.data.masks`; the synthetic data draws
its lesions' masks).

Every ``data`` field acts on every source it applies to: where a loader does not do it itself,
:func:`load_splits` caps each split at ``max_examples`` (round-robin over sites), converts to
``channels`` and resizes to ``image_size`` afterwards, and checks ``num_classes`` and ``task``
against what the source holds.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from fedjax_med.data import dataset as dataset_lib

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fedjax_med")


def cache_dir(data: ml_collections.ConfigDict) -> str | None:
    """The synthetic cache folder of ``data`` (``None``: no cache), checked before any work.

    Raises:
      ValueError: naming ``data.cache_dir`` if it (or a folder above it) is a file, or the nearest
        existing folder cannot be written.
    """
    if data.cache_dir == "none":
        return None
    path = data.cache_dir or os.environ.get("FEDJAX_MED_CACHE", DEFAULT_CACHE_DIR)
    node = os.path.abspath(path)
    while not os.path.exists(node):
        node = os.path.dirname(node)
    field = "data.cache_dir" if data.cache_dir else "FEDJAX_MED_CACHE (data.cache_dir='')"
    if not os.path.isdir(node):
        raise ValueError(
            f"{field}: '{node}' is a file, not a folder; choose another folder or 'none'"
        )
    if not os.access(node, os.W_OK | os.X_OK):
        raise ValueError(f"{field}: cannot write in '{node}' (read-only); choose another or 'none'")
    return path


def load_splits(data: ml_collections.ConfigDict, seed: int) -> dataset_lib.DatasetSplits:
    """Loads the dataset described by ``config.data`` (validated, host NumPy arrays)."""
    image_size = data.image_size or None
    channels = data.channels or None
    max_examples = data.max_examples or None
    task = data.task or None
    if data.name == "synthetic":
        from fedjax_med.data import synthetic

        s = data.synthetic
        # data.image_size, when set, overrides data.synthetic.image_size: name the one in use.
        size_field = "data.image_size" if image_size else "data.synthetic.image_size"
        size = image_size or s.image_size
        if not (isinstance(size, int) and 16 <= size <= 1024):
            raise ValueError(
                f"config field '{size_field}'={size!r} must be an integer >= 16 and <= 1024 for "
                "the synthetic data (data.image_size, when set, overrides "
                "data.synthetic.image_size)"
            )
        spec = synthetic.SyntheticSpec(
            num_sites=s.num_sites,
            examples_per_site=s.examples_per_site,
            image_size=size,
            num_classes=s.num_classes,
            images_per_patient=s.images_per_patient,
            site_heterogeneity=s.site_heterogeneity,
            depth=s.depth,
            test_fraction=data.test_fraction,
            val_fraction=data.val_fraction,
            seed=seed,
            masks=task == "segmentation",
        )
        splits = synthetic.load_synthetic(spec, cache_dir(data))
        splits = convert_images(splits, channels=channels, image_size=None)
        if max_examples:
            splits = dataset_lib.cap_per_split(splits, max_examples)
    elif task == "segmentation" and data.name in ("medmnist", "image_folder"):
        from fedjax_med.data import masks

        if data.name == "medmnist":
            splits = masks.load_mask_npz(
                data.path, num_classes=data.num_classes or None, max_examples=max_examples
            )
            splits = convert_images(splits, channels=channels, image_size=image_size)
        else:
            splits = masks.load_mask_folder(
                data.path,
                image_size=image_size,
                channels=channels or 1,
                num_classes=data.num_classes or None,
                val_fraction=data.val_fraction,
                test_fraction=data.test_fraction,
                seed=seed,
                dicom_window=data.window,
            )
            if max_examples:
                splits = dataset_lib.cap_per_split(splits, max_examples)
    elif data.name == "medmnist":
        from fedjax_med.data import medmnist

        splits = medmnist.load_medmnist(
            data.path,
            task=task,
            max_examples=max_examples,
            num_classes=data.num_classes or None,
            sparse_labels=data.sparse_labels,
        )
        splits = convert_images(splits, channels=channels, image_size=image_size)
    elif data.name == "image_folder":
        from fedjax_med.data import image_folder

        splits = image_folder.load_image_folder(
            data.path,
            image_size=image_size,
            channels=channels or 1,
            val_fraction=data.val_fraction,
            test_fraction=data.test_fraction,
            seed=seed,
            dicom_window=data.window,
        )
        if max_examples:
            splits = dataset_lib.cap_per_split(splits, max_examples)
    elif data.name == "volume_folder":
        from fedjax_med.data import volumes

        if channels not in (None, 1):
            raise ValueError(
                f"config field 'data.channels'={channels} must be 0 or 1 for volumes (one channel)"
            )
        splits = volumes.load_volume_folder(
            data.path,
            image_size=image_size,
            val_fraction=data.val_fraction,
            test_fraction=data.test_fraction,
            seed=seed,
            window=data.window,
        )
        if max_examples:
            splits = dataset_lib.cap_per_split(splits, max_examples)
    elif data.name == "tfds":
        from fedjax_med.data import tfds_source

        splits = tfds_source.load_tfds(
            data.tfds_name,
            data_dir=data.data_dir or None,
            image_size=image_size,
            channels=channels,
            max_examples=max_examples,
            val_fraction=data.val_fraction,
            test_fraction=data.test_fraction,
            seed=seed,
        )
    else:
        raise ValueError(
            f"data.name={data.name!r} must be one of 'synthetic', 'medmnist', 'tfds', "
            "'image_folder', 'volume_folder'"
        )
    if task is not None:
        splits = dataset_lib.with_task(splits, task)
    if data.num_classes:
        splits = dataset_lib.check_num_classes(splits, data.num_classes)
    return dataset_lib.validate_splits(splits)


def convert_images(
    splits: dataset_lib.DatasetSplits, *, channels: int | None, image_size: int | None
) -> dataset_lib.DatasetSplits:
    """Every split converted to ``channels`` and resized to ``image_size`` (None: keep).

    The same conversion as an image folder's (Pillow; ITU-R 601 luma for RGB to grayscale,
    repeated gray for grayscale to RGB, bilinear resizing). Volumes ``(D, H, W, 1)`` are
    resampled trilinearly to an ``image_size`` cube and keep their one channel.
    """
    *spatial, c = splits.info.image_shape
    channels = channels or c
    if channels == c and (image_size is None or tuple(spatial) == (image_size,) * len(spatial)):
        return splits
    if len(spatial) == 3 and channels != 1:
        raise ValueError(
            f"config field 'data.channels'={channels} must be 0 or 1 for volumes (one channel)"
        )
    from fedjax_med.data import image_folder, volumes

    def convert(d: dataset_lib.ImageDataset) -> dataset_lib.ImageDataset:
        if len(spatial) == 3:
            images = [volumes.resize_volume(x[..., 0], image_size)[..., None] for x in d.images]
        else:
            images = [
                image_folder.convert_image(x, channels=channels, image_size=image_size)
                for x in d.images
            ]
        return dataclasses.replace(d, images=np.stack(images))

    parts = {name: convert(splits.split(name)) for name in ("train", "val", "test")}
    shape = tuple(int(v) for v in parts["train"].images.shape[1:])
    info = dataclasses.replace(splits.info, image_shape=shape)
    splits = dataclasses.replace(splits, info=info, **parts)
    if info.task == "segmentation":  # masks follow their images' size, by nearest neighbour
        from fedjax_med.data import masks

        splits = masks.with_resized_masks(splits, image_size)
    return splits
