"""``fedjax-med attack`` against trained runs: files, keys and the number printed last."""

import json
import os

import pytest

from fedjax_med.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"
    args = ["train", "--config", config, "--workdir", str(workdir), "--quiet"]
    assert cli.main([*args, "--config.data.cache_dir=none"]) == 0
    return workdir


def test_membership_attack(trained, capsys):
    capsys.readouterr()
    assert cli.main(["attack", "membership", "--workdir", str(trained)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads((trained / "attack_membership.json").read_text())
    assert out[-1] == f"auc = {result['auc']:.6g}"
    assert 0.0 <= result["auc"] <= 1.0
    assert result["members"] > 0 and result["nonmembers"] > 0
    assert 0.0 <= result["tpr_at_1%_fpr"] <= 1.0


def test_inversion_attack(trained, capsys):
    args = ["attack", "inversion", "--workdir", str(trained), "--steps", "20", "--restarts", "1"]
    assert cli.main(args) == 0
    result = json.loads((trained / "attack_inversion.json").read_text())
    assert result["recovered_label"] == result["true_label"]  # iDLG is exact for one image
    assert result["psnr"] > 0 and -1.0 <= result["ssim"] <= 1.0
    assert (trained / "attack_inversion.png").stat().st_size > 0


def test_bad_index_is_a_user_error(trained, capsys):
    code = cli.main(["attack", "inversion", "--workdir", str(trained), "--index", "999999"])
    assert code == 2
    assert "--index=999999 must lie in" in capsys.readouterr().err
