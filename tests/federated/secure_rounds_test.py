"""Secure aggregation around a FederatedAlgorithm: same rounds, the server sees only messages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med import randomness
from fedjax_med.federated import algorithms, client, dp_fedavg, sampling, secure_rounds
from fedjax_med.secure import distributed_dp

SECURE = randomness.Randomness("secure")
METRIC_KEYS = {
    "loss",
    "num_sampled",
    "num_dropped",
    "num_excluded",
    "num_clients",
    "secure_bytes_per_client",
    "plaintext_bytes_per_client",
    "secure_aggregation_seconds",
    "plaintext_aggregation_seconds",
    "secure_bytes_received_per_client",
    "secure_round_aborted",
    "secure_sum_released",
    "secagg_neighbours",
    "secagg_threshold",
    "update_norm",
}


def _sites(num_clients, dim=2, seed=0):
    """Each client holds 2 points around its own centre; the global optimum is their mean."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clients, 1, dim)).astype(np.float32) + 2.0
    points = centres + 0.1 * rng.normal(size=(num_clients, 2, dim)).astype(np.float32)
    data = client.client_data(
        points, np.zeros((num_clients, 2)), np.ones((num_clients, 2), bool), [2] * num_clients
    )
    return data, points.reshape(-1, dim).mean(0)


def _update(quadratic, lr=0.5):
    return client.make_local_update_for_loss(quadratic, local_steps=1, batch_size=2, client_lr=lr)


def test_secagg_plus_fedavg_of_100_clients_trains_like_plaintext_fedavg(quadratic):
    n = 100
    data, optimum = _sites(n)
    options = algorithms.RoundOptions(backend="vmap", dropout_rate=0.07)
    plain = algorithms.fedavg(_update(quadratic), data, options=options)
    secure = secure_rounds.secure_algorithm(
        plain,
        method="secagg_plus",
        randomness=SECURE,
        secagg_clip=8.0,
        dropout_rate=0.1,
        corrupted_fraction=0.05,
    )
    assert secure.name == "fedavg+secagg_plus"
    cohort = sampling.padded_cohort(np.arange(n), n)
    s_plain = plain.init({"w": jnp.zeros(2)}, jax.random.key(0))
    s_secure = secure.init({"w": jnp.zeros(2)}, jax.random.key(0))
    errors = [float(np.linalg.norm(s_secure.params["w"] - optimum))]
    for _ in range(3):
        s_plain, _ = plain.apply_round(s_plain, cohort)
        s_secure, m = secure.apply_round(s_secure, cohort)
        assert set(m) == METRIC_KEYS and math.isnan(m["loss"])  # no plaintext client loss
        assert m["secure_round_aborted"] == 0 and m["secure_sum_released"] == 1
        assert m["num_dropped"] > 0 and m["num_clients"] == n - m["num_dropped"]
        assert m["secagg_threshold"] <= m["secagg_neighbours"] + 1 < n  # SecAgg+, sparse
        assert m["secure_bytes_per_client"] > m["plaintext_bytes_per_client"]
        # Same cohort, keys and dropouts as plaintext FedAvg: equal up to fixed point.
        np.testing.assert_allclose(s_secure.params["w"], s_plain.params["w"], atol=1e-5)
        errors.append(float(np.linalg.norm(s_secure.params["w"] - optimum)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.2 * errors[0]
    assert int(s_secure.round) == 3
    assert max(f._cache_size() for f in secure.jitted) == 1  # each step compiled at most once


@pytest.fixture(scope="module")
def dp_setup(quadratic):
    points = np.random.default_rng(0).normal(size=(5, 3, 20)).astype(np.float32)
    points *= np.array([0.1, 0.5, 1.0, 2.0, 4.0], np.float32)[:, None, None]
    data = client.client_data(points, np.zeros((5, 3)), np.ones((5, 3), bool), [3] * 5)
    update = client.make_local_update_for_loss(
        quadratic, local_steps=1, batch_size=3, client_lr=0.5
    )
    sampler = sampling.PoissonCohortSampler(num_clients=5, rate=1.0, seed=0)
    return data, update, sampler


@pytest.mark.parametrize("method", ["secagg", "additive"])
def test_dp_fedavg_over_secure_aggregation_equals_the_plaintext_round(dp_setup, method):
    data, update, sampler = dp_setup
    plain = dp_fedavg.dp_fedavg(
        update,
        data,
        sampler,
        noise_multiplier=1.3,
        clip_norm=2.0,
        options=algorithms.RoundOptions(backend="vmap"),
    )
    secure = secure_rounds.secure_algorithm(plain, method=method, randomness=SECURE)
    state = plain.init({"w": jnp.zeros(20)}, jax.random.key(4))
    want, _ = plain.apply_round(state, sampler.sample(0))
    got, metrics = secure.apply_round(state, sampler.sample(0))
    # Same clipping, same server noise key: only the 32-bit fixed-point error differs.
    np.testing.assert_allclose(got.params["w"], want.params["w"], atol=1e-5)
    assert float(np.abs(got.params["w"]).max()) > 0.1  # noise of stddev z S / 5 ~ 0.5 is in
    assert metrics["clip_norm"] == 2.0 and metrics["num_clients"] == 5


def test_client_side_screening_and_an_aborting_round_release_nothing(quadratic):
    data, _ = _sites(4)
    # Client 3's points are huge: its own update fails max_update_norm, so it never submits.
    images = np.asarray(data.images).copy()
    images[1:] *= 1e4
    data = client.client_data(images, np.zeros((4, 2)), np.ones((4, 2), bool), [2] * 4)
    base = algorithms.fedavg(
        _update(quadratic),
        data,
        options=algorithms.RoundOptions(backend="vmap", max_update_norm=100),
    )
    secure = secure_rounds.secure_algorithm(
        base, method="secagg", randomness=SECURE, secagg_clip=1e5
    )
    state = secure.init({"w": jnp.zeros(2)}, jax.random.key(0))
    new, m = secure.apply_round(state, sampling.padded_cohort(np.arange(4), 4))
    # One submitting client < t = 3: the protocol aborts, nothing is released or applied.
    assert m["num_excluded"] == 3 and m["secure_round_aborted"] == 1
    assert m["secure_sum_released"] == 0 and m["num_clients"] == 0
    np.testing.assert_array_equal(new.params["w"], state.params["w"])
    assert int(new.round) == 1


def test_distributed_dp_rounds_count_only_releases(quadratic):
    n, dim = 6, 2
    data, _ = _sites(n)
    ddp = distributed_dp.DistributedDP(
        "skellam",
        num_clients=n,
        dim=dim,
        clip=1.0,
        noise_multiplier=0.5,
        delta=1e-5,
        threshold=4,
        randomness=SECURE,
    )
    base = algorithms.fedavg(
        _update(quadratic), data, options=algorithms.RoundOptions(backend="vmap")
    )
    secure = secure_rounds.secure_algorithm(
        base, method="secagg", randomness=SECURE, distributed_dp=ddp
    )
    state = secure.init({"w": jnp.zeros(dim)}, jax.random.key(0))
    releases = 0
    for _ in range(2):
        state, m = secure.apply_round(state, sampling.padded_cohort(np.arange(n), n))
        releases += m["secure_sum_released"]
        assert m["secagg_threshold"] >= ddp.threshold
    assert releases == 2 and np.isfinite(ddp.epsilon(releases))
    assert np.all(np.isfinite(state.params["w"])) and np.any(state.params["w"] != 0)
    with pytest.raises(ValueError, match="server noise"):
        dp = dp_fedavg.dp_fedavg(
            _update(quadratic),
            data,
            sampling.PoissonCohortSampler(num_clients=n, rate=1.0, seed=0),
            noise_multiplier=1.0,
            clip_norm=1.0,
        )
        secure_rounds.secure_algorithm(dp, randomness=SECURE, distributed_dp=ddp)


def test_algorithms_without_a_sum_form_are_refused(quadratic):
    data, _ = _sites(4)
    update = _update(quadratic)
    sampler = sampling.PoissonCohortSampler(num_clients=4, rate=1.0, seed=0)
    for base in (
        algorithms.scaffold(update, data),
        dp_fedavg.dp_fedavg(
            update,
            data,
            sampler,
            noise_multiplier=1.0,
            clip_norm=1.0,
            adaptive=True,
            clipped_count_stddev=1.0,
        ),
    ):
        with pytest.raises(ValueError, match="cannot run over secure aggregation"):
            secure_rounds.secure_algorithm(base, randomness=SECURE)
    with pytest.raises(ValueError, match="method"):
        secure_rounds.secure_algorithm(
            algorithms.fedavg(update, data), method="he", randomness=SECURE
        )
