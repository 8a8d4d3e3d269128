"""The accelerator benchmark runs end to end in its tiny form and writes the promised JSON."""

import importlib.util
import json
import math
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "accelerator.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accelerator_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_tiny_run_writes_promised_keys(bench, tmp_path):
    path = tmp_path / "accelerator.json"
    returned = bench.main(["--tiny", "--json", str(path)])
    with open(path) as f:
        out = json.load(f)
    assert out == json.loads(json.dumps(returned))
    assert {"device", "dp_sgd", "federated", "federation", "summary", "plan", "seconds"} <= set(out)
    result = out["dp_sgd"]["cnn"]["2"]
    assert set(result["examples_per_second"]) == set(bench.DP_ORDER)
    assert set(result["peak_device_bytes"]) == set(bench.DP_ORDER)  # None on CPU
    for name in ("examples_per_second", "dp_over_nonprivate", "first_call_seconds"):
        values = list(_numbers(result[name]))
        assert values and all(math.isfinite(v) and v > 0 for v in values)
    cohorts = out["federated"]
    assert set(cohorts["examples_per_second"]["2"]) >= {"loop", "vmap", "centralized"}
    for name in ("examples_per_second", "vmap_over_loop", "vmap_over_centralized"):
        values = list(_numbers(cohorts[name]))
        assert values and all(math.isfinite(v) and v > 0 for v in values)
    federation = out["federation"]
    assert federation["num_clients"] == 8 and len(federation["round_seconds"]) == 2
    assert all(s > 0 for s in federation["round_seconds"])
    summary = out["summary"]
    assert summary["K"] == "2" and summary["dp_over_nonprivate"]["cnn_2"] > 0
    assert summary["vmap_over_loop"] == cohorts["vmap_over_loop"]["2"]


def test_full_plan_covers_the_promised_sizes(bench):
    plan = bench.FULL
    assert plan.dp_models == ("cnn", "resnet") and max(plan.dp_batch_sizes) == 1024
    assert plan.federated.clients == (64, 256, 1024)
    assert (plan.federated.federation_clients, plan.federated.federation_cohort) == (10_000, 1_000)


def test_skip_rejects_unknown_sections(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--skip", "dp"])
