"""Federated rounds: exact FedAvg / FedProx / FedOpt / SCAFFOLD numbers, backends, exclusions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_med.federated import aggregation, algorithms, client, sampling, server_optimizers
from fedjax_med.models import losses

VMAP = algorithms.RoundOptions(backend="vmap")


def _close(a, b, rtol=2e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _all(num_clients):
    return sampling.padded_cohort(np.arange(num_clients), num_clients)


def test_fedavg_one_client_one_full_step_is_centralized_sgd(mlp, make_clients):
    model, params = mlp
    data = make_clients([6], seed=4)
    update = client.make_local_update(
        model.apply, "multiclass", local_steps=1, batch_size=6, client_lr=0.2
    )
    algorithm = algorithms.fedavg(update, data, options=VMAP)
    state, metrics = algorithm.apply_round(algorithm.init(params, jax.random.key(0)), _all(1))

    def mean_loss(p):
        logits = model.apply(p, data.images[0])
        return losses.per_example_loss(logits, data.labels[0], "multiclass").mean()

    grads = jax.grad(mean_loss)(params)
    _close(state.params, jax.tree.map(lambda p, g: p - 0.2 * g, params, grads))
    assert int(state.round) == 1 and int(metrics["num_clients"]) == 1


@pytest.fixture(scope="module")
def three_points(quadratic):
    # Client means 1, 3, 6 with 1, 2, 3 examples; one full-batch step of lr 1 lands on the mean.
    images = np.zeros((3, 3, 1), np.float32)
    images[0, :1, 0] = [1.0]
    images[1, :2, 0] = [2.0, 4.0]
    images[2, :3, 0] = [3.0, 6.0, 9.0]
    mask = np.arange(3)[None, :] < np.array([1, 2, 3])[:, None]
    data = client.client_data(images, np.zeros((3, 3)), mask, [1, 2, 3])
    update = client.make_local_update_for_loss(
        quadratic, local_steps=1, batch_size=3, client_lr=1.0
    )
    return data, update


@pytest.mark.parametrize(
    "weighting,expected", [("examples", (1 * 1 + 2 * 3 + 3 * 6) / 6), ("uniform", 10 / 3)]
)
def test_weighted_and_uniform_averages_hand_numbers(three_points, weighting, expected):
    data, update = three_points
    options = algorithms.RoundOptions(weighting=weighting)  # default backend
    algorithm = algorithms.fedavg(update, data, options=options)
    state = algorithm.init({"w": jnp.zeros(1)}, jax.random.key(0))
    state, metrics = algorithm.apply_round(state, _all(3))
    np.testing.assert_allclose(state.params["w"], [expected], rtol=1e-6)
    assert int(metrics["num_sampled"]) == 3 and int(metrics["num_excluded"]) == 0


@pytest.fixture(scope="module")
def poisson_rounds(mlp, make_clients):
    """Three rounds of Poisson cohorts (sizes vary, capacity fixed) with each backend."""
    model, params = mlp
    data = make_clients([3, 7, 5, 1, 6, 4], seed=2)
    update = client.make_local_update(
        model.apply, "multiclass", local_steps=2, batch_size=4, client_lr=0.2
    )
    sampler = sampling.PoissonCohortSampler(num_clients=6, rate=0.5, seed=0, capacity=6)
    cohorts = [sampler.sample(r) for r in range(3)]
    assert len({c.num_sampled for c in cohorts}) > 1
    runs = {}
    for backend in ("vmap", "loop", "sharded"):
        algorithm = algorithms.fedavg(
            update, data, options=algorithms.RoundOptions(backend=backend)
        )
        state = algorithm.init(params, jax.random.key(1))
        history = []
        for cohort in cohorts:
            state, metrics = algorithm.apply_round(state, cohort)
            history.append((state, metrics))
        runs[backend] = (algorithm, history)
    return runs


@pytest.mark.parametrize("backend", ["loop", "sharded"])
def test_rounds_agree_across_backends(poisson_rounds, backend):
    _, reference = poisson_rounds["vmap"]
    _, history = poisson_rounds[backend]
    for (s1, m1), (s2, m2) in zip(reference, history, strict=True):
        _close(s1.params, s2.params)
        assert int(m1["num_clients"]) == int(m2["num_clients"])
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_second_round_compiles_nothing(poisson_rounds, backend):
    algorithm, _ = poisson_rounds[backend]
    assert [f._cache_size() for f in algorithm.jitted] == [1] * len(algorithm.jitted)


@pytest.fixture(scope="module")
def three_clients(mlp, make_clients):
    """Three MLP clients and FedAvg on them: the reference of FedProx and of the server steps."""
    model, params = mlp
    data = make_clients([4, 6, 5], seed=6)
    update = client.make_local_update(
        model.apply, "multiclass", local_steps=2, batch_size=4, client_lr=0.5
    )
    return params, data, update, algorithms.fedavg(update, data, options=VMAP)


def test_fedprox_with_mu_zero_is_fedavg(three_clients):
    params, data, update, fedavg = three_clients
    key = jax.random.key(2)
    expected, _ = fedavg.apply_round(fedavg.init(params, key), _all(3))
    fedprox = algorithms.fedprox(update, data, mu=0.0, options=VMAP)
    assert fedprox.for_each.local_update.prox_mu == 0.0
    state, _ = fedprox.apply_round(fedprox.init(params, key), _all(3))
    _close(state.params, expected.params, rtol=1e-6, atol=1e-7)
    assert algorithms.fedprox(update, data, mu=0.3).for_each.local_update.prox_mu == 0.3


@pytest.mark.parametrize(
    "name,tx",
    [
        ("fedadam", server_optimizers.fedadam(0.05, tau=1e-2)),
        ("fedyogi", server_optimizers.fedyogi(0.05, tau=1e-2)),
        ("fedadagrad", server_optimizers.fedadagrad(0.05, tau=1e-2)),
        ("fedavgm", server_optimizers.fedavgm(0.7, momentum=0.9)),
    ],
)
def test_server_optimizer_step_is_its_update_of_the_averaged_delta(three_clients, name, tx):
    params, data, update, averaging = three_clients
    build = {
        "fedadam": lambda: algorithms.fedadam(update, data, server_lr=0.05, tau=1e-2, options=VMAP),
        "fedyogi": lambda: algorithms.fedyogi(update, data, server_lr=0.05, tau=1e-2, options=VMAP),
        "fedadagrad": lambda: algorithms.fedadagrad(
            update, data, server_lr=0.05, tau=1e-2, options=VMAP
        ),
        "fedavgm": lambda: algorithms.fedavgm(
            update, data, server_lr=0.7, momentum=0.9, options=VMAP
        ),
    }[name]
    algorithm = build()
    rng = jax.random.key(7)
    state = algorithm.init(params, rng)
    opt_state = tx.init(params)
    for _ in range(2):
        # The averaged delta of this round: FedAvg from the same params, round and keys.
        probe = averaging.init(state.params, rng).replace(round=state.round)
        averaged, _ = averaging.apply_round(probe, _all(3))
        delta = jax.tree.map(jnp.subtract, averaged.params, state.params)
        step, opt_state = tx.update(jax.tree.map(jnp.negative, delta), opt_state, state.params)
        expected = optax.apply_updates(state.params, step)
        state, _ = algorithm.apply_round(state, _all(3))
        _close(state.params, expected, rtol=1e-4, atol=1e-6)


def test_scaffold_two_clients_option_two_exact(quadratic):
    points = np.array([[[1.0, 0.0], [3.0, 2.0]], [[-2.0, 4.0], [0.0, -2.0]]], np.float32)
    data = client.client_data(points, np.zeros((2, 2)), np.ones((2, 2), bool), [2, 2])
    lr, steps, server_lr = 0.1, 3, 0.8
    update = client.make_local_update_for_loss(
        quadratic, local_steps=steps, batch_size=2, client_lr=lr
    )
    algorithm = algorithms.scaffold(update, data, server_lr=server_lr, options=VMAP)
    state = algorithm.init({"w": jnp.array([0.5, -0.5])}, jax.random.key(0))

    # Karimireddy et al. Algorithm 1, option II, in NumPy (full-batch gradient y - mean_k).
    means = points.mean(axis=1).astype(np.float64)
    x, c, ci = np.array([0.5, -0.5]), np.zeros(2), np.zeros((2, 2))
    for cohort in (np.array([0, 1]), np.array([1])):
        dys, dcs = [], []
        for k in cohort:
            y = x.copy()
            for _ in range(steps):
                y = y - lr * ((y - means[k]) - ci[k] + c)
            new_ci = ci[k] - c + (x - y) / (steps * lr)
            dys.append(y - x)
            dcs.append(new_ci - ci[k])
            ci[k] = new_ci
        x = x + server_lr * np.mean(dys, axis=0)
        c = c + np.sum(dcs, axis=0) / 2  # (|S| / N) mean = sum / N

        state, _ = algorithm.apply_round(state, sampling.padded_cohort(cohort, 2))
        np.testing.assert_allclose(state.params["w"], x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.server_control["w"], c, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.client_controls["w"], ci, rtol=1e-5, atol=1e-6)


def test_dropped_and_poisoned_clients_are_excluded_and_counted(quadratic):
    points = np.random.default_rng(8).normal(size=(5, 2, 3)).astype(np.float32)
    points[1, 0] = np.nan  # poisoned: a NaN update
    points[3] *= 1e6  # wildly out of range
    data = client.client_data(points, np.zeros((5, 2)), np.ones((5, 2), bool), [2] * 5)
    update = client.make_local_update_for_loss(
        quadratic, local_steps=2, batch_size=1, client_lr=0.5
    )
    params = {"w": jnp.zeros(3)}
    rng = jax.random.key(3)
    reference = algorithms.fedavg(update, data, options=VMAP)

    def fedavg_over(clients):
        state, _ = reference.apply_round(
            reference.init(params, rng), sampling.padded_cohort(np.array(clients), 5)
        )
        return state.params

    screened = algorithms.fedavg(
        update, data, options=algorithms.RoundOptions(backend="vmap", max_update_norm=1e3)
    )
    state, metrics = screened.apply_round(screened.init(params, rng), _all(5))
    assert int(metrics["num_excluded"]) == 2 and int(metrics["num_clients"]) == 3
    assert bool(jnp.all(jnp.isfinite(state.params["w"])))
    _close(state.params, fedavg_over([0, 2, 4]))

    dropping = algorithms.fedavg(
        update,
        data,
        options=algorithms.RoundOptions(backend="vmap", max_update_norm=1e3, dropout_rate=0.4),
    )
    init = dropping.init(params, rng)
    state, metrics = dropping.apply_round(init, _all(5))
    dropout_key = jax.random.fold_in(algorithms.round_key(init), algorithms.STREAM_DROPOUT)
    reporting, dropped = aggregation.dropout(dropout_key, jnp.ones(5, bool), 0.4)
    reporting = np.asarray(reporting)
    clean = np.array([True, False, True, False, True])
    assert int(metrics["num_dropped"]) == int(dropped) == int((~reporting).sum()) > 0
    assert int(metrics["num_excluded"]) == int((reporting & ~clean).sum())
    kept = np.flatnonzero(reporting & clean)
    assert int(metrics["num_clients"]) == kept.size > 0
    _close(state.params, fedavg_over(kept))


def test_non_iid_partition_makes_fedavg_worse_than_iid():
    # 4 Gaussian classes; IID clients hold all classes, non-IID clients one class each. With
    # many local steps, one-class clients drift to "always predict my class", and after equal
    # rounds the averaged model is clearly worse on held-out IID data (margin measured over
    # seeds 0-2: test loss 2.5-4x higher).
    classes, dim, clients, per_client, hidden = 4, 16, 4, 32, 32
    rng = np.random.default_rng(0)
    means = rng.normal(size=(classes, dim))

    def make(one_class_per_client):
        x = np.zeros((clients, per_client, dim), np.float32)
        y = np.zeros((clients, per_client), np.int32)
        for k in range(clients):
            labels = np.full(per_client, k) if one_class_per_client else np.arange(per_client) % 4
            x[k] = means[labels] + rng.normal(size=(per_client, dim))
            y[k] = labels
        return client.client_data(x, y, np.ones(x.shape[:2], bool), np.full(clients, per_client))

    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss_fn(p, x, y):
        return losses.per_example_loss(apply(p, x), y, "multiclass")

    iid, non_iid, test = make(False), make(True), make(False)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": jax.random.normal(k1, (dim, hidden)) / 4,
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, classes)) / 6,
        "b2": jnp.zeros(classes),
    }
    update = client.make_local_update_for_loss(
        loss_fn, local_steps=30, batch_size=8, client_lr=0.5, unroll=1
    )
    test_loss = {}
    for name, data in (("iid", iid), ("non_iid", non_iid)):
        algorithm = algorithms.fedavg(update, data, options=VMAP)
        state = algorithm.init(params, jax.random.key(1))
        for _ in range(2):
            state, _ = algorithm.apply_round(state, _all(clients))
        x, y = test.images.reshape(-1, dim), test.labels.reshape(-1)
        test_loss[name] = float(loss_fn(state.params, x, y).mean())
    assert test_loss["non_iid"] > 1.5 * test_loss["iid"], test_loss


def test_argument_checks(three_points):
    data, update = three_points
    with pytest.raises(ValueError, match="weighting"):
        algorithms.RoundOptions(weighting="median")
    with pytest.raises(ValueError, match="dropout_rate"):
        algorithms.RoundOptions(dropout_rate=1.0)
    algorithm = algorithms.fedavg(update, data, options=VMAP)
    state = algorithm.init({"w": jnp.zeros(1)}, jax.random.key(0))
    with pytest.raises(ValueError, match="cohort indices"):
        algorithm.apply_round(state, sampling.padded_cohort(np.array([5]), 1))
    scaffold_update = algorithms.scaffold(update, data).for_each.local_update
    with pytest.raises(ValueError, match="scaffold"):
        algorithms.fedavg(scaffold_update, data)
