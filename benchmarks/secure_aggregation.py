"""Seconds and upload bytes of one secure-aggregation round against a plaintext sum.

Run from the repository root::

  python benchmarks/secure_aggregation.py --json runs/bench/secure_aggregation.json  # full
  python benchmarks/secure_aggregation.py --quick                                    # seconds

For n clients (default 10, 100, 500) each holding a float vector of d parameters (default
100,000 and 1,000,000, uniform in [-clip, clip] with clip = 1), one round of each method:

* ``plaintext``: ``np.sum`` of the float32 vectors; a client uploads 4 d bytes.
* ``secagg``: :func:`fedjax_med.secure.secagg.secure_sum` with every peer a neighbour (Bonawitz et
  al. 2017), threshold t = ceil(n / 2) + 1.
* ``secagg_plus``: the same with k = ceil(2 log2 n) neighbours (Bell et al. 2020,
  https://eprint.iacr.org/2020/704) on a secret random k-regular graph (k + 1 if n k is odd), and
  the threshold counts shares among a client's deg + 1 holders: t = ceil((deg + 1) / 2) + 1. (A
  cost benchmark; the parameters a deployment needs for a dropout rate and a corrupted fraction
  are :func:`fedjax_med.secure.secagg.secagg_plus_parameters`.)
* ``additive``: :func:`fedjax_med.secure.additive.secure_sum` with 2 servers.
* ``he_ckks``: :func:`fedjax_med.secure.he_ckks.secure_sum`, CKKS with ring degree N
  (``--he-poly-modulus-degree``, default 4096: 2,048 coordinates packed per ciphertext); each
  client encrypts, the server adds ciphertexts, the key holder decrypts the sum. Its rows add
  ``ciphertexts_per_client``, ``poly_modulus_degree``, ``encrypt_seconds_per_client``,
  ``aggregate_seconds``, ``decrypt_seconds`` and ``error_bound`` (the worst-case CKKS bound,
  :func:`fedjax_med.secure.he_ckks.error_bound`; ``max_abs_error`` must stay below it). Needs
  ``pip install 'fedjax_med[he]'``; the key generation is not counted (once per run).

The ring has 32 bits, no client drops out. All parties run in this one process, one after the
other, so ``seconds`` is the total work of all clients and the server(s) for the round (the
encoding of floats into the ring included), not the latency of a deployed round, where the
clients work in parallel. ``bytes_per_client`` is the mean upload of a client over the whole
round (every protocol message), from the protocol's own message sizes. ``over_plaintext`` is
``seconds`` over the plaintext seconds at the same (n, d); ``max_abs_error`` is the largest
coordinate gap between the method's sum and the float64 sum of the inputs (quantisation only).
Each secure case runs once (it takes seconds to minutes, far above timer noise); plaintext is the
best of 3 calls.

Full SecAgg expands O(n^2 d) mask words and shares O(n^2) secrets of degree t: at n = 500 and
d = 1M that is about 250G words, far beyond this machine. Before a case runs, its seconds are
estimated from rates measured at start-up (PRG plus ring add per word, encoding per word, Shamir
Horner step, key agreement plus share encryption per pair) and its peak memory from the array
sizes; a case over ``--max-seconds-per-case`` or ``--max-gb`` is recorded as skipped with the
estimate, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_med.secure import additive, crypto, field, he_ckks, secagg, shamir

METHODS = ("plaintext", "secagg", "secagg_plus", "additive", "he_ckks")
CLIP = 1.0
BITS = 32
NUM_SERVERS = 2
# Bytes of live arrays per input coordinate, from the code paths: float32 input, float64 copy,
# uint64 ring rows, each client's uint64 copy, the server's stored masked inputs (secagg); float32
# input, float64 copy and one uint64 share per server (additive).
# he_ckks: float32 input and float64 copy; ciphertexts are built one client at a time.
MEMORY_BYTES_PER_WORD = {
    "plaintext": 4,
    "secagg": 36,
    "secagg_plus": 36,
    "additive": 28,
    "he_ckks": 12,
}


def neighbours_of(method: str, n: int) -> str | int:
    """ "all" for SecAgg, k = ceil(2 log2 n) for SecAgg+."""
    return "all" if method == "secagg" else max(1, math.ceil(2 * math.log2(n)))


def degree_and_threshold(method: str, n: int) -> tuple[int, int]:
    """Neighbours per client in the public graph and the Shamir threshold t used."""
    graph = secagg.neighbour_graph(range(n), neighbours_of(method, n))
    deg = len(graph[0])
    if method == "secagg":
        return deg, min(n, math.ceil(n / 2) + 1)
    return deg, min(deg + 1, math.ceil((deg + 1) / 2) + 1)


def he_rate(params: he_ckks.CKKSParameters) -> float:
    """Seconds per ciphertext of one client (encrypt, serialise, load and add at the server)."""
    holder = he_ckks.KeyHolder(params)
    ctx = he_ckks.public_context(holder.public_context)
    x = np.random.default_rng(0).uniform(-CLIP, CLIP, 4 * params.slots)
    server = he_ckks.AggregationServer(holder.public_context, 4)
    tic = time.perf_counter()
    server.receive(0, he_ckks.encrypt_update(ctx, x, params))
    return (time.perf_counter() - tic) / 4


def measure_rates(d: int = 200_000) -> dict[str, float]:
    """Seconds per unit of the operations that dominate a secure round (best of 3)."""
    seed, y = bytes(32), np.zeros(d, np.uint64)
    enc = field.FieldEncoder(CLIP, 100, BITS)
    x = np.random.default_rng(0).uniform(-CLIP, CLIP, d).astype(np.float32)
    k1, k2 = crypto.generate_private_key(), crypto.generate_private_key()
    pk = crypto.public_bytes(k2)

    def best(fn, reps=3):
        out = []
        for _ in range(reps):
            tic = time.perf_counter()
            fn()
            out.append(time.perf_counter() - tic)
        return min(out)

    def pair():
        for _ in range(50):
            key = crypto.agree(k1, pk, b"bench")
            crypto.decrypt(key, crypto.encrypt(key, bytes(200), b"ad"), b"ad")
            crypto.agree(k1, pk, b"bench")
            crypto.agree(k1, pk, b"bench")

    return {
        "word": best(lambda: field.add(y, crypto.prg(seed, d, BITS), BITS)) / d,
        "encode": best(lambda: enc.encode(x)) / d,
        "horner": best(lambda: shamir.share(bytes(32), 20, 40)) / (3 * 20 * 40),
        "pair": best(pair, 1) / 50,
    }


def estimate_seconds(method: str, n: int, d: int, rates: dict[str, float]) -> float:
    """Rough work of all parties for one round, from the measured unit rates."""
    if method == "plaintext":
        return n * d * 1e-9
    if method == "he_ckks":
        return (n + 1) * math.ceil(d / rates["he_slots"]) * rates["he_ciphertext"]
    if method == "additive":
        words = n * d * (2 * (NUM_SERVERS - 1) + NUM_SERVERS)
        return words * rates["word"] + n * d * rates["encode"]
    deg, t = degree_and_threshold(method, n)
    # Client: self mask + deg pairwise masks; server: n adds + n self masks.
    words = d * (n * (deg + 1) + 2 * n)
    # Two secrets of 3 chunks each shared among deg + 1 holders; n reconstructions of O(t^2).
    horner = n * 6 * (deg + 1) * t + n * 2 * t * t
    return (
        words * rates["word"]
        + n * d * rates["encode"]
        + horner * rates["horner"]
        + n * deg * rates["pair"]
    )


def run_he_case(x: np.ndarray, params: he_ckks.CKKSParameters) -> tuple[float, np.ndarray, dict]:
    """(seconds, sum, row fields) of one CKKS round; key generation is outside the timing."""
    n, d = x.shape
    holder = he_ckks.KeyHolder(params)
    tic = time.perf_counter()
    total, stats = he_ckks.secure_sum(x, clip=CLIP, key_holder=holder)
    seconds = time.perf_counter() - tic
    fields = {
        "bytes_per_client": stats.mean_bytes_sent,
        "ciphertexts_per_client": params.num_ciphertexts(d),
        "poly_modulus_degree": params.poly_modulus_degree,
        "encrypt_seconds_per_client": stats.seconds["encrypt"],
        "aggregate_seconds": stats.seconds["aggregate"],
        "decrypt_seconds": stats.seconds["decrypt"],
        "error_bound": he_ckks.error_bound(params, n, CLIP),
    }
    return seconds, total, fields


def run_case(method: str, x: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(seconds, the method's sum, mean upload bytes per client) of one round on x (n, d)."""
    n, d = x.shape
    tic = time.perf_counter()
    if method == "plaintext":
        total = np.sum(x, axis=0)
        return time.perf_counter() - tic, total, 4.0 * d
    if method == "additive":
        total, stats = additive.secure_sum(x, clip=CLIP, num_servers=NUM_SERVERS, bits=BITS)
        seconds = time.perf_counter() - tic
        return seconds, total, stats.mean_bytes_sent
    _, t = degree_and_threshold(method, n)
    total, stats = secagg.secure_sum(
        x, clip=CLIP, threshold=t, neighbours=neighbours_of(method, n), bits=BITS
    )
    seconds = time.perf_counter() - tic
    if len(stats.survivors) != n:
        raise AssertionError(f"{method}: {len(stats.survivors)} survivors, expected {n}")
    return seconds, total, stats.mean_bytes_sent


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rates = measure_rates(1000 if args.quick else 200_000)
    he_params = he_ckks.CKKSParameters(args.he_poly_modulus_degree)
    if "he_ckks" in args.methods:
        rates.update(he_ciphertext=he_rate(he_params), he_slots=he_params.slots)
    print("unit rates (s): " + ", ".join(f"{k}={v:.3g}" for k, v in rates.items()), flush=True)
    rows = []
    for n in args.clients:
        for d in args.params:
            x = np.random.default_rng([n, d]).uniform(-CLIP, CLIP, (n, d)).astype(np.float32)
            exact = np.sum(x, axis=0, dtype=np.float64)
            # The baseline is always measured; it is reported only when asked for.
            plain_s = min(run_case("plaintext", x)[0] for _ in range(3))
            for method in args.methods:
                row: dict[str, Any] = {"n": n, "params": d, "method": method}
                est = estimate_seconds(method, n, d, rates)
                gb = MEMORY_BYTES_PER_WORD[method] * n * d / 1e9
                reason = None
                if est > args.max_seconds_per_case:
                    reason = f"estimated {est:.0f} s > --max-seconds-per-case"
                elif gb > args.max_gb:
                    reason = f"estimated {gb:.1f} GB > --max-gb (estimated {est:.0f} s)"
                if reason:
                    row.update(
                        seconds=None,
                        bytes_per_client=None,
                        over_plaintext=None,
                        skipped=reason,
                        estimated_seconds=est,
                    )
                else:
                    extra: dict[str, Any] = {}
                    if method == "plaintext":
                        seconds, total, nbytes = plain_s, np.sum(x, axis=0), 4.0 * d
                    elif method == "he_ckks":
                        seconds, total, extra = run_he_case(x, he_params)
                        nbytes = extra["bytes_per_client"]
                    else:
                        seconds, total, nbytes = run_case(method, x)
                    row.update(
                        seconds=seconds,
                        bytes_per_client=nbytes,
                        over_plaintext=seconds / plain_s,
                        max_abs_error=float(np.max(np.abs(total - exact))),
                    )
                    row.update(extra)
                rows.append(row)
                print(format_row(row, d), flush=True)
            del x, exact
    return rows


def format_row(row: dict[str, Any], d: int) -> str:
    head = f"| {row['n']} | {row['params']:,} | {row['method']} |"
    if row.get("skipped"):
        return f"{head} skipped | | | | {row['skipped']} |"
    return (
        f"{head} {row['seconds']:.3f} | {row['over_plaintext']:.1f} | "
        f"{row['bytes_per_client'] / 1e6:.3f} | {row['bytes_per_client'] / (4 * d):.3f} | "
        f"{row['max_abs_error']:.2e} |"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--max-seconds-per-case",
        type=float,
        default=120.0,
        help="skip a case whose estimated seconds exceed this",
    )
    parser.add_argument(
        "--max-gb", type=float, default=8.0, help="skip a case whose estimated memory exceeds this"
    )
    parser.add_argument(
        "--he-poly-modulus-degree",
        type=int,
        default=4096,
        choices=he_ckks.POLY_MODULUS_DEGREES,
        help="CKKS ring degree N of he_ckks (N / 2 coordinates per ciphertext)",
    )
    parser.add_argument("--quick", action="store_true", help="n = 4, 6 and d = 1000: a smoke test")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params = [4, 6], [1000]
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    print(
        "| n | params | method | seconds (all parties) | x plaintext | upload MB/client "
        "| x plaintext bytes | max abs error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = run(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
