"""Every federated algorithm's default server learning rate lowers the validation loss.

``federated.server_lr = 0`` (the base config's value) stands for the algorithm's entry of
``DEFAULT_SERVER_LR``; FedAdam and FedYogi at the averaging family's 1.0 diverge on the embedded
data (validation loss 1.3 -> 27 in six rounds), at their default 0.01 they learn.
"""

import os

import pytest

from fedjax_med.config import loading
from fedjax_med.trainers import federated, registry
from fedjax_med.training import evaluate

# A tiny federation that still generalises: 3 hospitals x 120 images, 4 local steps of 16.
TINY = [
    "--config.data.cache_dir=none",
    "--config.data.synthetic.examples_per_site=120",
    "--config.federated.local_steps=4",
    "--config.federated.client_batch_size=16",
    "--config.federated.rounds=6",
    "--config.federated.eval_every=6",
    "--config.federated.checkpoint_every=6",
]
DP_FEDAVG = [  # client-level DP with noise small enough to see the learning rate, not the noise
    "--config.data.normalization=fixed",
    "--config.federated.clients_per_round=2",
    "--config.privacy.noise_multiplier=0.001",
    "--config.privacy.clip_norm=1.0",
]


def _config(algorithm, extra=()):
    overrides = [f"--config.federated.algorithm={algorithm}", *TINY, *extra]
    if algorithm == "dp_fedavg":
        overrides += DP_FEDAVG
    # FedBN keeps normalisation layers local: its variant has a GroupNorm model.
    spec = "fedavg:fedbn,tiny" if algorithm == "fedbn" else "fedavg:tiny"
    return loading.load_config(spec, overrides)


def _initial_val_loss(config):
    plan = federated.build_plan(config)
    params = federated.init_server_state(plan).params
    result = evaluate.evaluate(
        evaluate.make_predict_fn(plan.model.apply, plan.splits.info.task),
        params,
        plan.splits.split("val"),
        plan.splits.info,
        plan.normalizer,
        config.train.eval_batch_size,
    )
    return result["metrics"]["loss"]


def test_every_algorithm_has_a_default():
    assert set(federated.DEFAULT_SERVER_LR) == set(federated.ALGORITHMS)


def test_zero_means_the_default_and_explicit_values_are_kept():
    assert _config("fedadam").federated.server_lr == 0.0
    assert federated.server_lr(_config("fedadam").federated) == 0.01
    assert federated.server_lr(_config("fedavg").federated) == 1.0
    explicit = _config("fedadam", ["--config.federated.server_lr=0.003"])
    assert federated.server_lr(explicit.federated) == 0.003


@pytest.mark.parametrize("algorithm", sorted(federated.ALGORITHMS))
def test_default_server_lr_lowers_the_validation_loss(algorithm, tmp_path):
    config = _config(algorithm)
    before = _initial_val_loss(config)
    report = registry.train(config, os.fspath(tmp_path), quiet=True)
    after = report["val_metrics"]["val_loss"]
    assert report["federated"]["server_lr"] == federated.DEFAULT_SERVER_LR[algorithm]
    assert after < 0.95 * before, f"{algorithm}: validation loss {before:.3f} -> {after:.3f}"
