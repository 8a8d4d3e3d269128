"""The secure-aggregation benchmark runs end to end, writes the promised rows, and sums right."""

import importlib.util
import json
import math
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "secure_aggregation.py")
MEASURED_KEYS = {
    "n",
    "params",
    "method",
    "seconds",
    "bytes_per_client",
    "over_plaintext",
    "max_abs_error",
}
HE_KEYS = {
    "ciphertexts_per_client",
    "poly_modulus_degree",
    "encrypt_seconds_per_client",
    "aggregate_seconds",
    "decrypt_seconds",
    "error_bound",
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("secure_aggregation_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_run_writes_rows_and_secure_sums_match_plaintext(bench, tmp_path):
    path = tmp_path / "bench.json"
    returned = bench.main(["--quick", "--json", str(path)])
    with open(path) as f:
        rows = json.load(f)
    assert rows == json.loads(json.dumps(returned))
    cases = {(r["n"], r["params"], r["method"]) for r in rows}
    assert cases == {(n, 1000, m) for n in (4, 6) for m in bench.METHODS}
    for row in rows:
        assert set(row) == MEASURED_KEYS | (HE_KEYS if row["method"] == "he_ckks" else set()), row
        assert row["seconds"] > 0 and row["over_plaintext"] > 0
        # Inputs lie in [-1, 1], so the only error is the ring's rounding: n / (2 scale).
        bound = bench.field.FieldEncoder(bench.CLIP, row["n"], bench.BITS).error_bound(row["n"])
        if row["method"] == "he_ckks":  # CKKS: its own worst-case bound, recomputed here
            bound = bench.he_ckks.error_bound(bench.he_ckks.CKKSParameters(4096), row["n"], 1.0)
            assert row["error_bound"] == bound and row["ciphertexts_per_client"] == 1
        if row["method"] != "plaintext":
            assert row["max_abs_error"] <= bound
        else:
            assert row["over_plaintext"] == 1.0
            assert row["bytes_per_client"] == 4 * row["params"]
    by_case = {(r["n"], r["method"]): r for r in rows}
    for n in (4, 6):
        # Masked ring words are 4 bytes, plus keys and shares; additive sends one word per server.
        assert by_case[n, "secagg"]["bytes_per_client"] > 4 * 1000
        assert by_case[n, "additive"]["bytes_per_client"] == bench.NUM_SERVERS * 4 * 1000
        # One ciphertext of two 4096-coefficient polynomials mod a 60-bit prime: > 8 bytes each.
        assert by_case[n, "he_ckks"]["bytes_per_client"] > 2 * 4096 * 7.5


def test_over_budget_case_is_recorded_as_skipped(bench, tmp_path):
    path = tmp_path / "skip.json"
    rows = bench.main(
        ["--quick", "--methods", "secagg", "--max-seconds-per-case", "0", "--json", str(path)]
    )
    assert len(rows) == 2
    for row in rows:
        assert row["seconds"] is None and row["over_plaintext"] is None
        assert "max-seconds-per-case" in row["skipped"]
        assert row["estimated_seconds"] > 0


def test_secagg_plus_uses_logarithmic_neighbours(bench):
    assert bench.neighbours_of("secagg", 100) == "all"
    assert bench.neighbours_of("secagg_plus", 100) == math.ceil(2 * math.log2(100))
    deg, t = bench.degree_and_threshold("secagg_plus", 500)
    assert deg == 18 and t <= deg + 1
    assert bench.degree_and_threshold("secagg", 100) == (99, 51)
