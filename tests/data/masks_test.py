"""Segmentation data: synthetic lesion masks, mask folders, ``*_masks`` .npz, and masks that stay
with their images through splits, partitions, shuffles and padding."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fedjax_med.config import base
from fedjax_med.data import dataset, masks, partition, pipeline, preprocess, sources, synthetic

SPEC = synthetic.SyntheticSpec(num_sites=3, examples_per_site=60, image_size=16)


@pytest.fixture(scope="module")
def pair():
    return synthetic.generate(SPEC), synthetic.generate(
        synthetic.SyntheticSpec(**{**SPEC.__dict__, "masks": True})
    )


def test_synthetic_masks_leave_the_images_unchanged(pair):
    plain, seg = pair
    for name in ("train", "val", "test"):
        a, b = plain.split(name), seg.split(name)
        assert a.images.tobytes() == b.images.tobytes()
        np.testing.assert_array_equal(a.patient_ids, b.patient_ids)
        # The mask's class is the image's class; normal images have empty masks.
        np.testing.assert_array_equal(b.subgroups["finding"], a.labels)
        assert b.labels.shape == a.images.shape[:3]
        has = b.labels.reshape(len(b), -1).max(axis=1)
        np.testing.assert_array_equal(has, a.labels)
    assert seg.info.task == "segmentation"
    assert seg.info.class_names[0] == "background"


def test_synthetic_masks_cover_the_brighter_lesions(pair):
    _, seg = pair
    d = seg.train
    inside, outside = [], []
    for image, mask in zip(d.images[..., 0].astype(float), d.labels, strict=True):
        if mask.any():
            inside.append(image[mask > 0].mean())
            outside.append(image[mask == 0].mean())
    assert len(inside) > 20
    assert np.mean(np.array(inside) - np.array(outside)) > 5  # lesions add intensity


def test_cache_round_trip_and_plain_cache_name_unchanged(tmp_path, pair):
    _, seg = pair
    spec = synthetic.SyntheticSpec(**{**SPEC.__dict__, "masks": True})
    first = synthetic.load_synthetic(spec, str(tmp_path))
    again = synthetic.load_synthetic(spec, str(tmp_path))
    np.testing.assert_array_equal(first.test.labels, again.test.labels)
    np.testing.assert_array_equal(again.test.subgroups["finding"], seg.test.subgroups["finding"])
    assert synthetic.cache_path(SPEC, "c") != synthetic.cache_path(spec, "c")
    assert "masks" not in synthetic.cache_path(SPEC, "c")


def _aligned(images: np.ndarray, labels: np.ndarray) -> bool:
    """Masks built as ``image > 127`` (class 1) still equal that function of their image."""
    return np.array_equal(labels, (images[..., 0] > 127).astype(labels.dtype))


def test_masks_follow_images_through_split_partition_shuffle_and_padding():
    rng = np.random.default_rng(0)
    n = 90
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    data = dataset.ImageDataset(
        images=images,
        labels=(images[..., 0] > 127).astype(np.uint8),
        sites=np.repeat(np.arange(3), 30).astype(np.int32),
        patient_ids=np.arange(n) // 2,
    )
    parts = dataset.split_by_patient(data, (0.6, 0.2, 0.2), rng)
    assert all(_aligned(p.images, p.labels) for p in parts)
    train = parts[0]
    for method in ("by_site", "iid", "dirichlet"):
        clients, names = partition.partition(train, method, 3, np.random.default_rng(1))
        fed = partition.make_federated(train, clients, names)
        assert _aligned(fed.images, fed.labels)  # padding rows: zero image, zero mask
    normalizer = preprocess.fit_normalizer(train, 3, method="per_site")
    batches = pipeline.ShuffledBatches(len(train), 8, seed=3)
    for step in range(4):
        idx = batches.indices(step)
        x, y = pipeline.gather(train, idx, normalizer)
        assert _aligned(train.images[idx], y) and x.shape[:3] == y.shape
    for idx, mask in pipeline.padded_batches(len(train), 16):
        x, y = pipeline.gather(train, idx, normalizer)
        assert _aligned(train.images[idx], y) and mask.sum() <= 16
    info = dataset.DatasetInfo(
        "t", "segmentation", 2, ("background", "x"), ("a", "b", "c"), (8, 8, 1)
    )
    capped = dataset.cap_per_split(dataset.validate_splits(dataset.DatasetSplits(info, *parts)), 10)
    assert _aligned(capped.train.images, capped.train.labels)


def _config(**data):
    config = base.get_base_config()
    config.data.update(ml_collections.ConfigDict(data))
    return config.data


def test_mask_folder_reads_pairs_and_resizes_masks_by_nearest(tmp_path):
    rng = np.random.default_rng(2)
    for site in ("north", "south"):
        for kind in ("images", "masks"):
            os.makedirs(tmp_path / site / kind)
        for i in range(12):
            image = rng.integers(0, 256, (10, 10), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / site / "images" / f"{i}.png")
            Image.fromarray(((image > 127) * 2).astype(np.uint8)).save(
                tmp_path / site / "masks" / f"{i}.png"
            )
    splits = sources.load_splits(
        _config(name="image_folder", path=str(tmp_path), task="segmentation"), 0
    )
    assert splits.info.task == "segmentation" and splits.info.num_classes == 3
    assert splits.info.site_names == ("north", "south")
    for name in ("train", "val", "test"):
        d = splits.split(name)
        np.testing.assert_array_equal(d.labels, (d.images[..., 0] > 127) * 2)
    resized = sources.load_splits(
        _config(name="image_folder", path=str(tmp_path), task="segmentation", image_size=20), 0
    )
    assert resized.train.labels.shape[1:] == (20, 20)
    assert set(np.unique(resized.train.labels)) <= {0, 2}  # nearest: no blended class ids
    os.remove(tmp_path / "south" / "masks" / "3.png")
    with pytest.raises(ValueError, match="without a partner"):
        masks.load_mask_folder(str(tmp_path))


def test_mask_npz_with_sites_and_bad_masks(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        images = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_masks"] = (images > 200).astype(np.int64)
        arrays[f"{split}_sites"] = np.arange(n) % 2
    path = tmp_path / "seg.npz"
    np.savez(path, **arrays)
    splits = sources.load_splits(
        _config(name="medmnist", path=str(path), task="segmentation", image_size=24), 0
    )
    assert splits.info.site_names == ("site_0", "site_1") and splits.info.num_classes == 2
    assert splits.train.images.shape[1:] == (24, 24, 1) and splits.train.labels.shape[1:] == (
        24,
        24,
    )
    # Nearest-neighbour upsampling by 2 repeats each source pixel of the mask.
    np.testing.assert_array_equal(splits.train.labels[:, ::2, ::2], arrays["train_masks"])
    np.savez(path, **{**arrays, "val_masks": arrays["val_masks"][:, :5]})
    with pytest.raises(ValueError, match="val_masks must be integers of shape"):
        masks.load_mask_npz(str(path))
    with pytest.raises(ValueError, match="data.num_classes"):
        masks.check_num_classes([np.array([0, 3])], 2, "x")


def test_dataset_validation_names_mask_problems(pair):
    _, seg = pair
    bad = dataset.ImageDataset(
        images=seg.train.images,
        labels=seg.train.labels[:, :-1],
        sites=seg.train.sites,
        patient_ids=seg.train.patient_ids,
        subgroups=seg.train.subgroups,
    )
    with pytest.raises(ValueError, match="segmentation masks must have shape"):
        dataset.validate_dataset(bad, seg.info, "train")
