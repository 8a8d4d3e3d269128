"""Partitioners keep patients whole and produce the requested skew; federated stacking."""

import numpy as np
import pytest

from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import partition

SITE_NAMES = ("a", "b", "c")
METHODS = ("by_site", "iid", "dirichlet", "quantity_skew")


def make_dataset(num_patients=100, num_classes=4, seed=0, multilabel=False):
    """About 200 examples of 4x4x1 images; 1-3 images per patient, patients nested in sites."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, size=num_patients)
    patient_ids = np.repeat(np.arange(num_patients), per_patient)
    n = patient_ids.size
    patient_site = rng.integers(0, len(SITE_NAMES), size=num_patients)
    patient_label = rng.integers(0, num_classes, size=num_patients)
    if multilabel:
        labels = (rng.uniform(size=(n, num_classes)) < 0.3).astype(np.int32)
    else:
        labels = patient_label[patient_ids].astype(np.int32)
    return dataset_lib.ImageDataset(
        images=rng.integers(1, 255, size=(n, 4, 4, 1), dtype=np.uint8),
        labels=labels,
        sites=patient_site[patient_ids].astype(np.int32),
        patient_ids=patient_ids,
        subgroups={"sex": rng.integers(0, 2, size=n).astype(np.int32)},
    )


def split(data, method, seed=0, num_clients=3, **kw):
    return partition.partition(
        data, method, num_clients, np.random.default_rng(seed), site_names=SITE_NAMES, **kw
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("multilabel", [False, True])
def test_disjoint_complete_and_patients_whole(method, multilabel):
    data = make_dataset(multilabel=multilabel)
    indices, names = split(data, method)
    assert len(indices) == len(names) == 3
    flat = np.concatenate(indices)
    assert np.array_equal(np.sort(flat), np.arange(len(data)))
    assert all(idx.size >= 1 and np.all(np.diff(idx) > 0) for idx in indices)
    owner = np.empty(len(data), dtype=int)
    for k, idx in enumerate(indices):
        owner[idx] = k
    for patient in np.unique(data.patient_ids):
        assert np.unique(owner[data.patient_ids == patient]).size == 1


def test_site_local_patient_ids_are_distinct_units():
    # Two sites both use patient id 0: they are different people and may land apart.
    data = dataset_lib.ImageDataset(
        images=np.zeros((4, 4, 4, 1), np.uint8),
        labels=np.array([0, 0, 1, 1], np.int32),
        sites=np.array([0, 0, 1, 1], np.int32),
        patient_ids=np.array([0, 0, 0, 0]),
    )
    indices = partition.iid(data, 2, np.random.default_rng(0))
    assert sorted(idx.tolist() for idx in indices) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_given_seed(method):
    data = make_dataset()
    first, _ = split(data, method, seed=7)
    second, _ = split(data, method, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_iid_deals_units_evenly():
    data = make_dataset()
    indices = partition.iid(data, 7, np.random.default_rng(0))
    units = [np.unique(data.patient_ids[idx]).size for idx in indices]
    assert max(units) - min(units) <= 1 and sum(units) == 100


def mean_label_tv(data, indices, num_classes=4):
    """Mean total-variation distance between client label distributions and the global one."""
    global_dist = np.bincount(data.labels, minlength=num_classes) / len(data)
    tvs = []
    for idx in indices:
        dist = np.bincount(data.labels[idx], minlength=num_classes) / idx.size
        tvs.append(0.5 * np.abs(dist - global_dist).sum())
    return np.mean(tvs)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    data = make_dataset(num_patients=200)
    seeds = range(5)

    def mean_tv(alpha):
        return np.mean(
            [
                mean_label_tv(data, split(data, "dirichlet", seed, 4, alpha=alpha)[0])
                for seed in seeds
            ]
        )

    skewed, near_iid = mean_tv(0.1), mean_tv(100.0)
    # Typical values are ~0.5 and ~0.05; the margin keeps this far from flaky.
    assert skewed > 0.25 > near_iid
    assert skewed > 3 * near_iid


def test_quantity_skew_gives_unequal_sizes():
    data = make_dataset(num_patients=200)

    def mean_cv(method):
        cvs = []
        for seed in range(5):
            sizes = np.array([idx.size for idx in split(data, method, seed, 5, beta=0.5)[0]])
            cvs.append(sizes.std() / sizes.mean())
        return np.mean(cvs)

    assert mean_cv("quantity_skew") > 0.3 > mean_cv("iid")


def test_min_examples_enforced_and_exhaustion_is_clear():
    data = make_dataset()
    rng = np.random.default_rng(0)
    indices = partition.dirichlet_label_skew(data, 5, 0.3, rng, min_examples=10)
    assert min(idx.size for idx in indices) >= 10
    indices = partition.quantity_skew(data, 5, rng, beta=0.3, min_examples=10)
    assert min(idx.size for idx in indices) >= 10
    with pytest.raises(ValueError, match="min_examples=1000"):
        partition.dirichlet_label_skew(data, 3, 1.0, rng, min_examples=1000, max_retries=3)
    with pytest.raises(ValueError, match="min_examples=1000"):
        partition.quantity_skew(data, 3, rng, min_examples=1000, max_retries=3)


def test_by_site_matches_sites():
    data = make_dataset()
    indices, names = partition.by_site(data, SITE_NAMES)
    assert names == list(SITE_NAMES)
    for code, idx in enumerate(indices):
        assert np.array_equal(idx, np.flatnonzero(data.sites == code))


def test_partition_errors():
    data = make_dataset()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"num_clients=0 must lie in \[1, 100\]"):
        partition.partition(data, "iid", 0, rng)
    with pytest.raises(ValueError, match=r"num_clients=101 must lie in \[1, 100\]"):
        partition.partition(data, "dirichlet", 101, rng)
    with pytest.raises(ValueError, match="alpha=0"):
        partition.partition(data, "dirichlet", 3, rng, alpha=0.0)
    with pytest.raises(ValueError, match="beta=-1"):
        partition.partition(data, "quantity_skew", 3, rng, beta=-1.0)
    with pytest.raises(ValueError, match="by_site.*iid.*dirichlet.*quantity_skew"):
        partition.partition(data, "random", 3, rng)
    with pytest.raises(ValueError, match="number of sites"):
        partition.partition(data, "by_site", 2, rng, site_names=SITE_NAMES)
    with pytest.raises(ValueError, match="'d'"):
        partition.by_site(data, SITE_NAMES + ("d",))


def test_make_federated_round_trip():
    data = make_dataset(multilabel=True)
    indices, names = split(data, "quantity_skew", seed=3)
    fed = partition.make_federated(data, indices, names, pad_to=200)
    k_clients = len(indices)
    assert fed.images.shape == (k_clients, 200, 4, 4, 1)
    assert fed.labels.shape == (k_clients, 200, 4)
    assert fed.client_names == tuple(names)
    assert np.array_equal(fed.counts, [idx.size for idx in indices])
    assert np.array_equal(fed.mask.sum(axis=1), fed.counts)
    assert len(fed.centralized) == len(data)
    for k, idx in enumerate(indices):
        expected = data.take(idx)
        got = fed.client(k)
        for field in ("images", "labels", "sites", "patient_ids"):
            assert np.array_equal(getattr(got, field), getattr(expected, field))
        assert np.array_equal(got.subgroups["sex"], expected.subgroups["sex"])
        n = idx.size
        assert fed.mask[k, :n].all() and not fed.mask[k, n:].any()
        assert np.array_equal(fed.images[k, :n], expected.images)
        assert np.array_equal(fed.labels[k, :n], expected.labels)
        assert not fed.images[k, n:].any() and not fed.labels[k, n:].any()
        assert (fed.example_index[k, n:] == -1).all()
        assert np.array_equal(fed.centralized.images[fed.example_index[k, :n]], expected.images)


def test_make_federated_default_pad_is_largest_client():
    data = make_dataset()
    indices, names = split(data, "iid")
    fed = partition.make_federated(data, indices, names)
    assert fed.images.shape[1] == max(idx.size for idx in indices)
    assert fed.labels.shape == fed.mask.shape == fed.example_index.shape


def test_make_federated_errors():
    data = make_dataset()
    with pytest.raises(ValueError, match="'empty'"):
        partition.make_federated(data, [np.arange(3), np.array([], int)], ["full", "empty"])
    with pytest.raises(ValueError, match="overlap"):
        partition.make_federated(data, [np.arange(3), np.arange(2, 5)], ["x", "y"])
    with pytest.raises(ValueError, match="pad_to=2"):
        partition.make_federated(data, [np.arange(3)], ["x"], pad_to=2)
    with pytest.raises(ValueError, match="client_names"):
        partition.make_federated(data, [np.arange(3)], ["x", "y"])
    fed = partition.make_federated(data, [np.arange(3)], ["x"])
    with pytest.raises(ValueError, match="k=1"):
        fed.client(1)
