"""The federated benchmark script runs end to end and writes the promised JSON."""

import importlib.util
import json
import os
import sys

import jax
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "federated.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("federated_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_run_writes_promised_keys(bench, tmp_path):
    path = tmp_path / "bench.json"
    returned = bench.main(["--quick", "--json", str(path)])
    with open(path) as f:
        out = json.load(f)
    assert out == json.loads(json.dumps(returned))
    ks = {"2", "4"}
    for name in ("vmap_over_centralized", "vmap_over_loop", "auto_over_loop"):
        assert set(out[name]) == ks
        assert all(ratio > 0 for ratio in out[name].values())
    variants = {"loop", "vmap", "centralized"} | ({"sharded"} if jax.device_count() > 1 else set())
    for k in ks:
        speeds = out["examples_per_second"][k]
        assert set(speeds) == variants and all(v > 0 for v in speeds.values())
        assert out["vmap_over_loop"][k] == pytest.approx(speeds["vmap"] / speeds["loop"])
        assert out["vmap_over_centralized"][k] == pytest.approx(
            speeds["vmap"] / speeds["centralized"]
        )
        assert out["best_backend"][k] in variants - {"centralized"}
        best = max(speeds[b] for b in variants - {"centralized"})
        assert out["best_over_centralized"][k] == pytest.approx(best / speeds["centralized"])
    assert out["auto_backend"] == "loop"  # CPU
    assert all(ratio == 1.0 for ratio in out["auto_over_loop"].values())
    memory = out["peak_memory"]
    assert memory["rss_peak_mb"] >= memory["rss_start_mb"] > 0
    assert set(memory["rss_raised_mb"]) == ks
    assert out["device"]["platform"] == "cpu" and out["device"]["jax"]
