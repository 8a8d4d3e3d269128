"""Starting Flower's deployment runtime with the fedjax_med app: commands, app folder, processes.

A deployed run is Flower's own processes (Flower >= 1.42, all links over HTTPS):

* the **SuperLink** (``flower-superlink``) at the server, with TLS (``ca.crt``, ``server.pem``,
  ``server.key`` of :mod:`fedjax_med.deploy.tls`) and SuperNode authentication on: only
  SuperNodes whose public key was registered (``flwr supernode register``) may connect;
* one **SuperNode** per hospital (``flower-supernode``), dialling the SuperLink with the CA
  certificate and signing its requests with the hospital's private key; its ``--node-config``
  names the config, the site and its data (:mod:`fedjax_med.deploy.flower_app`); with
  ``--isolation process`` the hospital's ``fedjax-med deploy client`` runs every ClientApp task
  in one long-lived process (:mod:`fedjax_med.deploy.worker`);
* the run itself, submitted with ``flwr run`` on the app folder :func:`write_app` makes; the
  SuperLink starts the ``ServerApp``.

Flower's own state (installed apps, the connection file) lives in ``FLWR_HOME`` under the
server's (or site's) folder, never in the user's home. The app's dependencies are those
installed (runtime installation off).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from fedjax_med.deploy import flower

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedjax-med-deploy"
version = "1.0.0"
description = "fedjax_med federated training on Flower"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedjax_med"

[tool.flwr.app.components]
serverapp = "fedjax_med.deploy.flower_app:server_app"
clientapp = "fedjax_med.deploy.flower_app:client_app"

[tool.flwr.app.config]
config = ""
overrides = ""
workdir = ""
sites = ""
resume = false
join-timeout = 600.0
round-timeout = 600.0
"""
CONNECTION = "fedjax_med"
# flower-supernode's exit code when the SuperLink refuses it (unknown key) or cannot be reached.
EXIT_NOT_ADMITTED = 305


@dataclasses.dataclass(frozen=True)
class Certificates:
    """The files of a certificate folder made by :func:`fedjax_med.deploy.tls.make_certificates`."""

    folder: str

    @property
    def ca(self) -> str:
        return os.path.join(self.folder, "ca.crt")

    @property
    def server_cert(self) -> str:
        return os.path.join(self.folder, "server.pem")

    @property
    def server_key(self) -> str:
        return os.path.join(self.folder, "server.key")

    def site_key(self, site: str) -> str:
        return os.path.join(self.folder, "sites", site)

    def site_public_key(self, site: str) -> str:
        return os.path.join(self.folder, "sites", site + ".pub")

    def check(self, *paths: str) -> None:
        """Raises ``FileNotFoundError`` naming the first of ``paths`` that is missing."""
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(2, "no such certificate or key file", path)


def split_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; raises ``ValueError`` naming the format."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} must be HOST:PORT with a port in [1, 65535]")
    return host, int(port)


def executable(name: str) -> str:
    """The path of one of Flower's commands, next to this Python or on ``PATH``."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    found = beside if os.path.exists(beside) else shutil.which(name)
    if found is None:
        raise FileNotFoundError(2, f"Flower's {name} command not found ({flower.INSTALL})", name)
    return found


def config_text(values: Mapping[str, object]) -> str:
    """``{"a": "x", "b": 1.0}`` -> ``a='x' b=1.0``, the TOML pairs of Flower's config flags.

    Examples:
      >>> config_text({"site": "hospital_0", "resume": False, "round-timeout": 60.0})
      "site='hospital_0' resume=false round-timeout=60.0"
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(float(value)) if isinstance(value, float) else str(value)
        else:
            if "'" in str(value):
                raise ValueError(f"{key}={value!r}: values cannot contain a single quote")
            text = f"'{value}'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def write_app(folder: str) -> str:
    """Writes the Flower app folder (its ``pyproject.toml`` names our apps); returns it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "pyproject.toml"), "w") as f:
        f.write(APP_PYPROJECT)
    return folder


def write_connection(home: str, address: str, ca: str | None) -> None:
    """The ``FLWR_HOME/config.toml`` naming the SuperLink for ``flwr run`` / ``register``."""
    os.makedirs(home, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f'address = "{address}"')
    lines.append(f'root-certificates = "{os.path.abspath(ca)}"' if ca else "insecure = true")
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")


def superlink_command(address: str, certificates: Certificates | None) -> list[str]:
    """``flower-superlink`` on ``address`` with TLS and SuperNode authentication (or neither)."""
    host, port = split_address(address)
    command = [executable("flower-superlink"), "--host", host, "--port", str(port)]
    command.append("--disable-runtime-dependency-installation")
    if certificates is None:
        return [*command, "--insecure"]
    c = certificates
    c.check(c.ca, c.server_cert, c.server_key)
    return [
        *command,
        "--ssl-ca-certfile",
        c.ca,
        "--ssl-certfile",
        c.server_cert,
        "--ssl-keyfile",
        c.server_key,
        "--enable-supernode-auth",
    ]


def register_command(public_key: str, name: str) -> list[str]:
    """``flwr supernode register``: lets the SuperNode holding the matching private key join."""
    return [executable("flwr"), "supernode", "register", public_key, CONNECTION, "--name", name]


def call_flwr(command: Sequence[str], env: Mapping[str, str]) -> tuple[int, str]:
    """Runs a short ``flwr ...`` command in this process; ``(exit code, its output)``.

    The same command line as the ``flwr`` executable (``command[0]``, ignored), without starting
    an interpreter and importing Flower again for each (seconds on a loaded machine).
    """
    import contextlib
    import io

    import click
    from flwr.cli.app import app
    from typer.main import get_command

    out = io.StringIO()
    saved = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            get_command(app).main(list(command[1:]), prog_name="flwr", standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except click.ClickException as e:
        out.write(e.format_message())
        code = e.exit_code
    finally:
        if saved is None:
            os.environ.pop("FLWR_HOME")
        else:
            os.environ["FLWR_HOME"] = saved
    return code, out.getvalue()


def supernode_command(
    server: str,
    node_config: Mapping[str, object],
    *,
    port: int,
    ca: str | None,
    key: str | None,
    isolation: str = "subprocess",
    poll: float = 3.0,
) -> list[str]:
    """``flower-supernode`` dialling ``server`` (TLS with ``ca``, authenticated with ``key``).

    ``isolation="process"``: the SuperNode leaves its ClientApp tasks to an outside executor
    (:mod:`fedjax_med.deploy.worker`) on its Runtime API at ``127.0.0.1:port``. ``poll``: the
    longest wait between two checks for a message (:mod:`fedjax_med.deploy.supernode`; Flower's
    own is 3 s).
    """
    split_address(server)
    if isolation not in ("subprocess", "process"):
        raise ValueError(f"isolation={isolation!r} must be 'subprocess' or 'process'")
    executable("flower-supernode")  # Flower's runtime is installed
    command = [sys.executable, "-m", "fedjax_med.deploy.supernode", f"--poll={poll:g}"]
    command += ["--superlink", server, "--port", str(port)]
    command += ["--isolation", isolation]
    command += ["--node-config", config_text(node_config)]
    if ca is None:
        return [*command, "--insecure"]
    command += ["--root-certificates", ca]
    if key is not None:
        command += ["--auth-supernode-private-key", key]
    return command


def run_command(app: str, run_config: Mapping[str, object]) -> list[str]:
    """``flwr run`` of the app folder with our run config, streaming the ServerApp's log."""
    return [
        executable("flwr"),
        "run",
        app,
        CONNECTION,
        "--run-config",
        config_text(run_config),
        "--stream",
    ]


# JAX's persistent compilation cache, as its environment variables: every program is kept, however
# fast it compiled and however small (the small programs of a small model are the ones that pay).
_CACHE_VARIABLES = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}


def compilation_cache_environment(folder: str) -> dict[str, str]:
    """The environment variables that point JAX's persistent compilation cache at ``folder``.

    The cache holds compiled XLA programs, keyed by a hash of the program and the compiler: a
    hospital's program takes its images, labels, parameters and keys as arguments, so none of
    them is in the cache (nothing a privacy guarantee covers is written). JAX runs whatever it
    finds there, so the folder must be the party's own (writable by no one else), as its data is.
    """
    return {"JAX_COMPILATION_CACHE_DIR": os.path.abspath(folder), **_CACHE_VARIABLES}


def use_compilation_cache(folder: str) -> None:
    """Points this process's JAX at the persistent compilation cache in ``folder``.

    To be called before this process compiles anything (JAX sets its cache up once, at the first
    compilation); see :func:`compilation_cache_environment` for what the cache holds.
    """
    import jax

    os.makedirs(folder, exist_ok=True)
    env = compilation_cache_environment(folder)
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    for name in _CACHE_VARIABLES:
        kind = float if name.endswith("_SECS") else int
        jax.config.update(name.lower(), kind(env[name]))


def environment(home: str, compilation_cache: str | None = None) -> dict[str, str]:
    """This process's environment with ``FLWR_HOME`` set and this fedjax_med importable.

    ``compilation_cache``: a folder for JAX's persistent compilation cache
    (:func:`compilation_cache_environment`) in the processes started with this environment, e.g.
    the ClientApp process Flower starts per message under ``--isolation subprocess``, which would
    otherwise compile the local update again for every round.
    """
    env = dict(os.environ, FLWR_HOME=os.path.abspath(home))
    if compilation_cache:
        env.update(compilation_cache_environment(compilation_cache))
    # Flower's executor looks for a new task (a ServerApp to start) once a second by default, and
    # keeps looking while the run lasts: every look costs it and the SuperLink CPU time.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
    return env


def start(command: Sequence[str], log: str, env: Mapping[str, str]) -> subprocess.Popen:
    """Starts ``command`` in its own process group, output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, env=dict(env),
            start_new_session=True,
        )


def stop(*processes: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stops processes :func:`start` made, and their children (their process groups).

    All are asked (SIGTERM) at once, then each is waited for; one still running after
    ``timeout`` seconds is killed.
    """
    running = [p for p in processes if p.poll() is None]
    for process in running:
        _signal_group(process, 15)
    for process in running:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, 9)
            process.wait(timeout)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def describe(command: Sequence[str]) -> str:
    """A command as one shell line (for logs and ``--dry-run``)."""
    return shlex.join(command)
