"""tensorflow-datasets image classification datasets as a :class:`DatasetSplits`, without TF.

Examples are read with ``tfds.data_source`` (random access over ArrayRecord files), which needs
neither TensorFlow nor a download at run time: prepare the dataset once beforehand, e.g.
``tfds build patch_camelyon --data_dir=DIR --file_format=array_record``.

The dataset's image feature is its first ``Image`` feature and its label the ``ClassLabel``
named ``label`` (else the first ``ClassLabel``). Its ``train`` / ``validation`` / ``test`` splits
are used where they exist; a missing one is carved out of ``train`` by example (or, without a
``train`` split, out of all splits pooled). There is no patient or site information: one site
named after the dataset, and one patient per example (a running index over all splits read).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_med.data import dataset, image_folder

# Our split name -> the tfds split name that provides it.
TFDS_SPLITS = {"train": "train", "val": "validation", "test": "test"}
_CHUNK = 256


def load_tfds(
    name: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    max_examples: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dataset.DatasetSplits:
    """Reads a prepared tfds image classification dataset into validated splits.

    Args:
      name: tfds name, optionally with config and version (``"patch_camelyon:2.0.0"``).
      data_dir: tfds data folder; None uses the tfds default.
      image_size: resize every image to ``image_size x image_size`` (bilinear, with Pillow); when
        None all images must share one size.
      channels: 1 (grayscale) or 3 (RGB); None keeps the dataset's own (RGBA becomes RGB).
      max_examples: read at most the first ``max_examples`` of each tfds split (for quick runs);
        carved splits are cut from what was read.
      val_fraction: share of the pool moved to validation when the dataset has no validation
        split.
      test_fraction: share of the pool moved to test when the dataset has no test split.
      seed: seeds the shuffle of carved splits.

    Returns:
      Validated splits named ``name``; images uint8 (float32 for 16-bit images), labels int32;
      task "binary" for a two-class label, else "multiclass".
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"{channels=} must be None (keep), 1 (grayscale) or 3 (RGB)")
    if image_size is not None and image_size < 1:
        raise ValueError(f"{image_size=} must be a positive integer or None")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"{max_examples=} must be a positive integer or None")
    for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{field}={value} must lie in (0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"{val_fraction=} + {test_fraction=} must be < 1")

    import tensorflow_datasets as tfds  # Imported here: a heavy import only this source needs.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"tfds dataset name={name!r} is not known to tensorflow-datasets") from e
    features = builder.info.features
    kinds = {k: type(f).__name__ for k, f in features.items()}
    image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    if image_key is None:
        raise ValueError(f"tfds dataset {name!r} has no Image feature; its features are {kinds}")
    label_keys = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not label_keys:
        raise ValueError(
            f"tfds dataset {name!r} has no ClassLabel feature; its features are {kinds}"
        )
    label_key = "label" if "label" in label_keys else label_keys[0]
    class_names = tuple(features[label_key].names)
    if len(class_names) < 2:
        raise ValueError(f"tfds dataset {name!r}: label {label_key!r} has fewer than 2 classes")
    if channels is None:
        native = features[image_key].shape[-1]
        channels = 1 if native == 1 else 3

    # Without written metadata (e.g. under tfds.testing.mock_data) the info lists no splits;
    # "train" is the one every classification dataset defines.
    available = list(builder.info.splits) or ["train"]
    present = {ours: theirs for ours, theirs in TFDS_SPLITS.items() if theirs in available}
    sources = list(present.values()) if "train" in present else available

    read: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in sources:
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except (NotImplementedError, FileNotFoundError, AssertionError) as e:
            raise FileNotFoundError(
                f"tfds dataset {name!r} split {split!r} is not prepared for random access under "
                f"data_dir={data_dir!r}; run `tfds build {name} --data_dir=... "
                f"--file_format=array_record` first ({e})"
            ) from e
        read[split] = _read_split(
            source,
            f"{name}/{split}",
            image_key=image_key,
            label_key=label_key,
            channels=channels,
            image_size=image_size,
            max_examples=max_examples,
        )
    shapes = {split: images.shape[1:] for split, (images, _) in read.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"tfds dataset {name!r}: image shapes differ between splits {shapes}; "
            "set data.image_size to resize them all"
        )

    parts: dict[str, dataset.ImageDataset] = {}
    offset = 0
    for split, (images, labels) in read.items():
        n = len(images)
        parts[split] = dataset.ImageDataset(
            images=images,
            labels=labels,
            sites=np.zeros(n, np.int32),
            # One patient per example; offsets keep ids distinct across splits.
            patient_ids=np.arange(offset, offset + n, dtype=np.int64),
        )
        offset += n
    if "train" in present:
        splits = {ours: parts[theirs] for ours, theirs in present.items()}
        pool = splits["train"]
    else:
        splits, pool = {}, dataset.concatenate(list(parts.values()))
    missing = [s for s in ("val", "test") if s not in splits]
    if missing:
        share = {"val": val_fraction, "test": test_fraction}
        fractions = [share[s] for s in missing]
        # Each example is its own patient, so this is a seeded split by example.
        carved = dataset.split_by_patient(
            pool, (1 - sum(fractions), *fractions), np.random.default_rng(seed)
        )
        splits["train"] = carved[0]
        splits.update(zip(missing, carved[1:], strict=True))

    images = splits["train"].images
    info = dataset.DatasetInfo(
        name=name,
        task="binary" if len(class_names) == 2 else "multiclass",
        num_classes=len(class_names),
        class_names=class_names,
        site_names=(builder.info.name,),
        image_shape=tuple(int(d) for d in images.shape[1:]),
    )
    return dataset.validate_splits(
        dataset.DatasetSplits(
            info=info, train=splits["train"], val=splits["val"], test=splits["test"]
        )
    )


def _read_split(
    source: Any,
    where: str,
    *,
    image_key: str,
    label_key: str,
    channels: int,
    image_size: int | None,
    max_examples: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W, C)`` and int32 labels of the first ``max_examples`` of ``source``."""
    n = len(source) if max_examples is None else min(max_examples, len(source))
    if n == 0:
        raise ValueError(f"{where}: split is empty")
    images: np.ndarray | None = None
    labels = np.empty(n, np.int32)
    batched = hasattr(source, "__getitems__")
    for start in range(0, n, _CHUNK):
        keys = list(range(start, min(start + _CHUNK, n)))
        examples = None
        if batched:
            try:
                # Batched reads let the ArrayRecord reader fetch records in parallel.
                examples = source.__getitems__(keys)
            except TypeError:
                # Some data source stand-ins (tfds mock data) declare but cannot serve batches.
                batched = False
        if examples is None:
            examples = [source[i] for i in keys]
        for i, example in zip(keys, examples, strict=True):
            image = _convert(example[image_key], channels, image_size)
            if images is None:
                images = np.empty((n, *image.shape), image.dtype)
            elif image.shape != images.shape[1:] or image.dtype != images.dtype:
                raise ValueError(
                    f"{where}: example 0 has image {images.shape[1:]} {images.dtype}, example "
                    f"{i} has {image.shape} {image.dtype}; set data.image_size to resize them all"
                )
            images[i] = image
            labels[i] = example[label_key]
    return images, labels


def _convert(image: np.ndarray, channels: int, image_size: int | None) -> np.ndarray:
    image = np.asarray(image)
    same_size = image_size is None or image.shape[:2] == (image_size, image_size)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == channels and same_size:
        return image  # Already in shape: skip the Pillow round trip.
    return image_folder.convert_image(image, channels=channels, image_size=image_size)
