"""The fedjax-med command line: train on each data source, describe, eval, clean user errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fedjax_med.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"
TINY = ["--config.data.cache_dir=none", "--config.train.num_devices=1"]
# Other sources than the synthetic one: the centralized quickstart (it sets no field of the
# synthetic generator, which those sources would refuse), shrunk to a few steps.
OTHER_SOURCE = [
    "--config",
    os.path.join(ROOT, "configs", "quickstart.py") + ":central",
    "--config.train.num_devices=1",
    "--config.train.batch_size=16",
    "--config.train.steps=6",
    "--config.train.eval_every=3",
    "--config.train.checkpoint_every=3",
]


def write_medmnist(path, multilabel=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        if multilabel:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 5), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(n) % 3)[:, None].astype(np.uint8)
    np.savez(path, **arrays)


def write_image_folder(root):
    rng = np.random.default_rng(1)
    for site in ("hospital_a", "hospital_b"):
        for cls in ("benign", "malignant"):
            os.makedirs(root / site / cls)
            for i in range(12):
                pixels = rng.integers(0, 256, (20, 20), dtype=np.uint8)
                Image.fromarray(pixels).save(root / site / cls / f"{i}.png")


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "data"):
        assert command in out


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_train_on_medmnist_npz(tmp_path, capsys, multilabel):
    npz = tmp_path / "toymnist.npz"
    write_medmnist(npz, multilabel)
    workdir = tmp_path / "run"
    code = cli.main(
        ["train", *OTHER_SOURCE, "--workdir", str(workdir), "--quiet"]
        + ["--config.data.name=medmnist", f"--config.data.path={npz}"]
    )
    assert code == 0
    report = json.loads((workdir / "report.json").read_text())
    assert report["dataset"]["task"] == ("multilabel" if multilabel else "multiclass")
    assert report["dataset"]["image_shape"] == [28, 28, 1]
    assert report["metrics"]["test_num_examples"] == 12
    if multilabel:
        assert "test_auroc_label_4" in report["metrics"]


def test_train_on_image_folder_then_eval(tmp_path, capsys):
    root = tmp_path / "study"
    write_image_folder(root)
    workdir = tmp_path / "run"
    code = cli.main(
        ["train", *OTHER_SOURCE, "--workdir", str(workdir), "--quiet"]
        + ["--config.data.name=image_folder", f"--config.data.path={root}"]
    )
    assert code == 0
    report = json.loads((workdir / "report.json").read_text())
    assert report["dataset"]["task"] == "binary"
    assert set(report["per_site"]) <= {"hospital_a", "hospital_b"}
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(workdir), "--split", "val"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "val" and "val_accuracy" in printed["metrics"]


def test_data_describe(capsys):
    assert cli.main(["data", "describe", "--config", QUICK, "--json", *TINY[:1]]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["name"] == "synthetic"
    train = summary["splits"]["train"]
    assert sum(s["examples"] for s in train["sites"].values()) == train["examples"]
    assert train["patients"] < train["examples"]  # several images per patient
    assert cli.main(["data", "describe", "--config", QUICK, *TINY[:1]]) == 0
    assert "hospital_0" in capsys.readouterr().out


def test_data_describe_png_shows_every_site_and_class(tmp_path, capsys):
    out = tmp_path / "samples.png"
    args = ["data", "describe", "--config", QUICK, *TINY[:1], "--png", str(out)]
    assert cli.main([*args, "--per-class", "2"]) == 0
    assert f"samples: {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        wide, grey = image.size, np.asarray(image.convert("L"), dtype=float)
    # The scans are drawn, not blank panels: most of the figure is image pixels, mid-grey.
    assert grey.mean() < 200
    # Three sites (rows) and four classes of two images (columns): wider than tall.
    assert image.format == "PNG" and wide[0] > wide[1] > 300
    assert cli.main([*args, "--per-class", "1"]) == 0
    with Image.open(out) as image:
        assert image.size[0] < wide[0]  # fewer images per class, a narrower grid
    assert cli.main([*args, "--per-class", "0"]) == 2
    assert "--per-class must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.train.stepz=3"], "unknown config field 'train.stepz'"),
        (["--config.data.name=medmnist", "--config.data.path=/no/such.npz"], "/no/such.npz"),
        (
            ["--config.data.name=image_folder", "--config.data.path=/no/such/dir"],
            "/no/such/dir",
        ),
        (["--config.train.batch_size=0"], "'train.batch_size'=0 must be >= 1"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    code = cli.main(["train", *OTHER_SOURCE, "--workdir", str(tmp_path / "w"), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_missing_config_file_subprocess(tmp_path):
    """The installed console script exits non-zero with one line and no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "fedjax_med.cli.main", "train", "--config", "nope.py"]
        + ["--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: config file 'nope.py' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
