"""Checkpointer round trips and pruning; atomic text/JSON writes survive a crash mid-write."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_med.training import checkpoint
from fedjax_med.training import state as state_lib

METADATA = {
    "sampler": {"epoch": 2, "position": [3, 1]},
    "ledger": {"steps_taken": 7, "epsilon": 0.25, "unit": "example", "stopped": None},
    "flag": True,
}


def make_state(seed: int, value: float) -> dict:
    """A train state like the DP trainer's: a raw uint32 rng and a typed noise key in opt state."""
    params = {"dense": {"kernel": jnp.full((3, 2), value), "bias": jnp.arange(2.0) + value}}
    opt_state = (optax.adam(0.1).init(params), {"rng_key": jax.random.key(seed)})
    train = state_lib.TrainState(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.PRNGKey(seed),
    )
    return {"train": train, "half": jnp.full((2,), value, jnp.bfloat16)}


def step_folders(directory: str) -> list[int]:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1..4 saved with max_to_keep=2 (4 differs from the template everywhere)."""
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
    assert ckpt.latest_step() is None  # a fresh folder has nothing to restore
    for step in (1, 2, 3, 4):
        ckpt.save(step, make_state(step, float(step)), {**METADATA, "step": step})
    yield ckpt, directory
    ckpt.close()


def test_restore_round_trips_state_and_metadata(saved):
    ckpt, _ = saved
    original = make_state(4, 4.0)
    restored, metadata = ckpt.restore(4, make_state(0, -1.0))
    assert metadata == {**METADATA, "step": 4}
    flat_restored, tree_restored = jax.tree.flatten(restored)
    flat_original, tree_original = jax.tree.flatten(original)
    assert tree_restored == tree_original
    for got, want in zip(flat_restored, flat_original, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(got) == jax.random.key_impl(want)
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The typed noise key still draws what the saved one drew.
    key = restored["train"].opt_state[1]["rng_key"]
    np.testing.assert_array_equal(
        jax.random.normal(key, (3,)), jax.random.normal(jax.random.key(4), (3,))
    )


def test_restore_takes_the_template_dtype(saved):
    ckpt, _ = saved
    template = make_state(0, 0.0)
    template["half"] = jnp.zeros((2,), jnp.float32)  # saved as bfloat16
    restored, _ = ckpt.restore(4, template)
    assert restored["half"].dtype == jnp.float32
    np.testing.assert_array_equal(restored["half"], [4.0, 4.0])


def test_keeps_only_the_newest_and_reopens(saved):
    _, directory = saved
    assert step_folders(directory) == [3, 4]
    reopened = checkpoint.Checkpointer(directory, max_to_keep=2)
    try:
        assert reopened.latest_step() == 4
        restored, metadata = reopened.restore(3, make_state(0, 0.0))
        assert metadata["step"] == 3
        np.testing.assert_array_equal(restored["train"].params["dense"]["bias"], [3.0, 4.0])
    finally:
        reopened.close()


def test_max_to_keep_one_and_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoint.Checkpointer("ckpts", max_to_keep=1)
    try:
        assert ckpt.directory == os.path.join(str(tmp_path), "ckpts")
        for step in (10, 20):
            ckpt.save(step, {"x": jnp.asarray(step)}, {})
        assert ckpt.latest_step() == 20
        assert step_folders(ckpt.directory) == [20]
    finally:
        ckpt.close()


def test_write_json_atomic_round_trip(tmp_path):
    path = tmp_path / "new" / "folder" / "report.json"  # missing folders are created
    data = {"z": 1, "a": [1.5, None, "x"], "nan": math.nan, "inf": math.inf}
    checkpoint.write_json_atomic(str(path), data)
    text = path.read_text()
    assert text.endswith("}\n")
    loaded = json.loads(text)
    assert list(loaded) == ["z", "a", "nan", "inf"]  # key order kept, not sorted
    assert loaded["a"] == [1.5, None, "x"] and math.isnan(loaded["nan"])
    assert loaded["inf"] == math.inf
    assert leftovers(path.parent) == []


def test_write_text_atomic_replaces_the_file_as_a_whole(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old text\n")
    renames = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", recording_replace)
    with open(path) as reader:  # a reader that opened the old file
        checkpoint.write_text_atomic(str(path), "new text\n")
        assert reader.read() == "old text\n"  # not truncated in place
    assert path.read_text() == "new text\n"
    # One rename of a temporary file from the same folder (so the rename is atomic).
    [(src, dst)] = renames
    assert dst == str(path)
    assert os.path.dirname(src) == str(tmp_path) and os.path.basename(src).startswith(".tmp-")
    assert sorted(os.listdir(tmp_path)) == ["report.md"]


class _DiskFull(OSError):
    pass


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    checkpoint.write_json_atomic(str(path), {"version": 1})
    before = path.read_text()
    real_fdopen = os.fdopen

    class HalfWriter:
        """Writes the first half of the text, then fails like a full disk."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise _DiskFull("no space left on device")

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, *a: HalfWriter(real_fdopen(fd, *a)))
    with pytest.raises(_DiskFull):
        checkpoint.write_json_atomic(str(path), {"version": 2, "payload": "x" * 100})
    assert path.read_text() == before
    assert json.loads(before) == {"version": 1}
    assert leftovers(tmp_path) == []


def test_failed_rename_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("kept\n")

    def failing_replace(src, dst):
        raise _DiskFull("rename failed")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(_DiskFull):
        checkpoint.write_text_atomic(str(path), "lost\n")
    assert path.read_text() == "kept\n"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]
