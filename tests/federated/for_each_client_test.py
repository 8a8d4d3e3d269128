"""Cohort backends agree: vmap, chunked vmap, loop, and sharded over 4 CPU devices."""

import jax
import numpy as np
import pytest

from fedjax_med.federated import client
from fedjax_med.federated import for_each_client as fec


@pytest.fixture(scope="module")
def cohort(mlp, make_clients):
    model, params = mlp
    data = make_clients([3, 7, 5, 1, 6, 4], seed=2)  # 6 clients: not a multiple of 4 devices
    update = client.make_local_update(
        model.apply, "multiclass", local_steps=2, batch_size=4, client_lr=0.2
    )
    keys = jax.random.split(jax.random.key(5), 6)
    args = (params, data.images, data.labels, data.mask, data.counts, keys)
    reference = jax.jit(fec.for_each_client(update, backend="vmap"))(*args)
    return update, args, reference


def _assert_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6), a, b)


def test_vmap_matches_single_client_calls(cohort):
    update, args, reference = cohort
    params, images, labels, mask, counts, keys = args
    for k in (0, 3):
        single = update(params, images[k], labels[k], mask[k], counts[k], keys[k])
        _assert_close(jax.tree.map(lambda x, k=k: x[k], reference.delta), single.delta)
    assert reference.num_examples.tolist() == [3, 7, 5, 1, 6, 4]


def test_chunked_vmap_equals_vmap(cohort):
    update, args, reference = cohort
    out = jax.jit(fec.for_each_client(update, backend="vmap", chunk_size=4))(*args)
    _assert_close(out, reference)


def test_loop_equals_vmap_and_skips_masked_slots(cohort):
    update, args, reference = cohort
    run = fec.for_each_client(update, backend="loop")
    _assert_close(run(*args), reference)
    client_mask = np.array([True, False, True, True, False, True])
    out = run(*args, client_mask=client_mask)
    _assert_close(
        jax.tree.map(lambda x: x[client_mask], out),
        jax.tree.map(lambda x: x[client_mask], reference),
    )
    assert float(abs(out.delta["Dense_0"]["kernel"][1]).sum()) == 0.0
    assert run._jitted._cache_size() == 1


def test_sharded_over_four_devices_equals_single_device(cohort):
    assert jax.device_count() >= 4, "tests/conftest.py forces 4 CPU devices"
    update, args, reference = cohort
    mesh = fec.client_mesh(jax.devices()[:4])
    run = fec.for_each_client(update, backend="sharded", mesh=mesh)
    _assert_close(jax.jit(run)(*args), reference)


def test_auto_backend_per_platform():
    cpu = jax.devices("cpu")
    assert fec.auto_backend(cpu) == "loop"
    assert fec.for_each_client(None, backend="auto").backend == fec.auto_backend()
    with pytest.raises(ValueError, match="backend"):
        fec.for_each_client(None, backend="pmap")
