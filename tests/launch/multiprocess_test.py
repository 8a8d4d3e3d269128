"""Two JAX processes on loopback train one data-parallel run (CPU collectives via gloo)."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    port = free_port()
    workdir = tmp_path / "run"
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="",  # one CPU device per process: two global devices
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "fedjax_med.launch_distributed"]
                + ["--config", os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"]
                + ["--workdir", str(workdir), "--quiet", "--config.data.cache_dir=none"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 0 of 2: 1 local / 2 global devices" in outputs[0]
    report = json.loads((workdir / "report.json").read_text())
    assert report["devices"]["count"] == 2
    assert report["steps"] == 6 and 0.0 <= report["metrics"]["test_accuracy"] <= 1.0
