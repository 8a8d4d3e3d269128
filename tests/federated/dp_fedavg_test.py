"""DP-FedAvg: clipping, calibrated noise on the sum, adaptive clipping, and the accountant."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.federated import algorithms, client, dp_fedavg, sampling
from fedjax_med.federated import for_each_client as fec
from fedjax_med.privacy import accounting, clipping, noise

VMAP = algorithms.RoundOptions(backend="vmap")
DIM = 4000


@pytest.fixture(scope="module")
def setup(quadratic):
    # 5 clients, 3 points each in DIM dimensions; one full-batch step of lr 0.5.
    points = np.random.default_rng(0).normal(size=(5, 3, DIM)).astype(np.float32)
    points *= np.array([0.1, 0.5, 1.0, 2.0, 4.0], np.float32)[:, None, None]
    data = client.client_data(points, np.zeros((5, 3)), np.ones((5, 3), bool), [3] * 5)
    update = client.make_local_update_for_loss(
        quadratic, local_steps=1, batch_size=3, client_lr=0.5
    )
    sampler = sampling.PoissonCohortSampler(num_clients=5, rate=1.0, seed=0)
    params = {"w": jnp.zeros(DIM)}
    rng = jax.random.key(4)
    # The clients' unclipped deltas of round 0, with the round's own client keys.
    client_root = jax.random.fold_in(jax.random.fold_in(rng, 0), algorithms.STREAM_CLIENTS)
    keys = jax.vmap(lambda k: jax.random.fold_in(client_root, k))(jnp.arange(5))
    deltas = fec.for_each_client(update, backend="vmap")(
        params, data.images, data.labels, data.mask, data.counts, keys
    ).delta
    return data, update, sampler, params, rng, deltas


def _run(setup, **kwargs):
    data, update, sampler, params, rng, _ = setup
    algorithm = dp_fedavg.dp_fedavg(update, data, sampler, options=VMAP, **kwargs)
    state = algorithm.init(params, rng)
    return algorithm, state, algorithm.apply_round(state, sampler.sample(0))


def test_no_noise_no_clipping_all_clients_is_uniform_fedavg(setup):
    data, update, sampler, params, rng, _ = setup
    _, _, (state, _) = _run(setup, noise_multiplier=0.0, clip_norm=math.inf)
    fedavg = algorithms.fedavg(
        update, data, options=algorithms.RoundOptions(backend="vmap", weighting="uniform")
    )
    expected, _ = fedavg.apply_round(fedavg.init(params, rng), sampler.sample(0))
    np.testing.assert_allclose(state.params["w"], expected.params["w"], rtol=1e-5, atol=1e-7)


def test_each_contribution_is_clipped_to_s(setup):
    *_, deltas = setup
    clip = 5.0
    norms = np.asarray(clipping.global_norms(deltas))
    assert (norms > clip).sum() >= 2 and (norms < clip).sum() >= 1  # both regimes occur
    algorithm, state, (new, metrics) = _run(setup, noise_multiplier=0.0, clip_norm=clip)
    clipped = np.asarray(deltas["w"]) * np.minimum(1.0, clip / norms)[:, None]
    assert np.all(np.linalg.norm(clipped, axis=1) <= clip * (1 + 1e-6))
    np.testing.assert_allclose(new.params["w"], clipped.sum(0) / 5.0, rtol=1e-5, atol=1e-7)
    assert float(metrics["clip_norm"]) == clip
    assert algorithm.sampler.rate == 1.0


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_on_the_sum_has_stddev_z_s_over_expected_clients(setup, adaptive):
    *_, deltas = setup
    clip, z, sigma_b = 5.0, 1.3, 1.0
    # Adaptive clipping leaves the delta z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 > z.
    z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5 if adaptive else z
    norms = np.asarray(clipping.global_norms(deltas))
    clipped_sum = (np.asarray(deltas["w"]) * np.minimum(1.0, clip / norms)[:, None]).sum(0)
    _, _, (new, _) = _run(
        setup, noise_multiplier=z, clip_norm=clip, adaptive=adaptive, clipped_count_stddev=sigma_b
    )
    noise = (np.asarray(new.params["w"]) - clipped_sum / 5.0) * 5.0 / (z_delta * clip)
    assert abs(noise.mean()) < 4 / math.sqrt(DIM)
    assert abs(noise.std() - 1.0) < 0.05  # DIM = 4000 draws: std error ~0.011


def test_adaptive_clip_follows_the_geometric_update(setup):
    *_, deltas = setup
    norms = np.asarray(clipping.global_norms(deltas))
    clip, gamma, eta = float(np.median(norms)) * 1.5, 0.5, 0.2
    # z = 0 and a negligible count noise make the update exact.
    _, _, (new, metrics) = _run(
        setup,
        noise_multiplier=0.0,
        clip_norm=clip,
        adaptive=True,
        target_quantile=gamma,
        clip_lr=eta,
        clipped_count_stddev=1e-9,
    )
    fraction = float(np.mean(norms <= clip))
    np.testing.assert_allclose(metrics["unclipped_fraction"], fraction, atol=1e-6)
    np.testing.assert_allclose(new.clip_norm, clip * math.exp(-eta * (fraction - gamma)), 1e-6)


def test_delta_noise_multiplier_composes_to_the_total():
    z, sigma_b = 1.1, 2.0
    z_delta = dp_fedavg.delta_noise_multiplier(z, sigma_b)
    np.testing.assert_allclose(z_delta**-2 + (2 * sigma_b) ** -2, z**-2, rtol=1e-12)
    # The (delta, centered count) pair of Gaussian releases is exactly the Gaussian of total z.
    pair = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_delta), dp_accounting.GaussianDpEvent(2 * sigma_b)]
    )
    eps = []
    for event in (pair, dp_accounting.GaussianDpEvent(z)):
        acct = dp_accounting.rdp.RdpAccountant()
        acct.compose(event)
        eps.append(acct.get_epsilon(1e-5))
    np.testing.assert_allclose(eps[0], eps[1], rtol=1e-9)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        dp_fedavg.delta_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_called_directly(accountant):
    z, q, rounds, delta = 1.2, 0.05, 200, 1e-6
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    acct = (
        dp_accounting.rdp.RdpAccountant()
        if accountant == "rdp"
        else dp_accounting.pld.PLDAccountant()
    )
    acct.compose(event)
    assert dp_fedavg.client_level_event(z, q, rounds) == event
    assert dp_fedavg.client_level_event(z, q, rounds) == accounting.dpsgd_event(z, q, rounds)
    # One implementation: exactly the library accountant (its orders and PLD discretisation) ...
    eps = dp_fedavg.client_level_epsilon(z, q, rounds, delta, accountant)
    assert eps == accounting.epsilon(event, delta, accountant)
    # ... which agrees with dp_accounting's defaults up to their order grid / discretisation.
    assert eps == pytest.approx(acct.get_epsilon(delta), rel=1e-4)
    assert dp_fedavg.client_level_epsilon(0.0, q, rounds, delta) == math.inf


def test_server_noise_is_the_privacy_noise_primitive():
    total = {"a": jnp.zeros(3), "b": jnp.ones((2, 2))}
    key = jax.random.key(3)
    got = dp_fedavg.noised_mean(total, 2.0, 1.5, 4.0, key)
    want = jax.tree.map(lambda t: t / 4.0, noise.add_gaussian_noise(total, key, 3.0))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert not hasattr(dp_fedavg, "gaussian_like")


def test_argument_checks(setup):
    data, update, sampler, *_ = setup
    with pytest.raises(ValueError, match="weighting"):
        dp_fedavg.dp_fedavg(
            update,
            data,
            sampler,
            noise_multiplier=1.0,
            clip_norm=1.0,
            options=algorithms.RoundOptions(weighting="examples"),
        )
    other = sampling.PoissonCohortSampler(num_clients=6, rate=0.5, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        dp_fedavg.dp_fedavg(update, data, other, noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="accountant"):
        dp_fedavg.client_level_epsilon(1.0, 0.1, 1, 1e-5, accountant="moments")
