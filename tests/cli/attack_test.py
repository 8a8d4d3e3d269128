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


def test_membership_with_lira_writes_roc(trained, capsys):
    args = ["attack", "membership", "--workdir", str(trained), "--shadow-models", "2"]
    assert cli.main([*args, "--shadow-steps", "3", "--pool-size", "20"]) == 0
    result = json.loads((trained / "attack_membership.json").read_text())
    assert result["lira"]["attack"] == "lira_online" and result["lira"]["shadow_models"] == 2
    assert 0.0 <= result["lira"]["auc"] <= 1.0 and result["lira"]["members"] == 10
    assert (trained / result["roc_png"]).stat().st_size > 0


def test_audit_needs_a_private_run(trained, capsys):
    assert cli.main(["attack", "audit", "--workdir", str(trained)]) == 2
    assert "not private" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dp_run")
    small = [
        "--config.data.cache_dir=none",
        "--config.data.synthetic.num_sites=3",
        "--config.data.synthetic.examples_per_site=60",
        "--config.data.synthetic.image_size=16",
        "--config.train.steps=3",
        "--config.train.batch_size=16",
        "--config.train.eval_every=3",
        "--config.train.checkpoint_every=3",
        "--config.privacy.delta=1e-3",
        "--config.privacy.method=vmap",
    ]
    config = os.path.join(ROOT, "configs", "dp_sgd.py")
    assert (
        cli.main(["train", "--config", config, "--workdir", str(workdir), "--quiet", *small]) == 0
    )
    return workdir


@pytest.mark.parametrize("mechanism", ["correct", "no_noise"])
def test_audit_of_a_dp_sgd_run(dp_run, mechanism, capsys):
    capsys.readouterr()
    args = ["attack", "audit", "--workdir", str(dp_run), "--trials", "400"]
    assert cli.main([*args, "--mechanism", mechanism]) == 0
    result = json.loads((dp_run / "attack_audit.json").read_text())
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"epsilon_lower_bound = {result['epsilon_lower_bound']:.6g}"
    )
    report = json.loads((dp_run / "report.json").read_text())["privacy"]
    assert result["noise_multiplier"] == pytest.approx(report["noise_multiplier"])
    assert result["run_epsilon"] == pytest.approx(report["epsilon"])
    if mechanism == "correct":
        assert result["consistent"]
    else:  # no noise: the canary is seen in every trial, the most these trials can certify
        assert result["epsilon_lower_bound"] == pytest.approx(result["max_detectable_epsilon"])


def test_whole_run_audit_of_a_dp_sgd_run(dp_run):
    """The claim is the whole run's epsilon (detection of broken code: canaries_test.py)."""
    args = ["attack", "audit", "--workdir", str(dp_run), "--whole-run", "--trials", "1000"]
    assert cli.main(args) == 0
    result = json.loads((dp_run / "attack_audit.json").read_text())
    report = json.loads((dp_run / "report.json").read_text())["privacy"]
    assert result["attack"] == "one_run_audit" and result["mechanism"] == "correct"
    assert result["accountant_epsilon"] == pytest.approx(report["epsilon"], rel=1e-6)
    assert result["consistent"] and result["trials"] == 1000


def test_no_subsampling_needs_whole_run(dp_run, capsys):
    args = ["attack", "audit", "--workdir", str(dp_run), "--mechanism", "no_subsampling"]
    assert cli.main(args) == 2
    assert "--whole-run" in capsys.readouterr().err


def test_server_view_inversion_of_a_dp_run_attacks_the_dp_release(dp_run):
    args = ["attack", "inversion", "--workdir", str(dp_run), "--view", "server"]
    assert cli.main([*args, "--steps", "10", "--restarts", "1"]) == 0
    result = json.loads((dp_run / "attack_inversion.json").read_text())
    assert result["view"] == "server" and result["attacked"] and result["round"] == "first"
    assert "DP-SGD" in result["server_sees"] and result["images_behind_update"] == 1


def test_server_view_of_a_centralized_run_is_the_images(trained, capsys):
    capsys.readouterr()
    assert cli.main(["attack", "inversion", "--workdir", str(trained), "--view", "server"]) == 0
    result = json.loads((trained / "attack_inversion.json").read_text())
    assert result["attacked"] is False
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("server_sees = the training")
