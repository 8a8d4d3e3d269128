"""Bad values through the CLI: exit status 2 and one ``error:`` line naming the field."""

import os

import numpy as np
import pytest

from fedjax_med.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.data.std=inf", "'data.std'=inf must be a finite number"),
        ("--config.data.mean=nan", "'data.mean'=nan must be a finite number"),
        ("--config.seed=1180591620717411303424", "'seed'=1180591620717411303424 must be in"),
    ],
)
def test_non_finite_and_huge_values_exit_2(tmp_path, capsys, override, message):
    code = cli.main(["train", "--config", QUICK, "--workdir", str(tmp_path / "w"), override])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "w" / "config.json")


def test_stray_label_exits_2(tmp_path, capsys):
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 4)[:, None].astype(np.uint8)
    arrays["train_labels"][0] = 99
    np.savez(tmp_path / "four.npz", **arrays)
    code = cli.main(
        [
            "data",
            "describe",
            "--config",
            QUICK,
            "--config.data.name=medmnist",
            f"--config.data.path={tmp_path / 'four.npz'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "value 99 on 1 example" in err and "Traceback" not in err


@pytest.mark.parametrize("num_examples", ["0", "-10"])
def test_privacy_num_examples_must_be_positive(capsys, num_examples):
    args = ["privacy", "epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.01"]
    args += ["--steps", "100", "--delta", "1e-5", "--num-examples", num_examples]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"--num-examples={num_examples} must be an integer >= 1" in err
    assert "Traceback" not in err


def test_privacy_pld_step_limit_exits_2_at_once(capsys):
    args = ["privacy", "calibrate", "--target-epsilon", "2", "--sampling-rate", "0.01"]
    args += ["--steps", str(10**9), "--delta", "1e-5", "--accountant", "pld"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "PLD_MAX_STEPS" in err and err.count("error:") == 1


def test_privacy_calibrate_shows_progress(capsys):
    args = ["privacy", "calibrate", "--target-epsilon", "2", "--sampling-rate", "0.01"]
    args += ["--steps", "1000", "--delta", "1e-5"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "trying noise_multiplier" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("noise_multiplier = ")
