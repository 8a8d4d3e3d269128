"""Per-site models: FedBN's local normalisation leaves and Ditto's personal models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from fedjax_med import randomness
from fedjax_med.federated import algorithms, client, personal, sampling, secure_rounds

FEATURES, OUTPUTS, ROWS = 3, 2, 6
LR = 0.2


def normed_linear(params, images, labels):
    """Per-example squared error of a linear layer followed by a GroupNorm-like affine map."""
    z = images @ params["Dense_0"]["kernel"]
    z = (z - z.mean(-1, keepdims=True)) / (z.std(-1, keepdims=True) + 1e-3)
    out = z * params["GroupNorm_0"]["scale"] + params["GroupNorm_0"]["bias"]
    return 0.5 * jnp.sum((out - labels) ** 2, axis=-1)


def initial_params():
    kernel = jax.random.normal(jax.random.key(1), (FEATURES, OUTPUTS))
    return {
        "Dense_0": {"kernel": kernel},
        "GroupNorm_0": {"scale": jnp.ones(OUTPUTS), "bias": jnp.zeros(OUTPUTS)},
    }


def site_arrays(num_sites, shift):
    """Each site's images have their own offset and gain (``shift`` 0: identical sites)."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(ROWS, FEATURES))
    labels = rng.normal(size=(ROWS, OUTPUTS))
    gains = 1.0 + shift * np.arange(num_sites)
    sites = np.stack([images * g + shift * k for k, g in enumerate(gains)])
    targets = np.stack([labels * g + 2 * shift * k for k, g in enumerate(gains)])
    mask = np.ones((num_sites, ROWS), bool)
    return client.client_data(sites, targets, mask, np.full(num_sites, ROWS))


def local_update(**kwargs):
    # Full-batch steps: every key draws all rows, so identical sites train identically.
    args = dict(local_steps=3, batch_size=ROWS, client_lr=LR)
    return client.make_local_update_for_loss(normed_linear, **(args | kwargs))


def run(algorithm, rounds, num_sites):
    state = algorithm.init(initial_params(), jax.random.key(0))
    for _ in range(rounds):
        state, _ = algorithm.apply_round(state, sampling.padded_cohort(np.arange(num_sites), 3))
    return state


OPTIONS = algorithms.RoundOptions(backend="vmap")


def test_norm_predicate_selects_only_normalisation_scales_and_biases():
    assert personal.is_norm_param(("ConvBlock_0", "GroupNorm_1", "bias"))
    assert personal.is_norm_param(("final_norm", "scale"))
    assert not personal.is_norm_param(("Conv_0", "bias"))
    assert not personal.is_norm_param(("GroupNorm_0", "kernel"))
    split = personal.NORM_LOCAL
    params = initial_params()
    assert set(traverse_util.flatten_dict(split.local(params))) == {
        ("GroupNorm_0", "scale"),
        ("GroupNorm_0", "bias"),
    }
    merged = split.merge(split.shared(params), split.local(params))
    assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_fedbn_with_identical_sites_equals_fedavg_on_the_shared_params():
    data = site_arrays(3, shift=0.0)
    fedbn = run(algorithms.fedbn(local_update(), data, options=OPTIONS), 3, 3)
    fedavg = run(algorithms.fedavg(local_update(), data, options=OPTIONS), 3, 3)
    np.testing.assert_allclose(
        fedbn.params["Dense_0"]["kernel"], fedavg.params["Dense_0"]["kernel"], atol=1e-5
    )
    # Each site's own normalisation leaves are FedAvg's averaged ones (all sites agree).
    for k in range(3):
        for name in ("scale", "bias"):
            np.testing.assert_allclose(
                fedbn.site_params["GroupNorm_0"][name][k],
                fedavg.params["GroupNorm_0"][name],
                atol=1e-5,
            )
    # The global model's normalisation leaves were never learned by the server.
    np.testing.assert_array_equal(fedbn.params["GroupNorm_0"]["scale"], np.ones(OUTPUTS))
    assert not np.allclose(fedavg.params["GroupNorm_0"]["scale"], 1.0)


@pytest.fixture(scope="module")
def shifted_fedbn():
    data = site_arrays(3, shift=0.5)
    algorithm = algorithms.fedbn(local_update(), data, options=OPTIONS)
    return algorithm, data, run(algorithm, 2, 3)


def test_fedbn_norm_params_differ_per_site_under_scanner_shift(shifted_fedbn):
    _, _, state = shifted_fedbn
    bias = np.asarray(state.site_params["GroupNorm_0"]["bias"])
    assert bias.shape == (3, OUTPUTS)
    gaps = [np.abs(bias[i] - bias[j]).max() for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 1e-2


def test_fedbn_server_never_receives_local_params(shifted_fedbn):
    algorithm, data, state = shifted_fedbn
    parts = algorithm.secure
    indices, mask = parts.check(sampling.padded_cohort(np.arange(3), 3))
    inputs = parts.prepare(state, indices, mask)
    outputs = parts.run_clients(state, inputs)
    # The plaintext update holds the shared leaves only...
    paths = set(traverse_util.flatten_dict(outputs.delta))
    assert paths == {("Dense_0", "kernel")}
    # ... and so does the vector a client submits to secure aggregation: d shared + 1 weight.
    shared_size = ravel_pytree(personal.NORM_LOCAL.shared(state.params))[0].size
    assert parts.message(state, outputs, 1.0).shape == (3, shared_size + 1)
    # No server step reads what the sites kept: garbage there leaves the global model as is.
    nan = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), outputs.site_params)
    garbage = outputs.replace(site_params=nan)
    honest, _ = algorithm.finish(state, indices, mask, inputs, outputs)
    blind, _ = algorithm.finish(state, indices, mask, inputs, garbage)
    for a, b in zip(jax.tree.leaves(honest.params), jax.tree.leaves(blind.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # The site model is the global shared leaves with the site's own normalisation leaves.
    model = algorithm.site_model(honest, 1)
    np.testing.assert_array_equal(model["Dense_0"]["kernel"], honest.params["Dense_0"]["kernel"])
    np.testing.assert_array_equal(
        model["GroupNorm_0"]["bias"], honest.site_params["GroupNorm_0"]["bias"][1]
    )


def test_fedbn_refuses_a_model_without_normalisation_params():
    data = site_arrays(2, shift=0.0)
    algorithm = algorithms.fedbn(local_update(), data, options=OPTIONS)
    with pytest.raises(ValueError, match="model has none.*GroupNorm"):
        algorithm.init({"Dense_0": {"kernel": jnp.zeros((FEATURES, OUTPUTS))}}, jax.random.key(0))


def _ditto_call(lam, v0, x, data, key, **kwargs):
    update = local_update(ditto_lambda=lam, **kwargs)
    row = (data.images[0], data.labels[0], data.mask[0], data.counts[0])
    return update(x, *row, key, site_params=v0)


@pytest.fixture(scope="module")
def ditto_setup():
    data = site_arrays(2, shift=0.5)
    x = initial_params()
    v0 = jax.tree.map(lambda p: p + 0.5, x)  # a personal model away from the global one
    return data, x, v0, jax.random.key(3)


def test_ditto_lambda_zero_is_pure_local_training(ditto_setup):
    data, x, v0, key = ditto_setup
    out = _ditto_call(0.0, v0, x, data, key)
    alone = local_update()(
        v0,
        data.images[0],
        data.labels[0],
        data.mask[0],
        data.counts[0],
        jax.random.fold_in(key, randomness.CLIENT_PERSONAL),
    )
    expected = jax.tree.map(jnp.add, v0, alone.delta)
    for a, b in zip(jax.tree.leaves(out.site_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The global model's delta is FedAvg's: the personal model does not touch it.
    fedavg = local_update()(x, data.images[0], data.labels[0], data.mask[0], data.counts[0], key)
    for a, b in zip(jax.tree.leaves(out.delta), jax.tree.leaves(fedavg.delta), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ditto_large_lambda_keeps_the_personal_model_at_the_global_one(ditto_setup):
    data, x, v0, key = ditto_setup

    def gap(lam):
        v = _ditto_call(lam, v0, x, data, key).site_params
        return float(jnp.linalg.norm(ravel_pytree(v)[0] - ravel_pytree(x)[0]))

    gaps = [gap(lam) for lam in (0.0, 1.0, 3.0, 1.0 / LR)]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 0.2 * gaps[0]
    with pytest.raises(ValueError, match="ditto_lambda=10.0 must be < 2 / client_lr"):
        local_update(ditto_lambda=2.0 / LR)


def test_ditto_personal_steps_are_private_under_local_dp_sgd(ditto_setup):
    data, x, v0, key = ditto_setup
    # A clip norm of ~0 leaves no data gradient: with lambda = 0 the personal model stays put.
    out = _ditto_call(0.0, v0, x, data, key, dp_clip_norm=1e-9, dp_noise_multiplier=0.0)
    for a, b in zip(jax.tree.leaves(out.site_params), jax.tree.leaves(v0), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)
    assert local_update(ditto_lambda=0.0).steps_per_round == 2 * local_update().steps_per_round


def test_ditto_round_stores_personal_models_and_averages_global_deltas():
    data = site_arrays(2, shift=0.5)
    ditto = run(algorithms.ditto(local_update(), data, lam=0.5, options=OPTIONS), 2, 2)
    fedavg = run(algorithms.fedavg(local_update(), data, options=OPTIONS), 2, 2)
    for a, b in zip(jax.tree.leaves(ditto.params), jax.tree.leaves(fedavg.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    kernels = np.asarray(ditto.site_params["Dense_0"]["kernel"])
    assert kernels.shape == (2, FEATURES, OUTPUTS) and not np.allclose(kernels[0], kernels[1])


def test_fedbn_over_secure_aggregation_sends_only_shared_coordinates(shifted_fedbn):
    plain, data, state = shifted_fedbn
    secure = secure_rounds.secure_algorithm(
        plain,
        method="secagg",
        secagg_clip=8.0,
        randomness=randomness.Randomness("reproducible", 0),
    )
    cohort = sampling.padded_cohort(np.arange(3), 3)
    masked, metrics = secure.apply_round(state, cohort)
    clear, _ = plain.apply_round(state, cohort)
    shared_size = ravel_pytree(personal.NORM_LOCAL.shared(state.params))[0].size
    assert metrics["plaintext_bytes_per_client"] == 4.0 * (shared_size + 1)
    for a, b in zip(jax.tree.leaves(masked.params), jax.tree.leaves(clear.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # Each site kept its own normalisation leaves, outside the secure sum.
    for a, b in zip(
        jax.tree.leaves(masked.site_params), jax.tree.leaves(clear.site_params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_ditto_personal_models_fit_their_shifted_sites_better_than_the_global_model():
    data = site_arrays(2, shift=1.0)  # site 1: other gain, offset and targets
    algorithm = algorithms.ditto(local_update(), data, lam=0.1, options=OPTIONS)
    state = run(algorithm, 4, 2)

    def loss(params, k):
        return float(jnp.mean(normed_linear(params, data.images[k], data.labels[k])))

    for k in range(2):
        assert loss(algorithm.site_model(state, k), k) < 0.9 * loss(state.params, k)
