"""Tests for the multi-site image folder reader on tiny PNG trees written to ``tmp_path``."""

import sys

import numpy as np
import pytest
from PIL import Image

from fedjax_med.data import image_folder

# site -> class -> number of images; site "b" lacks class "normal".
LAYOUT = {"a": {"benign": 6, "malignant": 5, "normal": 4}, "b": {"benign": 5, "malignant": 5}}
CLASSES = ("benign", "malignant", "normal")


def _pixel(site, cls, i):
    """A gray level that identifies (site, class), so images can be matched to their labels."""
    return 40 * ("ab".index(site) * 3 + CLASSES.index(cls)) + i


def _write_tree(base, layout=LAYOUT, size=(8, 6), mode="L"):
    """Writes ``base/<site>/<class>/<i>.png``; returns the relative paths written."""
    paths = []
    for site, classes in layout.items():
        for cls, n in classes.items():
            (base / site / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                value = _pixel(site, cls, i)
                pixels = np.full((size[1], size[0]), value, np.uint8)
                image = Image.fromarray(pixels).convert(mode)
                path = base / site / cls / f"img_{i}.png"
                image.save(path)
                paths.append(path)
    return paths


def _all(splits):
    return [splits.split(s) for s in ("train", "val", "test")]


def _check_labels_follow_images(splits):
    """Every image's gray level decodes back to its own site and label."""
    for data in _all(splits):
        code = data.images[:, 0, 0, 0].astype(int) // 40
        np.testing.assert_array_equal(code // 3, data.sites)
        names = np.array(splits.info.class_names)[data.labels]
        np.testing.assert_array_equal(np.array(CLASSES)[code % 3], names)


def test_sites_classes_and_patient_splits(tmp_path):
    _write_tree(tmp_path / "derm")
    splits = image_folder.load_image_folder(str(tmp_path / "derm"))
    info = splits.info
    assert info.name == "derm"
    assert (info.task, info.num_classes) == ("multiclass", 3)
    assert info.class_names == CLASSES
    assert info.site_names == ("a", "b")
    assert info.image_shape == (6, 8, 1)
    assert info.subgroup_names == {}
    sizes = [len(d) for d in _all(splits)]
    assert sum(sizes) == 25 and min(sizes) > 0
    for data in _all(splits):
        assert data.images.dtype == np.uint8
        assert data.labels.dtype == np.int32 and data.sites.dtype == np.int32
        assert data.patient_ids.dtype == np.int64
        assert set(data.sites) == {0, 1}, "every site keeps a held-out share"
    ids = np.concatenate([d.patient_ids for d in _all(splits)])
    assert len(np.unique(ids)) == 25, "without metadata each image is its own patient"
    _check_labels_follow_images(splits)


def test_split_is_seeded(tmp_path):
    _write_tree(tmp_path)
    first = image_folder.load_image_folder(str(tmp_path), seed=3)
    again = image_folder.load_image_folder(str(tmp_path), seed=3)
    other = image_folder.load_image_folder(str(tmp_path), seed=4)
    np.testing.assert_array_equal(first.test.patient_ids, again.test.patient_ids)
    assert not np.array_equal(first.test.patient_ids, other.test.patient_ids)


def test_two_classes_is_binary(tmp_path):
    _write_tree(tmp_path, {"a": {"benign": 5, "malignant": 5}, "b": {"benign": 5}})
    splits = image_folder.load_image_folder(str(tmp_path))
    assert (splits.info.task, splits.info.num_classes, splits.info.num_outputs) == ("binary", 2, 1)


def test_metadata_groups_patients_and_adds_subgroups(tmp_path):
    paths = _write_tree(tmp_path)
    rows, expected = ["path,patient_id,sex,scanner"], {}
    for k, path in enumerate(paths):
        rel = path.relative_to(tmp_path).as_posix()
        patient = f"{rel.split('/')[0]}-p{k // 3}"  # Three images per patient, within a site.
        sex = "MF"[k // 3 % 2]
        rows.append(f"{rel},{patient},{sex},{'xy'[k // 13]}")
        expected[_pixel(*rel.split("/")[:2], int(path.stem[4:]))] = (patient, sex)
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    splits = image_folder.load_image_folder(str(tmp_path), seed=1)
    assert splits.info.subgroup_names == {"sex": ("F", "M"), "scanner": ("x", "y")}
    patient_of_id = {}
    for data in _all(splits):
        assert data.subgroups["sex"].dtype == np.int32
        for image, pid, sex in zip(
            data.images, data.patient_ids, data.subgroups["sex"], strict=True
        ):
            patient, sex_name = expected[int(image[0, 0, 0])]
            assert splits.info.subgroup_names["sex"][sex] == sex_name
            assert patient_of_id.setdefault(int(pid), patient) == patient
    assert len(patient_of_id) == len(set(p for p, _ in expected.values()))
    split_of = [set(d.patient_ids.tolist()) for d in _all(splits)]
    assert not (split_of[0] & split_of[1] or split_of[0] & split_of[2] or split_of[1] & split_of[2])
    _check_labels_follow_images(splits)


def test_metadata_errors(tmp_path):
    paths = _write_tree(tmp_path)
    csv = tmp_path / "metadata.csv"
    csv.write_text("path,patient\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['patient_id'\]"):
        image_folder.load_image_folder(str(tmp_path))
    first = paths[0].relative_to(tmp_path).as_posix()
    csv.write_text(f"path,patient_id\n{first},p0\n")
    with pytest.raises(ValueError, match="24 image.*have no row"):
        image_folder.load_image_folder(str(tmp_path))
    csv.write_text(f"path,patient_id\n{first},p0\n{first},p1\n")
    with pytest.raises(ValueError, match="listed twice"):
        image_folder.load_image_folder(str(tmp_path))


@pytest.mark.parametrize("with_val", [True, False])
def test_predefined_split_folders(tmp_path, with_val):
    small = {"a": {"benign": 2, "malignant": 2}, "b": {"benign": 2, "malignant": 1}}
    _write_tree(tmp_path / "train", LAYOUT)
    _write_tree(tmp_path / "test", small)
    if with_val:
        _write_tree(tmp_path / "val", small)
    splits = image_folder.load_image_folder(str(tmp_path), val_fraction=0.2)
    assert splits.info.class_names == CLASSES
    assert len(splits.test) == 7
    if with_val:
        assert (len(splits.train), len(splits.val)) == (25, 7)
    else:
        assert len(splits.train) + len(splits.val) == 25 and len(splits.val) >= 2
    _check_labels_follow_images(splits)


def test_split_folders_need_train_and_test(tmp_path):
    _write_tree(tmp_path / "train")
    with pytest.raises(ValueError, match=r"need both train/ and test/"):
        image_folder.load_image_folder(str(tmp_path))
    _write_tree(tmp_path / "test")
    _write_tree(tmp_path / "site_c")
    with pytest.raises(ValueError, match=r"\['site_c'\] sit next to the split folders"):
        image_folder.load_image_folder(str(tmp_path))


def test_channels_and_resize(tmp_path):
    _write_tree(tmp_path, mode="RGB")
    rgb = image_folder.load_image_folder(str(tmp_path), channels=3, image_size=4)
    assert rgb.info.image_shape == (4, 4, 3)
    images = rgb.train.images
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    gray = image_folder.load_image_folder(str(tmp_path), channels=1, image_size=5)
    assert gray.train.images.shape[1:] == (5, 5, 1)
    _check_labels_follow_images(gray)


def test_differing_sizes_need_image_size(tmp_path):
    _write_tree(tmp_path)
    Image.new("L", (9, 9)).save(tmp_path / "b" / "benign" / "img_0.png")
    with pytest.raises(ValueError, match=r"images differ.*b/benign/img_0.png.*data.image_size"):
        image_folder.load_image_folder(str(tmp_path))
    assert image_folder.load_image_folder(str(tmp_path), image_size=8).info.image_shape == (
        8,
        8,
        1,
    )


def test_sixteen_bit_images_are_float32(tmp_path):
    for site in ("a", "b"):
        for k, cls in enumerate(("neg", "pos")):
            (tmp_path / site / cls).mkdir(parents=True)
            for i in range(5):
                pixels = np.full((4, 4), 10000 * k + 300 * i + 7, np.uint16)
                Image.fromarray(pixels).save(tmp_path / site / cls / f"{i}.png")
    splits = image_folder.load_image_folder(str(tmp_path))
    for data in _all(splits):
        assert data.images.dtype == np.float32
        np.testing.assert_array_equal(data.images[:, 0, 0, 0] // 10000, data.labels)
    values = np.concatenate([d.images[:, 0, 0, 0] for d in _all(splits)])
    assert values.max() == 10000 + 300 * 4 + 7, "raw 16-bit values, not rescaled"


def test_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root=.*missing"):
        image_folder.load_image_folder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no site folders"):
        image_folder.load_image_folder(str(tmp_path))
    _write_tree(tmp_path)
    (tmp_path / "c" / "benign").mkdir(parents=True)
    (tmp_path / "c" / "benign" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"site folder .*c holds no images"):
        image_folder.load_image_folder(str(tmp_path))


def test_single_class_is_an_error(tmp_path):
    _write_tree(tmp_path, {"a": {"benign": 3}, "b": {"benign": 3}})
    with pytest.raises(ValueError, match="at least 2 classes"):
        image_folder.load_image_folder(str(tmp_path))


def test_unreadable_image_is_named(tmp_path):
    _write_tree(tmp_path)
    (tmp_path / "a" / "normal" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken.png"):
        image_folder.load_image_folder(str(tmp_path))


def test_dicom_without_pydicom(tmp_path, monkeypatch):
    _write_tree(tmp_path)
    (tmp_path / "a" / "normal" / "scan.dcm").write_bytes(b"\0" * 132)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # Makes `import pydicom` fail.
    with pytest.raises(ImportError, match=r"scan.dcm.*install fedjax_med\[dicom\]"):
        image_folder.load_image_folder(str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": 2}, "channels=2"),
        ({"image_size": 0}, "image_size=0"),
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"test_fraction": 0.5, "val_fraction": 0.5}, "sum to less than 1"),
    ],
)
def test_argument_errors(tmp_path, kwargs, match):
    _write_tree(tmp_path)
    with pytest.raises(ValueError, match=match):
        image_folder.load_image_folder(str(tmp_path), **kwargs)


def test_convert_image_on_arrays():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255
    gray = image_folder.convert_image(rgb, channels=1)
    assert gray.shape == (4, 6, 1) and gray.dtype == np.uint8
    assert gray[0, 0, 0] == np.asarray(Image.fromarray(rgb).convert("L"))[0, 0]
    deep = image_folder.convert_image(np.full((4, 6), 4000, np.uint16), channels=3, image_size=2)
    assert deep.shape == (2, 2, 3) and deep.dtype == np.float32
    np.testing.assert_allclose(deep, 4000.0)
    with pytest.raises(ValueError, match=r"shape \(4, 6, 3\) and dtype uint16"):
        image_folder.convert_image(np.zeros((4, 6, 3), np.uint16), channels=1)


def test_hidden_and_other_files_are_ignored(tmp_path):
    _write_tree(tmp_path)
    (tmp_path / "a" / "benign" / "._img_0.png").write_bytes(b"AppleDouble, not a png")
    (tmp_path / "a" / "benign" / ".cache").mkdir()
    (tmp_path / "a" / "benign" / ".cache" / "x.png").write_bytes(b"not a png")
    (tmp_path / "a" / "benign" / "readme.txt").write_text("notes")
    (tmp_path / "a" / "benign" / "patient_9").mkdir()
    Image.fromarray(np.full((6, 8), _pixel("a", "benign", 9), np.uint8)).save(
        tmp_path / "a" / "benign" / "patient_9" / "img.png"
    )
    splits = image_folder.load_image_folder(str(tmp_path))
    assert sum(len(d) for d in _all(splits)) == 26, "nested folders are read, hidden ones not"
