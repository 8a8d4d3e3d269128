"""Damaged checkpoints fall back to the newest intact one; a resume logs what a whole run logs.

Three kinds of damage: the newest checkpoint's array data truncated, deleted, or its folder emptied.
A resume then continues from the previous checkpoint with its privacy ledger, so the final
epsilon, report and ``metrics.jsonl`` equal the uninterrupted run's.
"""

import glob
import json
import os
import shutil

import pytest

from fedjax_med.cli import main as cli
from fedjax_med.config import loading
from fedjax_med.trainers import central, federated
from fedjax_med.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DP_SGD = [
    "--config.data.cache_dir=none",
    "--config.data.synthetic.num_sites=3",
    "--config.data.synthetic.examples_per_site=60",
    "--config.data.synthetic.image_size=16",
    "--config.train.steps=6",
    "--config.train.batch_size=16",
    "--config.train.eval_every=4",  # not a multiple of checkpoint_every: windows span resumes
    "--config.train.checkpoint_every=3",
    "--config.train.num_devices=1",
    "--config.privacy.delta=1e-3",
    "--config.privacy.method=vmap",
]


def dp_sgd_config():
    return loading.load_config(os.path.join(ROOT, "configs", "dp_sgd.py"), DP_SGD)


def damage(step_dir, kind):
    """Damages the checkpoint folder ``step_dir`` as a bad disk or a careless operator would."""
    data = sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True))
    if kind == "truncated":
        biggest = max(data, key=os.path.getsize)
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif kind == "data_deleted":
        for path in data:
            os.remove(path)
    else:  # "emptied"
        for name in os.listdir(step_dir):
            shutil.rmtree(os.path.join(step_dir, name), ignore_errors=True)
            if os.path.exists(os.path.join(step_dir, name)):
                os.remove(os.path.join(step_dir, name))


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dp_sgd"))
    report = central.train_and_evaluate(dp_sgd_config(), workdir, quiet=True)
    return workdir, report


def test_resume_logs_the_same_train_means(uninterrupted, tmp_path):
    workdir, _ = uninterrupted
    config = dp_sgd_config()
    assert central.train_and_evaluate(config, str(tmp_path), quiet=True, stop_at_step=3) == {
        "stopped_at_step": 3
    }
    central.train_and_evaluate(config, str(tmp_path), resume=True, quiet=True)
    resumed, full = records(str(tmp_path)), records(workdir)
    assert [r["step"] for r in full] == [4, 6, 6]
    assert any(k.startswith("train_") for k in full[0])
    assert resumed == full  # the step-4 train_* means cover steps 1..4 in both


@pytest.mark.parametrize("kind", ["truncated", "data_deleted", "emptied"])
def test_damaged_newest_checkpoint_falls_back_with_its_ledger(
    uninterrupted, tmp_path, caplog, kind
):
    full_dir, full_report = uninterrupted
    workdir = tmp_path / "run"
    shutil.copytree(full_dir, workdir)
    damage(str(workdir / "checkpoints" / "6"), kind)
    # eval reads the intact checkpoint 3, not the damaged 6
    _, state = central.restore_for_eval(str(workdir))
    assert int(state.step) == 3
    assert "checkpoints/6' is damaged" in caplog.text
    report = central.train_and_evaluate(dp_sgd_config(), str(workdir), resume=True, quiet=True)
    assert report["privacy"]["epsilon"] == full_report["privacy"]["epsilon"]
    assert report["privacy"]["steps"] == full_report["privacy"]["steps"] == 6
    assert report["metrics"] == full_report["metrics"]
    assert records(str(workdir)) == records(full_dir)
    assert os.path.isdir(workdir / "checkpoints" / "damaged-6")  # kept aside, not deleted
    _, state = central.restore_for_eval(str(workdir))
    assert int(state.step) == 6


def test_no_intact_checkpoint_names_every_path(uninterrupted, tmp_path, capsys):
    full_dir, _ = uninterrupted
    workdir = tmp_path / "run"
    shutil.copytree(full_dir, workdir)
    damage(str(workdir / "checkpoints" / "6"), "truncated")
    damage(str(workdir / "checkpoints" / "3"), "emptied")
    for command in (["eval"], ["attack", "audit"]):
        assert cli.main([*command, "--workdir", str(workdir), "--quiet"]) == 2
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "no intact checkpoint" in line and "Traceback" not in err
        for step in ("6", "3"):
            assert os.path.join(str(workdir), "checkpoints", step) in line


def test_audit_and_eval_use_the_intact_checkpoint(uninterrupted, tmp_path, capsys):
    full_dir, _ = uninterrupted
    workdir = tmp_path / "run"
    shutil.copytree(full_dir, workdir)
    damage(str(workdir / "checkpoints" / "6"), "data_deleted")
    assert cli.main(["eval", "--workdir", str(workdir), "--quiet"]) == 0
    assert json.loads((workdir / "eval_test.json").read_text())["step"] == 3
    assert cli.main(["attack", "audit", "--workdir", str(workdir), "--trials", "50"]) == 0


def test_federated_resume_falls_back_with_its_ledger(tmp_path):
    path = os.path.join(ROOT, "configs", "dp_fedavg.py") + ":tiny"
    config = loading.load_config(path, ["--config.data.cache_dir=none"])
    full = federated.run_rounds(config, str(tmp_path / "full"), quiet=True)
    workdir = tmp_path / "damaged"
    shutil.copytree(tmp_path / "full", workdir)
    damage(str(workdir / "checkpoints" / "4"), "truncated")
    _, state = federated.restore_for_eval(str(workdir))
    assert int(state.round) == 2
    resumed = federated.run_rounds(config, str(workdir), resume=True, quiet=True)
    assert resumed["privacy"]["epsilon"] == full["privacy"]["epsilon"]
    assert resumed["metrics"] == full["metrics"]
    assert records(str(workdir)) == records(str(tmp_path / "full"))


def test_restore_latest_without_checkpoints(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        ckpt.restore_latest({})
    ckpt.close()
