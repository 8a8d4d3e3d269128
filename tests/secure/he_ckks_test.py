"""CKKS aggregation: the decrypted sum is within the stated bound, only the key holder decrypts."""

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med import randomness
from fedjax_med.config import base, schema
from fedjax_med.federated import algorithms, client, sampling, secure_rounds
from fedjax_med.secure import he_ckks, secagg

ts = pytest.importorskip("tenseal")
PARAMS = he_ckks.CKKSParameters(poly_modulus_degree=4096)
_ROUNDS = itertools.count()  # the key holder decrypts each round once: every sum its own round


@pytest.fixture(scope="module")
def holder():
    return he_ckks.KeyHolder(PARAMS)


@pytest.mark.parametrize("n", [2, 5, 9])
def test_decrypted_sum_equals_plain_sum_within_the_bound(holder, n):
    # 2,500 coordinates: two ciphertexts of 2,048 slots, the second one partly filled.
    x = np.random.default_rng(n).uniform(-1.0, 1.0, size=(n, 2500))
    total, stats = he_ckks.secure_sum(x, clip=1.0, key_holder=holder, round_index=next(_ROUNDS))
    bound = he_ckks.error_bound(PARAMS, n, 1.0)
    assert total.shape == (2500,) and stats.survivors == tuple(range(n))
    assert np.abs(total - x.sum(0)).max() <= bound
    assert bound < 1e-4  # the bound is small enough to be useful for model updates
    # Two ciphertexts per client: the upload is several bytes per coordinate.
    assert all(b > 8 * 2500 for b in stats.bytes_sent.values())


def test_bound_grows_with_clients_and_ring_degree():
    small = he_ckks.error_bound(PARAMS, 2, 1.0)
    assert he_ckks.error_bound(PARAMS, 4, 1.0) == pytest.approx(2 * small)
    assert he_ckks.error_bound(he_ckks.CKKSParameters(8192), 2, 1.0) > 3.9 * small


def test_the_server_holds_no_secret_key_and_cannot_decrypt(holder):
    server = he_ckks.AggregationServer(holder.public_context, num_ciphertexts=1)
    client_ctx = he_ckks.public_context(holder.public_context)
    x = np.array([[0.25, -0.5], [0.5, 0.125]])
    for u in range(2):
        server.receive(u, he_ckks.encrypt_update(client_ctx, x[u], PARAMS))
    assert not server.context.has_secret_key() and not client_ctx.has_secret_key()
    aggregate = server.aggregate()
    # Neither an individual ciphertext nor the aggregate decrypts without the secret key.
    single = he_ckks.encrypt_update(client_ctx, x[0], PARAMS)[0]
    for blob in (single, aggregate[0]):
        with pytest.raises(ValueError, match="secret_key"):
            ts.ckks_vector_from(server.context, blob).decrypt()
    # A context carrying the secret key is refused as "public".
    with pytest.raises(ValueError, match="secret key"):
        he_ckks.public_context(holder._context.serialize(save_secret_key=True))
    got = holder.decrypt_sum(aggregate, dim=2, round_index=next(_ROUNDS), num_clients=2)
    assert np.abs(got - x.sum(0)).max() <= he_ckks.error_bound(PARAMS, 2, 1.0)


def test_dropped_clients_are_absent_and_the_weights_count_only_submitters(holder):
    rng = np.random.default_rng(0)
    n, d = 5, 30
    deltas, weights = rng.uniform(-1, 1, size=(n, d)), rng.uniform(0.1, 1.0, size=n)
    rows = np.concatenate([weights[:, None] * deltas, weights[:, None]], axis=1)  # FedAvg message
    dropped = {1, 3}
    total, stats = he_ckks.secure_sum(
        rows, clip=1.0, key_holder=holder, dropped=dropped, round_index=next(_ROUNDS)
    )
    kept = [0, 2, 4]
    bound = he_ckks.error_bound(PARAMS, 3, 1.0)
    assert stats.survivors == tuple(kept) and stats.dropped == (1, 3)
    assert set(stats.bytes_sent) == set(kept)  # a dropped client sends nothing
    assert abs(total[-1] - weights[kept].sum()) <= bound  # the denominator: submitters only
    want = (weights[kept, None] * deltas[kept]).sum(0) / weights[kept].sum()
    np.testing.assert_allclose(total[:-1] / total[-1], want, atol=10 * bound)


def test_the_key_holder_decrypts_once_per_round_for_two_or_more_clients(holder):
    x = np.full((3, 4), 0.5)
    r = next(_ROUNDS)
    he_ckks.secure_sum(x, clip=1.0, key_holder=holder, round_index=r)
    with pytest.raises(secagg.ProtocolError, match="already decrypted"):
        he_ckks.secure_sum(x, clip=1.0, key_holder=holder, round_index=r)
    with pytest.raises(secagg.TooFewSurvivorsError):  # one submitter: its update, not a sum
        he_ckks.secure_sum(x, clip=1.0, key_holder=holder, dropped={0, 1}, round_index=r + 1000)


def test_an_offline_key_holder_aborts_the_round():
    offline = he_ckks.KeyHolder(PARAMS)
    offline.online = False
    with pytest.raises(he_ckks.KeyHolderUnavailableError) as err:
        he_ckks.secure_sum(np.zeros((3, 4)), clip=1.0, key_holder=offline)
    assert isinstance(err.value, secagg.RoundAbortedError)  # secure rounds release nothing


@pytest.mark.parametrize(
    "vectors,clip,match",
    [
        (np.full((2, 3), 2.0), 1.0, "exceeds clip"),
        (np.zeros((2, 3)), 2.0**18, "must be <"),
        (np.array([[np.nan, 0.0], [0.0, 0.0]]), 1.0, "not finite"),
    ],
)
def test_bad_inputs_are_refused_before_encryption(holder, vectors, clip, match):
    with pytest.raises(ValueError, match=match):
        he_ckks.secure_sum(vectors, clip=clip, key_holder=holder, round_index=next(_ROUNDS))


def test_missing_tenseal_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(ImportError, match=r"pip install 'fedjax_med\[he\]'"):
        he_ckks.KeyHolder(PARAMS)
    monkeypatch.setattr(schema.importlib.util, "find_spec", lambda name: None)
    config = base.get_base_config()
    config.trainer = "federated"
    config.secure_aggregation.method = "he_ckks"
    with pytest.raises(schema.ConfigError, match=r"pip install 'fedjax_med\[he\]'"):
        schema.validate(config)


def _quadratic(params, x, y):
    del y
    return 0.5 * jnp.sum((params - x) ** 2, axis=-1)


def test_a_fedavg_round_over_he_ckks_averages_and_aborts_without_key_holder(monkeypatch):
    # 4 clients at 1, 2, 3, 4; one full local step moves each exactly onto its point.
    update = client.make_local_update_for_loss(
        _quadratic, local_steps=1, batch_size=1, client_lr=1.0
    )
    data = client.client_data(
        np.arange(1.0, 5.0).reshape(4, 1, 1), np.zeros((4, 1)), np.ones((4, 1), bool), [1] * 4
    )
    plain = algorithms.fedavg(update, data, options=algorithms.RoundOptions(backend="vmap"))
    secure = secure_rounds.secure_algorithm(
        plain, method="he_ckks", randomness=randomness.Randomness("secure"), secagg_clip=8.0
    )
    cohort = sampling.padded_cohort(np.arange(4), 4)
    state = secure.init(jnp.zeros(1), jax.random.key(0))
    got, metrics = secure.apply_round(state, cohort)
    # The released sum is [sum_k w_k x_k, sum_k w_k] up to the CKKS bound (clip 8, 4 clients).
    assert secure.name == "fedavg+he_ckks" and metrics["secure_sum_released"] == 1
    assert abs(float(got.params[0]) - 2.5) <= 2 * he_ckks.error_bound(PARAMS, 4, 8.0)
    assert metrics["he_ciphertext_bytes_per_client"] > metrics["plaintext_bytes_per_client"]
    assert metrics["he_encrypt_seconds_per_client"] > 0 and metrics["num_clients"] == 4

    def offline(*args, **kwargs):
        raise he_ckks.KeyHolderUnavailableError("offline")

    monkeypatch.setattr(he_ckks.KeyHolder, "decrypt_sum", offline)
    after, metrics = secure.apply_round(got, cohort)
    assert metrics["secure_round_aborted"] == 1 and metrics["secure_sum_released"] == 0
    np.testing.assert_array_equal(after.params, got.params)  # nothing applied
