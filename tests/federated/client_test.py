"""Local training: exact SGD, FedProx and SCAFFOLD steps, uniform minibatches, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_med.data import dataset, partition, preprocess
from fedjax_med.federated import client
from fedjax_med.models import losses


def test_one_full_batch_step_is_one_sgd_step(mlp, make_clients):
    model, params = mlp
    data = make_clients([5], max_examples=7)
    update = client.make_local_update(
        model.apply, "multiclass", local_steps=1, batch_size=5, client_lr=0.3
    )
    out = jax.jit(update)(
        params, data.images[0], data.labels[0], data.mask[0], data.counts[0], jax.random.key(1)
    )

    def mean_loss(p):
        logits = model.apply(p, data.images[0, :5])
        return losses.per_example_loss(logits, data.labels[0, :5], "multiclass").mean()

    loss, grads = jax.value_and_grad(mean_loss)(params)
    expected = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
    got = jax.tree.map(jnp.add, params, out.delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
    assert float(out.num_examples) == 5.0
    np.testing.assert_allclose(out.loss, loss, rtol=1e-6)


def test_padding_does_not_change_a_full_batch_update(mlp, make_clients):
    # The same 4 examples padded to 4 or 9 rows: the full-batch update is identical.
    model, params = mlp
    small = make_clients([4], max_examples=4, seed=3)
    padded = make_clients([4], max_examples=4, seed=3)
    images = jnp.concatenate([padded.images[0], jnp.full((5, *padded.images.shape[2:]), 7.0)])
    labels = jnp.concatenate([padded.labels[0], jnp.zeros(5, jnp.int32)])
    mask = jnp.arange(9) < 4
    update = client.make_local_update(
        model.apply, "multiclass", local_steps=2, batch_size=4, client_lr=0.1
    )
    a = update(params, small.images[0], small.labels[0], small.mask[0], 4, jax.random.key(0))
    b = update(params, images, labels, mask, 4, jax.random.key(0))
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a.delta, b.delta
    )


def test_sample_batch_draws_distinct_real_rows_uniformly():
    mask = jnp.array([True] * 5 + [False] * 3)
    keys = jax.random.split(jax.random.key(0), 4000)
    idx, real = jax.vmap(lambda k: client.sample_batch(k, mask, 3))(keys)
    idx, real = np.asarray(idx), np.asarray(real)
    assert real.all() and (idx < 5).all()
    assert all(len(set(row)) == 3 for row in idx[:200])
    freq = np.bincount(idx.ravel(), minlength=8)[:5] / len(keys)
    np.testing.assert_allclose(freq, 3 / 5, atol=0.03)  # each real row in 3 of 5 draws
    # Fewer real rows than the batch: all of them, the rest flagged as padding.
    idx, real = client.sample_batch(jax.random.key(1), mask, 8)
    assert sorted(np.asarray(idx)[np.asarray(real)].tolist()) == [0, 1, 2, 3, 4]
    assert int(real.sum()) == 5


def test_rolled_and_unrolled_loops_agree(mlp, make_clients):
    model, params = mlp
    data = make_clients([6], seed=1)
    args = (params, data.images[0], data.labels[0], data.mask[0], 6, jax.random.key(2))
    outs = []
    for unroll in (1, True):
        update = client.make_local_update(
            model.apply, "multiclass", local_steps=3, batch_size=2, client_lr=0.2, unroll=unroll
        )
        outs.append(jax.jit(update)(*args))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        outs[0].delta,
        outs[1].delta,
    )


def _quadratic_client(quadratic, **kw):
    update = client.make_local_update_for_loss(
        quadratic, local_steps=2, batch_size=2, client_lr=0.25, **kw
    )
    points = jnp.array([[1.0, -2.0], [3.0, 0.0]])  # mean (2, -1): full-batch grad is w - mean
    return update, points


def test_fedprox_step_matches_closed_form(quadratic):
    update, points = _quadratic_client(quadratic, prox_mu=0.5)
    x = np.array([0.5, 0.5])
    out = update(
        {"w": jnp.asarray(x)}, points, jnp.zeros(2), jnp.ones(2, bool), 2, jax.random.key(0)
    )
    y = x.copy()
    for _ in range(2):  # y <- y - lr ((y - mean) + mu (y - x))
        y = y - 0.25 * ((y - np.array([2.0, -1.0])) + 0.5 * (y - x))
    np.testing.assert_allclose(out.delta["w"], y - x, rtol=1e-6)


def test_scaffold_client_option_two(quadratic):
    update, points = _quadratic_client(quadratic, scaffold=True)
    x, c, ci = np.array([0.5, 0.5]), np.array([0.1, -0.3]), np.array([-0.2, 0.4])
    out = update(
        {"w": jnp.asarray(x)},
        points,
        jnp.zeros(2),
        jnp.ones(2, bool),
        2,
        jax.random.key(0),
        {"w": jnp.asarray(c)},
        {"w": jnp.asarray(ci)},
    )
    y = x.copy()
    for _ in range(2):  # y <- y - lr (g(y) - c_i + c)
        y = y - 0.25 * ((y - np.array([2.0, -1.0])) - ci + c)
    new_ci = ci - c + (x - y) / (2 * 0.25)
    np.testing.assert_allclose(out.delta["w"], y - x, rtol=1e-6)
    np.testing.assert_allclose(out.control_delta["w"], new_ci - ci, rtol=1e-5)


def test_local_adam_steps_each_coordinate_by_the_learning_rate_first(quadratic):
    # Adam's first step is lr * g / (|g| + eps): every coordinate moves by about lr, against the
    # sign of the gradient, whatever its size (plain SGD would move by lr * g).
    update = client.make_local_update_for_loss(
        quadratic, local_steps=1, batch_size=2, client_lr=0.01, client_optimizer="adam"
    )
    x = jnp.array([[2.0, -40.0, 0.5], [4.0, -60.0, 0.5]])
    out = update({"w": jnp.zeros(3)}, x, jnp.zeros(2), jnp.ones(2, bool), 2, jax.random.key(0))
    # The gradient at w = 0 is -mean(x) = (-3, 50, -0.5).
    np.testing.assert_allclose(out.delta["w"], [0.01, -0.01, 0.01], rtol=1e-4)
    with pytest.raises(ValueError, match="client_optimizer='rmsprop' must be one of"):
        client.make_local_update_for_loss(
            quadratic, local_steps=1, batch_size=2, client_lr=0.01, client_optimizer="rmsprop"
        )


def test_argument_checks(quadratic):
    with pytest.raises(ValueError, match="local_steps"):
        client.make_local_update_for_loss(quadratic, local_steps=0, batch_size=1, client_lr=1.0)
    with pytest.raises(ValueError, match="scaffold"):
        client.make_local_update_for_loss(
            quadratic,
            local_steps=1,
            batch_size=1,
            client_lr=1.0,
            client_optimizer=optax.adam(0.1),
            scaffold=True,
        )
    with pytest.raises(ValueError, match="counts"):
        client.client_data(np.zeros((1, 2, 3)), np.zeros((1, 2)), np.ones((1, 2), bool), [1])


def test_from_federated_dataset_normalises_each_example_with_its_site():
    images = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2, 1) * 10
    data = dataset.ImageDataset(
        images=images,
        labels=np.array([0, 1, 0, 1, 0, 1], np.int32),
        sites=np.array([0, 0, 0, 1, 1, 1]),
        patient_ids=np.arange(6),
    )
    indices, names = partition.partition(data, "by_site", 2, np.random.default_rng(0))
    indices = [indices[0][:2], indices[1]]  # unequal sizes: client 0 is padded
    federated = partition.make_federated(data, indices, names)
    normalizer = preprocess.fit_normalizer(data, 2, method="per_site")
    out = client.from_federated_dataset(federated, normalizer)
    assert out.images.shape == (2, 3, 2, 2, 1) and out.counts.tolist() == [2, 3]
    np.testing.assert_allclose(out.images[1], normalizer(images[3:], data.sites[3:]), rtol=1e-6)
    np.testing.assert_allclose(out.images[0, :2], normalizer(images[:2], data.sites[:2]))
    assert float(jnp.abs(out.images[0, 2]).sum()) == 0.0
    plain = client.from_federated_dataset(federated)
    np.testing.assert_allclose(plain.images[0, :2], images[:2] / 255.0, rtol=1e-6)


def test_from_federated_dataset_fills_patient_unit_ids():
    # Patient ids repeat across sites: (site, patient_id) is the person.
    data = dataset.ImageDataset(
        images=np.zeros((9, 2, 2, 1), np.uint8),
        labels=np.zeros(9, np.int32),
        sites=np.array([0, 0, 0, 1, 1, 1, 1, 2, 3]),
        patient_ids=np.array([5, 5, 9, 5, 5, 7, 5, 5, 5]),
    )
    federated = partition.make_federated(data, [np.arange(7), np.array([7, 8])], ["a", "b"])
    out = client.from_federated_dataset(federated)
    ids = np.asarray(out.unit_ids)
    assert ids.dtype == np.int32 and ids.shape == (2, 7)
    # Client a: (0,5) (0,5) (0,9) (1,5) (1,5) (1,7) (1,5) -> 4 patients, numbered 0..3.
    a = ids[0]
    assert a[0] == a[1] and a[3] == a[4] == a[6] and len({a[0], a[2], a[3], a[5]}) == 4
    assert sorted(set(a.tolist())) == [0, 1, 2, 3]
    assert ids[1].tolist()[:2] in ([0, 1], [1, 0]) and (ids[1, 2:] == -1).all()
    assert client.num_units(out).tolist() == [4, 2]


def test_client_data_checks_unit_ids():
    mask = np.array([[True, True, False]])
    args = (np.zeros((1, 3, 2)), np.zeros((1, 3), np.int32), mask, [2])
    with pytest.raises(ValueError, match="-1 on every padding row"):
        client.client_data(*args, unit_ids=np.array([[0, 1, 0]]))
    with pytest.raises(ValueError, match="unit_ids of real rows"):
        client.client_data(*args, unit_ids=np.array([[0, -1, -1]]))
    with pytest.raises(ValueError, match="unit_ids"):
        client.client_data(*args, unit_ids=np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match="unit_ids is None"):
        client.num_units(client.client_data(*args))
