"""The wheel ships the configs: installed in a fresh venv, ``fedjax-med`` runs outside the checkout.

Builds a wheel with ``pip wheel --no-deps``, installs it with ``--no-deps`` into a venv made with
``--system-site-packages`` (jax and the other dependencies come from the system), and runs
``fedjax-med configs`` and ``fedjax-med train --config quickstart:tiny`` from an empty folder.
"""

import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_wheel_in_fresh_venv_runs_builtin_quickstart(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    wheels, venv, empty = tmp_path / "wheels", tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        tmp_path,
        env,
    )
    (wheel,) = wheels.glob("fedjax_med-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "fedjax_med/configs/quickstart.py" in archive.namelist()
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path, env)
    fedjax_med = str(venv / "bin" / "fedjax-med")

    where = _run([str(python), "-c", "import fedjax_med; print(fedjax_med.__file__)"], empty, env)
    assert str(venv) in where, "the wheel's package, not the checkout's, is imported"
    listing = _run([fedjax_med, "configs"], empty, env)
    assert "quickstart" in listing and "dp_sgd" in listing
    _run(
        [
            fedjax_med,
            "train",
            "--config",
            "quickstart:tiny",
            "--workdir",
            "W",
            "--quiet",
            "--config.data.cache_dir=none",
        ],
        empty,
        env,
    )
    assert (empty / "W" / "report.json").is_file()
