"""Multi-site volume folders (NIfTI, DICOM) as a federated :class:`DatasetSplits` of volumes.

Layout (``data.name = "volume_folder"``, ``data.path = ROOT``)::

    ROOT/<site>/<class>/<volume>
    ROOT/metadata.csv            (optional: path,patient_id[,subgroup columns])

Each top-level folder is a site (one federated client), each folder inside it a class, and each
entry of a class folder one volume (searched recursively below it, so per-patient folders are
fine):

* a NIfTI file ``*.nii`` / ``*.nii.gz`` (``nibabel``, the ``nifti`` extra): reoriented to the
  closest canonical (RAS+) axes and read as ``(D, H, W) = (S, A, R)`` with its ``scl_slope`` /
  ``scl_inter`` applied;
* a multi-frame DICOM file ``*.dcm``, or a folder holding the ``.dcm`` slices of one series
  (``pydicom``, the ``dicom`` extra), read by :func:`fedjax_med.data.dicom.read_volume`: Hounsfield
  units, slices ordered by ``ImagePositionPatient``, ``MONOCHROME1`` inverted.

``data.window`` sets the display window of both (:mod:`fedjax_med.data.dicom`): ``"header"``
(the DICOM window; NIfTI's ``cal_min`` / ``cal_max``; else each volume's full range), ``"C,W"`` or
``"none"`` (raw values). Volumes come back as float32 ``(N, D, H, W, 1)``; ``data.image_size``
resamples every volume to ``S x S x S`` (trilinear), otherwise all volumes must share one shape.

Patients: ``metadata.csv`` as for image folders (:mod:`fedjax_med.data.image_folder`); without
it, DICOM volumes of one site sharing a ``PatientID`` are one patient and every other volume is
its own. Splits are drawn by patient within each site.
"""

from __future__ import annotations

import pathlib

import numpy as np

from fedjax_med.data import dataset, dicom, image_folder

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_volume(path: pathlib.Path) -> bool:
    name = path.name.lower()
    if path.is_file():
        return name.endswith(NIFTI_SUFFIXES) or name.endswith(".dcm")
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def _list_volumes(root: pathlib.Path) -> list[tuple[str, str, pathlib.Path]]:
    """``(site, class, path)`` for every volume under ``root/<site>/<class>/``, sorted."""

    def folders(p):
        return sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith("."))

    sites = folders(root)
    if not sites:
        raise ValueError(f"{root}: no site folders found; expected {root}/<site>/<class>/<volume>")
    found = []
    for site in sites:
        before = len(found)
        for cls in folders(site):
            pending = [cls]
            while pending:  # a folder of .dcm slices is one volume; other folders are searched
                for entry in sorted(pending.pop().iterdir()):
                    if entry.name.startswith("."):
                        continue
                    if _is_volume(entry):
                        found.append((site.name, cls.name, entry))
                    elif entry.is_dir():
                        pending.append(entry)
        if len(found) == before:
            raise ValueError(
                f"site folder {site} holds no volumes; expected {site}/<class>/<volume> with "
                f"<volume> a .nii / .nii.gz file, a multi-frame .dcm file or a folder of .dcm "
                "slices"
            )
    return found


def read_nifti(path: pathlib.Path, window: str | tuple[float, float]) -> np.ndarray:
    """One NIfTI volume as float32 ``(D, H, W)`` display values (module docstring)."""
    try:
        import nibabel
    except ImportError as e:
        raise ImportError(
            f"{path} is a NIfTI file and reading it needs nibabel: install fedjax_med[nifti] "
            "(pip install 'fedjax_med[nifti]')"
        ) from e
    try:
        image = nibabel.as_closest_canonical(nibabel.load(str(path)))
        values = np.asarray(image.get_fdata(dtype=np.float64))
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ValueError(f"cannot read NIfTI file {path}: {e}") from e
    if values.ndim == 4 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise ValueError(f"{path}: NIfTI data of shape {values.shape} is not one 3-D volume")
    values = np.transpose(values, (2, 1, 0))  # (R, A, S) -> (S, A, R) = (D, H, W)
    if window == "none":
        return values.astype(np.float32)
    if window == "header":
        lo, hi = (float(image.header[k]) for k in ("cal_min", "cal_max"))
        if not hi > lo:
            lo, hi = float(values.min()), float(values.max())
        window = ((lo + hi + 1) / 2, max(hi - lo + 1, 1.0))
    return dicom.apply_window(values, *window)


def read_volume(path: pathlib.Path, window: str | tuple[float, float]) -> tuple[np.ndarray, str]:
    """``(values (D, H, W), PatientID or "")`` of one NIfTI file, DICOM file or series folder."""
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti(path, window), ""
    try:
        read = dicom.read_volume(path, window)
    except ImportError as e:
        raise ImportError(f"{path} is DICOM: {e}") from e
    return read.pixels, read.patient_id


def resize_volume(volume: np.ndarray, size: int) -> np.ndarray:
    """``volume`` ``(D, H, W)`` resampled trilinearly to ``(size, size, size)``, same dtype.

    Examples:
      >>> resize_volume(np.zeros((4, 6, 8), np.float32), 5).shape
      (5, 5, 5)
    """
    from scipy import ndimage

    if volume.shape == (size,) * 3:
        return volume
    zoom = [size / n for n in volume.shape]
    out = ndimage.zoom(volume.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True)
    if volume.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(volume.dtype)


def load_volume_folder(
    root: str,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    window: str = "header",
) -> dataset.DatasetSplits:
    """Reads a multi-site volume folder (module docstring) into validated splits.

    Args:
      root: ``ROOT`` laid out as ``ROOT/<site>/<class>/<volume>``.
      image_size: resample every volume to ``image_size`` per side; None keeps the shapes, which
        must then agree.
      val_fraction: share of each site's volumes (by patient) for validation.
      test_fraction: share of each site's volumes (by patient) for test.
      seed: seeds the patient shuffle of the split.
      window: ``data.window``: ``"header"``, ``"none"`` or ``"CENTRE,WIDTH"``.

    Returns:
      Validated splits of float32 volumes ``(N, D, H, W, 1)``; task "binary" for two classes,
      else "multiclass".
    """
    if image_size is not None and image_size < 2:
        raise ValueError(
            f"config field 'data.image_size'={image_size} must be 0 (keep) or >= 2 for volumes"
        )
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"config fields 'data.val_fraction'={val_fraction} and 'data.test_fraction'="
            f"{test_fraction} must be > 0 and sum to less than 1"
        )
    parsed = dicom.parse_window(window)
    rootp = pathlib.Path(root)
    if not rootp.is_dir():
        raise FileNotFoundError(
            f"volume folder data.path={root!r} does not exist or is not a folder"
        )
    files = _list_volumes(rootp)
    site_names = tuple(sorted({site for site, _, _ in files}))
    class_names = tuple(sorted({cls for _, cls, _ in files}))
    if len(class_names) < 2:
        raise ValueError(f"{root}: found class folders {list(class_names)}; at least 2 are needed")
    volumes, patients = [], []
    for _, _, path in files:
        values, patient = read_volume(path, parsed)
        volumes.append(values if image_size is None else resize_volume(values, image_size))
        patients.append(patient)
    shapes = {tuple(v.shape) for v in volumes}
    if len(shapes) > 1:
        raise ValueError(
            f"{root}: volumes differ in shape ({sorted(shapes)[:4]}); set data.image_size to "
            "resample them all to one cube"
        )
    patient_ids, subgroups, subgroup_names = image_folder.read_metadata(
        rootp, [path for _, _, path in files]
    )
    if not (rootp / image_folder.METADATA_FILE).is_file() and any(patients):
        patient_ids = image_folder.patient_keys([s for s, _, _ in files], patients)
    site_index = {s: i for i, s in enumerate(site_names)}
    class_index = {c: i for i, c in enumerate(class_names)}
    everything = dataset.ImageDataset(
        images=np.stack(volumes).astype(np.float32)[..., None],
        labels=np.array([class_index[c] for _, c, _ in files], np.int32),
        sites=np.array([site_index[s] for s, _, _ in files], np.int32),
        patient_ids=patient_ids,
        subgroups=subgroups,
    )
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    train, val, test = dataset.split_by_patient(everything, fractions, np.random.default_rng(seed))
    info = dataset.DatasetInfo(
        name=rootp.resolve().name,
        task="binary" if len(class_names) == 2 else "multiclass",
        num_classes=len(class_names),
        class_names=class_names,
        site_names=site_names,
        image_shape=tuple(int(d) for d in everything.images.shape[1:]),
        subgroup_names=subgroup_names,
    )
    return dataset.validate_splits(dataset.DatasetSplits(info, train, val, test))
