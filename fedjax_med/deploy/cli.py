"""``fedjax-med deploy certificates | server | client``: a config run across real hospitals.

* ``certificates --out DIR --sites A,B [--host NAME]``: the study's CA, the SuperLink's TLS
  certificate and one authentication key pair per hospital (:mod:`fedjax_med.deploy.tls`).
* ``server --config C --workdir W [--address HOST:PORT] [--certificates DIR] [--sites A,B]``:
  starts the SuperLink (TLS and SuperNode authentication when ``--certificates`` is given),
  registers the public key of every listed hospital, submits the run and streams its log until
  it ends; the outputs are those of ``fedjax-med train`` in ``W``.
* ``client --config C --site NAME --data PATH --server HOST:PORT [--certificates DIR]``: runs
  the hospital's SuperNode in the foreground (with ``--certificates``: ``DIR/ca.crt`` and
  ``DIR/sites/NAME``, the only two files a hospital needs).

``--config.FIELD=VALUE`` overrides are passed to every party: server and hospitals must run the
same config (the server refuses a hospital whose config digest differs).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time
from collections.abc import Sequence

logger = logging.getLogger("fedjax_med")


def register(sub) -> None:
    """Adds ``deploy`` and its subcommands to the ``fedjax-med`` parser."""
    deploy = sub.add_parser(
        "deploy",
        help="run a federated config across real hospitals on Flower",
        description="Run a federated config across separate machines on Flower's deployment "
        "runtime, over TLS with authenticated hospitals (pip install 'fedjax_med[deploy]').",
    )
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True, metavar="SUBCOMMAND")

    certs = deploy_sub.add_parser(
        "certificates",
        help="make the study's CA, the server certificate and per-hospital keys",
        description="Write ca.crt, server.pem/.key and sites/NAME(.pub) into --out.",
    )
    certs.add_argument("--out", required=True, help="folder to write into")
    certs.add_argument("--sites", required=True, help="hospital names, comma-separated")
    certs.add_argument(
        "--host", action="append", default=[], help="a name or IP the hospitals dial (repeatable)"
    )

    server = deploy_sub.add_parser(
        "server",
        help="start the SuperLink and run a config's training across the hospitals",
        description="Start the SuperLink, register the hospitals' keys, run the config's rounds "
        "and write metrics.jsonl, checkpoints/ and report.json into --workdir.",
    )
    _add_config(server)
    server.add_argument("--workdir", required=True, help="output folder of the run")
    server.add_argument("--address", default="127.0.0.1:9093", help="HOST:PORT to listen on")
    server.add_argument("--certificates", help="folder made by 'deploy certificates' (TLS on)")
    server.add_argument("--sites", default="", help="hospitals in client order (comma-separated)")
    server.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    server.add_argument("--join-timeout", type=float, default=600.0, help="seconds to wait")
    server.add_argument("--round-timeout", type=float, default=600.0, help="seconds per round")

    client = deploy_sub.add_parser(
        "client",
        help="run one hospital's SuperNode",
        description="Run the SuperNode of hospital --site on its own --data until stopped.",
    )
    _add_config(client)
    client.add_argument("--site", required=True, help="this hospital's name on the study list")
    client.add_argument(
        "--data", required=True, help="MedMNIST .npz, image folder, tfds:NAME, or synthetic"
    )
    client.add_argument("--server", required=True, help="the SuperLink's HOST:PORT")
    client.add_argument("--certificates", help="folder with ca.crt and sites/NAME")
    client.add_argument(
        "--target-epsilon", type=float, default=0.0, help="this hospital's own budget (0: config)"
    )
    client.add_argument("--port", type=int, default=9094, help="local port of the SuperNode")
    client.add_argument("--home", default="", help="Flower's state folder (default: temporary)")
    client.add_argument(
        "--join-timeout",
        type=float,
        default=600.0,
        help="seconds to keep retrying while the SuperLink refuses or is not up yet",
    )
    for p in (certs, server, client):
        p.add_argument("--quiet", action="store_true", help="warnings only")
        p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE.py[:ARG]",
        help="the study's config (the same for every party); --config.FIELD=VALUE overrides",
    )


def _overrides(overrides: Sequence[str]) -> str:
    return " ".join(o.removeprefix("--config.") for o in overrides)


def _path_or_name(spec: str) -> str:
    """A file argument made absolute (Flower's processes run elsewhere); names stay names."""
    path, sep, arg = spec.partition(":")
    return os.path.abspath(path) + sep + arg if os.path.exists(path) else spec


def _sites(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run(args, overrides: Sequence[str]) -> int:
    """Runs ``fedjax-med deploy ...``; returns the exit code."""
    if args.deploy_command == "certificates":
        from fedjax_med.deploy import tls

        written = tls.make_certificates(args.out, _sites(args.sites), args.host)
        for name, path in written.items():
            print(f"{name}: {path}")
        return 0
    args.config = _path_or_name(args.config)
    if args.deploy_command == "server":
        return run_server(args, _overrides(overrides))
    return run_client(args, _overrides(overrides))


def _check_config(spec: str, overrides: str) -> None:
    from fedjax_med.deploy import server
    from fedjax_med.deploy.flower_app import load_config

    server.check_deployable(load_config(spec, overrides))


def run_server(args, overrides: str) -> int:
    """``deploy server``: SuperLink up, keys registered, the run followed, SuperLink down."""
    from fedjax_med.deploy import runtime

    _check_config(args.config, overrides)
    workdir = os.path.abspath(args.workdir)
    flwr_dir = os.path.join(workdir, "flower")
    os.makedirs(flwr_dir, exist_ok=True)
    certs = runtime.Certificates(args.certificates) if args.certificates else None
    env = runtime.environment(os.path.join(flwr_dir, "home"))
    runtime.write_connection(env["FLWR_HOME"], args.address, certs.ca if certs else None)
    app = runtime.write_app(os.path.join(flwr_dir, "app"))
    sites = _sites(args.sites)
    if certs is None:
        logger.warning("no --certificates: links are NOT encrypted and any node may join")
    link = runtime.start(
        runtime.superlink_command(args.address, certs), os.path.join(flwr_dir, "superlink.log"), env
    )
    try:
        _wait_for_link(runtime, env, link)
        if certs is not None:
            for site in sites or _default_sites(args.config, overrides):
                certs.check(certs.site_public_key(site))
                _call(runtime.register_command(certs.site_public_key(site), site), env)
        run_config = {
            "config": args.config,
            "overrides": overrides,
            "workdir": workdir,
            "sites": ",".join(sites),
            "resume": bool(args.resume),
            "join-timeout": float(args.join_timeout),
            "round-timeout": float(args.round_timeout),
        }
        logger.info("SuperLink up at %s; waiting for the hospitals %s", args.address, sites or "")
        code = subprocess.call(runtime.run_command(app, run_config), env=env)
    finally:
        runtime.stop(link)
    report = os.path.join(workdir, "report.json")
    if code == 0 and os.path.exists(report):
        print(f"report: {report}")
        return 0
    print(f"error: the run did not finish (see {os.path.join(flwr_dir, 'superlink.log')})")
    return 1


def _default_sites(spec: str, overrides: str) -> tuple[str, ...]:
    from fedjax_med.deploy import server
    from fedjax_med.deploy.flower_app import load_config

    return server.default_sites(load_config(spec, overrides))


def _call(command: Sequence[str], env) -> None:
    done = subprocess.run(list(command), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"{command[0]} failed: {(done.stdout + done.stderr).strip()[-400:]}")
    logger.info("%s", done.stdout.strip().splitlines()[-1] if done.stdout.strip() else command)


def _wait_for_link(runtime, env, link, attempts: int = 120) -> None:
    """Waits until the SuperLink answers ``flwr supernode list`` (or exits)."""
    probe = [runtime.executable("flwr"), "supernode", "list", runtime.CONNECTION]
    for _ in range(attempts):
        if link.poll() is not None:
            raise ValueError(f"the SuperLink exited with code {link.returncode}")
        if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise ValueError("the SuperLink did not come up")


def run_client(args, overrides: str) -> int:
    """``deploy client``: this hospital's SuperNode, in the foreground until the run ends."""
    import tempfile

    from fedjax_med.deploy import runtime

    _check_config(args.config, overrides)
    certs = runtime.Certificates(args.certificates) if args.certificates else None
    ca = key = None
    if certs is not None:
        ca, key = certs.ca, certs.site_key(args.site)
        certs.check(ca, key)
    node_config = {
        "config": args.config,
        "overrides": overrides,
        "site": args.site,
        "data": _path_or_name(args.data) if args.data != "synthetic" else args.data,
        "target-epsilon": float(args.target_epsilon),
    }
    home = args.home or tempfile.mkdtemp(prefix=f"fedjax_med_{args.site}_")
    command = runtime.supernode_command(args.server, node_config, port=args.port, ca=ca, key=key)
    deadline = time.monotonic() + args.join_timeout
    env = runtime.environment(home)
    while True:
        code, admitted = _supernode(runtime, command, env)
        if admitted or time.monotonic() > deadline:
            if not admitted:
                print(
                    f"error: the SuperLink at {args.server} did not admit {args.site!r} "
                    "(is it up, and is this hospital's public key registered?)"
                )
            return code
        logger.warning("the SuperLink did not admit %s yet; retrying in 2 s", args.site)
        time.sleep(2.0)


def _supernode(runtime, command, env) -> tuple[int, bool]:
    """Runs the SuperNode, echoing its log; ``(exit code, admitted)``.

    A SuperNode the SuperLink refuses (not up yet, or this key not registered yet) logs Flower's
    exit code 305 but keeps running: it is stopped here so that the caller can retry.
    """
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            if f"Exit Code: {runtime.EXIT_NOT_ADMITTED}" in line:
                runtime.stop(process)
                return runtime.EXIT_NOT_ADMITTED, False
        return process.wait(), True
    finally:
        runtime.stop(process)
