"""One entry point from ``config.data`` to validated :class:`DatasetSplits`.

``data.name`` selects the source: ``synthetic`` (embedded, no download), ``medmnist`` (a local
``.npz``), ``tfds`` (tensorflow-datasets by name, random access) or ``image_folder``
(``root/<site>/<class>/*.png``). Each loader lives in its own module and is imported lazily so
that, e.g., tensorflow-datasets is only imported when used.
"""

from __future__ import annotations

import os

import ml_collections

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
            test_fraction=data.test_fraction,
            val_fraction=data.val_fraction,
            seed=seed,
        )
        splits = synthetic.load_synthetic(spec, cache_dir(data))
    elif data.name == "medmnist":
        from fedjax_med.data import medmnist

        splits = medmnist.load_medmnist(data.path, task=task, max_examples=max_examples)
    elif data.name == "image_folder":
        from fedjax_med.data import image_folder

        splits = image_folder.load_image_folder(
            data.path,
            image_size=image_size,
            channels=channels or 1,
            val_fraction=data.val_fraction,
            test_fraction=data.test_fraction,
            seed=seed,
        )
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
            "'image_folder'"
        )
    return dataset_lib.validate_splits(splits)
