"""The deployment runtime for real: a SuperLink and SuperNodes as processes on 127.0.0.1.

Started exactly as the README says (``fedjax-med deploy certificates|server|client``), with TLS
and SuperNode authentication on: three registered hospitals train FedAvg and the final
parameters equal the simulation's; a fourth hospital holding a key the server never registered
is refused. Flower starts one ClientApp process per message, so this takes minutes on two cores:
it runs with ``FEDJAX_MED_LOOPBACK=1``; flower_app_test.py checks the same app in-process in
the default run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from fedjax_med.deploy import flower_app  # noqa: E402
from fedjax_med.trainers import federated  # noqa: E402
from fedjax_med.training import checkpoint  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("FEDJAX_MED_LOOPBACK"),
        reason="starts a SuperLink and 4 SuperNodes (minutes on 2 cores); FEDJAX_MED_LOOPBACK=1",
    ),
]

OVERRIDES = [
    "--config.model.name=linear",
    "--config.data.synthetic.image_size=16",
    "--config.data.synthetic.examples_per_site=30",
    "--config.federated.rounds=2",
]
SITES = ["hospital_0", "hospital_1", "hospital_2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args):
    return [sys.executable, "-m", "fedjax_med.cli.main", "deploy", *args]


def test_three_hospitals_over_tls_train_the_simulated_model(tmp_path):
    overrides = [*OVERRIDES, f"--config.data.cache_dir={tmp_path}/cache"]
    certs = str(tmp_path / "certs")
    # hospital_3 gets a key pair but is not on the server's list: its key is never registered.
    subprocess.run(
        _cli("certificates", "--out", certs, "--sites", ",".join([*SITES, "hospital_3"])),
        check=True,
        capture_output=True,
    )
    address = f"127.0.0.1:{_free_port()}"
    clients = []
    for site in [*SITES, "hospital_3"]:
        log = open(tmp_path / f"{site}.log", "w")
        command = _cli(
            "client",
            "--config",
            "fedavg:tiny",
            *overrides,
            "--site",
            site,
            "--data",
            "synthetic",
            "--server",
            address,
            "--certificates",
            certs,
            "--port",
            str(_free_port()),
            "--home",
            str(tmp_path / f"home_{site}"),
            "--join-timeout",
            "240",
        )
        clients.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    workdir = tmp_path / "deploy"
    try:
        server = subprocess.run(
            _cli(
                "server",
                "--config",
                "fedavg:tiny",
                *overrides,
                "--workdir",
                str(workdir),
                "--address",
                address,
                "--certificates",
                certs,
                "--sites",
                ",".join(SITES),
                "--join-timeout",
                "240",
            ),
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        for process in clients:
            if process.poll() is None:
                os.killpg(process.pid, 15)
                process.wait(30)
    assert server.returncode == 0, server.stdout[-3000:] + server.stderr[-3000:]
    refused = (tmp_path / "hospital_3.log").read_text()
    assert "did not admit 'hospital_3'" in refused and "Exit Code: 305" in refused
    superlink_log = (workdir / "flower" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log

    config = flower_app.load_config(
        "fedavg:tiny", " ".join(o.removeprefix("--config.") for o in overrides)
    )
    federated.run_rounds(config, str(tmp_path / "sim"), quiet=True)
    template = federated.init_server_state(federated.build_plan(config))
    params = []
    for run in ("sim", "deploy"):
        ckpt = checkpoint.Checkpointer(str(tmp_path / run / "checkpoints"))
        params.append(ckpt.restore_latest(template)[1].params)
        ckpt.close()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *params)
