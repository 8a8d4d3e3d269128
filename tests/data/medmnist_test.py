"""Tests for the MedMNIST ``.npz`` reader on tiny files written to ``tmp_path``."""

import numpy as np
import pytest

from fedjax_med.data import medmnist

SIZES = {"train": 12, "val": 4, "test": 6}


def _write(path, images=None, labels=None, drop=(), **overrides):
    """Writes a MedMNIST-style file; ``images`` / ``labels`` map split -> array builder."""
    arrays = {}
    for split, n in SIZES.items():
        arrays[f"{split}_images"] = images(split, n)
        arrays[f"{split}_labels"] = labels(split, n)
    arrays.update(overrides)
    for key in drop:
        del arrays[key]
    np.savez(path, **arrays)
    return str(path)


def _gray(split, n):
    # Pixel value = example index within the split, so truncation can be checked.
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 8, 8)).copy()


def _rgb(split, n):
    return np.zeros((n, 8, 8, 3), np.uint8)


def _multiclass(split, n):
    return (np.arange(n) % 4)[:, None].astype(np.uint8)


def _binary(split, n):
    return (np.arange(n) % 2)[:, None].astype(np.uint8)


def _multilabel(split, n):
    return (np.arange(n * 5).reshape(n, 5) % 3 == 0).astype(np.uint8)


def test_multiclass_grayscale(tmp_path):
    splits = medmnist.load_medmnist(_write(tmp_path / "organamnist.npz", _gray, _multiclass))
    info = splits.info
    assert info.name == "organamnist"
    assert (info.task, info.num_classes, info.num_outputs) == ("multiclass", 4, 4)
    assert info.class_names == ("class_0", "class_1", "class_2", "class_3")
    assert info.site_names == ("medmnist",)
    assert info.image_shape == (8, 8, 1)
    ids = []
    for split, n in SIZES.items():
        data = splits.split(split)
        assert len(data) == n
        assert data.images.dtype == np.uint8 and data.images.shape == (n, 8, 8, 1)
        assert data.labels.dtype == np.int32 and data.labels.shape == (n,)
        np.testing.assert_array_equal(data.labels, np.arange(n) % 4)
        np.testing.assert_array_equal(data.images[:, 0, 0, 0], np.arange(n))
        assert data.sites.dtype == np.int32 and not data.sites.any()
        assert data.patient_ids.dtype == np.int64
        ids.append(data.patient_ids)
    ids = np.concatenate(ids)
    assert len(np.unique(ids)) == len(ids), "one patient per image, distinct across splits"


def test_binary_rgb(tmp_path):
    splits = medmnist.load_medmnist(_write(tmp_path / "pneumoniamnist.npz", _rgb, _binary))
    assert (splits.info.task, splits.info.num_classes, splits.info.num_outputs) == (
        "binary",
        2,
        1,
    )
    assert splits.info.image_shape == (8, 8, 3)
    assert splits.train.images.shape == (12, 8, 8, 3)


def test_task_override_makes_two_classes_multiclass(tmp_path):
    path = _write(tmp_path / "b.npz", _gray, _binary)
    splits = medmnist.load_medmnist(path, task="multiclass")
    assert (splits.info.task, splits.info.num_classes, splits.info.num_outputs) == (
        "multiclass",
        2,
        2,
    )


def test_multilabel(tmp_path):
    splits = medmnist.load_medmnist(_write(tmp_path / "chestmnist.npz", _gray, _multilabel))
    assert (splits.info.task, splits.info.num_classes) == ("multilabel", 5)
    assert splits.val.labels.shape == (4, 5) and splits.val.labels.dtype == np.int32
    np.testing.assert_array_equal(splits.val.labels, _multilabel("val", 4))


def test_num_classes_counts_all_splits_and_ignores_truncation(tmp_path):
    test_labels = np.zeros((6, 1), np.uint8)
    test_labels[-1] = 4  # The largest class appears only in the last test example.
    path = _write(tmp_path / "m.npz", _gray, _multiclass, test_labels=test_labels)
    assert medmnist.load_medmnist(path).info.num_classes == 5
    splits = medmnist.load_medmnist(path, max_examples=3)
    assert splits.info.num_classes == 5
    assert [len(splits.split(s)) for s in SIZES] == [3, 3, 3]
    np.testing.assert_array_equal(splits.train.images[:, 0, 0, 0], [0, 1, 2])
    assert len(np.unique(np.concatenate([splits.split(s).patient_ids for s in SIZES]))) == 9


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        medmnist.load_medmnist(str(tmp_path / "nothere.npz"))


def test_not_an_npz(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_text("not a zip")
    with pytest.raises(ValueError, match="readable .npz"):
        medmnist.load_medmnist(str(path))


def test_missing_keys_are_named(tmp_path):
    path = _write(tmp_path / "m.npz", _gray, _multiclass, drop=("test_labels", "val_images"))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['val_images', 'test_labels'\]"):
        medmnist.load_medmnist(path)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"train_images": np.zeros((12, 8, 8), np.uint16)}, "train_images: dtype uint16"),
        ({"val_images": np.zeros((4, 8, 8, 8, 2), np.uint8)}, "val_images: shape"),
        ({"test_images": np.zeros((6, 9, 9), np.uint8)}, "image shapes differ"),
        ({"val_labels": np.zeros((3, 1), np.uint8)}, r"val_labels: shape \(3, 1\)"),
        ({"train_labels": np.zeros((12, 1), np.float32)}, "train_labels: dtype float32"),
        ({"test_labels": -np.ones((6, 1), np.int64)}, "test_labels: labels must be >= 0"),
        ({"test_labels": np.zeros((6, 2), np.uint8)}, "label widths differ"),
    ],
)
def test_bad_arrays_are_named(tmp_path, override, match):
    path = _write(tmp_path / "m.npz", _gray, _multiclass, **override)
    with pytest.raises(ValueError, match=match):
        medmnist.load_medmnist(path)


def test_multilabel_needs_zero_one(tmp_path):
    labels = lambda split, n: np.full((n, 5), 2, np.uint8)
    with pytest.raises(ValueError, match="multilabel.*0/1"):
        medmnist.load_medmnist(_write(tmp_path / "m.npz", _gray, labels))


@pytest.mark.parametrize(
    "labels, task, match",
    [
        (_multiclass, "binary", r"task='binary' needs labels in \{0, 1\}"),
        (_multilabel, "multiclass", r"task='multiclass' needs labels of shape \(N, 1\)"),
        (_binary, "regression", "task='regression' must be None"),
    ],
)
def test_task_override_errors(tmp_path, labels, task, match):
    with pytest.raises(ValueError, match=match):
        medmnist.load_medmnist(_write(tmp_path / "m.npz", _gray, labels), task=task)


def test_max_examples_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_examples=0"):
        medmnist.load_medmnist(_write(tmp_path / "m.npz", _gray, _binary), max_examples=0)
