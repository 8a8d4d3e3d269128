"""A target epsilon that cannot afford one release is refused before compiling, with the bound."""

import os

import pytest

from fedjax_med.cli import main as cli
from fedjax_med.config import base
from fedjax_med.data import sources
from fedjax_med.privacy import budget
from fedjax_med.trainers import dp_sgd, federated

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"


def _tiny():
    config = base.get_base_config()
    s = config.data.synthetic
    s.num_sites, s.examples_per_site, s.image_size = 3, 30, 16
    config.data.cache_dir = "none"
    config.data.normalization = "fixed"
    config.privacy.noise_multiplier = 0.5
    config.privacy.target_epsilon = 0.01
    config.train.batch_size = 8
    return config, sources.load_splits(config.data, 0)


def test_ledger_helper_states_the_bound():
    ledger = budget.PrivacyLedger(
        noise_multiplier=0.5, sampling_rate=0.5, delta=1e-5, target_epsilon=0.01
    )
    one = ledger.epsilon(1)
    with pytest.raises(ValueError, match=rf"cannot afford one step: .* epsilon {one:.4g} at"):
        budget.check_affords_one(ledger)
    bigger = budget.PrivacyLedger(
        noise_multiplier=0.5, sampling_rate=0.5, delta=1e-5, target_epsilon=one * 1.01
    )
    assert budget.check_affords_one(bigger) is bigger


def test_central_dp_sgd_plan_refuses():
    config, splits = _tiny()
    config.privacy.enabled = True
    with pytest.raises(ValueError, match=r"privacy.target_epsilon=0.01 cannot afford one step"):
        dp_sgd.make_plan(config, splits.train, 1)


def test_dp_fedavg_ledger_refuses():
    config, splits = _tiny()
    config.trainer, config.federated.algorithm = "federated", "dp_fedavg"
    fed = federated.build_federation(config, splits)
    with pytest.raises(ValueError, match=r"cannot afford one round: .* spends epsilon"):
        federated._client_level_ledger(config, fed, 0.5)


def test_local_dp_sgd_site_ledgers_refuse_naming_the_site():
    config, splits = _tiny()
    config.trainer, config.privacy.enabled = "federated", True
    config.privacy.target_epsilon = 0.0  # no budget except the one site below
    fed = federated.build_federation(config, splits)
    config.federated.site_target_epsilons = f"{fed.client_names[1]}=0.01"
    steps = config.federated.local_steps
    with pytest.raises(ValueError, match=rf"site '{fed.client_names[1]}': target epsilon 0.01"):
        federated._site_ledgers(config, fed, None, 0.5, steps)
    config.federated.site_target_epsilons = ""
    federated._site_ledgers(config, fed, None, 0.5, steps)  # no budgets: nothing to refuse


def test_cli_exits_2_before_training(tmp_path, capsys):
    args = ["train", "--config", QUICK, "--workdir", str(tmp_path / "w")]
    args += [
        "--config.privacy.enabled=True",
        "--config.data.normalization=fixed",
        "--config.privacy.noise_multiplier=0.3",
        "--config.privacy.target_epsilon=0.001",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "cannot afford one step" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")
