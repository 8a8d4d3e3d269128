"""The centralized trainer: it learns, resumes exactly, compiles once, writes its outputs."""

import json
import os

import jax
import numpy as np
import pytest

from fedjax_med.config import base, schema
from fedjax_med.trainers import central, registry
from fedjax_med.training import workdir as workdir_lib

REPORT_METRICS = ("test_accuracy", "test_auroc", "test_balanced_accuracy", "test_ece", "test_loss")


def tiny_config(**train):
    config = base.get_base_config()
    config.data.cache_dir = "none"
    config.data.synthetic.num_sites = 3
    config.data.synthetic.examples_per_site = 80
    config.train.batch_size = 16
    config.train.eval_batch_size = 64
    config.train.steps = 6
    config.train.eval_every = 2
    config.train.checkpoint_every = 3
    for k, v in train.items():
        config.train[k] = v
    return schema.validate(config)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    report = central.train_and_evaluate(tiny_config(), workdir, quiet=True)
    return workdir, report


def test_report_schema(finished_run):
    workdir, report = finished_run
    with open(os.path.join(workdir, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(report))
    for key in REPORT_METRICS:
        assert key in report["metrics"]
    assert set(report["per_site"]) == {"hospital_0", "hospital_1", "hospital_2"}
    for site in report["per_site"].values():
        assert "test_accuracy" in site
    assert {"sex", "age_band"} <= set(report["per_subgroup"])
    for key in ("wall_time_s", "examples_per_second", "config", "versions"):
        assert key in report
    for pkg in ("python", "jax", "flax", "optax", "dp_accounting", "fedjax_med"):
        assert pkg in report["versions"]
    assert report["config"]["train"]["steps"] == 6


def test_metrics_jsonl_has_one_line_per_eval(finished_run):
    workdir, _ = finished_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # evals at steps 2 and 4, then the final val and test evaluations at step 6
    assert [(r["step"], r["split"]) for r in records] == [
        (2, "val"),
        (4, "val"),
        (6, "val"),
        (6, "test"),
    ]
    assert all(0.0 <= r[f"{r['split']}_accuracy"] <= 1.0 for r in records)


def test_existing_workdir_needs_resume(finished_run):
    workdir, _ = finished_run
    with pytest.raises(workdir_lib.WorkdirError, match="--resume"):
        central.train_and_evaluate(tiny_config(), workdir, quiet=True)


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(workdir_lib.WorkdirError, match="no checkpoint"):
        central.train_and_evaluate(tiny_config(), str(tmp_path), resume=True, quiet=True)


def test_resume_equals_uninterrupted(finished_run, tmp_path):
    workdir, full_report = finished_run
    partial = central.train_and_evaluate(tiny_config(), str(tmp_path), quiet=True, stop_at_step=3)
    assert partial == {"stopped_at_step": 3}
    resumed_report = central.train_and_evaluate(
        tiny_config(), str(tmp_path), resume=True, quiet=True
    )
    assert resumed_report["metrics"] == full_report["metrics"]
    _, full_state = central.restore_for_eval(workdir)
    _, resumed_state = central.restore_for_eval(str(tmp_path))
    assert int(resumed_state.step) == 6
    jax.tree.map(np.testing.assert_array_equal, full_state.params, resumed_state.params)
    jax.tree.map(np.testing.assert_array_equal, full_state.opt_state, resumed_state.opt_state)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [2, 4, 6, 6]


def test_eval_workdir_matches_report(finished_run):
    workdir, report = finished_run
    result = registry.evaluate_workdir(workdir, "test")
    assert result["metrics"]["test_accuracy"] == pytest.approx(report["metrics"]["test_accuracy"])
    assert os.path.exists(os.path.join(workdir, "eval_test.json"))


def test_train_step_compiles_once():
    experiment = central.build_experiment(tiny_config())
    state = central.init_state(experiment)
    step = central.make_train_step(
        experiment.model.apply, experiment.optimizer, experiment.splits.info.task
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        images = rng.normal(size=(16, 32, 32, 1)).astype(np.float32)
        labels = rng.integers(0, 4, size=16).astype(np.int32)
        state, _ = step(state, images, labels)
    assert step._cache_size() == 1
    assert int(state.step) == 3


def test_data_parallel_equals_single_device(tmp_path):
    assert jax.device_count() >= 2, "tests run with several fake CPU devices (conftest)"
    one = central.train_and_evaluate(
        tiny_config(num_devices=1, steps=3), str(tmp_path / "one"), quiet=True
    )
    many = central.train_and_evaluate(
        tiny_config(num_devices=2, steps=3), str(tmp_path / "two"), quiet=True
    )
    for key in REPORT_METRICS:
        assert one["metrics"][key] == pytest.approx(many["metrics"][key], rel=1e-4, abs=1e-5)


def test_batch_not_divisible_by_devices(tmp_path):
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        central.train_and_evaluate(
            tiny_config(num_devices=2, batch_size=15), str(tmp_path), quiet=True
        )
