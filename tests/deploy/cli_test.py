"""``fedjax-med deploy``: bad input fails before any process starts; the commands it runs."""

from __future__ import annotations

import pytest

from fedjax_med.cli import main as cli
from fedjax_med.deploy import runtime


@pytest.mark.parametrize(
    "override, named",
    [
        ("--config.federated.partition.method=iid", "federated.partition.method='by_site'"),
        ("--config.robust_aggregation.method=krum", "robust_aggregation.method='mean'"),
        ("--config.poisoning.kind=label_flip", "'poisoning.kind'"),
        ("--config.federated.algorithm=ditto", "federated.algorithm='ditto'"),
    ],
)
def test_a_config_the_deployment_cannot_run_fails_naming_the_field(
    tmp_path, capsys, override, named
):
    overrides = [override] + ["--config.poisoning.fraction=0.3"] * ("poisoning" in override)
    workdir = str(tmp_path / "w")
    args = ["deploy", "server", "--config", "fedavg:tiny", "--workdir", workdir, *overrides]
    code = cli.main(args)
    assert code == 2
    err = capsys.readouterr().err
    assert named in err
    assert not (tmp_path / "w").exists()  # nothing started, nothing written


def test_a_bad_server_address_is_refused(tmp_path, capsys):
    code = cli.main(
        [
            "deploy",
            "client",
            "--config",
            "fedavg:tiny",
            "--site",
            "hospital_0",
            "--data",
            "synthetic",
            "--server",
            "no-port",
            "--home",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "must be HOST:PORT" in capsys.readouterr().err


def test_tls_and_authentication_are_on_exactly_when_certificates_are_given(tmp_path):
    pytest.importorskip("flwr")
    certs = runtime.Certificates(str(tmp_path))
    for path in (certs.ca, certs.server_cert, certs.server_key):
        open(path, "w").close()
    secure = runtime.superlink_command("127.0.0.1:9093", certs)
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert secure[secure.index("--ssl-certfile") + 1] == certs.server_cert
    assert "--insecure" in runtime.superlink_command("127.0.0.1:9093", None)
    node = runtime.supernode_command(
        "127.0.0.1:9093", {"site": "a"}, port=9100, ca=certs.ca, key=certs.site_key("a")
    )
    assert node[node.index("--auth-supernode-private-key") + 1] == certs.site_key("a")
    assert node[node.index("--node-config") + 1] == "site='a'"
    with pytest.raises(FileNotFoundError, match="ca.crt"):
        runtime.superlink_command("127.0.0.1:9093", runtime.Certificates(str(tmp_path / "x")))


def test_the_supernode_polls_as_asked_and_isolation_is_checked():
    pytest.importorskip("flwr")
    from fedjax_med.deploy import supernode

    node = runtime.supernode_command(
        "127.0.0.1:9093", {}, port=9100, ca=None, key=None, isolation="process", poll=0.2
    )
    assert node[1:4] == ["-m", "fedjax_med.deploy.supernode", "--poll=0.2"]
    assert node[node.index("--isolation") + 1] == "process"
    assert supernode.parse_poll(node[3:])[1] == node[4:]
    with pytest.raises(ValueError, match="isolation"):
        runtime.supernode_command("127.0.0.1:9093", {}, port=1, ca=None, key=None, isolation="x")
    with pytest.raises(ValueError, match=r"--poll=0.0 must be in \(0, 3\]"):
        supernode.parse_poll(["--poll=0"])


def test_the_client_app_is_named_module_colon_attribute():
    pytest.importorskip("flwr")
    from fedjax_med.deploy import flower_app, worker

    assert worker.load_app(worker.DEFAULT_APP) is flower_app.client_app
    with pytest.raises(ValueError, match="--app 'flower_app' must be MODULE:ATTRIBUTE"):
        worker.load_app("flower_app")


def test_the_compilation_cache_is_off_unless_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert "JAX_COMPILATION_CACHE_DIR" not in runtime.environment(str(tmp_path / "home"))
    env = runtime.environment(str(tmp_path / "home"), str(tmp_path / "cache"))
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cache")
    # Every program is kept, however fast it compiled (a small model's are all fast).
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    args = cli.build_parser().parse_args(
        ["deploy", "server", "--config", "c", "--workdir", "w", "--compilation-cache", "d"]
    )
    assert args.compilation_cache == "d"


def test_object_pulls_retry_after_a_twentieth_of_a_second(monkeypatch):
    import sys
    import types

    from fedjax_med.deploy import flower

    def pull_objects(ids, fn, *, initial_backoff=1.0, backoff_cap=10.0):
        return initial_backoff, backoff_cap

    module = types.ModuleType("flower_like")
    module.pull_objects = pull_objects
    monkeypatch.setitem(sys.modules, "flower_like", module)
    assert flower.quick_object_pulls("flower_like", "pull_objects")
    assert flower.quick_object_pulls("flower_like", "pull_objects")  # once only
    assert module.pull_objects([], None) == (0.05, 1.0)
    assert not flower.quick_object_pulls("no_such_module_here", "pull_objects")
