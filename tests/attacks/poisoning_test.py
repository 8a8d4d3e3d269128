"""Poisoning: who is malicious, what their data and updates become, and how success is scored."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.attacks import poisoning
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import partition


def _federation(num_clients=4, per_client=10, seed=0):
    rng = np.random.default_rng(seed)
    n = num_clients * per_client
    data = dataset_lib.ImageDataset(
        images=rng.integers(0, 200, size=(n, 6, 6, 1)).astype(np.uint8),
        labels=rng.integers(0, 4, size=n).astype(np.int64),
        sites=np.repeat(np.arange(num_clients), per_client),
        patient_ids=np.arange(n),
    )
    # Clients of unequal size, so padding rows exist.
    indices = [np.flatnonzero(data.sites == k)[: per_client - k] for k in range(num_clients)]
    return partition.make_federated(data, indices, tuple(f"h{k}" for k in range(num_clients)))


def test_malicious_clients_come_from_the_stream_in_the_asked_number():
    a = poisoning.choose_malicious(12, 0.25, np.random.default_rng([0, 11]))
    b = poisoning.choose_malicious(12, 0.25, np.random.default_rng([0, 11]))
    assert a.sum() == 3 and np.array_equal(a, b)
    assert poisoning.choose_malicious(6, 0.01, np.random.default_rng(0)).sum() == 1
    assert poisoning.choose_malicious(6, 0.0, np.random.default_rng(0)).sum() == 0
    with pytest.raises(ValueError, match="fraction"):
        poisoning.choose_malicious(6, 1.0, np.random.default_rng(0))


def test_trigger_and_label_flip():
    images = np.full((2, 5, 5, 3), 0.3, np.float32)
    stamped = poisoning.stamp_trigger(images, 2)
    assert np.array_equal(stamped[:, :3], images[:, :3]) and np.all(images == 0.3)
    assert stamped[0, 3, 3, 2] == 1.0 and stamped[0, 3, 4, 0] == 0.0
    labels = np.arange(5)
    assert np.array_equal(poisoning.flip_labels(poisoning.flip_labels(labels, 5), 5), labels)
    with pytest.raises(ValueError, match="size"):
        poisoning.stamp_trigger(images, 6)


@pytest.mark.parametrize("kind", ["label_flip", "backdoor"])
def test_only_malicious_clients_data_changes(kind):
    fed = _federation()
    malicious = np.array([False, True, False, True])
    attack = poisoning.DataPoisoning(kind, 4, target_label=2, trigger_size=2, poison_fraction=0.5)
    out = attack.poison_federation(fed, malicious, np.random.default_rng(1))
    changed = np.any(out.images != fed.images, axis=(2, 3, 4)) | (out.labels != fed.labels)
    assert not changed[~malicious].any()
    assert np.array_equal(out.mask, fed.mask) and not changed[~fed.mask].any()
    # The padded arrays and the centralized examples stay one dataset.
    rows = fed.example_index[fed.mask]
    assert np.array_equal(out.centralized.images[rows], out.images[fed.mask])
    assert np.array_equal(out.centralized.labels[rows], out.labels[fed.mask])
    for k in np.flatnonzero(malicious):
        real = fed.mask[k]
        if kind == "label_flip":
            assert np.array_equal(out.labels[k][real], 3 - fed.labels[k][real])
        else:
            poisoned = np.all(out.images[k, :, 4:, 4:, 0] != fed.images[k, :, 4:, 4:, 0], (1, 2))
            poisoned |= out.labels[k] != fed.labels[k]
            assert poisoned[real].sum() <= int(0.5 * fed.counts[k])
            assert np.all(out.labels[k][real & poisoned] == 2)
            stamped = out.images[k][real & poisoned]
            assert np.array_equal(stamped, poisoning.stamp_trigger(stamped, 2))


def test_attack_test_sets_and_success_rate():
    data = _federation().centralized
    backdoor = poisoning.DataPoisoning("backdoor", 4, target_label=1, trigger_size=2)
    triggered = backdoor.attack_test_set(data)
    assert len(triggered) == int(np.sum(data.labels != 1)) and np.all(triggered.labels == 1)
    assert np.all(triggered.images[:, 4, 4, 0] == 255)
    flip = poisoning.DataPoisoning("label_flip", 4).attack_test_set(data)
    assert len(flip) == len(data)  # with 4 classes no label is its own flip
    assert poisoning.DataPoisoning("scale", 4).attack_test_set(data) is None
    probs = np.eye(4)[[1, 1, 0, 3]]
    assert poisoning.attack_success_rate(probs, np.array([1, 0, 0, 0])) == 0.5
    assert poisoning.attack_success_rate(np.array([0.9, 0.2]), np.array([1, 1])) == 0.5


def test_little_is_enough_z_follows_the_formula():
    for n, m in ((50, 12), (10, 2), (6, 1), (20, 9)):
        s = n // 2 + 1 - m
        expected = statistics.NormalDist().inv_cdf((n - s) / n)
        assert poisoning.little_is_enough_z(n, m) == pytest.approx(expected)
    assert poisoning.little_is_enough_z(6, 1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="minority"):
        poisoning.little_is_enough_z(6, 4)


def test_tampered_updates_equal_a_loop():
    rng = np.random.default_rng(0)
    deltas = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.arange(5.0)}
    table = np.array([True, False, True, False, False, True])  # over 6 clients
    indices = jnp.array([0, 1, 2, 3, 5])
    reporting = jnp.array([True, True, True, True, False])  # client 5 dropped: it sends nothing
    for kind, boost, z in (("scale", 6.0, 0.0), ("sign_flip", 2.0, 0.0), ("little", 0, 0.7)):
        kind = "little_is_enough" if kind == "little" else kind
        tamper = jax.jit(poisoning.make_tamper(kind, table, boost=boost, z=z))
        out = tamper(indices, reporting, jax.tree.map(jnp.asarray, deltas))
        for leaf in ("w", "b"):
            d = deltas[leaf]
            honest = [i for i in range(5) if bool(reporting[i]) and not table[int(indices[i])]]
            for i in range(5):
                bad = bool(reporting[i]) and table[int(indices[i])]
                want = d[i]
                if bad and kind == "little_is_enough":
                    want = d[honest].mean(0) - z * d[honest].std(0)
                elif bad:
                    want = d[i] * (boost if kind == "scale" else -boost)
                np.testing.assert_allclose(out[leaf][i], want, rtol=1e-5, atol=1e-6)
    honest = poisoning.make_tamper("label_flip", table, boost=1.0, z=0.0)
    assert honest(indices, reporting, deltas) is deltas
