"""The federated trainer: rounds, per-site report, exact resume, client-level DP accounting."""

import json
import os

import dp_accounting
import jax
import numpy as np
import pytest

from fedjax_med.config import loading
from fedjax_med.trainers import federated, registry
from fedjax_med.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_of(name, *overrides):
    path = os.path.join(ROOT, "configs", name) + ":tiny"
    return loading.load_config(path, ["--config.data.cache_dir=none", *overrides])


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fedavg"))
    return workdir, federated.run_rounds(config_of("fedavg.py"), workdir, quiet=True)


def test_report_has_global_and_per_site_metrics(fedavg_run):
    _, report = fedavg_run
    assert report["federated"]["algorithm"] == "fedavg"
    assert report["federated"]["num_clients"] == 3
    assert set(report["per_site"]) == {"hospital_0", "hospital_1", "hospital_2"}
    assert 0.0 <= report["metrics"]["test_accuracy"] <= 1.0
    assert {"worst_accuracy", "spread_accuracy"} <= set(report["site_summary"])
    assert "privacy" not in report


def test_one_record_per_round(fedavg_run):
    workdir, _ = fedavg_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    rounds = [r for r in records if r["split"] == "round"]
    assert [r["step"] for r in rounds] == [1, 2, 3]
    assert all(r["num_clients"] == 3 and np.isfinite(r["loss"]) for r in rounds)


def test_resume_equals_uninterrupted(fedavg_run, tmp_path):
    workdir, full = fedavg_run
    config = config_of("fedavg.py")
    assert federated.run_rounds(config, str(tmp_path), quiet=True, stop_at_round=2) == {
        "stopped_at_step": 2
    }
    resumed = federated.run_rounds(config, str(tmp_path), resume=True, quiet=True)
    assert resumed["metrics"] == full["metrics"]


def test_dp_fedavg_epsilon_matches_dp_accounting(tmp_path):
    report = federated.run_rounds(config_of("dp_fedavg.py"), str(tmp_path), quiet=True)
    privacy = report["privacy"]
    assert privacy["level"] == "client" and privacy["steps"] == 4
    q = 4 / 12
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 4))
    assert privacy["sampling_rate"] == pytest.approx(q)
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(1e-2), rel=1e-3)
    with open(tmp_path / "metrics.jsonl") as f:
        eps = [json.loads(line)["epsilon"] for line in f if '"round"' in line]
    assert len(eps) == 4 and all(a < b for a, b in zip(eps, eps[1:], strict=False))


def test_dropout_and_budget(tmp_path):
    config = config_of(
        "dp_fedavg.py",
        "--config.federated.dropout_prob=0.5",
        "--config.privacy.target_epsilon=1.5",
    )
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    assert privacy["epsilon"] <= 1.5
    assert privacy["stopped_by_budget"] == (privacy["steps"] < 4)
    with open(tmp_path / "metrics.jsonl") as f:
        rounds = [json.loads(line) for line in f if '"round"' in line]
    assert sum(r["num_dropped"] for r in rounds) > 0


def test_eval_command_reads_federated_checkpoint(fedavg_run):
    workdir, report = fedavg_run
    _, state = federated.restore_for_eval(workdir)
    assert int(state.round) == 3
    result = registry.evaluate_workdir(workdir, "test")
    assert result["metrics"]["test_accuracy"] == pytest.approx(report["metrics"]["test_accuracy"])
    leaves = jax.tree.leaves(state.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_local_dp_sgd_reports_each_site(tmp_path):
    from fedjax_med.data import sources
    from fedjax_med.federated import client as client_lib

    overrides = (
        "--config.privacy.enabled=True",
        "--config.privacy.noise_multiplier=1.0",
        "--config.privacy.delta=1e-3",
        "--config.data.normalization=fixed",
    )
    config = config_of("fedavg.py", *overrides)
    fed = federated.build_federation(config, sources.load_splits(config.data, config.seed))
    # hospital_1's budget affords one round (2 local steps) but not a second one.
    budget_1 = client_lib.local_dp_epsilon(1.0, 8, int(fed.counts[1]), 3, 1e-3)
    config = config_of(
        "fedavg.py", *overrides, f"--config.federated.site_target_epsilons=hospital_1={budget_1}"
    )
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    eps = privacy["per_site_epsilon"]
    assert set(eps) == {"hospital_0", "hospital_1", "hospital_2"}
    # hospital_1 trained one round, then its budget kept it out, and the report says when.
    assert privacy["steps"]["hospital_1"] == 2
    assert privacy["site_budget_exhausted_at_round"] == {"hospital_1": 1}
    assert privacy["steps"]["hospital_0"] == 3 * 2  # 3 rounds x 2 local steps
    n0 = report["federated"]["client_sizes"][0]

    assert eps["hospital_0"] == pytest.approx(
        client_lib.local_dp_epsilon(1.0, 8, n0, 6, 1e-3), rel=1e-6
    )
    assert privacy["epsilon"] == max(eps.values())
    # The report names what the client code runs and the accountant assumes: Poisson rows,
    # add/remove-one neighbours (local_dp_epsilon is dpsgd_event with Poisson sampling).
    assert privacy["sampling"] == "poisson"
    assert privacy["neighbouring_relation"] == "add_or_remove_one"
    assert "adding or removing one example" in privacy["guarantee"]
    # What leaves a site outside its guarantee is named: its size (the FedAvg weight).
    assert any("number of training examples" in r for r in privacy["released_outside_guarantee"])
    assert privacy["mechanism"] == "local_dp_sgd" and "outside the site" in privacy["adversary"]
    # No plaintext client loss leaves a DP site: the round records carry none.
    with open(tmp_path / "metrics.jsonl") as f:
        rounds = [json.loads(line) for line in f if '"round"' in line]
    assert rounds and not any("loss" in r for r in rounds)


def test_personalization_reports_each_site(tmp_path):
    config = config_of("fedavg.py", "--config.federated.personalization_steps=3")
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    tuned = report["per_site_personalized"]
    assert set(tuned) == set(report["per_site"])
    for site, metrics in tuned.items():
        assert metrics["test_num_examples"] == report["per_site"][site]["test_num_examples"]
        assert 0.0 <= metrics["test_accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["secagg", "secagg_plus", "additive", "he_ckks"])
def test_secure_aggregation_equals_plaintext_fedavg(fedavg_run, tmp_path, method):
    workdir, plain = fedavg_run
    config = config_of(
        "fedavg.py",
        f"--config.secure_aggregation.method={method}",
        "--config.secure_aggregation.clip=1.0",
    )
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    _, plain_state = federated.restore_for_eval(workdir)
    _, secure_state = federated.restore_for_eval(str(tmp_path))
    # Fixed-point error: 32-bit ring, 3 clients, clip 1 -> far below 1e-5 per coordinate.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
        plain_state.params,
        secure_state.params,
    )
    assert report["federated"]["secure_aggregation"] == method
    # The secure sum hides single updates only if the protocol's keys are secret: the report
    # says this reproducible run's keys follow from the seed.
    assert report["federated"]["randomness"] == "reproducible"
    assert "no guarantee" in report["federated"]["randomness_meaning"]
    cost = report["aggregation_cost"]
    assert cost["bytes_per_client_per_round"] > cost["plaintext_bytes_per_client_per_round"] * 0.9
    assert cost["seconds_per_round"] > 0
    if method == "he_ckks":  # CKKS figures: ciphertext bytes and the three steps' seconds
        assert cost["he_ciphertext_bytes_per_client"] == cost["bytes_per_client_per_round"]
        steps = ("he_encrypt_seconds_per_client", "he_aggregate_seconds", "he_decrypt_seconds")
        assert all(cost[key] > 0 for key in steps)
        assert "key holder" in cost["trusted"]


def test_secure_aggregation_survives_dropouts(tmp_path):
    config = config_of(
        "fedavg.py",
        "--config.secure_aggregation.method=secagg",
        "--config.federated.dropout_prob=0.3",
        "--config.secure_aggregation.dropout_rate=0.3",
        "--config.federated.rounds=4",
    )
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    with open(tmp_path / "metrics.jsonl") as f:
        rounds = [json.loads(line) for line in f if '"round"' in line]
    assert len(rounds) == 4
    assert sum(r["num_dropped"] for r in rounds) > 0
    # A round with fewer survivors than the threshold (here 2 of 3) aborts with no update,
    # never a wrong sum; every other round aggregates at least the threshold.
    for r in rounds:
        if r["secure_round_aborted"]:
            assert r["num_clients"] == 0
        else:
            assert r["num_clients"] >= 2
    assert np.isfinite(report["metrics"]["test_loss"])


def test_distributed_dp_epsilon_matches_the_published_bound(tmp_path):
    config = config_of(
        "fedavg.py",
        "--config.secure_aggregation.method=secagg",
        "--config.secure_aggregation.distributed_dp=skellam",
        "--config.privacy.noise_multiplier=2.0",
        "--config.privacy.clip_norm=0.5",
        "--config.privacy.delta=1e-3",
        "--config.data.normalization=fixed",
    )
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    # Accounted as zero-out (one client's update replaced by 0), and labelled so.
    assert privacy["neighbouring_relation"] == "zero_out"
    assert "replacing one client's update by zero" in privacy["guarantee"]
    from fedjax_med.secure import distributed_dp, field

    n = report["federated"]["clients_per_round"]
    dim = report["num_params"]
    t = privacy["min_clients_per_round"]
    encoder = field.FieldEncoder(0.5 * (1 + 8 * 2.0), n, 32)
    l2 = distributed_dp.quantised_l2_sensitivity(0.5, encoder.scale, dim, rounding="nearest")
    l1 = distributed_dp.l1_sensitivity_bound(l2, dim)
    expected = distributed_dp.distributed_epsilon("skellam", 2.0, l2, l1, t, 3, 1e-3, dim=dim)
    assert privacy["epsilon"] == pytest.approx(expected)
    assert privacy["level"] == "client" and privacy["steps"] == 3
    with open(tmp_path / "metrics.jsonl") as f:
        eps = [json.loads(line)["epsilon"] for line in f if '"round"' in line]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(expected)
    assert np.isfinite(report["metrics"]["test_loss"])


def test_dp_fedavg_with_secagg_equals_plaintext_dp_fedavg(tmp_path):
    plain = federated.run_rounds(config_of("dp_fedavg.py"), str(tmp_path / "plain"), quiet=True)
    secure = federated.run_rounds(
        config_of("dp_fedavg.py", "--config.secure_aggregation.method=secagg"),
        str(tmp_path / "secure"),
        quiet=True,
    )
    _, a = federated.restore_for_eval(str(tmp_path / "plain"))
    _, b = federated.restore_for_eval(str(tmp_path / "secure"))
    # Same cohorts and the same server noise: only the 32-bit fixed-point error (~1e-9 per
    # coordinate and round) and float summation order differ, which the rounds' local training
    # amplifies over the rounds to ~2e-5; a wrong sum or noise would differ by the update, ~1e-2.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4), a.params, b.params)
    assert secure["privacy"]["epsilon"] == pytest.approx(plain["privacy"]["epsilon"])


# ---- attacks on the federated claims, as an adversary holding the run's files would try -----


def _checkpointed_server_key(workdir):
    plan, state = federated.restore_for_eval(workdir)
    return plan, np.asarray(jax.random.key_data(state.rng))


def test_secure_federated_checkpoint_holds_no_server_key(tmp_path):
    # The attack: the server key in the final checkpoint regenerates every round's DP-FedAvg
    # noise from the public initial model, and the clipped client sums follow (error 1.6e-7).
    config = config_of("dp_fedavg.py", "--config.privacy.noise_seed=secure")
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    _, key = _checkpointed_server_key(str(tmp_path))
    assert not key.any()
    assert report["privacy"]["noise_seed_mode"] == "secure"
    assert "never written to disk" in report["privacy"]["randomness"]


def test_reproducible_federated_run_says_the_seed_breaks_it(tmp_path):
    report = federated.run_rounds(config_of("dp_fedavg.py"), str(tmp_path), quiet=True)
    _, key = _checkpointed_server_key(str(tmp_path))
    assert key.any()  # reproducible runs keep their key, and their claim says what that means
    assert "no guarantee against anyone who holds the seed" in report["privacy"]["guarantee"]
    assert report["privacy"]["mechanism"] == "dp_fedavg"
    assert report["privacy"]["neighbouring_relation"] == "add_or_remove_one"


def test_secure_federated_resume_draws_fresh_keys_and_finishes(tmp_path):
    config = config_of("dp_fedavg.py", "--config.privacy.noise_seed=secure")
    assert federated.run_rounds(config, str(tmp_path), quiet=True, stop_at_round=2) == {
        "stopped_at_step": 2
    }
    report = federated.run_rounds(config, str(tmp_path), resume=True, quiet=True)
    assert report["privacy"]["steps"] == 4


def test_federated_resume_with_changed_privacy_is_refused(tmp_path):
    config = config_of("dp_fedavg.py")
    federated.run_rounds(config, str(tmp_path), quiet=True, stop_at_round=2)
    changed = config_of("dp_fedavg.py", "--config.privacy.noise_multiplier=0.3")
    with pytest.raises(workdir_lib.WorkdirError, match="privacy.noise_multiplier"):
        federated.run_rounds(changed, str(tmp_path), resume=True, quiet=True)


def test_resumed_site_ledgers_must_match_the_plan():
    from fedjax_med.trainers import ledgers

    def make(sigma):
        return ledgers.SiteLedgers(
            names=("a", "b"),
            num_units=np.array([10, 20]),
            targets=np.array([np.inf, 2.0]),
            noise_multiplier=sigma,
            batch_size=4,
            local_steps=2,
            delta=1e-3,
            accountant="rdp",
        )

    saved = make(1.0).state_dict()
    make(1.0).load_state_dict(saved)
    with pytest.raises(ValueError, match="noise_multiplier"):
        make(0.5).load_state_dict(saved)


def test_personalisation_is_accounted_in_each_sites_ledger(tmp_path):
    # Before: personalisation steps read the site's images, their metrics were published, and
    # the site's epsilon did not count them.
    config = config_of(
        "fedavg.py",
        "--config.privacy.enabled=True",
        "--config.privacy.noise_multiplier=1.0",
        "--config.privacy.delta=1e-3",
        "--config.data.normalization=fixed",
        "--config.federated.personalization_steps=3",
    )
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    assert set(report["per_site_personalized"]) == set(privacy["steps"])
    assert all(steps == 3 * 2 + 3 for steps in privacy["steps"].values())
    from fedjax_med.federated import client as client_lib

    n0 = report["federated"]["client_sizes"][0]
    assert privacy["per_site_epsilon"]["hospital_0"] == pytest.approx(
        client_lib.local_dp_epsilon(1.0, 8, n0, 9, 1e-3), rel=1e-6
    )


def test_secagg_plus_run_of_100_clients_trains(tmp_path):
    # Before: k = ceil(2 log2 n) neighbours held each client's shares but t = ceil(n / 2) were
    # needed, so every round of 24 or more clients aborted and the model never trained.
    config = config_of(
        "fedavg.py",
        "--config.secure_aggregation.method=secagg_plus",
        "--config.federated.partition.method=iid",
        "--config.federated.partition.num_clients=100",
        "--config.data.synthetic.examples_per_site=300",
        "--config.federated.client_batch_size=4",
        "--config.federated.client_lr=0.1",
        "--config.federated.rounds=4",
        "--config.federated.local_steps=3",
        "--config.federated.dropout_prob=0.05",
        "--config.federated.eval_every=100",
        "--config.federated.checkpoint_every=100",
    )
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    with open(tmp_path / "metrics.jsonl") as f:
        rounds = [json.loads(line) for line in f if '"round"' in line]
    assert len(rounds) == 4 and not any(r["secure_round_aborted"] for r in rounds)
    assert all(r["secagg_threshold"] <= r["secagg_neighbours"] + 1 < 100 for r in rounds)
    assert all(r["num_clients"] >= r["secagg_threshold"] for r in rounds)
    assert "loss" not in rounds[0]  # the server learns no plaintext client loss
    run = registry.restore(str(tmp_path))
    from fedjax_med.training import evaluate

    predict = evaluate.make_predict_fn(run.model.apply, run.splits.info.task)
    initial = evaluate.evaluate(
        predict, run.initial_params, run.splits.test, run.splits.info, run.normalizer, 256
    )
    assert report["metrics"]["test_loss"] < initial["metrics"]["loss"] - 0.01


def test_patient_level_local_dp_sgd_is_honoured_not_dropped(tmp_path):
    # Before: privacy.unit='patient' under local DP-SGD was silently example-level.
    config = config_of(
        "fedavg.py",
        "--config.privacy.enabled=True",
        "--config.privacy.unit=patient",
        "--config.privacy.max_images_per_patient=2",
        "--config.privacy.noise_multiplier=1.0",
        "--config.privacy.delta=1e-3",
        "--config.data.normalization=fixed",
    )
    report = federated.run_rounds(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    assert privacy["unit"] == "patient" and "one patient" in privacy["guarantee"]
    plan, _ = federated.restore_for_eval(str(tmp_path))
    from fedjax_med.federated import client as client_lib

    patients = client_lib.num_units(plan.client_data)
    assert (patients < np.asarray(report["federated"]["client_sizes"])).all()
    for k, name in enumerate(plan.federation.client_names):
        assert privacy["per_site_epsilon"][name] == pytest.approx(
            client_lib.local_dp_epsilon(1.0, 8, int(patients[k]), 6, 1e-3), rel=1e-6
        )


@pytest.mark.parametrize(
    "spec,mechanism",
    [
        ("dp_sgd.py:tiny", "dp_sgd"),
        ("dp_fedavg.py:tiny", "dp_fedavg"),
        ("secagg_fedavg.py:ddp,tiny", "distributed_dp"),
        ("quickstart.py:smoke", "local_dp_sgd"),
    ],
)
def test_named_configs_run_in_secure_mode_and_say_so(tmp_path, spec, mechanism):
    path = os.path.join(ROOT, "configs", spec)
    config = loading.load_config(
        path, ["--config.data.cache_dir=none", "--config.privacy.noise_seed=secure"]
    )
    report = registry.train(config, str(tmp_path), quiet=True)
    privacy = report["privacy"]
    assert privacy["mechanism"] == mechanism and privacy["noise_seed_mode"] == "secure"
    assert "operating system" in privacy["randomness"]
    assert "no guarantee" not in privacy["guarantee"]
