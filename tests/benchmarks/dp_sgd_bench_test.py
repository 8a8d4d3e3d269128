"""The DP-SGD benchmark script runs end to end and writes the promised JSON."""

import importlib.util
import json
import os
import sys

import jax
import pytest

from fedjax_med.models import registry

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "dp_sgd.py")
VARIANTS = (
    "jax_nonprivate",
    "jax_dp_vmap",
    "jax_dp_ghost",
    "torch_nonprivate",
    "opacus_hooks",
    "opacus_ghost",
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dp_sgd_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_run_writes_promised_keys(bench, tmp_path):
    path = tmp_path / "bench.json"
    returned = bench.main(["--quick", "--models", "cnn", "--no-opacus", "--json", str(path)])
    with open(path) as f:
        out = json.load(f)
    assert out == json.loads(json.dumps(returned))
    assert out["cnn_dp_over_nonprivate"] > 0
    for key in ("resnet_dp_over_nonprivate", "cnn_ours_over_opacus", "resnet_ours_over_opacus"):
        assert key in out and out[key] is None
    speeds = out["examples_per_second"]["cnn"]
    assert set(speeds) == set(VARIANTS)
    for name in VARIANTS[:3]:
        assert speeds[name] > 0
    for name in VARIANTS[3:]:
        assert speeds[name] is None
    best_dp = max(speeds["jax_dp_vmap"], speeds["jax_dp_ghost"])
    assert out["cnn_dp_over_nonprivate"] == pytest.approx(best_dp / speeds["jax_nonprivate"])
    assert out["device"]["platform"] == "cpu" and out["device"]["jax"]
    # The compiled programs' planned buffers: at least the parameters they read, and more for a
    # DP step, which also holds per-example gradients or activations.
    buffers = out["xla_buffer_bytes"]["cnn"]
    assert set(buffers) == set(VARIANTS[:3])
    assert buffers["jax_nonprivate"] >= 4 * out["num_params"]["cnn"]["jax"]
    assert buffers["jax_dp_vmap"] > buffers["jax_nonprivate"]


def test_same_padding_matches_flax_same(bench):
    # 28 -> 14 with 3 + 3; 27 -> 14 with 3 + 4 (XLA puts the odd pixel at the end).
    assert bench.same_padding(28, 8, 2) == (3, 3)
    assert bench.same_padding(27, 8, 2) == (3, 4)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_torch_models_match_jax_models(bench, name):
    torch = pytest.importorskip("torch")
    setting = bench.QUICK_SETTINGS[name]
    model = registry.get_model(
        setting.model, input_shape=setting.input_shape, num_outputs=setting.num_classes
    )
    expected = model.num_params(model.init(jax.random.key(0)))
    torch_model = bench.torch_model(setting)
    assert sum(p.numel() for p in torch_model.parameters()) == expected
    height, width, channels = setting.input_shape
    assert tuple(torch_model(torch.zeros(2, channels, height, width)).shape) == (2, 10)
