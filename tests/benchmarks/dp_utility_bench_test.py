"""The DP-SGD utility ablation runs end to end: pretraining, private fine-tuning, the table."""

import importlib.util
import json
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "dp_utility.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dp_utility_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_fine_tuning_row_meets_the_fixed_epsilon(bench, tmp_path):
    path = tmp_path / "utility.json"
    out = bench.main(["--quick", "--variants", "finetune", "--epsilon", "3", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    (row,) = out["rows"]
    assert row["variant"] == "finetune" and 0.0 <= row["test_accuracy"] <= 1.0
    assert 0.9 * 3.0 < row["epsilon"] <= 3.0 and row["steps"] == 2
    assert "| `finetune` |" in bench.table(out["rows"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "nope"])
