"""Multi-site image folders: ``root/<site>/<class>/*.png`` as a federated :class:`DatasetSplits`.

Each top-level folder of ``root`` is one site (a hospital, later one federated client); inside it,
each folder is a class and every image below it (searched recursively, so per-patient subfolders
are fine) is an example of that class. PNG, JPEG, BMP and TIFF are read with Pillow, DICOM
(``.dcm``) with ``pydicom`` when the ``dicom`` extra is installed (:mod:`fedjax_med.data.dicom`:
rescaled to Hounsfield units, windowed by ``data.window``, MONOCHROME1 inverted). Other
files are ignored.

An optional ``root/metadata.csv`` groups images per patient and adds subgroups::

    path,patient_id,sex
    site_a/pneumonia/img_001.png,P17,F

``path`` is relative to ``root``; ``patient_id`` (any string) groups a patient's images so that
splits and patient-level privacy never separate them; every other column becomes a subgroup whose
string values are coded by their sorted order. Without the file, DICOM images of one site sharing
a ``PatientID`` are one patient, and every other image is its own patient.

Splits are drawn by patient within each site (:func:`dataset.split_by_patient`), unless ``root``
holds ``train/`` and ``test/`` (and optionally ``val/``) folders, each with the layout above; those
predefined splits are kept, and a missing ``val/`` is carved out of ``train/`` by patient.

8-bit images come back as uint8; 16-bit images as float32 holding the raw stored values; DICOM
images as float32 display values (in ``[0, 1]`` when windowed).
"""

from __future__ import annotations

import concurrent.futures
import csv
import os
import pathlib

import numpy as np
from PIL import Image

from fedjax_med.data import dataset, dicom

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
METADATA_FILE = "metadata.csv"
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
# Pillow modes holding more than 8 bits per pixel; they are read as float32.
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def load_image_folder(
    root: str,
    *,
    image_size: int | None = None,
    channels: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    dicom_window: str = "header",
) -> dataset.DatasetSplits:
    """Reads a multi-site image folder into validated train / val / test splits.

    Args:
      root: folder laid out as ``root/<site>/<class>/*`` or ``root/<split>/<site>/<class>/*``.
      image_size: resize every image to ``image_size x image_size`` (bilinear); when None all
        images must already share one size.
      channels: 1 (grayscale) or 3 (RGB); images are converted to it.
      val_fraction: share of each site's images (by patient) for validation; with predefined
        ``train/``/``test/`` folders and no ``val/``, the share of ``train/`` moved to validation.
      test_fraction: share of each site's images (by patient) for test; unused with predefined
        splits.
      seed: seeds the patient shuffle of the split.
      dicom_window: ``data.window`` for DICOM files: ``"header"``, ``"none"`` or
        ``"CENTRE,WIDTH"`` (:func:`fedjax_med.data.dicom.parse_window`).

    Returns:
      Validated splits; task "binary" for two classes, else "multiclass"; ``sites`` index
      ``info.site_names`` (sorted folder names), labels index ``info.class_names`` (the sorted
      union of class folders over all sites; a site may lack some classes).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from PIL import Image
      >>> tmp = tempfile.TemporaryDirectory()
      >>> root = tmp.name
      >>> for site in ("a", "b"):
      ...     for cls in ("healthy", "sick"):
      ...         os.makedirs(os.path.join(root, site, cls))
      ...         for i in range(10):
      ...             pixels = np.full((8, 8), i, np.uint8)
      ...             Image.fromarray(pixels).save(os.path.join(root, site, cls, f"{i}.png"))
      >>> splits = load_image_folder(root)
      >>> splits.info.task, splits.info.site_names, splits.info.image_shape
      ('binary', ('a', 'b'), (8, 8, 1))
      >>> len(splits.train) + len(splits.val) + len(splits.test)
      40
      >>> tmp.cleanup()
    """
    if channels not in (1, 3):
        raise ValueError(f"{channels=} must be 1 (grayscale) or 3 (RGB)")
    if image_size is not None and image_size < 1:
        raise ValueError(f"{image_size=} must be a positive integer or None")
    window = dicom.parse_window(dicom_window)
    rootp = pathlib.Path(root)
    if not rootp.is_dir():
        raise FileNotFoundError(f"image folder root={root!r} does not exist or is not a folder")

    split_dirs = _predefined_split_dirs(rootp)
    if split_dirs:
        if not 0 < val_fraction < 1 and "val" not in split_dirs:
            raise ValueError(f"{val_fraction=} must lie in (0, 1) to carve val/ out of train/")
        listings = {split: _list_files(d) for split, d in split_dirs.items()}
    else:
        if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"{val_fraction=} and {test_fraction=} must be > 0 and sum to less than 1"
            )
        listings = {"all": _list_files(rootp)}

    files = [f for split_files in listings.values() for f in split_files]
    site_names = tuple(sorted({site for site, _, _ in files}))
    class_names = tuple(sorted({cls for _, cls, _ in files}))
    if len(class_names) < 2:
        raise ValueError(
            f"{root}: found class folders {list(class_names)}; at least 2 classes are needed"
        )
    paths = [path for _, _, path in files]
    patient_ids, subgroups, subgroup_names = read_metadata(rootp, paths)
    images, dicom_patients = _decode_all(
        paths, channels=channels, image_size=image_size, window=window
    )
    if not (rootp / METADATA_FILE).is_file() and any(dicom_patients):
        patient_ids = patient_keys([site for site, _, _ in files], dicom_patients)

    site_index = {s: i for i, s in enumerate(site_names)}
    class_index = {c: i for i, c in enumerate(class_names)}
    everything = dataset.ImageDataset(
        images=images,
        labels=np.array([class_index[c] for _, c, _ in files], np.int32),
        sites=np.array([site_index[s] for s, _, _ in files], np.int32),
        patient_ids=patient_ids,
        subgroups=subgroups,
    )
    rng = np.random.default_rng(seed)
    if split_dirs:
        bounds = np.cumsum([0] + [len(split_files) for split_files in listings.values()])
        parts = {
            split: everything.take(np.arange(lo, hi))
            for split, lo, hi in zip(listings, bounds[:-1], bounds[1:], strict=True)
        }
        if "val" not in parts:
            parts["train"], parts["val"] = dataset.split_by_patient(
                parts["train"], (1 - val_fraction, val_fraction), rng
            )
    else:
        fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
        train, val, test = dataset.split_by_patient(everything, fractions, rng)
        parts = {"train": train, "val": val, "test": test}

    info = dataset.DatasetInfo(
        name=rootp.resolve().name,
        task="binary" if len(class_names) == 2 else "multiclass",
        num_classes=len(class_names),
        class_names=class_names,
        site_names=site_names,
        image_shape=tuple(int(d) for d in images.shape[1:]),
        subgroup_names=subgroup_names,
    )
    return dataset.validate_splits(
        dataset.DatasetSplits(info=info, train=parts["train"], val=parts["val"], test=parts["test"])
    )


def convert_image(
    image: Image.Image | np.ndarray, *, channels: int, image_size: int | None = None
) -> np.ndarray:
    """Converts one image to ``(H, W, channels)``, resized to ``image_size`` if given.

    8-bit images (any Pillow mode, or uint8 arrays of shape ``(H, W)`` / ``(H, W, 1|3|4)``) are
    converted by Pillow to grayscale ("L", ITU-R 601 luma) or RGB and returned as uint8; alpha is
    dropped. Deeper single-channel images (16-bit, int, float) are returned as float32 with their
    raw values; ``channels=3`` repeats the gray channel.
    """
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    size = None if image_size is None else (image_size, image_size)
    if image.mode in _HIGH_DEPTH_MODES:
        image = image.convert("F")
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32)[..., None]
        return np.repeat(array, channels, axis=-1) if channels > 1 else array.copy()
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8 and (array.ndim == 2 or array.shape[-1] in (3, 4)):
        return Image.fromarray(array)
    if array.ndim == 2 and (np.issubdtype(array.dtype, np.number)):
        return Image.fromarray(array.astype(np.float32))
    raise ValueError(
        f"image array of shape {array.shape} and dtype {array.dtype} is not supported: expected "
        "uint8 (H, W) or (H, W, 1|3|4), or a single-channel (H, W) array of another number type"
    )


def _predefined_split_dirs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """``{"train": root/train, ...}`` when ``root`` holds predefined split folders, else ``{}``."""
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    found: dict[str, pathlib.Path] = {}
    for split, names in SPLIT_FOLDERS.items():
        present = [n for n in names if n in folders]
        if len(present) > 1:
            raise ValueError(f"{root}: use only one of the split folders {present}")
        if present:
            found[split] = root / present[0]
    if not found:
        return {}
    if "train" not in found or "test" not in found:
        raise ValueError(
            f"{root}: has split folder(s) {sorted(p.name for p in found.values())}; predefined "
            "splits need both train/ and test/ (val/ is optional), otherwise rename the folders "
            "so that every top-level folder is a site"
        )
    others = folders - {p.name for p in found.values()}
    if others:
        raise ValueError(
            f"{root}: folders {sorted(others)} sit next to the split folders "
            f"{sorted(p.name for p in found.values())}; with predefined splits every top-level "
            "folder must be train/, val/ or test/"
        )
    return found


def _list_files(base: pathlib.Path) -> list[tuple[str, str, pathlib.Path]]:
    """``(site, class, path)`` for every image under ``base/<site>/<class>/``, sorted."""
    sites = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise ValueError(f"{base}: no site folders found; expected {base}/<site>/<class>/*.png")
    files = []
    for site in sites:
        found = []
        for cls in sorted(p for p in site.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(cls.rglob("*")):
                # Hidden entries are editor or OS artefacts (e.g. "._x.png" AppleDouble files).
                hidden = any(part.startswith(".") for part in path.relative_to(cls).parts)
                if path.suffix.lower() in IMAGE_SUFFIXES and not hidden and path.is_file():
                    found.append((site.name, cls.name, path))
        if not found:
            raise ValueError(
                f"site folder {site} holds no images; expected {site}/<class>/*, with suffix "
                f"one of {IMAGE_SUFFIXES}"
            )
        files.extend(found)
    return files


def read_metadata(
    root: pathlib.Path, paths: list[pathlib.Path]
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, tuple[str, ...]]]:
    """Patient ids, subgroup codes and subgroup value names for ``paths``, in order."""
    csv_path = root / METADATA_FILE
    if not csv_path.is_file():
        return np.arange(len(paths), dtype=np.int64), {}, {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "patient_id") if c not in columns]
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {missing}; the header must be "
                f"'path,patient_id[,other columns]', got {columns}"
            )
        rows: dict[str, dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            key = _normalise(row["path"])
            if key in rows:
                raise ValueError(f"{csv_path}:{line}: path {row['path']!r} is listed twice")
            if not row["patient_id"]:
                raise ValueError(f"{csv_path}:{line}: patient_id is empty for {row['path']!r}")
            rows[key] = row
    keys = [path.relative_to(root).as_posix() for path in paths]
    absent = [k for k in keys if k not in rows]
    if absent:
        raise ValueError(
            f"{csv_path}: {len(absent)} image(s) have no row, e.g. {absent[:3]}; every image "
            "needs a 'path' (relative to the root) and a 'patient_id'"
        )
    # Extra rows (for images no longer on disk) are ignored so one file can describe a superset.
    matched = [rows[k] for k in keys]
    _, patient_ids = np.unique([r["patient_id"] for r in matched], return_inverse=True)
    subgroups, subgroup_names = {}, {}
    for column in columns:
        if column in ("path", "patient_id"):
            continue
        names, codes = np.unique([r[column] for r in matched], return_inverse=True)
        subgroups[column] = codes.astype(np.int32)
        subgroup_names[column] = tuple(str(n) for n in names)
    return patient_ids.astype(np.int64), subgroups, subgroup_names


def patient_keys(sites: list[str], patients: list[str]) -> np.ndarray:
    """int64 patient ids: one per distinct ``(site, PatientID)``, one per example where it is "".

    Hospitals number their patients independently, so the same ``PatientID`` at two sites is two
    patients.

    Examples:
      >>> patient_keys(["a", "a", "b", "a"], ["P1", "P1", "P1", ""]).tolist()
      [0, 0, 1, 2]
    """
    keys = [
        f"id:{site}/{p}" if p else f"none:{i:012d}"
        for i, (site, p) in enumerate(zip(sites, patients, strict=True))
    ]
    _, ids = np.unique(keys, return_inverse=True)
    return ids.astype(np.int64)


def _normalise(path: str) -> str:
    return pathlib.PurePosixPath(path.replace("\\", "/")).as_posix().removeprefix("./")


def _decode_all(
    paths: list[pathlib.Path], *, channels: int, image_size: int | None, window
) -> tuple[np.ndarray, list[str]]:
    """All images as one ``(N, H, W, C)`` array (checked to agree in shape), and each image's
    DICOM ``PatientID`` ("" for other files)."""
    first, patient = _decode(paths[0], channels, image_size, window)
    out = np.empty((len(paths), *first.shape), first.dtype)
    out[0] = first
    patients = [patient] + [""] * (len(paths) - 1)

    def fill(i: int) -> None:
        image, patients[i] = _decode(paths[i], channels, image_size, window)
        if image.shape != first.shape or image.dtype != first.dtype:
            hint = (
                " or set data.image_size to resize them all"
                if image.shape != first.shape
                else "; mix only 8-bit or only 16-bit images"
            )
            raise ValueError(
                f"images differ: {paths[0]} is {first.shape} {first.dtype}, {paths[i]} is "
                f"{image.shape} {image.dtype}; make them equal{hint}"
            )
        out[i] = image

    # Pillow releases the GIL while decoding, so threads overlap file reads and decoding.
    workers = min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, range(1, len(paths))))
    return out, patients


def _decode(
    path: pathlib.Path, channels: int, image_size: int | None, window
) -> tuple[np.ndarray, str]:
    if path.suffix.lower() == ".dcm":
        try:
            read = dicom.read_image(path, window)
        except ImportError as e:
            raise ImportError(f"{path} is a DICOM file: {e}") from e
        try:
            image = convert_image(read.pixels, channels=channels, image_size=image_size)
        except ValueError as e:
            raise ValueError(f"cannot convert DICOM file {path}: {e}") from e
        return image, read.patient_id
    try:
        with Image.open(path) as image:
            return convert_image(image, channels=channels, image_size=image_size), ""
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e
