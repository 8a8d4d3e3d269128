"""Tests for the tfds reader on ``tfds.testing.mock_data`` (no TensorFlow, no download)."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fedjax_med.data import tfds_source


def _mock(num_examples, **kwargs):
    return tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE, **kwargs
    )


def _write_split_metadata(data_dir, name, splits):
    """Writes ``dataset_info.json`` listing ``splits``, as a prepared dataset would have."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    infos = [
        tfds.core.SplitInfo(name=s, shard_lengths=[5], num_bytes=0, filename_template=None)
        for s in splits
    ]
    builder.info.set_splits(tfds.core.SplitDict(infos))
    pathlib.Path(builder.data_dir).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)


def _check_common(splits, n_total):
    ids = np.concatenate([splits.split(s).patient_ids for s in ("train", "val", "test")])
    assert len(ids) == n_total and len(np.unique(ids)) == n_total
    for s in ("train", "val", "test"):
        data = splits.split(s)
        assert data.labels.dtype == np.int32 and data.sites.dtype == np.int32
        assert not data.sites.any() and data.patient_ids.dtype == np.int64


def test_train_only_dataset_is_carved(tmp_path):
    with _mock(20):
        splits = tfds_source.load_tfds("colorectal_histology", data_dir=str(tmp_path), seed=1)
    info = splits.info
    assert (info.task, info.num_classes) == ("multiclass", 8)
    assert info.class_names[:2] == ("tumor", "stroma")
    assert info.site_names == ("colorectal_histology",)
    assert info.image_shape == (150, 150, 3)
    assert [len(splits.split(s)) for s in ("train", "val", "test")] == [14, 2, 4]
    assert splits.train.images.dtype == np.uint8
    _check_common(splits, 20)


def test_resize_and_grayscale_match_pillow(tmp_path):
    with _mock(10):
        full = tfds_source.load_tfds("colorectal_histology", data_dir=str(tmp_path))
        small = tfds_source.load_tfds(
            "colorectal_histology", data_dir=str(tmp_path), image_size=32, channels=1
        )
    assert small.info.image_shape == (32, 32, 1)
    np.testing.assert_array_equal(small.train.patient_ids, full.train.patient_ids)
    expected = Image.fromarray(full.train.images[0]).convert("L").resize((32, 32), Image.BILINEAR)
    np.testing.assert_array_equal(small.train.images[0, ..., 0], np.asarray(expected))


def test_predefined_splits_and_max_examples(tmp_path):
    _write_split_metadata(tmp_path, "patch_camelyon", ["train", "validation", "test"])
    with tfds.testing.mock_data(
        num_examples=6, data_dir=str(tmp_path), policy=tfds.testing.MockPolicy.USE_FILES
    ):
        splits = tfds_source.load_tfds("patch_camelyon", data_dir=str(tmp_path))
        capped = tfds_source.load_tfds("patch_camelyon", data_dir=str(tmp_path), max_examples=4)
    info = splits.info
    assert (info.task, info.num_classes, info.num_outputs) == ("binary", 2, 1)
    assert info.image_shape == (96, 96, 3)
    # The mock serves num_examples per split.
    assert [len(splits.split(s)) for s in ("train", "val", "test")] == [6, 6, 6]
    assert [len(capped.split(s)) for s in ("train", "val", "test")] == [4, 4, 4]
    _check_common(splits, 18)
    assert set(np.unique(splits.train.labels)) <= {0, 1}


def test_missing_validation_split_is_carved_from_train(tmp_path):
    _write_split_metadata(tmp_path, "patch_camelyon", ["train", "test"])
    with tfds.testing.mock_data(
        num_examples=10, data_dir=str(tmp_path), policy=tfds.testing.MockPolicy.USE_FILES
    ):
        splits = tfds_source.load_tfds("patch_camelyon", data_dir=str(tmp_path), val_fraction=0.2)
    assert [len(splits.split(s)) for s in ("train", "val", "test")] == [8, 2, 10]
    _check_common(splits, 20)


class _BatchedSource:
    """A random-access source that serves batches, as ArrayRecord data sources do."""

    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.examples = [
            {"image": rng.integers(0, 256, (12, 12, 3), np.uint8), "label": i % 8} for i in range(n)
        ]
        self.batches = []

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        raise AssertionError("batched reads were expected")

    def __getitems__(self, keys):
        self.batches.append(list(keys))
        return [self.examples[k] for k in keys]


def test_batched_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "_CHUNK", 4)
    source = _BatchedSource(10)
    with _mock(10, as_data_source_fn=lambda builder, split, **kw: source):
        splits = tfds_source.load_tfds("colorectal_histology", data_dir=str(tmp_path))
    assert source.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert splits.info.image_shape == (12, 12, 3)
    for data in (splits.train, splits.val, splits.test):
        for image, label, pid in zip(data.images, data.labels, data.patient_ids, strict=True):
            np.testing.assert_array_equal(image, source.examples[pid]["image"])
            assert label == source.examples[pid]["label"]


def test_differing_image_sizes_need_image_size(tmp_path):
    examples = [{"image": np.zeros((8 + i % 2, 8, 3), np.uint8), "label": i % 8} for i in range(10)]
    with _mock(10, as_data_source_fn=lambda builder, split, **kw: examples):
        with pytest.raises(ValueError, match="example 1 has .*data.image_size"):
            tfds_source.load_tfds("colorectal_histology", data_dir=str(tmp_path))
        splits = tfds_source.load_tfds("colorectal_histology", data_dir=str(tmp_path), image_size=8)
    assert splits.info.image_shape == (8, 8, 3)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="name='no_such_medical_set'"):
        tfds_source.load_tfds("no_such_medical_set", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "name, match",
    [("imdb_reviews", "no Image feature"), ("celeb_a", "no ClassLabel feature")],
)
def test_missing_features(tmp_path, name, match):
    with _mock(2), pytest.raises(ValueError, match=match):
        tfds_source.load_tfds(name, data_dir=str(tmp_path))


def test_unprepared_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build colorectal_histology"):
        tfds_source.load_tfds("colorectal_histology", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": 4}, "channels=4"),
        ({"image_size": 0}, "image_size=0"),
        ({"max_examples": 0}, "max_examples=0"),
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfds_source.load_tfds("colorectal_histology", **kwargs)
