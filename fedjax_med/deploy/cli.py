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
same config (the server refuses a hospital whose config digest differs). ``--compilation-cache
DIR`` (server, client; off by default) keeps JAX's compiled programs in the party's own ``DIR``
for later processes (:func:`fedjax_med.deploy.runtime.compilation_cache_environment`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
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
    client.add_argument(
        "--home",
        default="",
        help="Flower's state folder and this hospital's own privacy ledger (default: temporary; "
        "give one to keep the ledger across runs)",
    )
    client.add_argument(
        "--isolation",
        choices=("process", "subprocess"),
        default="process",
        help="process: this command runs every ClientApp task itself (loaded and compiled once); "
        "subprocess: Flower starts a ClientApp process per message",
    )
    client.add_argument(
        "--poll",
        type=float,
        default=0.5,
        help="longest wait in seconds between two checks for a message, by the SuperNode and "
        "by this command's executor (Flower's own: 3)",
    )
    client.add_argument(
        "--app",
        default="fedjax_med.deploy.flower_app:client_app",
        help="the ClientApp this hospital runs (MODULE:ATTRIBUTE; with --isolation process)",
    )
    client.add_argument(
        "--join-timeout",
        type=float,
        default=600.0,
        help="seconds to keep retrying while the SuperLink refuses or is not up yet",
    )
    for p in (server, client):
        p.add_argument(
            "--compilation-cache",
            default="",
            metavar="DIR",
            help="keep JAX's compiled programs in DIR (this party's own folder) and reuse them in "
            "later processes: compiled code only, no data, parameters or keys (default: off)",
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


def _exit_on_sigterm() -> None:
    """SIGTERM ends this process through ``finally`` blocks, which stop Flower's processes.

    The SuperLink and SuperNodes run in sessions of their own (a terminal's Ctrl-C does not reach
    them twice); without this, stopping the command would leave them running.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run(args, overrides: Sequence[str]) -> int:
    """Runs ``fedjax-med deploy ...``; returns the exit code."""
    if args.deploy_command == "certificates":
        from fedjax_med.deploy import tls

        written = tls.make_certificates(args.out, _sites(args.sites), args.host)
        for name, path in written.items():
            print(f"{name}: {path}")
        return 0
    args.config = _path_or_name(args.config)
    _exit_on_sigterm()
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
    env = runtime.environment(os.path.join(flwr_dir, "home"), args.compilation_cache)
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
                _call(runtime, runtime.register_command(certs.site_public_key(site), site), env)
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


def _call(runtime, command: Sequence[str], env) -> None:
    code, out = runtime.call_flwr(command, env)
    if code != 0:
        raise ValueError(f"flwr {' '.join(command[1:3])} failed: {out.strip()[-400:]}")
    logger.info("%s", out.strip().splitlines()[-1] if out.strip() else command)


def _wait_for_link(runtime, env, link, attempts: int = 240) -> None:
    """Waits until the SuperLink answers ``flwr supernode list`` (or exits)."""
    probe = ["flwr", "supernode", "list", runtime.CONNECTION]
    for _ in range(attempts):
        if link.poll() is not None:
            raise ValueError(f"the SuperLink exited with code {link.returncode}")
        if runtime.call_flwr(probe, env)[0] == 0:
            return
        time.sleep(0.25)
    raise ValueError("the SuperLink did not come up")


def run_client(args, overrides: str) -> int:
    """``deploy client``: this hospital's SuperNode, in the foreground until the run ends.

    With ``--isolation process`` (the default) this process is also the SuperNode's ClientApp
    executor (:func:`fedjax_med.deploy.worker.serve`): the site is loaded and its functions
    compiled once, not once per message.
    """
    import tempfile

    from fedjax_med.deploy import runtime

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
    home = os.path.abspath(args.home or tempfile.mkdtemp(prefix=f"fedjax_med_{args.site}_"))
    node_config["state-dir"] = os.path.join(home, "ledger")
    command = runtime.supernode_command(
        args.server,
        node_config,
        port=args.port,
        ca=ca,
        key=key,
        isolation=args.isolation,
        poll=args.poll,
    )
    deadline = time.monotonic() + args.join_timeout
    env = runtime.environment(home, args.compilation_cache)
    loaded = []

    def load():
        """Checks the config and imports the app (JAX, the model) while the SuperNode starts."""
        if not loaded:
            from fedjax_med.deploy import worker

            if args.compilation_cache:
                runtime.use_compilation_cache(args.compilation_cache)
            _check_config(args.config, overrides)
            loaded.append(worker.load_app(args.app) if args.isolation == "process" else None)
        return loaded[0]

    while True:
        api = f"127.0.0.1:{args.port}"
        code, admitted = _supernode(runtime, command, env, load, api, args.poll)
        if admitted or time.monotonic() > deadline:
            if not admitted:
                print(
                    f"error: the SuperLink at {args.server} did not admit {args.site!r} "
                    "(is it up, and is this hospital's public key registered?)",
                    flush=True,
                )
            return code
        logger.warning("the SuperLink did not admit %s yet; retrying in 2 s", args.site)
        time.sleep(2.0)


def _supernode(runtime, command, env, load, runtime_api: str, poll: float) -> tuple[int, bool]:
    """Runs the SuperNode, echoing its log, and serves its tasks; ``(exit code, admitted)``.

    A SuperNode the SuperLink refuses (not up yet, or this key not registered yet) logs Flower's
    exit code 305 but keeps running: it is stopped here so that the caller can retry.
    """
    import threading

    from fedjax_med.deploy import worker

    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    stop, refused = threading.Event(), threading.Event()

    def echo() -> None:
        for line in process.stdout:
            print(line, end="", flush=True)
            if f"Exit Code: {runtime.EXIT_NOT_ADMITTED}" in line:
                refused.set()
                break
        stop.set()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        app = load()
        if app is not None:
            worker.serve(runtime_api, app, stop, poll=poll)
        else:
            stop.wait()
        if refused.is_set():
            return runtime.EXIT_NOT_ADMITTED, False
        return process.wait(), True
    finally:
        runtime.stop(process)
