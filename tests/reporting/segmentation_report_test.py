"""``fedjax-med report --config privacy_report:segmentation``: the report on a segmentation task."""

import json

import pytest

from fedjax_med.cli import main as cli

MIA_KEYS = {"attack", "auc", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr", "members", "nonmembers"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("segmentation_report")
    args = ["report", "--config", "privacy_report:segmentation", "--workdir", str(workdir)]
    # Trained here, one setting after another (as in privacy_report_test.py).
    overrides = ["--quiet", "--config.data.cache_dir=none", "--config.report.workers=0"]
    assert cli.main([*args, *overrides]) == 0
    return json.loads((workdir / "report.json").read_text())


def test_every_setting_reports_dice_and_the_segmentation_attacks(report):
    assert list(report["settings"]) == ["central", "fedavg", "dp_sgd_eps1"]
    assert report["majority_class_accuracy"] is None  # no single label per image
    for name, entry in report["settings"].items():
        utility = entry["utility"]
        assert 0 <= utility["test_dice"] <= 1 and 0 < utility["test_dice_all_background"] < 1
        for attack in ("loss_threshold", "dice_threshold", "lira"):
            assert MIA_KEYS <= set(entry["membership"][attack]), (name, attack)
            assert 0 <= entry["membership"][attack]["auc"] <= 1
        assert entry["membership"]["dice_threshold"]["attack"] == "dice_threshold"
    # Pooled data: nothing to invert; a client's update and a DP-SGD release are inverted with
    # the victim's mask given, and scored against guessing.
    assert report["settings"]["central"]["inversion"]["attacked"] is False
    for name in ("fedavg", "dp_sgd_eps1"):
        inversion = report["settings"][name]["inversion"]
        assert inversion["attacked"] and inversion["labels_given"], name
        assert "label_recovered" not in inversion
        assert inversion["psnr"] > 0 and inversion["psnr_random_baseline"] > 0
    assert report["settings"]["dp_sgd_eps1"]["audit"] is not None
    assert "poisoning" not in report
