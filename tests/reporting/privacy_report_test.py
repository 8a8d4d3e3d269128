"""``fedjax-med report`` end to end on a tiny task: files, promised keys, each setting's meaning."""

import json
import os

import pytest
from PIL import Image

from fedjax_med.attacks import canaries
from fedjax_med.cli import main as cli
from fedjax_med.config import loading, schema
from fedjax_med.reporting import privacy_report, settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "privacy_report.py") + ":smoke"  # every setting, tiny
SETTING_KEYS = {
    "description",
    "defences",
    "workdir",
    "run",
    "train_seconds",
    "utility",
    "worst_site_accuracy",
    "epsilon",
    "delta",
    "privacy_level",
    "noise_multiplier",
    "membership",
    "inversion",
    "audit",
    "run_audit",
    "attack_seconds",
    "claim",
}
MIA_KEYS = {"attack", "auc", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr", "members", "nonmembers"}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("report")
    args = ["report", "--config", TINY, "--workdir", str(workdir), "--quiet"]
    # Trained here, one setting after another: under the suite's workers, spawned training
    # processes would only add their imports (tests/reporting/training_pool_test.py tests them).
    overrides = ["--config.data.cache_dir=none", "--config.report.workers=0"]
    assert cli.main([*args, *overrides]) == 0
    return workdir


@pytest.fixture(scope="module")
def report(report_dir):
    return json.loads((report_dir / "report.json").read_text())


def test_writes_every_promised_file(report_dir, report):
    assert set(report["plots"]) == {
        "utility_vs_epsilon",
        "mia_roc",
        "reconstructions",
        "audit",
        "poisoning",
    }
    for name in report["plots"].values():
        with Image.open(report_dir / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    text = (report_dir / "report.md").read_text()
    for name in report["settings"]:
        assert f"| {name} |" in text
        assert (report_dir / "runs" / name / "report.json").exists()


def test_report_keys_and_settings(report):
    assert {"schema_version", "settings", "audits", "plots", "config", "seconds"} <= set(report)
    assert 0.0 < report["majority_class_accuracy"] < 1.0
    assert list(report["settings"]) == [
        "central",
        "fedavg",
        "secagg",
        "dp_sgd_patient",
        "dp_sgd_per_layer",
        "dp_sgd_eps1",
        "dp_fedavg",
        "local_dp_sgd",
    ]
    for name, entry in report["settings"].items():
        assert set(entry) == SETTING_KEYS, name
        assert 0.0 <= entry["utility"]["test_accuracy"] <= 1.0
        assert MIA_KEYS <= set(entry["membership"]["loss_threshold"])
        assert entry["membership"]["lira"]["shadow_models"] == 2
        assert entry["run"] == "trained"


def test_each_private_setting_states_its_threat_model(report_dir, report):
    text = (report_dir / "report.md").read_text()
    assert "## Privacy claims" in text
    for name, entry in report["settings"].items():
        claim = entry["claim"]
        if entry["epsilon"] is None:
            assert claim is None, name
            continue
        assert claim["trusted"] and claim["adversary"] and claim["guarantee"] in text, name
        assert claim["noise_seed_mode"] == "reproducible" and "no guarantee" in claim["guarantee"]
    assert report["settings"]["local_dp_sgd"]["claim"]["unit"] == "example"
    assert report["settings"]["dp_sgd_patient"]["claim"]["unit"] == "patient"


def test_each_setting_is_attacked_as_its_server_sees_it(report):
    s = report["settings"]
    assert s["central"]["inversion"]["attacked"] is False  # the server holds the images
    assert s["central"]["epsilon"] is None and s["central"]["audit"] is None
    fedavg = s["fedavg"]["inversion"]
    assert fedavg["images_behind_update"] == 1 and "label_recovered" in fedavg
    secagg = s["secagg"]["inversion"]
    assert secagg["images_behind_update"] == 3 and secagg["labels_given"]  # 3 hospitals' sum
    assert s["secagg"]["defences"] == ["secure_aggregation"]
    dp = s["dp_sgd_eps1"]
    assert dp["epsilon"] <= 1.0 + 1e-6 and dp["privacy_level"] == "example"
    assert s["dp_fedavg"]["privacy_level"] == "client"
    for name in ("dp_sgd_eps1", "dp_fedavg"):
        audit = s[name]["audit"]
        claimed = canaries.claimed_epsilon(audit["noise_multiplier"], audit["delta"])
        assert audit["accountant_epsilon"] == pytest.approx(claimed)
        assert audit["noise_multiplier"] == pytest.approx(s[name]["noise_multiplier"])
        assert audit["consistent"] and audit["mechanism"] == "correct"


def test_audits_include_the_broken_variant(report):
    mechanisms = [a["mechanism"] for a in report["audits"]]
    # Per release: each DP setting through the code that trained it (patient-level, per-layer
    # and example-level DP-SGD, DP-FedAvg, local DP-SGD); whole run: dp_sgd_eps1.
    assert mechanisms.count("correct") == 6
    for name in ("dp_sgd_patient", "dp_sgd_per_layer", "dp_sgd_eps1", "dp_fedavg", "local_dp_sgd"):
        audit = report["settings"][name]["audit"]
        assert audit is not None and audit["consistent"], name
        assert audit["accountant_epsilon"] > 0, name
    assert "no_noise" in mechanisms and "no_subsampling" in mechanisms
    whole = report["settings"]["dp_sgd_eps1"]["run_audit"]
    assert whole["consistent"] and whole["accountant_epsilon"] == pytest.approx(
        report["settings"]["dp_sgd_eps1"]["epsilon"], rel=1e-6
    )
    assert report["settings"]["dp_fedavg"]["run_audit"] is None


def test_poisoning_section_tabulates_clean_accuracy_and_attack_success(report_dir, report):
    entry = report["poisoning"]["backdoor_krum"]
    assert entry["attack"] == "backdoor" and entry["defence"] == "krum"
    assert len(entry["malicious_clients"]) == 1 and entry["num_clients"] == 5
    assert 0.0 <= entry["test_accuracy"] <= 1.0 and 0.0 <= entry["test_attack_success"] <= 1.0
    assert [r["round"] for r in entry["per_round"]] == [1, 2]
    assert (report_dir / entry["workdir"] / "report.json").exists()
    text = (report_dir / "report.md").read_text()
    assert "## Poisoning" in text and "| backdoor_krum | backdoor | 1 of 5 | krum |" in text
    assert "every individual update" in text  # which defence keeps which privacy claim


def test_default_poisoning_grid_resolves_in_report_order():
    resolved = settings.resolve_poisoning(loading.load_config(TINY.replace(":smoke", "")))
    assert [s.name for s in resolved] == [
        "no_attack",
        "backdoor_mean",
        "backdoor_dp_fedavg",
        "backdoor_krum",
        "backdoor_median",
        "backdoor_norm_bound",
    ]
    assert [settings.poisoning_defence(s.config) for s in resolved][1:] == [
        "none",
        "dp_fedavg",
        "krum",
        "median",
        "norm_bound",
    ]


def test_finished_runs_are_reused(report_dir):
    config = loading.load_config(TINY, ["--config.data.cache_dir=none"])
    central = next(s for s in settings.resolve(config) if s.name == "central")
    run_dir = str(report_dir / "runs" / "central")
    before = os.path.getmtime(os.path.join(run_dir, "report.json"))
    _, how = privacy_report.train_setting(central, run_dir, quiet=True)
    assert how == "reused" and os.path.getmtime(os.path.join(run_dir, "report.json")) == before


def test_default_and_gpu_variants_resolve():
    for variant in ("", ":gpu"):
        spec = os.path.join(ROOT, "configs", "privacy_report.py") + variant
        resolved = settings.resolve(loading.load_config(spec))
        assert [s.name for s in resolved] == [
            "central",
            "fedavg",
            "secagg",
            "dp_sgd_eps16",
            "dp_sgd_eps4",
            "dp_sgd_patient",
            "dp_sgd_per_layer",
            "dp_sgd_eps1",
            "dp_fedavg",
            "local_dp_sgd",
        ]
        assert all(s.config.privacy.target_epsilon > 0 for s in resolved if s.private)


def test_settings_defences_and_errors():
    config = loading.load_config(TINY)
    by_name = {s.name: s for s in settings.resolve(config)}
    assert by_name["dp_fedavg"].defences == ("dp_fedavg",)
    assert by_name["dp_sgd_eps1"].defences == ("dp_sgd",) and by_name["dp_sgd_eps1"].private
    assert not by_name["fedavg"].private and by_name["fedavg"].federated
    with config.unlocked():
        config.report.settings = {"bad": {"privacy": {"noise_multipler": 1.0}}}
    with pytest.raises(schema.ConfigError, match="'bad'.*privacy.noise_multipler.*did you mean"):
        settings.resolve(config)
    with config.unlocked():
        config.report.settings = {"bad": {"privacy": {"delta": 2.0}}}
    with pytest.raises(schema.ConfigError, match="'bad'.*privacy.delta"):
        settings.resolve(config)
    with config.unlocked():
        config.report.settings = {}
    with pytest.raises(schema.ConfigError, match="report.settings"):
        settings.resolve(config)


def test_bad_report_field_is_a_user_error(tmp_path, capsys):
    args = ["report", "--config", TINY, "--workdir", str(tmp_path)]
    assert cli.main([*args, "--config.report.broken_mechanisms=no_clip"]) == 2
    assert "report.broken_mechanisms" in capsys.readouterr().err


def test_settings_can_be_added_and_changed_from_the_command_line():
    overrides = [
        "--config.report.settings.central.train.steps=3",
        "--config.report.settings.local_dp.trainer=federated",
        "--config.report.settings.local_dp.privacy.enabled=True",
        "--config.report.settings.local_dp.privacy.noise_multiplier=1.5",
    ]
    by_name = {s.name: s for s in settings.resolve(loading.load_config(TINY, overrides))}
    assert by_name["central"].config.train.steps == 3
    assert by_name["local_dp"].defences == ("local_dp_sgd",)
    assert by_name["local_dp"].config.privacy.noise_multiplier == 1.5


def test_recipe_settings_resolve_and_stay_out_of_the_default():
    names = {s.name for s in settings.resolve(loading.load_config("privacy_report"))}
    assert not names & {"dp_sgd_recipe", "dp_scatter_linear"}
    for arg in ("recipe", "tiny,recipe"):
        config = loading.load_config(f"privacy_report:{arg}")
        resolved = {s.name: s.config for s in settings.resolve(config)}
        recipe, scatter = resolved["dp_sgd_recipe"], resolved["dp_scatter_linear"]
        assert (recipe.privacy.augmult, recipe.train.ema_decay) == (4, 0.99)
        assert scatter.model.name == "scatter_linear"
        assert recipe.privacy.target_epsilon == scatter.privacy.target_epsilon == 4.0
        if arg == "recipe":  # the default settings, plus the two
            assert set(resolved) == names | {"dp_sgd_recipe", "dp_scatter_linear"}
