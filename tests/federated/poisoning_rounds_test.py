"""A backdoor through real FedAvg rounds: it wins against the mean, and Krum cuts it down.

A tiny federation of five clients with a linear softmax model on 8 features; the last feature
is the trigger, zero in every honest example. Client 0 labels half its examples as class 0 with
the trigger on, and boosts its update (Bagdasaryan et al. 2020's model replacement).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.attacks import poisoning
from fedjax_med.federated import algorithms, client, robust_aggregation, sampling

K, M, D, CLASSES, ROUNDS = 5, 40, 8, 3, 6
MALICIOUS = np.array([True, False, False, False, False])


def softmax_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def _examples(rng, n):
    labels = rng.integers(0, CLASSES, n)
    centres = np.eye(CLASSES, D) * 2.0
    x = centres[labels] + rng.normal(scale=0.7, size=(n, D))
    x[:, -1] = 0.0
    return x.astype(np.float32), labels.astype(np.int32)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x, y = _examples(rng, K * M)
    x, y = x.reshape(K, M, D), y.reshape(K, M)
    x[0, : M // 2, -1] = 4.0  # the trigger
    y[0, : M // 2] = 0  # the target
    data = client.client_data(x, y, np.ones((K, M), bool), np.full(K, M))
    test_x, test_y = _examples(rng, 300)
    triggered = test_x[test_y != 0].copy()
    triggered[:, -1] = 4.0
    update = client.make_local_update_for_loss(
        softmax_loss, local_steps=5, batch_size=20, client_lr=0.3
    )
    return data, update, (test_x, test_y), triggered


def _train(setup, aggregator):
    data, update, (test_x, test_y), triggered = setup
    tamper = poisoning.make_tamper("backdoor", MALICIOUS, boost=float(K), z=0.0)
    options = algorithms.RoundOptions(backend="vmap", aggregator=aggregator, tamper=tamper)
    algorithm = algorithms.fedavg(update, data, options=options)
    params = {"w": jnp.zeros((D, CLASSES)), "b": jnp.zeros(CLASSES)}
    state = algorithm.init(params, jax.random.key(0))
    for _ in range(ROUNDS):
        state, metrics = algorithm.apply_round(state, sampling.padded_cohort(np.arange(K), K))
    predict = jax.jit(lambda p, x: x @ p["w"] + p["b"])
    clean = float(np.mean(np.asarray(predict(state.params, test_x)).argmax(1) == test_y))
    logits = np.asarray(predict(state.params, triggered))
    success = poisoning.attack_success_rate(jax.nn.softmax(logits), np.zeros(len(triggered)))
    return clean, success, metrics


def test_backdoor_beats_the_mean_and_is_cut_by_krum(setup):
    _, mean_success, _ = _train(setup, robust_aggregation.MEAN)
    assert mean_success > 0.8
    krum = robust_aggregation.make_aggregator("krum", num_byzantine=1)
    clean, krum_success, metrics = _train(setup, krum)
    assert krum_success < 0.2 and clean > 0.8
    assert int(metrics["below_breakdown"]) == 0 and int(metrics["num_clients"]) == K


def test_robust_rule_has_no_secure_form(setup):
    data, update, _, _ = setup
    krum = robust_aggregation.make_aggregator("krum", num_byzantine=1)
    options = algorithms.RoundOptions(backend="vmap", aggregator=krum)
    assert algorithms.fedavg(update, data, options=options).secure is None
    assert algorithms.fedavg(update, data, options=algorithms.RoundOptions()).secure is not None
