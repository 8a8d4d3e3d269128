"""Faults and bad input at the command line: exit 2 with one ``error:`` line naming the culprit.

Read-only folders are made with ``chmod``; as root (which ``chmod`` does not stop) ``os.access``
is patched to report them read-only, the way it does for another user or a read-only mount.
"""

import os
import shutil

import pytest

from fedjax_med.cli import main as cli
from fedjax_med.config import schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"
TINY = ["--config.data.cache_dir=none", "--config.train.num_devices=1", "--quiet"]


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def make_read_only(path, monkeypatch):
    """``chmod a-w`` on ``path``; as root, also patch ``os.access`` to say so."""
    path = os.path.abspath(path)
    os.chmod(path, 0o555)
    if os.geteuid() == 0:
        real_access = os.access

        def access(target, mode, *args, **kwargs):
            inside = os.path.abspath(target) == path or os.path.abspath(target).startswith(
                path + os.sep
            )
            if inside and mode & os.W_OK:
                return False
            return real_access(target, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", "--config", QUICK, "--workdir", str(workdir), *TINY]) == 0
    return workdir


def copy_of(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def train(workdir, *extra, config=QUICK):
    return cli.main(["train", "--config", config, "--workdir", str(workdir), *TINY, *extra])


# ---- filesystem ------------------------------------------------------------------------------
def test_workdir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("x")
    assert train(path) == 2
    one_error_line(capsys, str(path), "is a file")


def test_workdir_below_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert train(tmp_path / "afile" / "run") == 2
    one_error_line(capsys, "afile' is a file")


def test_workdir_in_a_read_only_parent(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    make_read_only(parent, monkeypatch)
    try:
        assert train(parent / "run") == 2
        one_error_line(capsys, "cannot write in", str(parent))
    finally:
        os.chmod(parent, 0o755)
    assert not (parent / "run").exists()


def test_read_only_workdir(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    workdir.mkdir()
    make_read_only(workdir, monkeypatch)
    try:
        assert train(workdir) == 2
        one_error_line(capsys, "cannot write in", str(workdir))
    finally:
        os.chmod(workdir, 0o755)
    assert os.listdir(workdir) == []


def test_cache_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "cache"
    path.write_text("x")
    assert cli.main(["train", "--config", QUICK, "--workdir", str(tmp_path / "run"), "--quiet",
                     f"--config.data.cache_dir={path}"]) == 2  # fmt: skip
    one_error_line(capsys, "data.cache_dir", str(path), "is a file")


@pytest.mark.parametrize("command", ["eval", "resume", "attack"])
def test_read_only_finished_run(finished, tmp_path, capsys, monkeypatch, command):
    workdir = copy_of(finished, tmp_path)
    before = sorted(os.listdir(workdir))
    make_read_only(workdir, monkeypatch)
    try:
        if command == "eval":
            code = cli.main(["eval", "--workdir", str(workdir), "--quiet"])
        elif command == "attack":
            code = cli.main(["attack", "membership", "--workdir", str(workdir), "--quiet"])
        else:
            code = train(workdir, "--resume")
        assert code == 2
        one_error_line(capsys, "cannot write in", str(workdir))
    finally:
        os.chmod(workdir, 0o755)
    assert sorted(os.listdir(workdir)) == before  # refused before any work


def test_os_error_during_work_is_one_line(tmp_path, capsys, monkeypatch):
    from fedjax_med.training import checkpoint

    def full_disk(path, data):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(checkpoint, "write_json_atomic", full_disk)
    assert train(tmp_path / "run") == 2
    one_error_line(capsys, "No space left on device", "config.json")


# ---- config files ----------------------------------------------------------------------------
CONFIG_FILES = {
    "raises": ('def get_config():\n    raise RuntimeError("boom")\n', "RuntimeError: boom"),
    "syntax": ("def get_config(:\n", "SyntaxError"),
    "import": ("import no_such_module_xyz\n", "No module named 'no_such_module_xyz'"),
    "arg": (
        "from fedjax_med.config import base\n\n\n"
        "def get_config():\n    return base.get_base_config()\n",
        "get_config() takes no argument, but ':tiny' was given",
    ),
}


@pytest.mark.parametrize("kind", sorted(CONFIG_FILES))
def test_broken_config_file(tmp_path, capsys, kind):
    text, message = CONFIG_FILES[kind]
    path = tmp_path / f"{kind}.py"
    path.write_text(text)
    spec = f"{path}:tiny" if kind == "arg" else str(path)
    assert cli.main(["train", "--config", spec, "--workdir", str(tmp_path / "run")]) == 2
    one_error_line(capsys, f"config file '{path}'", message)
    assert not (tmp_path / "run").exists()


def test_debug_keeps_the_traceback(tmp_path):
    path = tmp_path / "raises.py"
    path.write_text(CONFIG_FILES["raises"][0])
    with pytest.raises(schema.ConfigError, match="boom") as info:
        cli.main(["train", "--config", str(path), "--workdir", str(tmp_path), "--debug"])
    assert isinstance(info.value.__cause__, RuntimeError)


# ---- values the library would reject in its own words ---------------------------------------
@pytest.mark.parametrize(
    "args, needles, absent",
    [
        (
            ["--config.model.name=mlp", "--config.model.kwargs.hidden=abc"],
            ["model.kwargs.hidden", "'abc'"],
            "int()",
        ),
        (
            ["--config.model.name=mlp", "--config.model.kwargs.hidden=('a',)"],
            ["model.kwargs.hidden"],
            "int()",
        ),
        (["--config.data.image_size=8"], ["'data.image_size'=8"], "None"),
        (
            ["--config.data.synthetic.images_per_patient=1000"],
            ["train split is empty", "3 patient(s)", "images_per_patient"],
            "Traceback",
        ),
    ],
    ids=["kwarg_type", "kwarg_element_type", "image_size", "one_patient_per_site"],
)
def test_bad_value_names_the_field(tmp_path, capsys, args, needles, absent):
    assert train(tmp_path / "run", *args) == 2
    line = one_error_line(capsys, *needles)
    assert absent not in line


def test_adaptive_clipping_with_few_clients_names_config_fields(tmp_path, capsys):
    config = os.path.join(ROOT, "configs", "dp_fedavg.py") + ":tiny"
    args = ["--config.data.cache_dir=none", "--quiet", "--config.federated.adaptive_clipping=true"]
    # (train.num_devices is the central trainer's: federated.backend places the clients)
    assert cli.main(["train", "--config", config, "--workdir", str(tmp_path / "run"), *args]) == 2
    line = one_error_line(
        capsys, "federated.clients_per_round", "federated.partition.num_clients",
        "privacy.noise_multiplier", "federated.adaptive_clipping",
    )  # fmt: skip
    assert "clipped_count_stddev" not in line


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"seed": "x"}'])
def test_corrupt_config_json_names_the_file(finished, tmp_path, capsys, content):
    workdir = copy_of(finished, tmp_path)
    (workdir / "config.json").write_text(content)
    assert cli.main(["eval", "--workdir", str(workdir), "--quiet"]) == 2
    one_error_line(capsys, str(workdir / "config.json"))
    assert train(workdir, "--resume") == 2
    one_error_line(capsys, str(workdir / "config.json"))
