"""What each setting's server sees, the guessing baselines, and which claims get a canary audit.

Runs are built from the ``:smoke`` privacy-report config (with a linear model) by the trainers'
own builders at their initial parameters; nothing is trained.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.attacks import canaries, gradient_inversion
from fedjax_med.config import loading
from fedjax_med.reporting import runs, settings, threats
from fedjax_med.trainers import central, dp_sgd, federated
from fedjax_med.trainers import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "privacy_report.py") + ":smoke"
OVERRIDES = ["--config.data.cache_dir=none", "--config.model.name=linear"]


def resolve(*overrides):
    config = loading.load_config(TINY, [*OVERRIDES, *overrides])
    return {s.name: s for s in settings.resolve(config)}


@pytest.fixture(scope="module")
def by_name():
    return resolve()


@pytest.fixture(scope="module")
def dp_experiment(by_name):
    """The DP-SGD setting's experiment; ``central`` shares its data, so it serves both."""
    return central.build_experiment(by_name["dp_sgd_eps1"].config)


@pytest.fixture(scope="module")
def central_run(dp_experiment):
    e = dp_experiment
    params = central.init_state(e).params
    return run_lib.Run("central", e.config, e.splits, e.normalizer, e.model, params, params, 0)


@pytest.fixture(scope="module")
def federated_run(by_name):
    plan = federated.build_plan(by_name["secagg"].config)
    params = federated.init_server_state(plan).params
    return run_lib.Run(
        "federated",
        plan.config,
        plan.splits,
        plan.normalizer,
        plan.model,
        params,
        params,
        0,
        federation=plan.federation,
    )


@pytest.fixture(scope="module")
def dp_privacy(dp_experiment):
    plan = dp_experiment.plan
    return dp_sgd.privacy_claim(plan, plan.ledger, dp_experiment.config, False).to_report()


def expected_batch(run, data, take):
    part = data.take(np.arange(take))
    return run.normalizer(part.images, part.sites), part.labels.astype(np.int32), part.sites


def assert_victims(victims, run, parts):
    """``parts``: ``(dataset, count)`` per client, the victim's first."""
    images, labels, sites = zip(*(expected_batch(run, d, n) for d, n in parts), strict=True)
    assert victims.group_sizes == tuple(n for _, n in parts)
    assert victims.num_victim == parts[0][1]
    np.testing.assert_array_equal(victims.images, np.concatenate(images))
    np.testing.assert_array_equal(victims.labels, np.concatenate(labels))
    assert victims.labels.dtype == np.int32
    assert victims.bounds == runs.pixel_bounds(run.normalizer, np.concatenate(sites))
    groups = victims.groups()
    assert len(groups) == len(parts)
    for (x, y), want_x, want_y in zip(groups, images, labels, strict=True):
        np.testing.assert_array_equal(np.asarray(x), want_x)
        np.testing.assert_array_equal(np.asarray(y), want_y)


def test_central_victims_are_the_first_training_images(by_name, central_run):
    train = central_run.splits.train
    for batch_size in (1, 3):
        victims = threats.pick_victims(by_name["central"], central_run, batch_size)
        assert_victims(victims, central_run, [(train, batch_size)])
    # A batch larger than the split takes the whole split.
    victims = threats.pick_victims(by_name["central"], central_run, len(train) + 5)
    assert victims.group_sizes == (len(train),)


def test_fedavg_server_sees_only_the_victim_client(by_name, federated_run):
    federation = federated_run.federation
    assert federation.num_clients == 3
    victims = threats.pick_victims(by_name["fedavg"], federated_run, 2)
    assert_victims(victims, federated_run, [(federation.client(0), 2)])


def test_secure_sum_mixes_every_client_of_the_round(by_name, federated_run):
    federation = federated_run.federation
    assert by_name["secagg"].config.federated.clients_per_round == 0  # 0: every client
    victims = threats.pick_victims(by_name["secagg"], federated_run, 2)
    parts = [(federation.client(k), 2) for k in range(3)]
    assert_victims(victims, federated_run, parts)
    assert len(victims.images) == 6


@pytest.mark.parametrize("clients_per_round, cohort", [(2, 2), (1, 1), (10, 3)])
def test_secure_sum_cohort_follows_clients_per_round(federated_run, clients_per_round, cohort):
    setting = resolve(
        f"--config.report.settings.secagg.federated.clients_per_round={clients_per_round}"
    )["secagg"]
    victims = threats.pick_victims(setting, federated_run, 1)
    assert victims.group_sizes == (1,) * cohort
    federation = federated_run.federation
    assert_victims(victims, federated_run, [(federation.client(k), 1) for k in range(cohort)])


def test_pooled_server_has_nothing_to_invert(by_name, central_run):
    victims = threats.pick_victims(by_name["central"], central_run, 1)
    update, what, steps = threats.server_view(
        by_name["central"], central_run, central_run.params, None, victims, 1, jax.random.key(0)
    )
    assert update is None and steps == 0
    assert what == "the training images themselves (data are pooled)"


def test_secure_sum_is_the_sum_of_the_cohorts_client_updates(by_name, federated_run):
    params = federated_run.params
    lr = by_name["secagg"].config.federated.client_lr
    victims = threats.pick_victims(by_name["secagg"], federated_run, 1)

    @jax.jit
    def client_update(x, y):
        return gradient_inversion.fedavg_update(
            federated_run.model.apply, params, x, y, local_steps=1, local_lr=lr
        )

    views = {
        name: threats.server_view(
            by_name[name], federated_run, params, None, victims, 1, jax.random.key(0)
        )
        for name in ("fedavg", "secagg")
    }
    updates = [client_update(x, y) for x, y in victims.groups()]
    total = jax.tree.map(lambda *u: sum(u), *updates)
    secure, what, steps = views["secagg"]
    assert (what, steps) == ("only the sum of the round's 3 client updates", 1)
    for got, want in zip(jax.tree.leaves(secure), jax.tree.leaves(total), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # Without secure aggregation the server gets the victim's own update.
    plain, what, _ = views["fedavg"]
    assert what == "the victim client's model update"
    for got, want in zip(jax.tree.leaves(plain), jax.tree.leaves(updates[0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_population_mean(central_run):
    train = central_run.splits.train
    mean = threats.population_mean(central_run)
    assert mean.shape == central_run.splits.info.image_shape == (16, 16, 1)
    everything = central_run.normalizer(train.images, train.sites)
    np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-5, atol=1e-6)
    first = threats.population_mean(central_run, max_images=5)
    np.testing.assert_allclose(first, everything[:5].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_canary_example(central_run):
    key = jax.random.key(3)
    image, label = threats.canary_example(central_run, central_run.params, key)
    shape = central_run.splits.info.image_shape
    assert image.shape == shape and label.shape == () and label.dtype == jnp.int32
    np.testing.assert_array_equal(image, 3.0 * jax.random.normal(key, shape))
    logits = central_run.model.apply(central_run.params, image[None])[0]
    assert int(label) == int(jnp.argmin(logits))  # the label the model finds least likely
    assert 0 <= int(label) < central_run.splits.info.num_classes
    other, _ = threats.canary_example(central_run, central_run.params, jax.random.key(4))
    assert not np.allclose(image, other)


def _audit(by_name, central_run, privacy, trials=16):
    setting = by_name["dp_sgd_eps1"]
    victims = threats.pick_victims(setting, central_run, 2)
    return threats.audit(
        setting,
        central_run,
        central_run.params,
        privacy,
        victims,
        mechanism="correct",
        trials=trials,
        confidence=0.95,
        key=jax.random.key(0),
    )


@pytest.mark.parametrize(
    "change",
    [
        {"noise_multiplier": 0.0},  # no noise: nothing private to audit
        {"mechanism": "distributed_dp"},
        {"neighbouring_relation": "replace_one", "sampling": "shuffle"},  # fixed-size batches
    ],
    ids=["no_noise", "distributed_dp", "replace_one"],
)
def test_claims_without_an_audit(by_name, central_run, dp_privacy, change):
    assert _audit(by_name, central_run, {**dp_privacy, **change}) is None


def test_dp_sgd_claim_is_audited_with_its_own_numbers(by_name, central_run, dp_privacy):
    assert dp_privacy["mechanism"] == "dp_sgd"
    assert dp_privacy["neighbouring_relation"] == "add_or_remove_one"
    result = _audit(by_name, central_run, dp_privacy)
    assert isinstance(result, canaries.CanaryAudit)
    sigma, delta = dp_privacy["noise_multiplier"], dp_privacy["delta"]
    assert result.mechanism == "correct"
    assert result.noise_multiplier == pytest.approx(sigma) and sigma > 0
    assert result.clip_norm == by_name["dp_sgd_eps1"].config.privacy.clip_norm
    assert (result.delta, result.confidence, result.trials) == (delta, 0.95, 16)
    assert result.accountant_epsilon == pytest.approx(canaries.claimed_epsilon(sigma, delta))
    assert result.canary_norm > 0
    assert result.consistent
    assert set(dataclasses.asdict(result)) | {"consistent"} == set(result.as_dict())
