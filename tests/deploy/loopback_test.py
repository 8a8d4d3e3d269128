"""The deployment runtime for real: a SuperLink and SuperNodes as processes on 127.0.0.1.

Started exactly as the README says (``fedjax-med deploy certificates|server|client``), with TLS
and SuperNode authentication on. Three registered hospitals train 4 rounds of FedAvg with local
DP-SGD (reproducible keys, so the simulation is replayed exactly);
``hospital_2`` runs tests/deploy/apps/tampering_app.py, which trains honestly but sends a NaN
update in round 4, so after round 3 the model must equal the simulation's 3 rounds of the same
config, round 4 must exclude and count hospital_2, and each hospital's epsilon (in the report and
in its own ledger) must equal the simulation's accountant. A fourth SuperNode (Flower's, started
directly) holding a key the server never registered is refused. Every process is started by
the fixture and stopped in its ``finally``; each wait is bounded.

The simulation runs first, in this process, with JAX's persistent compilation cache on; the
hospitals get the same folder (``--compilation-cache``) and load the local update and predict
programs the simulation compiled instead of compiling them again (the test's largest cost on
2 cores after the imports).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from fedjax_med.cli import main as cli  # noqa: E402
from fedjax_med.deploy import flower_app, runtime  # noqa: E402
from fedjax_med.trainers import federated  # noqa: E402
from fedjax_med.training import checkpoint  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OVERRIDES = [
    "--config.model.name=linear",
    "--config.data.synthetic.image_size=16",
    "--config.data.synthetic.examples_per_site=24",
    "--config.federated.rounds=4",
    "--config.federated.eval_every=4",
    "--config.federated.checkpoint_every=3",  # rounds 3 and 4 (the last) are saved
    # Local DP-SGD, so that each hospital's epsilon is checked against the simulation's too.
    "--config.data.normalization=fixed",
    "--config.privacy.enabled=true",
    "--config.privacy.noise_multiplier=1.0",
    "--config.privacy.clip_norm=1.0",
    "--config.privacy.method=vmap",
]
SITES = ["hospital_0", "hospital_1", "hospital_2"]
TAMPERING = "hospital_2"
ROGUE = "hospital_9"  # has a key pair, but the server never registers it
DEADLINE = 600.0  # seconds for the whole run: a bound on a hang, generous for a busy machine
POLL = "0.25"  # seconds between a hospital's checks for a message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args):
    return [sys.executable, "-m", "fedjax_med.cli.main", "deploy", *args]


def _wait_for(path: pathlib.Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    # Polls every 0.2 s, at most timeout / 0.2 times: a bound on a hang, not a measurement.
    for _ in range(int(timeout / 0.2)):
        if path.exists() and text in path.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}: {path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


@pytest.fixture(scope="module")
def loopback(tmp_path_factory, compilation_cache):
    tmp = tmp_path_factory.mktemp("loopback")
    overrides = [*OVERRIDES, f"--config.data.cache_dir={tmp}/cache"]
    certs = str(tmp / "certs")
    assert (
        cli.main(["deploy", "certificates", "--out", certs, "--sites", ",".join([*SITES, ROGUE])])
        == 0
    )
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE / "apps")]))
    processes: list[subprocess.Popen] = []

    def start(name, command, environment=env):
        with open(tmp / f"{name}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    start_new_session=True,
                )
            )
        return processes[-1]

    workdir = tmp / "deploy"
    try:
        server = start(
            "server",
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
                "300",
                "--round-timeout",
                "180",
            ),
        )
        # The simulation of the same config while the server starts; its compiled programs
        # are the hospitals' (the same jitted local update and predict function).
        spec = " ".join(o.removeprefix("--config.") for o in overrides)
        sim_config = flower_app.load_config("fedavg:tiny", spec + " federated.rounds=3")
        with compilation_cache(str(tmp / "jax_cache")):
            federated.run_rounds(sim_config, str(tmp / "sim"), quiet=True)
        # Hospitals start once their keys are registered, so none needs a second attempt.
        _wait_for(tmp / "server.log", "waiting for the hospitals", server, 240)
        for site in SITES:
            app = ["--app", "tampering_app:client_app"] if site == TAMPERING else []
            start(
                site,
                _cli(
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
                    str(tmp / f"home_{site}"),
                    "--join-timeout",
                    "180",
                    "--poll",
                    POLL,
                    "--compilation-cache",
                    str(tmp / "jax_cache"),
                    *app,
                ),
            )
        c = runtime.Certificates(certs)
        rogue = runtime.supernode_command(
            address, {}, port=_free_port(), ca=c.ca, key=c.site_key(ROGUE), isolation="process"
        )
        rogue_env = runtime.environment(str(tmp / f"home_{ROGUE}"))
        refused = f"Exit Code: {runtime.EXIT_NOT_ADMITTED}"
        rogue_process = start(ROGUE, rogue, rogue_env)
        _wait_for(tmp / f"{ROGUE}.log", refused, rogue_process, 240)
        runtime.stop(rogue_process)  # refused: it would only keep asking
        code = server.wait(DEADLINE)
    finally:
        runtime.stop(*processes)
        leftovers = _kill_leftovers(address)
    assert code == 0, (tmp / "server.log").read_text()[-4000:]
    return {"tmp": tmp, "workdir": workdir, "sim_config": sim_config, "leftovers": leftovers}


def _kill_leftovers(address: str) -> list[str]:
    """Kills (and names) any process still naming this test's SuperLink address."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if address in command and int(pid) != os.getpid():
            found.append(command[:200])
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
    return found


def _rounds(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "round"]


def test_three_rounds_deployed_equal_the_simulation(loopback):
    tmp = loopback["tmp"]
    template = federated.init_server_state(federated.build_plan(loopback["sim_config"]))
    sim = checkpoint.Checkpointer(str(tmp / "sim" / "checkpoints"))
    deployed = checkpoint.Checkpointer(str(loopback["workdir"] / "checkpoints"))
    try:
        expected = sim.restore_latest(template)[1].params
        got = deployed.restore(3, template)[0].params
        final = deployed.restore_latest(template)[1].params
    finally:
        sim.close()
        deployed.close()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), final, got)
    assert max(jax.tree.leaves(moved)) > 0  # round 4 trained on without hospital_3
    assert [r["num_clients"] for r in _rounds(loopback["workdir"])] == [3, 3, 3, 2]


def test_a_malformed_update_is_excluded_counted_and_logged(loopback):
    last = _rounds(loopback["workdir"])[-1]
    assert last["num_malformed"] == 1 and last["num_excluded"] == 1
    assert all(r["num_malformed"] == 0 for r in _rounds(loopback["workdir"])[:-1])
    log = (loopback["tmp"] / "server.log").read_text()
    assert f"round 4: site {TAMPERING} excluded: malformed update" in log
    assert "non-finite" in log


def test_a_node_with_an_unregistered_key_is_refused(loopback):
    # The fixture waited for the refused SuperNode's exit code; the SuperLink says why.
    superlink = (loopback["workdir"] / "flower" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink
    report = json.loads((loopback["workdir"] / "report.json").read_text())
    assert report["deployment"]["sites"] == SITES


def test_stopping_the_commands_stops_every_flower_process(loopback):
    assert loopback["leftovers"] == []


def test_each_hospital_epsilon_equals_the_simulation(loopback):
    """Local DP-SGD: the deployed report's per-site epsilon and each hospital's own ledger (on its
    disk) equal the simulation's accountant after the same 4 rounds."""
    config = loopback["sim_config"].copy_and_resolve_references()
    config.federated.rounds = 4
    plan = federated.build_plan(config)
    for t in range(4):
        plan.ledger.record(plan.ledger.admit(plan.sampler.sample(t), t), True)
    expected = plan.ledger.per_site_epsilon()
    report = json.loads((loopback["workdir"] / "report.json").read_text())
    assert report["privacy"]["mechanism"] == "local_dp_sgd"
    assert report["privacy"]["per_site_epsilon"] == pytest.approx(expected, rel=1e-9)
    for site in SITES:
        (path,) = (loopback["tmp"] / f"home_{site}" / "ledger").iterdir()
        assert json.loads(path.read_text())["epsilon"] == pytest.approx(expected[site], rel=1e-9)


def test_the_hospitals_ran_the_program_the_simulation_compiled(loopback):
    """One compiled local update serves the simulation and all three hospitals: the program
    depends on the config and shapes only, not on a site's images, so the compilation cache
    holds nothing of a site's (and the hospitals loaded it instead of compiling)."""
    cache = loopback["tmp"] / "jax_cache"
    assert len([p for p in cache.iterdir() if p.name.startswith("jit__single-")]) == 1

