"""Progress off a terminal: a log line every N updates, never a line per update."""

import io
import logging
import os
import subprocess
import sys

import pytest
import tqdm

from fedjax_med.training import progress

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_the_bar_a_file_gets_log_lines():
    assert isinstance(progress.progress_bar(10, 0, "step", False, stream=_Terminal()), tqdm.tqdm)
    bar = progress.progress_bar(10, 0, "step", False, stream=io.StringIO())
    assert isinstance(bar, progress.LogProgress)
    quiet = progress.progress_bar(10, 0, "step", True, stream=io.StringIO())
    assert isinstance(quiet, tqdm.tqdm) and quiet.disable


def test_log_lines_are_bounded_and_end_at_the_total(caplog):
    caplog.set_level(logging.INFO, logger=progress.logger.name)
    bar = progress.LogProgress(total=10_000, initial=0, unit="step", every=1)
    for step in range(10_000):
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == progress.MAX_LINES
    assert lines[-1].startswith("step 10000/10000 (100%) loss=0.0001")


def test_log_lines_respect_log_every_and_resume(caplog):
    caplog.set_level(logging.INFO, logger=progress.logger.name)
    bar = progress.LogProgress(total=40, initial=10, unit="round", every=10)
    for _ in range(30):
        bar.update(1)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "round 20/40",
        "round 30/40",
        "round 40/40",
    ]


@pytest.mark.parametrize(
    "spec, schedule, unit",
    [
        (
            "quickstart:tiny",
            [
                "--config.train.steps=300",
                "--config.train.eval_every=100",
                "--config.train.checkpoint_every=300",
            ],
            "step",
        ),
        (
            "quickstart:smoke",
            ["--config.federated.rounds=30", "--config.privacy.enabled=False"]
            + ["--config.federated.eval_every=10", "--config.federated.checkpoint_every=30"],
            "round",
        ),
    ],
    ids=["central", "federated"],
)
def test_non_tty_log_of_a_run_is_short(tmp_path, spec, schedule, unit):
    # The quickstart (60 rounds) logs 32 lines off a terminal (measured). Here a central run
    # logging every step and a federated one on small data, stderr a pipe as under CI, nohup or
    # SLURM: the progress lines stay MAX_LINES however many steps or rounds run.
    args = ["train", "--config", spec, "--workdir", str(tmp_path / "run")]
    # A linear model: the log's length is the property, not what the model learns.
    args += ["--config.data.cache_dir=none", "--config.model.name=linear", *schedule]
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-m", "fedjax_med.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr + result.stdout
    assert "\r" not in log, "no progress-bar redraws in a log"
    assert len(log.splitlines()) < 40, log
    lines = [line for line in result.stderr.splitlines() if f" INFO {unit} " in line]
    assert len(lines) <= progress.MAX_LINES and "(100%)" in lines[-1], log
