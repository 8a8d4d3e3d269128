"""Per-site models in the federated trainer: FedBN, Ditto, their report keys and ledgers."""

import numpy as np
import pytest
from flax import traverse_util

from fedjax_med.config import loading, schema
from fedjax_med.federated import client as client_lib
from fedjax_med.federated import personal
from fedjax_med.trainers import federated

SITES = {"hospital_0", "hospital_1", "hospital_2"}


def load(spec, *overrides):
    return loading.load_config(spec, ["--config.data.cache_dir=none", *overrides])


@pytest.fixture(scope="module")
def fedbn_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fedbn"))
    return workdir, federated.run_rounds(load("fedavg:fedbn,tiny"), workdir, quiet=True)


def test_fedbn_reports_each_site_model_beside_the_global_one(fedbn_run):
    _, report = fedbn_run
    assert report["federated"]["algorithm"] == "fedbn"
    assert set(report["per_site"]) == SITES
    for metrics in report["per_site"].values():
        assert 0.0 <= metrics["test_accuracy"] <= 1.0  # the global model's, as before
        assert 0.0 <= metrics["personal_test_accuracy"] <= 1.0
        assert metrics["personal_test_num_examples"] == metrics["test_num_examples"]
    summary = report["personal_site_summary"]
    personal = [m["personal_test_accuracy"] for m in report["per_site"].values()]
    assert summary["worst_personal_test_accuracy"] == min(personal)


def test_fedbn_keeps_each_sites_norm_params_and_the_server_none(fedbn_run):
    workdir, _ = fedbn_run
    plan, state = federated.restore_for_eval(workdir)
    flat = traverse_util.flatten_dict(state.site_params)
    assert flat and all(personal.is_norm_param(path) for path in flat)
    rows = [np.asarray(v).reshape(3, -1) for p, v in flat.items() if p[-1] == "bias"]
    bias = np.concatenate(rows, axis=1)  # (sites, every normalisation bias)
    assert all(np.abs(bias[i] - bias[j]).max() > 0 for i, j in ((0, 1), (0, 2), (1, 2)))
    # The released global model's normalisation leaves are the initial ones.
    initial = federated.init_server_state(plan).params
    for path, value in traverse_util.flatten_dict(state.params).items():
        if personal.is_norm_param(path):
            np.testing.assert_array_equal(value, traverse_util.flatten_dict(initial)[path])


def test_ditto_under_local_dp_counts_personal_steps_in_each_site_ledger(tmp_path):
    config = load("quickstart:smoke", "--config.federated.algorithm=ditto")
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    privacy, f = report["privacy"], config.federated
    steps = f.rounds * 2 * f.local_steps  # global + personal steps, every round
    fed = report["federated"]
    sizes = dict(zip(fed["client_names"], fed["client_sizes"], strict=True))
    assert set(privacy["per_site_epsilon"]) == SITES
    for site, eps in privacy["per_site_epsilon"].items():
        assert privacy["steps"][site] == steps
        direct = client_lib.local_dp_epsilon(
            config.privacy.noise_multiplier,
            f.client_batch_size,
            sizes[site],
            steps,
            config.privacy.delta,
        )
        assert eps == pytest.approx(direct, rel=1e-9)
        assert 0.0 <= report["per_site"][site]["personal_test_accuracy"] <= 1.0
    # Counted in the ledger, the personal models' metrics are not released outside it.
    assert not any("personal" in r for r in privacy["released_outside_guarantee"])


def test_ditto_lambda_outside_its_range_is_refused_naming_the_field():
    with pytest.raises(schema.ConfigError, match=r"'federated.ditto_lambda'=50.0 must be in \[0"):
        load("fedavg:ditto,tiny", "--config.federated.ditto_lambda=50.0")
    with pytest.raises(schema.ConfigError, match="'federated.ditto_lambda'=-1.0 must be >= 0"):
        load("fedavg:ditto,tiny", "--config.federated.ditto_lambda=-1.0")
    with pytest.raises(schema.ConfigError, match="'federated.personalization_steps'=2 must be 0"):
        load("fedavg:fedbn,tiny", "--config.federated.personalization_steps=2")


def test_fedbn_without_normalisation_layers_is_refused_before_training(tmp_path):
    config = load("fedavg:fedbn,tiny", "--config.model.name=small_cnn")
    config.model.kwargs = type(config.model.kwargs)()
    with pytest.raises(ValueError, match="model has none"):
        federated.run_rounds(config, str(tmp_path), quiet=True)


def test_fedbn_resumes_each_sites_own_params_exactly(fedbn_run, tmp_path):
    _, full = fedbn_run
    config = load("fedavg:fedbn,tiny")
    assert federated.run_rounds(config, str(tmp_path), quiet=True, stop_at_round=2) == {
        "stopped_at_step": 2
    }
    resumed = federated.run_rounds(config, str(tmp_path), resume=True, quiet=True)
    assert resumed["per_site"] == full["per_site"]
