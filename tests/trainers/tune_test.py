"""fedjax-med tune: K random DP-SGD trials, the best released, epsilon of the whole search."""

import json
import os

import dp_accounting
import pytest

from fedjax_med.cli import main as cli
from fedjax_med.config import base, loading, schema
from fedjax_med.privacy import tuning
from fedjax_med.trainers import tune

OVERRIDES = [
    "--config.data.cache_dir=none",
    "--config.data.normalization=fixed",
    "--config.data.synthetic.num_sites=2",
    "--config.data.synthetic.examples_per_site=40",
    "--config.data.synthetic.image_size=16",
    "--config.model.name=mlp",
    "--config.model.kwargs.hidden=(8,)",
    "--config.train.steps=2",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
    "--config.train.batch_size=16",
    "--config.privacy.noise_multiplier=1.0",
    "--config.privacy.target_epsilon=0",
    "--config.privacy.delta=1e-3",
]


def test_search_space_may_not_change_the_privacy_event():
    config = base.get_base_config()
    assert tune.parse_space("optimizer.learning_rate=0.5,1", config) == {
        "optimizer.learning_rate": [0.5, 1.0]
    }
    for field in ("privacy.noise_multiplier", "train.batch_size", "data.name", "model.kwargs.norm"):
        with pytest.raises(ValueError, match=f"{field}' would change each trial's privacy event"):
            tune.parse_space(f"{field}=1,2", config)
    with pytest.raises(ValueError, match="'optimizer.nope' is not a config field"):
        tune.parse_space("optimizer.nope=1", config)
    with pytest.raises(ValueError, match="needs DP-SGD in the central trainer"):
        tune.tune(schema.validate(config), "unused", {"optimizer.learning_rate": [1.0]})


def test_tune_releases_the_best_of_k_trials_with_the_search_epsilon(tmp_path, capsys):
    # Seed 1 draws K = 1 trial (of the geometric distribution with gamma = 0.5): one run, cheap.
    args = ["tune", "--config", "dp_sgd:tiny", "--workdir", str(tmp_path), "--quiet"]
    args += ["--config.seed=1"]
    args += ["--space", "optimizer.learning_rate=0.1,1.0", "--eta", "1", "--gamma", "0.5"]
    assert cli.main(args + OVERRIDES) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "tune.json").read_text())
    assert result["num_trials"] == len(result["trials"]) == 1
    scores = [t["score"] for t in result["trials"]]
    assert result["trials"][result["best_trial"]]["score"] == max(scores)
    assert os.path.isfile(os.path.join(result["best_workdir"], "report.json"))
    # Theorem 2 on the trial's own event, recomputed here from the trial's report.
    report = json.loads((tmp_path / "trial_0" / "report.json").read_text())
    q, sigma = report["privacy"]["sampling_rate"], report["privacy"]["noise_multiplier"]
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 2
    )
    assert result["epsilon"] == pytest.approx(tuning.search_epsilon(event, 1e-3, 1.0, 0.5))
    assert result["epsilon"] > result["epsilon_one_trial"]


@pytest.mark.parametrize(("seed", "num_trials"), [(5, 0), (0, 1)])
def test_poisson_search_may_release_nothing_and_plots_its_trials(tmp_path, seed, num_trials):
    # Seed 5 draws K = 0 of Poisson(1) (no trial, no model released); seed 0 draws K = 1.
    config = tune_config(seed)
    result = tune.tune(
        config, str(tmp_path), {"optimizer.learning_rate": [1.0]}, distribution="poisson", mu=1.0
    )
    assert result["num_trials"] == len(result["trials"]) == num_trials
    assert result["distribution"] == {"name": "poisson", "mu": 1.0}
    event = tune.trial_event(config)
    assert result["epsilon"] == pytest.approx(tuning.poisson_search_epsilon(event, 1e-3, 1.0))
    assert result["epsilon"] >= result["epsilon_one_trial"]
    if num_trials == 0:
        assert result["best_trial"] is None and result["best_workdir"] is None
        assert not (tmp_path / "tune.png").exists()
    else:
        assert os.path.isfile(os.path.join(result["best_workdir"], "report.json"))
        png = (tmp_path / "tune.png").read_bytes()
        assert png.startswith(b"\x89PNG")


def tune_config(seed):
    return loading.load_config("dp_sgd:tiny", [*OVERRIDES, f"--config.seed={seed}"])


def test_bad_poisson_mean_names_the_range():
    config = tune_config(0)
    with pytest.raises(ValueError, match=r"mu=0.5 \(the mean number of Poisson trials\)"):
        tune.tune(
            config, "unused", {"optimizer.learning_rate": [1.0]}, distribution="poisson", mu=0.5
        )
