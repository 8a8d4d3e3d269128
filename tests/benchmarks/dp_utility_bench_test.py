"""The DP-SGD utility ablation runs end to end: pretraining, private fine-tuning, the table."""

import json

import pytest


@pytest.fixture(scope="module")
def bench(import_benchmark):
    with import_benchmark("dp_utility.py") as module:
        yield module


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
