"""``curves.png`` next to every run's report.json, drawn from what the run logged."""

import json
import os

import pytest
from PIL import Image

from fedjax_med.config import loading
from fedjax_med.trainers import central, federated
from fedjax_med.training import curves, figures

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300


@pytest.fixture(scope="module")
def local_dp_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("local_dp"))
    config = loading.load_config(os.path.join(ROOT, "configs", "quickstart.py") + ":smoke")
    return workdir, federated.run_rounds(config, workdir, quiet=True)


def test_federated_run_draws_per_site_curves(local_dp_run):
    workdir, report = local_dp_run
    assert_png(os.path.join(workdir, curves.FILENAME))
    log = records(workdir)
    # Each site's validation accuracy is logged at every evaluation, as the curves draw it.
    val = [r for r in log if r["split"] == "val"]
    sites = set(report["federated"]["client_names"])
    assert val and all(set(r["site_accuracy"]) == sites for r in val)
    assert all(0.0 <= a <= 1.0 for r in val for a in r["site_accuracy"].values())
    per_site = curves.grouped_series(log, "site_epsilon")
    assert set(per_site) == sites
    # The last point of each site's epsilon curve is the epsilon the report claims for it.
    claimed = report["privacy"]["per_site_epsilon"]
    for site, (_, eps) in per_site.items():
        assert eps[-1] == pytest.approx(claimed[site])


def test_central_run_logs_train_loss_at_the_final_evaluation(tmp_path):
    config = loading.load_config(os.path.join(ROOT, "configs", "quickstart.py") + ":tiny")
    central.train_and_evaluate(config, str(tmp_path), quiet=True)
    assert_png(tmp_path / curves.FILENAME)
    steps, losses = curves.scalar_series(records(tmp_path), "train_loss", "val")
    assert steps[-1] == config.train.steps and all(loss > 0 for loss in losses)


def test_without_matplotlib_the_run_goes_on(tmp_path, monkeypatch, caplog):
    def missing():
        raise ImportError(figures.INSTALL_HINT)

    monkeypatch.setattr(figures, "load_matplotlib", missing)
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "split": "val", "val_loss": 1.0}\n')
    with caplog.at_level("INFO", logger="fedjax_med"):
        assert curves.write_curves(str(tmp_path), str(log), unit="step") is None
    assert not (tmp_path / curves.FILENAME).exists()
    assert "pip install 'fedjax_med[report]'" in caplog.text


def test_nonfinite_values_are_left_out_not_drawn():
    log = [
        {"step": 1, "split": "round", "loss": float("nan")},
        {"step": 2, "split": "round", "loss": 0.5},
        {"step": 3, "split": "round", "loss": None},
    ]
    assert curves.scalar_series(log, "loss", "round") == ([2.0], [0.5])
