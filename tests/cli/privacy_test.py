"""``privacy`` CLI: the answer is the last number printed; user errors raise ValueError."""

import argparse
import re

import pytest

from fedjax_med.cli import privacy as cli
from fedjax_med.privacy import accounting


def _parser():
    parser = argparse.ArgumentParser(prog="fedjax-med")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def _run(argv, capsys):
    args = _parser().parse_args(argv)
    assert args.func is cli.run
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    return out, float(re.findall(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?", out)[-1])


COMMON = ["--sampling-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_epsilon_prints_epsilon_last(accountant, capsys):
    out, last = _run(
        ["privacy", "epsilon", "--noise-multiplier", "1.1", *COMMON, "--accountant", accountant],
        capsys,
    )
    expected = accounting.epsilon(accounting.dpsgd_event(1.1, 0.01, 1000), 1e-5, accountant)
    assert last == pytest.approx(expected, rel=1e-5)
    assert out.strip().splitlines()[-1].startswith("epsilon = ")


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_calibrate_prints_noise_multiplier_last(accountant, capsys):
    out, last = _run(
        ["privacy", "calibrate", "--target-epsilon", "2", *COMMON, "--accountant", accountant],
        capsys,
    )
    sigma = accounting.calibrate_noise_multiplier(2.0, 0.01, 1000, 1e-5, accountant)
    assert sigma <= last <= sigma + 1e-6
    assert accounting.epsilon(accounting.dpsgd_event(last, 0.01, 1000), 1e-5, accountant) <= 2
    assert out.strip().splitlines()[-1].startswith("noise_multiplier = ")


def test_shuffle_epsilon(capsys):
    _, last = _run(
        [
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "2",
            *COMMON,
            "--sampling",
            "shuffle",
            "--num-examples",
            "10000",
        ],
        capsys,
    )
    event = accounting.dpsgd_event(2.0, 0.01, 1000, "shuffle", 10_000, 100)
    assert last == pytest.approx(accounting.epsilon(event, 1e-5), rel=1e-5)


@pytest.mark.parametrize(
    "argv,field",
    [
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "1.5",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "sampling_rate",
        ),
        (["epsilon", "--noise-multiplier", "0", *COMMON], "noise_multiplier"),
        (["calibrate", "--target-epsilon", "-1", *COMMON], "target_epsilon"),
        (
            [
                "calibrate",
                "--target-epsilon",
                "1",
                "--sampling-rate",
                "0.01",
                "--steps",
                "10",
                "--delta",
                "0",
            ],
            "delta",
        ),
        (["epsilon", "--noise-multiplier", "1", *COMMON, "--sampling", "shuffle"], "num-examples"),
    ],
)
def test_user_errors_raise_value_error(argv, field):
    args = _parser().parse_args(["privacy", *argv])
    with pytest.raises(ValueError, match=field):
        cli.run(args)


@pytest.mark.parametrize("command", [[], ["epsilon"], ["calibrate"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["privacy", *command, "--help"])
    assert exit_info.value.code == 0
    assert "DP-SGD" in capsys.readouterr().out
