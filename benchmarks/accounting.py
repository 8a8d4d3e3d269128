"""Seconds of noise calibration (RDP and PLD, Poisson and shuffle) and of the SecAgg mask PRG.

Run from the repository root::

  python benchmarks/accounting.py --json runs/bench/accounting.json  # full (about a minute)
  python benchmarks/accounting.py --quick                            # seconds

Calibration: :func:`fedjax_med.privacy.accounting.calibrate_noise_multiplier` for every setting
(dataset size ``N``, batch ``b``, steps ``T``, target epsilon, ``delta = 1e-5``) in each mode:

* ``poisson``: ``PoissonSampledDpEvent(b / N, GaussianDpEvent(sigma))``, add/remove one
  (Abadi et al. 2016, https://arxiv.org/abs/1607.00133), with ``rdp`` and ``pld``;
* ``shuffle``: ``SampledWithoutReplacementDpEvent(N, b, GaussianDpEvent(sigma))``, replace one,
  sigma relative to the sensitivity ``2 C`` (Wang et al. 2019, https://arxiv.org/abs/1808.00087),
  with ``rdp``; ``pld`` has no such event in dp_accounting and is recorded as unsupported.

The epsilon cache is cleared before every call, so each is a cold calibration; ``evaluations``
counts the accountant runs it needed (cache misses) and ``epsilon`` is the epsilon reached.
Each case runs ``--repeats`` times and reports the median and the minimum seconds.

PRG: :func:`fedjax_med.secure.crypto.prg` expanding one 32-byte seed into a million words of 32
and of 64 bits (AES-256-CTR), the median and minimum of ``--prg-repeats`` calls, and ns per word.

The tests assert work counts, never seconds; this script is where the seconds are measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from fedjax_med.privacy import accounting
from fedjax_med.secure import crypto

DELTA = 1e-5
PRG_WORDS = 1_000_000


@dataclasses.dataclass(frozen=True)
class Setting:
    """One DP-SGD run to calibrate: ``N`` units, batches of ``b``, ``T`` steps, a target."""

    name: str
    num_examples: int
    batch_size: int
    steps: int
    target_epsilon: float


SETTINGS = (
    Setting("q0.01_T1000_eps2", 10_000, 100, 1000, 2.0),
    Setting("q0.01_T400_eps8", 10_000, 100, 400, 8.0),
    Setting("mnist_b256_T1000_eps1", 60_000, 256, 1000, 1.0),
)
QUICK_SETTINGS = (Setting("q0.01_T400_eps8", 10_000, 100, 400, 8.0),)
MODES = (("poisson", "rdp"), ("poisson", "pld"), ("shuffle", "rdp"), ("shuffle", "pld"))


def calibrate_once(setting: Setting, sampling: str, accountant: str) -> dict[str, Any]:
    """One cold calibration: seconds, sigma, epsilon reached and accountant evaluations."""
    q = setting.batch_size / setting.num_examples
    kwargs = {"sampling": sampling}
    if sampling == "shuffle":
        kwargs.update(num_examples=setting.num_examples, batch_size=setting.batch_size)
    accounting.clear_cache()
    start = time.perf_counter()
    sigma = accounting.calibrate_noise_multiplier(
        setting.target_epsilon, q, setting.steps, DELTA, accountant, **kwargs
    )
    seconds = time.perf_counter() - start
    evaluations = accounting._epsilon.cache_info().misses  # noqa: SLF001 - benchmark only
    event = accounting.dpsgd_event(
        sigma, q, setting.steps, sampling, kwargs.get("num_examples"), kwargs.get("batch_size")
    )
    eps = accounting.epsilon(event, DELTA, accountant)
    return {"seconds": seconds, "sigma": sigma, "epsilon": eps, "evaluations": evaluations}


def run_calibration(settings: Sequence[Setting], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for setting in settings:
        for sampling, accountant in MODES:
            row: dict[str, Any] = {
                **dataclasses.asdict(setting),
                "sampling": sampling,
                "accountant": accountant,
            }
            try:
                accounting.check_supported(accountant, sampling)
            except ValueError as e:
                rows.append({**row, "unsupported": str(e)})
                print_calibration_row(rows[-1])
                continue
            runs = [calibrate_once(setting, sampling, accountant) for _ in range(repeats)]
            seconds = [r["seconds"] for r in runs]
            row.update(
                seconds_median=statistics.median(seconds),
                seconds_min=min(seconds),
                sigma=runs[0]["sigma"],
                epsilon=runs[0]["epsilon"],
                evaluations=runs[0]["evaluations"],
            )
            rows.append(row)
            print_calibration_row(row)
    return rows


def print_calibration_row(row: dict[str, Any]) -> None:
    head = f"| {row['name']} | {row['sampling']} | {row['accountant']} |"
    if "unsupported" in row:
        print(f"{head} unsupported | | | | |")
        return
    print(
        f"{head} {row['seconds_median']:.3f} | {row['seconds_min']:.3f} | {row['sigma']:.4f} "
        f"| {row['epsilon']:.4f} | {row['evaluations']} |"
    )


def run_prg(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for bits in (32, 64):
        crypto.prg(bytes(32), PRG_WORDS, bits)  # warm-up (allocator, OpenSSL context)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            crypto.prg(bytes(32), PRG_WORDS, bits)
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        rows.append(
            {
                "words": PRG_WORDS,
                "bits": bits,
                "seconds_median": median,
                "seconds_min": min(seconds),
                "ns_per_word": 1e9 * median / PRG_WORDS,
            }
        )
        r = rows[-1]
        print(
            f"| {PRG_WORDS:,} | {bits} | {r['seconds_median'] * 1e3:.2f} "
            f"| {r['seconds_min'] * 1e3:.2f} | {r['ns_per_word']:.2f} |"
        )
    return rows


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("dp-accounting", "numpy", "scipy", "cryptography"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            out[package] = "not installed"
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="per case (default 3, quick 1)")
    parser.add_argument(
        "--prg-repeats", type=int, default=None, help="PRG calls (default 20, quick 3)"
    )
    parser.add_argument("--quick", action="store_true", help="one setting, one repeat")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.prg_repeats is None:
        args.prg_repeats = 3 if args.quick else 20
    for name in ("repeats", "prg_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    print(f"{info['cpu_count']} CPUs ({info['processor']}); {versions()}")
    print(f"\nCalibration (delta = {DELTA:g}; median and min of {args.repeats} cold calls):\n")
    print("| setting | sampling | accountant | median s | min s | sigma | epsilon | evaluations |")
    print("|---|---|---|---|---|---|---|---|")
    calibration = run_calibration(QUICK_SETTINGS if args.quick else SETTINGS, args.repeats)
    print(f"\nMask PRG (AES-256-CTR; median and min of {args.prg_repeats} calls):\n")
    print("| words | bits | median ms | min ms | ns/word |")
    print("|---|---|---|---|---|")
    prg = run_prg(args.prg_repeats)
    out = {
        "calibration": calibration,
        "prg": prg,
        "delta": DELTA,
        "repeats": args.repeats,
        "prg_repeats": args.prg_repeats,
        "quick": args.quick,
        "device": info,
        "versions": versions(),
        "command": " ".join(
            ["python", "benchmarks/accounting.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
