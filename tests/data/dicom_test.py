"""DICOM as a viewer shows it: Hounsfield units, windows, MONOCHROME1, PatientID, slice order."""

import numpy as np
import pytest

from fedjax_med.data import dicom, image_folder, volumes

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # axial slices: rows along x, columns along y


def write_dcm(path, pixels, **fields):
    """Writes int16 ``pixels`` ((H, W), or (F, H, W) multi-frame) with the given header fields."""
    pixels = np.asarray(pixels, np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in fields.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


STORED = np.array([[0, 500], [1000, 2000]])  # stored values; x 1 - 1024: -1024, -524, -24, 976


def test_rescale_gives_hounsfield_units(tmp_path):
    path = write_dcm(tmp_path / "ct.dcm", STORED, RescaleSlope=2, RescaleIntercept=-1024)
    hu = dicom.read_image(path, "none").pixels
    np.testing.assert_allclose(hu, 2 * STORED - 1024)
    assert hu.dtype == np.float32


def test_window_from_config_and_header_clips_to_unit_range(tmp_path):
    path = write_dcm(
        tmp_path / "ct.dcm",
        STORED,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=-524,
        WindowWidth=201,
    )
    soft = dicom.read_image(path, dicom.parse_window("40,400")).pixels
    # Soft tissue window [-160, 240]: air (-1024, -524 HU) below it is 0, bone (976 HU) above it
    # 1, and -24 HU inside it lies on the line (x - (c - 0.5)) / (w - 1) + 0.5.
    np.testing.assert_allclose(soft, [[0, 0], [(-24 - 39.5) / 399 + 0.5, 1]], atol=1e-6)
    header = dicom.read_image(path, "header").pixels
    # The header's window (-524, 201) puts -524 HU mid-grey and clips the rest.
    np.testing.assert_allclose(header, [[0, 0.5025], [1, 1]], atol=1e-3)
    np.testing.assert_allclose(
        header, dicom.apply_window(STORED - 1024.0, -524, 201)
    )  # the standard's formula, not a min-max stretch


def test_no_header_window_uses_the_full_range(tmp_path):
    path = write_dcm(tmp_path / "x.dcm", STORED)
    y = dicom.read_image(path, "header").pixels
    assert y.min() == 0 and y.max() == 1 and np.all(np.diff(y.ravel()) > 0)


def test_monochrome1_is_inverted(tmp_path):
    m2 = write_dcm(tmp_path / "m2.dcm", STORED, WindowCenter=1000, WindowWidth=2001)
    m1 = write_dcm(
        tmp_path / "m1.dcm",
        STORED,
        WindowCenter=1000,
        WindowWidth=2001,
        PhotometricInterpretation="MONOCHROME1",
    )
    a, b = dicom.read_image(m2, "header").pixels, dicom.read_image(m1, "header").pixels
    np.testing.assert_allclose(a + b, 1.0, atol=1e-6)
    assert b[0, 0] > b[1, 1]  # low stored values display bright
    np.testing.assert_allclose(dicom.read_image(m1, "none").pixels, -STORED)


def test_image_folder_groups_patients_by_patient_id_per_site(tmp_path):
    for site in ("a", "b"):
        for cls in ("normal", "nodule"):
            for i in range(4):
                write_dcm(
                    tmp_path / site / cls / f"{i}.dcm",
                    STORED + i,
                    PatientID=f"P{i}",
                    RescaleIntercept=-1024,
                    RescaleSlope=1,
                )
    splits = image_folder.load_image_folder(str(tmp_path), val_fraction=0.25, test_fraction=0.25)
    everything = [splits.train, splits.val, splits.test]
    pairs = {
        (int(s), int(p)) for d in everything for s, p in zip(d.sites, d.patient_ids, strict=True)
    }
    # Four patients per site, each with a scan in both class folders; "P0" of site a is not
    # "P0" of site b.
    assert len(pairs) == 8 and len({p for _, p in pairs}) == 8
    assert sum(len(d) for d in everything) == 16
    for d in everything:  # no patient in two splits, and values are windowed into [0, 1]
        assert d.images.dtype == np.float32 and 0 <= d.images.min() <= d.images.max() <= 1
    seen = [set(d.patient_ids.tolist()) for d in everything]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_image_folder_refuses_a_multi_frame_file_naming_volume_folder(tmp_path):
    write_dcm(tmp_path / "a" / "x" / "v.dcm", np.zeros((3, 2, 2)))
    write_dcm(tmp_path / "a" / "y" / "i.dcm", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="multi-frame.*volume_folder"):
        image_folder.load_image_folder(str(tmp_path))


def test_series_slices_are_ordered_by_position_then_instance(tmp_path):
    z = [5.0, -2.5, 0.0, 2.5]  # files in this order; slice k holds the value k of its z rank
    rank = np.argsort(np.argsort(z))
    for i, (pos, r) in enumerate(zip(z, rank, strict=True)):
        write_dcm(
            tmp_path / "series" / f"{i:02d}.dcm",
            np.full((2, 2), r),
            PatientID="P7",
            ImagePositionPatient=[0, 0, pos],
            ImageOrientationPatient=IDENTITY,
            InstanceNumber=10 - i,
        )
        write_dcm(
            tmp_path / "by_instance" / f"{i:02d}.dcm",
            np.full((2, 2), i),
            InstanceNumber=10 - i,
        )
    read = dicom.read_volume(tmp_path / "series", "none")
    np.testing.assert_array_equal(read.pixels[:, 0, 0], [0, 1, 2, 3])
    assert read.patient_id == "P7"
    by_instance = dicom.read_volume(tmp_path / "by_instance", "none").pixels
    np.testing.assert_array_equal(by_instance[:, 0, 0], [3, 2, 1, 0])


def test_multi_frame_file_is_a_volume_in_position_order(tmp_path):
    frames = np.stack([np.full((2, 2), v) for v in (30, 10, 20)])
    per_frame = []
    for pos in (3.0, 1.0, 2.0):
        group = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [0, 0, pos]
        group.PlanePositionSequence = [position]
        per_frame.append(group)
    shared, orientation = Dataset(), Dataset()
    orientation.ImageOrientationPatient = IDENTITY
    shared.PlaneOrientationSequence = [orientation]
    path = write_dcm(
        tmp_path / "mf.dcm",
        frames,
        PerFrameFunctionalGroupsSequence=per_frame,
        SharedFunctionalGroupsSequence=[shared],
        RescaleSlope=1,
        RescaleIntercept=-5,
    )
    np.testing.assert_array_equal(dicom.read_volume(path, "none").pixels[:, 0, 0], [5, 15, 25])


def test_volume_folder_reads_series_and_groups_patients(tmp_path):
    for site in ("a", "b"):
        for cls in ("benign", "malignant"):
            for v in range(4):
                for k in range(3):
                    write_dcm(
                        tmp_path / site / cls / f"study{v}" / f"{k}.dcm",
                        np.full((4, 4), 100 * (cls == "malignant") + k),
                        PatientID=f"{cls}{v // 2}",
                        ImagePositionPatient=[0, 0, -k],
                        ImageOrientationPatient=IDENTITY,
                    )
    splits = volumes.load_volume_folder(
        str(tmp_path), window="none", val_fraction=0.25, test_fraction=0.25
    )
    assert splits.info.image_shape == (3, 4, 4, 1) and splits.info.site_names == ("a", "b")
    data = splits.train
    # Ordered by position: z = 0, -1, -2 are slices k = 2, 1, 0 (ascending along the normal).
    np.testing.assert_array_equal(data.images[0, :, 0, 0, 0] % 100, [2, 1, 0])
    all_ids = np.concatenate([splits.split(s).patient_ids for s in ("train", "val", "test")])
    assert len(np.unique(all_ids)) == 8  # 2 patients x 2 classes x 2 sites, 2 studies each


def test_window_spec_errors_name_the_field():
    for bad in ("lung", "40", "40,0", "nan,400", "1,2,3"):
        with pytest.raises(ValueError, match="data.window"):
            dicom.parse_window(bad)
