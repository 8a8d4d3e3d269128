"""DICOM images and series read as a radiologist's viewer shows them (``pydicom``, optional).

A stored pixel value ``p`` becomes what the viewer displays in three steps of the DICOM standard
(PS3.3, https://dicom.nema.org/medical/dicom/current/output/html/part03.html):

1. **Modality LUT** (C.11.1): ``x = RescaleSlope * p + RescaleIntercept``; for CT ``x`` is in
   Hounsfield units (air -1000, water 0, bone > 300). Enhanced multi-frame files carry the two
   values in the (shared or per-frame) *Pixel Value Transformation* sequence.
2. **VOI LUT, linear window** (C.11.2.1.2.1) with centre ``c`` and width ``w``::

       y = 0                                   if x <= c - 0.5 - (w - 1) / 2
       y = 1                                   if x >  c - 0.5 + (w - 1) / 2
       y = (x - (c - 0.5)) / (w - 1) + 0.5     otherwise

   (output range ``[0, 1]``). ``c, w`` come from the header's ``WindowCenter`` /
   ``WindowWidth`` (the first value when several are given) or from the config
   (``data.window = "C,W"``, e.g. ``"40,400"`` soft tissue, ``"-600,1500"`` lung).
3. **Photometric interpretation** (C.7.6.3.1.2): ``MONOCHROME1`` displays low values bright, so
   it is inverted (``y -> 1 - y``) to read like ``MONOCHROME2``; RGB is kept.

``data.window`` chooses the window: ``"header"`` (the default) uses the header's, or, when a
file has none, the full range of its values (min to max); ``"C,W"`` a fixed window; ``"none"``
returns the rescaled values themselves (Hounsfield units for CT, float32), ``MONOCHROME1`` negated
so that larger still means brighter. Windowed images are float32 in ``[0, 1]``, the range the
normaliser (:mod:`fedjax_med.data.preprocess`) expects of float images.

The patient is the header's ``PatientID`` (per site: hospitals number patients independently), so
patient-level privacy and patient-wise splits group a patient's studies without a metadata file.

Volumes: a multi-frame file (``NumberOfFrames > 1``) or a series (the ``.dcm`` files of one
folder) is a volume ``(D, H, W)``; its slices are ordered along the slice normal (the cross
product of the ``ImageOrientationPatient`` row and column directions) by their
``ImagePositionPatient``, by ``InstanceNumber`` when positions are absent, and by file name last.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

WINDOW_MODES = ("header", "none")


def parse_window(spec: str) -> str | tuple[float, float]:
    """``"header"``, ``"none"`` or the ``(centre, width)`` of ``data.window``.

    Raises:
      ValueError: naming ``data.window`` and the allowed forms.

    Examples:
      >>> parse_window("40,400")
      (40.0, 400.0)
      >>> parse_window("header")
      'header'
    """
    text = spec.strip()
    if text in WINDOW_MODES:
        return text
    parts = text.split(",")
    try:
        centre, width = (float(p) for p in parts)
    except ValueError:
        centre = width = math.nan
    if len(parts) != 2 or not (math.isfinite(centre) and math.isfinite(width) and width >= 1):
        raise ValueError(
            f"config field 'data.window'={spec!r} must be 'header', 'none' or "
            "'CENTRE,WIDTH' with a finite centre and a width >= 1 (e.g. '40,400')"
        )
    return centre, width


def apply_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """The DICOM linear VOI window of ``values`` into ``[0, 1]`` (module docstring, step 2).

    Examples:
      >>> [round(float(y), 3) for y in apply_window(np.array([-1000.0, 40.0, 1000.0]), 40, 400)]
      [0.0, 0.501, 1.0]
    """
    if width < 1:
        raise ValueError(f"window {width=} must be >= 1 (DICOM PS3.3 C.11.2.1.2)")
    y = (np.asarray(values, np.float64) - (centre - 0.5)) / (width - 1) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DicomPixels:
    """Display values of one file or series and the header fields the loaders use.

    Attributes:
      pixels: float32 ``(H, W)`` (one frame) or ``(D, H, W)`` (volume); RGB files keep their
        stored ``(H, W, 3)`` values.
      patient_id: ``PatientID`` ("" when the header has none).
    """

    pixels: np.ndarray
    patient_id: str


def _pydicom():
    try:
        import pydicom
    except ImportError as e:
        raise ImportError(
            "reading DICOM (.dcm) files needs pydicom: install fedjax_med[dicom] "
            "(pip install 'fedjax_med[dicom]')"
        ) from e
    return pydicom


def _read(path: pathlib.Path) -> Any:
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except Exception as e:  # pydicom raises many types for corrupt or unsupported files.
        raise ValueError(f"cannot read DICOM file {path}: {e}") from e
    return ds, pixels


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        return float(value[0]) if len(value) else None
    return float(value)


def _functional(ds: Any, frame: int | None, sequence: str, keyword: str) -> Any:
    """``keyword`` of an enhanced file's per-frame (else shared) functional group ``sequence``."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
    if "SharedFunctionalGroupsSequence" in ds:
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        if sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
            return group[sequence][0][keyword].value
    return None


def _rescale(ds: Any, frame: int | None) -> tuple[float, float]:
    slope, intercept = _first(ds.get("RescaleSlope")), _first(ds.get("RescaleIntercept"))
    if slope is None:
        slope = _first(_functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    if intercept is None:
        intercept = _first(
            _functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        )
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _header_window(ds: Any) -> tuple[float, float] | None:
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if centre is None or width is None:
        centre = _first(_functional(ds, 0, "FrameVOILUTSequence", "WindowCenter"))
        width = _first(_functional(ds, 0, "FrameVOILUTSequence", "WindowWidth"))
    if centre is None or width is None or width < 1:
        return None
    return centre, width


def _display(values: np.ndarray, ds: Any, window: str | tuple[float, float]) -> np.ndarray:
    """Steps 2 and 3 of the module docstring on rescaled ``values``."""
    inverted = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"
    if window == "none":
        return (-values if inverted else values).astype(np.float32)
    if window == "header":
        window = _header_window(ds)
        if window is None:  # no window in the header: the values' full range
            lo, hi = float(values.min()), float(values.max())
            window = ((lo + hi + 1) / 2, max(hi - lo + 1, 1.0))
    y = apply_window(values, *window)
    return 1.0 - y if inverted else y


def _patient(ds: Any) -> str:
    return str(ds.get("PatientID", "") or "").strip()


def read_image(path: pathlib.Path, window: str | tuple[float, float]) -> DicomPixels:
    """One single-frame DICOM file: ``(H, W)`` display values (RGB: the stored ``(H, W, 3)``).

    Raises:
      ValueError: for a multi-frame file (a volume: use ``data.name='volume_folder'``).
    """
    ds, pixels = _read(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(
            f"{path}: a multi-frame DICOM file ({frames} frames, {pixels.shape}) is a volume; "
            "read volumes with data.name='volume_folder'"
        )
    if pixels.ndim == 3:  # RGB (e.g. dermoscopy, photographs): no modality or VOI LUT applies
        return DicomPixels(pixels, _patient(ds))
    slope, intercept = _rescale(ds, None)
    values = pixels.astype(np.float64) * slope + intercept
    return DicomPixels(_display(values, ds, window), _patient(ds))


def _normal(orientation: Any) -> np.ndarray | None:
    if orientation is None or len(orientation) != 6:
        return None
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return np.cross(row, col)


def slice_order(positions: Sequence[Any], orientation: Any, instances: Sequence[Any]) -> np.ndarray:
    """Indices that sort slices along the slice normal by ``ImagePositionPatient``.

    Falls back to ``InstanceNumber`` when any position is missing, and to the given order when
    any instance number is missing too (module docstring).

    Examples:
      >>> slice_order([[0, 0, 5.0], [0, 0, -2.5], [0, 0, 0.0]], [1, 0, 0, 0, 1, 0], [1, 2, 3])
      array([1, 2, 0])
      >>> slice_order([None, None], None, [7, 3])
      array([1, 0])
    """
    normal = _normal(orientation)
    if normal is not None and all(p is not None and len(p) == 3 for p in positions):
        distance = np.asarray(positions, float) @ normal
        return np.argsort(distance, kind="stable")
    if all(i is not None for i in instances):
        return np.argsort(np.asarray(instances, float), kind="stable")
    return np.arange(len(positions))


def read_volume(path: pathlib.Path, window: str | tuple[float, float]) -> DicomPixels:
    """A volume ``(D, H, W)``: a multi-frame file, or a folder holding one series of ``.dcm``."""
    if path.is_dir():
        return _read_series(path, window)
    ds, pixels = _read(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim != 3 or frames != pixels.shape[0]:
        raise ValueError(
            f"{path}: pixel array {pixels.shape} is not a grayscale multi-frame volume "
            f"(NumberOfFrames={frames}); a single-frame slice belongs in a series folder"
        )
    positions = [
        _functional(ds, f, "PlanePositionSequence", "ImagePositionPatient") for f in range(frames)
    ]
    orientation = _functional(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    order = slice_order(positions, orientation, list(range(frames)))
    values = np.empty(pixels.shape, np.float64)
    for f in range(frames):
        slope, intercept = _rescale(ds, f)
        values[f] = pixels[f].astype(np.float64) * slope + intercept
    return DicomPixels(_display(values[order], ds, window), _patient(ds))


def _read_series(folder: pathlib.Path, window: str | tuple[float, float]) -> DicomPixels:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    if not paths:
        raise ValueError(f"{folder}: a DICOM series folder must hold .dcm slices; found none")
    read = [_read(p) for p in paths]
    shapes = {p.name: pixels.shape for p, (_, pixels) in zip(paths, read, strict=True)}
    if len(set(shapes.values())) > 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(
            f"{folder}: the slices of a series must be single-frame grayscale images of one "
            f"size; found {dict(list(shapes.items())[:4])}"
        )
    patients = {_patient(ds) for ds, _ in read}
    if len(patients) > 1:
        raise ValueError(f"{folder}: one series holds several PatientID values {sorted(patients)}")
    first = read[0][0]
    order = slice_order(
        [ds.get("ImagePositionPatient") for ds, _ in read],
        first.get("ImageOrientationPatient"),
        [ds.get("InstanceNumber") for ds, _ in read],
    )
    slices = []
    for ds, pixels in (read[i] for i in order):
        slope, intercept = _rescale(ds, None)
        slices.append(pixels.astype(np.float64) * slope + intercept)
    return DicomPixels(_display(np.stack(slices), read[order[0]][0], window), patients.pop())
