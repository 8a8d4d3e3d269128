"""Every code block of the README runs as written.

The ```python blocks run top to bottom in an empty folder. Of the ```bash blocks, every command
(``&&`` splits a line, ``\\`` continues it, ``#`` starts a comment) runs through
``fedjax_med.cli.main.main`` in that folder (``configs/...`` paths taken from the checkout)
when it is cheap: a ``:tiny`` or ``:smoke`` variant (``quickstart:tiny``,
``dp_sgd:patient,tiny``), ``fedjax-med configs``, or ``privacy epsilon`` / ``privacy
calibrate``. The others are skipped, each for a reason of :func:`skip_reason`:

- installs (``pip install ...``) and the test suite itself (``ruff check .``, ``pytest``);
- full-size training runs (``quickstart``, ``configs/quickstart.py``, ``dp_sgd.py``,
  ``dp_sgd.py:patient``, ``fedavg.py``, ``dp_fedavg.py``, ``fedprox_noniid.py``; 40 s to 4 min
  each) and the full privacy report (``configs/privacy_report.py``, minutes): the measured
  numbers next to them are theirs; their ``:tiny`` / ``:smoke`` forms run here and in
  tests/trainers;
- ``fedjax-med attack ...`` lines, which attack those full runs' workdirs
  (``runs/quickstart``, ``runs/dp_sgd``); tests/cli/attack_test.py runs each attack on tiny runs;
- ``fedjax-med infer ...`` lines, which serve a full run's model (``runs/cryptonets``);
  tests/cli/infer_test.py runs plaintext and encrypted inference on a tiny CryptoNets run.
- ``fedjax-med deploy server`` / ``client`` lines, which start Flower's long-running processes
  (tests/deploy/loopback_test.py starts and stops them).

A command that is neither run nor skipped for one of these reasons fails the test, so a new
README line is either cheap enough to run or named here.
"""

import os
import pathlib
import re
import shlex

import pytest

from fedjax_med.cli import main as cli

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
TEXT = README.read_text()
CHEAP = re.compile(
    r"--config \S*[:,](tiny|smoke)\b|^fedjax-med (configs$|privacy (epsilon|calibrate) )"
)


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", TEXT, re.S | re.M)


def bash_commands() -> list[str]:
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            text = " ".join(words)
            commands += [c.strip() for c in text.split("&&") if c.strip()]
    return commands


def skip_reason(command: str) -> str | None:
    """Why a README command is not run here, or None when it runs."""
    if command.startswith("pip install"):
        return "install"
    if command.startswith(("ruff ", "pytest")):
        return "the test suite itself"
    if command.startswith("fedjax-med deploy certificates "):
        return None  # makes keys, cheap
    if command.startswith(("fedjax-med deploy server ", "fedjax-med deploy client ")):
        return "starts Flower's SuperLink / a SuperNode; tests/deploy/loopback_test.py runs them"
    if command.startswith("fedjax-med report --config "):
        # Even :tiny trains and attacks three settings (about a minute); the report test runs
        # the same pipeline on :smoke.
        return "the privacy report; tests/reporting/privacy_report_test.py runs it on :smoke"
    if CHEAP.search(command):
        return None
    if command.startswith("fedjax-med attack "):
        return "attacks a full run's workdir"
    if command.startswith("fedjax-med infer "):
        return "serves a full run's model"
    if command.startswith(("fedjax-med train --config ", "fedjax-med report --config ")):
        return "full-size run"
    raise AssertionError(f"README command neither cheap nor skipped for a named reason: {command}")


COMMANDS = bash_commands()
RUN = [c for c in COMMANDS if skip_reason(c) is None]


def test_the_readme_has_blocks_and_cheap_commands():
    assert blocks("python") and len(COMMANDS) > 10
    assert any("quickstart:smoke" in c for c in RUN) and any("privacy epsilon" in c for c in RUN)
    for command in COMMANDS:
        skip_reason(command)  # every command is run or skipped for a documented reason


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the data cache lands here, not in the user's
    for block in blocks("python"):
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("command", RUN)
def test_cheap_bash_commands_run_as_written(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    # ``configs/...`` in the README is relative to the checkout, where the README is read.
    words = [
        str(README.parent / w) if w.startswith("configs/") else w for w in shlex.split(command)
    ]
    assert words[0] == "fedjax-med"
    code = cli.main(words[1:])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    if words[1] == "train":
        workdir = words[words.index("--workdir") + 1]
        assert os.path.isfile(os.path.join(workdir, "report.json"))
