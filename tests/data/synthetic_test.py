"""Tests for the synthetic multi-site benchmark: determinism, structure, site effects, cache."""

import dataclasses
import os
import re

import numpy as np
import pytest

from fedjax_med.data import dataset, synthetic

SMALL = synthetic.SyntheticSpec(num_sites=4, examples_per_site=300, image_size=16)


def _all(splits: dataset.DatasetSplits) -> dataset.ImageDataset:
    return dataset.concatenate([splits.train, splits.val, splits.test])


def _arrays(splits: dataset.DatasetSplits) -> dict[str, np.ndarray]:
    out = {}
    for name in ("train", "val", "test"):
        d = splits.split(name)
        fields = dict(images=d.images, labels=d.labels, sites=d.sites, patient_ids=d.patient_ids)
        out.update({f"{name}.{k}": v for k, v in {**fields, **d.subgroups}.items()})
    return out


def _assert_same(a: dataset.DatasetSplits, b: dataset.DatasetSplits) -> None:
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for key, value in arrays_a.items():
        assert value.dtype == arrays_b[key].dtype, key
        np.testing.assert_array_equal(value, arrays_b[key], err_msg=key)
    assert a.info == b.info


@pytest.fixture(scope="module")
def small() -> dataset.DatasetSplits:
    return synthetic.generate(SMALL)


def test_same_seed_gives_identical_bytes(small):
    again = synthetic.generate(SMALL)
    _assert_same(small, again)
    assert small.train.images.tobytes() == again.train.images.tobytes()


def test_different_seed_differs(small):
    other = synthetic.generate(dataclasses.replace(SMALL, seed=1))
    n = min(len(other.train), len(small.train))
    assert not np.array_equal(other.train.images[:n], small.train.images[:n])


@pytest.mark.parametrize(
    "num_classes, image_size, task",
    [(2, 16, "binary"), (4, 17, "multiclass"), (5, 32, "multiclass")],
)
def test_shapes_dtypes_and_info(num_classes, image_size, task):
    spec = dataclasses.replace(
        SMALL, num_sites=3, examples_per_site=120, num_classes=num_classes, image_size=image_size
    )
    splits = synthetic.generate(spec)
    dataset.validate_splits(splits)
    info = splits.info
    assert info.task == task
    assert info.num_classes == num_classes
    assert info.class_names == synthetic.CLASS_NAMES[:num_classes]
    assert info.site_names == ("hospital_0", "hospital_1", "hospital_2")
    assert info.image_shape == (image_size, image_size, 1)
    assert dict(info.subgroup_names) == {
        "sex": synthetic.SEX_NAMES,
        "age_band": synthetic.AGE_BAND_NAMES,
    }
    for name in ("train", "val", "test"):
        d = splits.split(name)
        assert d.images.shape == (len(d), image_size, image_size, 1)
        assert d.images.dtype == np.uint8
        assert d.labels.dtype == np.int32
        assert d.patient_ids.dtype == np.int64
        assert set(d.subgroups) == {"sex", "age_band"}
    labels = _all(splits).labels
    assert set(np.unique(labels)) == set(range(num_classes))


def test_splits_by_patient_within_every_site(small):
    ids = {name: set(small.split(name).patient_ids.tolist()) for name in ("train", "val", "test")}
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    for name in ("train", "val", "test"):
        assert set(small.split(name).sites.tolist()) == set(range(SMALL.num_sites))
    everything = _all(small)
    frac_test = len(small.test) / len(everything)
    assert abs(frac_test - SMALL.test_fraction) < 0.05


def test_patients_have_several_images_and_one_identity(small):
    data = _all(small)
    _, counts = np.unique(data.patient_ids, return_counts=True)
    assert counts.max() > 1
    assert 2.5 < counts.mean() < 3.5  # images_per_patient = 3 on average
    for field in ("labels", "sites"):
        pairs = np.unique(np.stack([data.patient_ids, getattr(data, field)]), axis=1)
        assert pairs.shape[1] == len(counts), field
    for name, codes in data.subgroups.items():
        pairs = np.unique(np.stack([data.patient_ids, codes]), axis=1)
        assert pairs.shape[1] == len(counts), name


def test_one_image_per_patient():
    splits = synthetic.generate(dataclasses.replace(SMALL, images_per_patient=1))
    ids = _all(splits).patient_ids
    assert len(np.unique(ids)) == len(ids)


def test_images_of_a_patient_are_correlated(small):
    data = _all(small)
    x = data.images.reshape(len(data), -1).astype(np.float64)
    for site in np.unique(data.sites):  # remove the site's bias field, shared by all its patients
        x[data.sites == site] -= x[data.sites == site].mean(0)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    order = np.argsort(data.patient_ids, kind="stable")
    x, ids = x[order], data.patient_ids[order]
    same = ids[1:] == ids[:-1]  # neighbours after sorting: same patient or the next one
    corr = (x[1:] * x[:-1]).mean(1)
    assert corr[same].mean() > 0.2
    assert abs(corr[~same].mean()) < 0.05


def _site_stats(splits: dataset.DatasetSplits):
    data = _all(splits)
    x = data.images.astype(np.float64) / 255
    sites = range(len(splits.info.site_names))
    sizes = np.array([np.sum(data.sites == s) for s in sites])
    means = np.array([x[data.sites == s].mean() for s in sites])
    # Std of horizontal pixel differences: dominated by each site's noise level.
    noise = np.array([np.diff(x[data.sites == s], axis=2).std() for s in sites])
    prevalence = np.array(
        [
            np.bincount(data.labels[data.sites == s], minlength=4) / sizes[i]
            for i, s in enumerate(sites)
        ]
    )
    return sizes, means, noise, prevalence


def test_sites_differ_with_heterogeneity_and_coincide_without():
    spec = dataclasses.replace(SMALL, num_sites=6, examples_per_site=400)
    sizes, means, noise, prevalence = _site_stats(synthetic.generate(spec))
    assert sizes.std() / sizes.mean() > 0.1
    assert abs(sizes.mean() / spec.examples_per_site - 1) < 0.1  # examples_per_site is the mean
    assert sizes.min() > 0.4 * spec.examples_per_site
    assert np.ptp(means) > 0.05
    assert np.ptp(noise) > 0.012
    assert np.ptp(prevalence, axis=0).max() > 0.2

    flat = dataclasses.replace(spec, site_heterogeneity=0.0)
    sizes0, means0, noise0, _ = _site_stats(synthetic.generate(flat))
    assert sizes0.std() / sizes0.mean() < 0.1
    assert np.ptp(means0) < 0.03
    assert np.ptp(noise0) < 0.01


def test_mean_intensity_does_not_give_the_class_away():
    # Without site effects (which correlate prevalence and brightness), a 1-D classifier on the
    # image's mean intensity must stay near chance: the class is in the shape, not the brightness.
    spec = dataclasses.replace(SMALL, num_sites=6, examples_per_site=500, site_heterogeneity=0.0)
    splits = synthetic.generate(spec)
    mean = {n: splits.split(n).images.mean(axis=(1, 2, 3)) for n in ("train", "test")}
    y_train, y_test = splits.train.labels, splits.test.labels
    centres = np.array([mean["train"][y_train == k].mean() for k in range(4)])
    within_std = np.mean([mean["train"][y_train == k].std() for k in range(4)])
    assert np.ptp(centres) < 0.4 * within_std
    predicted = np.abs(mean["test"][:, None] - centres[None, :]).argmin(1)
    majority = np.bincount(y_test, minlength=4).max() / len(y_test)
    assert (predicted == y_test).mean() < majority + 0.08


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_sites", 0, "num_sites=0 must be >= 1"),
        ("examples_per_site", 0, "examples_per_site=0 must be >= 1"),
        ("image_size", 8, "image_size=8 must be >= 16"),
        ("num_classes", 1, "num_classes=1 must be in [2, 5]"),
        ("num_classes", 6, "num_classes=6 must be in [2, 5]"),
        ("images_per_patient", 0.5, "images_per_patient=0.5 must be >= 1"),
        ("site_heterogeneity", -0.1, "site_heterogeneity=-0.1 must be in [0, 2]"),
        ("test_fraction", 0.0, "test_fraction=0.0 must be in (0, 1)"),
        ("val_fraction", 1.0, "val_fraction=1.0 must be in (0, 1)"),
        ("seed", -1, "seed=-1 must be >= 0"),
        ("num_sites", 2.0, "num_sites=2.0 must be an integer"),
        ("seed", "0", "seed='0' must be a number"),
    ],
)
def test_spec_validation_names_the_field(field, value, message):
    spec = dataclasses.replace(SMALL, **{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        synthetic.generate(spec)


def test_fractions_must_leave_a_train_split():
    with pytest.raises(ValueError, match="test_fraction \\+ val_fraction"):
        synthetic.validate_spec(dataclasses.replace(SMALL, test_fraction=0.6, val_fraction=0.4))


def test_too_small_spec_says_which_field_to_grow():
    spec = dataclasses.replace(SMALL, num_sites=1, examples_per_site=2)
    with pytest.raises(ValueError, match="examples_per_site"):
        synthetic.generate(spec)


def test_cache_round_trip(tmp_path, small, monkeypatch):
    cache_dir = str(tmp_path / "cache")
    first = synthetic.load_synthetic(SMALL, cache_dir)
    _assert_same(first, small)
    path = synthetic.cache_path(SMALL, cache_dir)
    assert os.path.exists(path)
    assert os.listdir(cache_dir) == [os.path.basename(path)]  # no temporary file left behind

    def fail(spec):
        raise AssertionError("a cached spec must not be regenerated")

    monkeypatch.setattr(synthetic, "generate", fail)
    _assert_same(synthetic.load_synthetic(SMALL, cache_dir), small)


def test_cache_key_depends_on_every_field(tmp_path):
    paths = {synthetic.cache_path(SMALL, str(tmp_path))}
    for field, value in [("seed", 1), ("image_size", 32), ("site_heterogeneity", 0.5)]:
        paths.add(synthetic.cache_path(dataclasses.replace(SMALL, **{field: value}), str(tmp_path)))
    assert len(paths) == 4


@pytest.mark.parametrize("content", [b"not an npz file", b""])
def test_corrupt_cache_is_regenerated(tmp_path, small, content):
    cache_dir = str(tmp_path)
    path = synthetic.cache_path(SMALL, cache_dir)
    with open(path, "wb") as f:
        f.write(content)
    _assert_same(synthetic.load_synthetic(SMALL, cache_dir), small)
    with np.load(path) as arrays:  # rewritten as a valid file
        np.testing.assert_array_equal(arrays["train.images"], small.train.images)


def test_cache_with_wrong_contents_is_regenerated(tmp_path, small):
    cache_dir = str(tmp_path)
    path = synthetic.cache_path(SMALL, cache_dir)
    np.savez(path, **{"train.images": np.zeros((1, 2, 2, 1), np.uint8)})
    _assert_same(synthetic.load_synthetic(SMALL, cache_dir), small)


def test_no_cache_dir_generates(small):
    _assert_same(synthetic.load_synthetic(SMALL, None), small)
