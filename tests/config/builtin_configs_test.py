"""Built-in configs: ``--config NAME[:ARG]`` loads ``fedjax_med/configs/NAME.py``; a path wins."""

import os

import pytest

from fedjax_med.cli import main as cli
from fedjax_med.config import loading, schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_top_level_config_is_a_builtin_and_loads_the_same():
    names = loading.builtin_configs()
    files = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
    assert sorted(names) == files
    for name in ("quickstart", "dp_sgd"):
        by_name = loading.to_json_dict(loading.load_config(name + ":tiny"))
        by_path = loading.to_json_dict(
            loading.load_config(os.path.join(ROOT, "configs", name + ".py:tiny"))
        )
        assert by_name == by_path
    assert all(names.values()), "every built-in config has a one-line docstring"


def test_builtin_name_takes_variants():
    config = loading.load_config("dp_sgd:patient,tiny")
    assert config.privacy.unit == "patient" and config.train.steps < 20


def test_unknown_name_lists_the_builtins():
    with pytest.raises(
        schema.ConfigError, match=r"no built-in config \(built-in: .*dp_sgd, .*quickstart"
    ):
        loading.load_config("quickstrat")


def test_existing_path_wins_over_builtin_name(tmp_path, monkeypatch):
    (tmp_path / "quickstart").write_text(
        "from fedjax_med.config import base\n\n"
        "def get_config():\n    c = base.get_base_config()\n    c.train.steps = 3\n    return c\n"
    )
    monkeypatch.chdir(tmp_path)
    assert loading.load_config("quickstart").train.steps == 3


def test_configs_subcommand_lists_names_with_docstrings(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == set(loading.builtin_configs())
    assert "local DP-SGD" in lines["quickstart"]


def test_quickstart_scatter_keeps_the_quickstart_mechanism():
    base_config, scatter = (loading.load_config(f"quickstart{a}") for a in ("", ":scatter"))
    assert scatter.model.name == "scatter_linear" and base_config.model.name == "small_cnn"
    # Same sampling, noise and steps: the same per-site epsilons.
    assert scatter.privacy.to_dict() == base_config.privacy.to_dict()
    for field in ("rounds", "local_steps", "client_batch_size", "partition"):
        assert scatter.federated[field] == base_config.federated[field]
