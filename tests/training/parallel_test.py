"""The ``data`` mesh: batches split along axis 0, state replicated, sizes checked by name.

tests/conftest.py gives the suite 4 fake CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fedjax_med.training import parallel

NUM_DEVICES = 4


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == NUM_DEVICES, "tests/conftest.py sets 4 fake CPU devices"
    return parallel.make_data_parallel(0)


def test_zero_means_every_device(mesh):
    assert mesh.size == NUM_DEVICES
    assert mesh.mesh.axis_names == ("data",)
    assert list(mesh.mesh.devices.flat) == jax.devices()


@pytest.mark.parametrize("num_devices", [1, 2, 4])
def test_first_devices_in_order(num_devices):
    dp = parallel.make_data_parallel(num_devices)
    assert dp.size == num_devices
    assert list(dp.mesh.devices.flat) == jax.devices()[:num_devices]


def test_too_many_devices_names_the_field():
    with pytest.raises(ValueError, match=r"train\.num_devices=5 must be <= the 4 available"):
        parallel.make_data_parallel(NUM_DEVICES + 1)


def test_shard_batch_splits_axis_zero(mesh):
    batch = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2)
    sharded = mesh.shard_batch(batch)
    assert sharded.shape == batch.shape and sharded.dtype == batch.dtype
    assert sharded.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(sharded), batch)
    shards = sorted(sharded.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.device for s in shards] == jax.devices()
    for i, shard in enumerate(shards):
        assert shard.data.shape == (2, 3, 2)
        np.testing.assert_array_equal(np.asarray(shard.data), batch[2 * i : 2 * i + 2])


def test_shard_batch_keeps_integer_labels(mesh):
    labels = np.array([3, 1, 4, 1], np.int32)
    sharded = mesh.shard_batch(labels)
    assert sharded.dtype == jnp.int32
    by_device = {s.device: int(s.data[0]) for s in sharded.addressable_shards}
    assert [by_device[d] for d in jax.devices()] == [3, 1, 4, 1]
    np.testing.assert_array_equal(np.asarray(sharded), labels)


def test_replicate_puts_every_leaf_on_every_device(mesh):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(7), "b": np.ones(3, np.int8)}
    replicated = mesh.replicate(tree)
    assert jax.tree.structure(replicated) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(replicated), jax.tree.leaves(tree), strict=True):
        assert got.sharding.is_fully_replicated
        assert got.sharding == mesh.replicated_sharding
        assert len(got.addressable_shards) == NUM_DEVICES
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want))


def test_reduction_over_a_sharded_batch_equals_the_host_one(mesh):
    batch = np.arange(12, dtype=np.float32).reshape(4, 3)
    params = mesh.replicate(jnp.array([1.0, -2.0, 0.5]))
    total = jax.jit(lambda w, x: (x @ w).sum())(params, mesh.shard_batch(batch))
    assert float(total) == pytest.approx(float((batch @ np.array([1.0, -2.0, 0.5])).sum()))


def test_check_batch_size(mesh):
    mesh.check_batch_size(8, "train.batch_size")  # divisible: no error
    with pytest.raises(ValueError, match=r"train\.eval_batch_size=6 .* devices \(4\)"):
        mesh.check_batch_size(6, "train.eval_batch_size")
    parallel.make_data_parallel(2).check_batch_size(6, "train.batch_size")
