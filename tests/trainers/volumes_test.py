"""A 3-D model trains on a tiny MedMNIST-3D file: centrally, with DP-SGD and federated."""

import json
import os

import numpy as np
import pytest

from fedjax_med.config import loading
from fedjax_med.trainers import central, federated

CLASSES = 3


def write_file(path, side=16, seed=0):
    """A MedMNIST-3D-shaped file: class k is a bright cube in octant k of a noisy volume."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 96), ("val", 12), ("test", 48)):
        labels = np.arange(n) % CLASSES
        volumes = rng.integers(0, 120, (n, side, side, side)).astype(np.uint8)
        h = side // 2
        for i, k in enumerate(labels):
            z, y = (k & 1) * h, (k >> 1) * h
            volumes[i, z + 2 : z + h - 2, y + 2 : y + h - 2, 2 : h - 2] = 230
        arrays[f"{split}_images"] = volumes
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_file(tmp_path_factory.mktemp("vol") / "tinymnist3d.npz")


def config(path, variant, *overrides):
    return loading.load_config(
        f"medmnist3d:{variant}",
        [f"--config.data.path={path}", *(f"--config.{o}" for o in overrides)],
    )


def _train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]


def test_central_training_learns_the_volumes(path, tmp_path):
    workdir = str(tmp_path / "central")
    cfg = config(
        path,
        "tiny",
        "train.steps=30",
        "train.eval_every=15",
        "train.checkpoint_every=30",
    )
    report = central.train_and_evaluate(cfg, workdir, quiet=True)
    assert report["dataset"]["image_shape"] == [16, 16, 16, 1]
    assert report["metrics"]["test_accuracy"] > 1 / CLASSES + 0.25  # chance is 1/3
    losses = _train_losses(workdir)
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_dp_sgd_on_volumes_reports_epsilon(path, tmp_path):
    # vmap compiles faster than the ghost path on CPU; tests/models/cnn3d_test.py checks that
    # ghost clipping of the 3-D convolutions equals it.
    cfg = config(
        path,
        "dp,tiny",
        "train.steps=4",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "privacy.method=vmap",
    )
    report = central.train_and_evaluate(cfg, str(tmp_path / "dp"), quiet=True)
    privacy = report["privacy"]
    assert 0 < privacy["epsilon"] <= cfg.privacy.target_epsilon
    assert privacy["steps"] == 4 and privacy["unit"] == "example"
    assert np.isfinite(report["metrics"]["test_loss"])


def test_federated_training_on_volumes(path, tmp_path):
    cfg = config(path, "federated,tiny")
    report = federated.run_rounds(cfg, str(tmp_path / "fed"), quiet=True)
    assert report["federated"]["rounds"] == 2
    assert 0 <= report["metrics"]["test_accuracy"] <= 1
