"""Segmentation through every trainer: a U-Net learns the synthetic lesions; DP-SGD, DP-FedAvg and
secure aggregation runs report Dice per site (and epsilon)."""

import math

import pytest

from fedjax_med.config import loading
from fedjax_med.trainers import registry


def _run(tmp_path, spec, *overrides):
    config = loading.load_config(spec, [f"--config.{o}" for o in overrides])
    return registry.train(config, str(tmp_path), quiet=True)


def _check_dice(report):
    m = report["metrics"]
    assert 0 <= m["test_dice"] <= 1 and 0 <= m["test_iou"] <= m["test_dice"] + 1e-9
    assert m["test_hd95"] >= 0
    assert report["per_site"] and all("test_dice" in s for s in report["per_site"].values())
    assert report["dataset"]["task"] == "segmentation"


def test_unet_learns_the_lesions_well_above_all_background(tmp_path):
    report = _run(
        tmp_path,
        "segmentation:tiny",
        "data.synthetic.num_classes=2",  # normal vs mass: background vs the ellipse
        "data.synthetic.examples_per_site=60",
        "train.steps=60",
        "train.batch_size=16",
        "train.eval_every=60",
        "train.checkpoint_every=60",
        "optimizer.learning_rate=0.01",
    )
    _check_dice(report)
    m = report["metrics"]
    # All background scores the fraction of normal images, and 0 on the masses.
    assert m["test_dice"] > m["test_dice_all_background"] + 0.15
    assert m["test_dice_class_1"] > 0.3
    assert report["site_summary"]["worst_dice"] <= report["site_summary"]["mean_dice"]


def test_dp_sgd_segmentation_reports_dice_per_site_and_epsilon(tmp_path):
    report = _run(
        tmp_path, "segmentation:dp,tiny", "privacy.target_epsilon=0", "privacy.noise_multiplier=1.0"
    )
    _check_dice(report)
    privacy = report["privacy"]
    assert privacy["mechanism"] == "dp_sgd" and 0 < privacy["epsilon"] < math.inf


@pytest.mark.parametrize(
    "overrides",
    [
        (
            "federated.algorithm=dp_fedavg",
            "privacy.clip_norm=0.5",
            "privacy.noise_multiplier=1.0",
            "privacy.delta=1e-2",
            "data.normalization=fixed",
        ),
        ("secure_aggregation.method=secagg", "secure_aggregation.clip=0.5"),
    ],
    ids=["dp_fedavg", "secagg"],
)
def test_federated_segmentation_reports_dice_per_site(tmp_path, overrides):
    report = _run(tmp_path, "segmentation:federated,tiny", *overrides)
    _check_dice(report)
    assert set(report["per_site"]) == {"hospital_0", "hospital_1"}
    if "federated.algorithm=dp_fedavg" in overrides:
        assert 0 < report["privacy"]["epsilon"] < math.inf
