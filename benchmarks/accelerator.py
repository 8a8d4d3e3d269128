"""One accelerator benchmark: DP-SGD steps, federated rounds and a 10,000-client federation.

Run from the repository root on a machine with one GPU (about 5 minutes)::

  pip install -e ".[cuda12]"
  python benchmarks/accelerator.py --json runs/bench/accelerator.json

  python benchmarks/accelerator.py --tiny --json /tmp/accelerator.json   # CPU, seconds

Sections (each reuses the measurement code of ``benchmarks/dp_sgd.py`` and
``benchmarks/federated.py``, so the numbers mean the same as theirs):

* ``dp_sgd``: for ``small_cnn`` (28x28x1) and ``resnet_gn`` (64x64x3) at batch sizes 64, 256
  and 1024, examples/second of the trainer's non-private step and of its DP-SGD step with
  ``vmap`` and ``ghost`` clipping (:func:`dp_sgd.jax_steps`, interleaved medians of
  :func:`dp_sgd.measure`), ``dp_over_nonprivate`` (best DP / non-private; accelerator goal
  >= 0.8) and the device's peak memory after each variant's first calls
  (``memory_stats()["peak_bytes_in_use"]``, a process-wide high-water mark: variants run from the
  least to the most memory-hungry, so each peak is the most that variant or an earlier one
  needed; ``None`` where the device has no statistics, e.g. CPU);
* ``federated``: K = 64, 256 and 1024 clients per round, the ``vmap`` (and, with several
  devices, ``sharded``) cohort against the ``loop`` backend and centralized SGD on the same
  examples (:func:`federated.bench_cohorts`; goals at K = 64: vmap/loop >= 5 and
  vmap/centralized >= 0.9);
* ``federation``: 10,000 clients holding 32 examples each, 1,000 sampled per round, FedAvg on
  the ``"auto"`` backend (:func:`federated.bench_federation`): seconds per round and memory.

Everything goes into one JSON (``--json``); ``--tiny`` shrinks every size so that the whole
script runs on a CPU in seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
# Least to most device memory, so that each high-water mark is attributable.
DP_ORDER = ("jax_nonprivate", "jax_dp_ghost", "jax_dp_vmap")
SECTIONS = ("dp_sgd", "federated", "federation")
GOALS = {
    "dp_over_nonprivate": 0.8,
    "vmap_over_loop_at_64": 5.0,
    "vmap_over_centralized_at_64": 0.9,
}


def _load(name: str):
    """The sibling benchmark script ``benchmarks/<name>.py`` as a module."""
    full = f"_bench_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


dp_bench = _load("dp_sgd")
fed_bench = _load("federated")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    dp_models: tuple[str, ...] = ("cnn", "resnet")
    dp_batch_sizes: tuple[int, ...] = (64, 256, 1024)
    dp_repeats: int = 3
    dp_min_time: float = 0.3
    federated: Any = dataclasses.field(
        default_factory=lambda: dataclasses.replace(
            fed_bench.FULL,
            clients=(64, 256, 1024),
            federation_clients=10_000,
            federation_cohort=1_000,
            federation_examples=32,
            federation_rounds=3,
        )
    )
    federated_repeats: int = 2


FULL = Plan()
# --tiny: one small model and batch, two clients; compiling dominates.
TINY = Plan(
    dp_models=("cnn",),
    dp_batch_sizes=(2,),
    dp_repeats=1,
    dp_min_time=0.0,
    federated=dataclasses.replace(
        fed_bench.QUICK, clients=(2,), federation_clients=8, federation_rounds=2
    ),
    federated_repeats=1,
)


def dp_setting(name: str, batch_size: int, tiny: bool):
    settings = dp_bench.QUICK_SETTINGS if tiny else dp_bench.SETTINGS
    return dataclasses.replace(settings[name], batch_size=batch_size)


def bench_dp(plan: Plan, tiny: bool) -> dict[str, Any]:
    """Examples/second and peak device memory of the three JAX step variants per model and batch."""
    out: dict[str, Any] = {}
    for name in plan.dp_models:
        out[name] = {}
        for batch_size in plan.dp_batch_sizes:
            setting = dp_setting(name, batch_size, tiny)
            rng = np.random.default_rng(0)
            images = rng.standard_normal((batch_size, *setting.input_shape), dtype=np.float32)
            labels = rng.integers(0, setting.num_classes, batch_size).astype(np.int32)
            steps, num_params = dp_bench.jax_steps(setting, images, labels)
            steps = {k: steps[k] for k in DP_ORDER}
            peak, compile_s = {}, {}
            for variant, step in steps.items():
                t0 = time.perf_counter()
                step()  # compiles
                compile_s[variant] = time.perf_counter() - t0
                memory = fed_bench.device_memory()
                peak[variant] = memory.get("peak_bytes_in_use") if memory else None
            samples = dp_bench.measure(steps, batch_size, plan.dp_repeats, plan.dp_min_time)
            speed = {k: statistics.median(v) for k, v in samples.items()}
            best_dp = max(speed["jax_dp_vmap"], speed["jax_dp_ghost"])
            out[name][str(batch_size)] = {
                "examples_per_second": speed,
                "examples_per_second_range": {k: [min(v), max(v)] for k, v in samples.items()},
                "dp_over_nonprivate": best_dp / speed["jax_nonprivate"],
                "peak_device_bytes": peak,
                "first_call_seconds": compile_s,
                "num_params": num_params,
                "input_shape": list(setting.input_shape),
            }
            print(
                f"   dp_sgd {name:<6} batch {batch_size:>5}: "
                + "  ".join(f"{k} {v:9.1f} ex/s" for k, v in speed.items())
                + f"  DP/non-private {out[name][str(batch_size)]['dp_over_nonprivate']:.2f}"
            )
    return out


def summary(out: dict[str, Any]) -> dict[str, Any]:
    """The goal ratios of the run: best DP / non-private per model and batch, and K = 64."""
    dp = {
        f"{model}_{batch}": result["dp_over_nonprivate"]
        for model, by_batch in out["dp_sgd"].items()
        for batch, result in by_batch.items()
    }
    cohorts = out["federated"]
    k = "64" if "64" in cohorts["vmap_over_loop"] else min(cohorts["vmap_over_loop"], key=int)
    return {
        "dp_over_nonprivate": dp,
        "K": k,
        "vmap_over_loop": cohorts["vmap_over_loop"][k],
        "vmap_over_centralized": cohorts["vmap_over_centralized"][k],
        "goals": GOALS,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    parser.add_argument(
        "--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def _check_finite(tree: Any, path: str = "") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_finite(v, f"{path}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _check_finite(v, f"{path}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise RuntimeError(f"non-finite value at {path}: {tree}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    plan = TINY if args.tiny else FULL
    info = dp_bench.device_info(False)
    print(
        f"JAX {info['jax']} on {info['platform']} ({info['device_kind']}, "
        f"{info['num_devices']} device(s)); {'tiny sizes' if args.tiny else 'full sizes'}"
    )
    start = time.perf_counter()
    out: dict[str, Any] = {"device": info, "tiny": args.tiny}
    if "dp_sgd" not in args.skip:
        print("\n== DP-SGD steps")
        out["dp_sgd"] = bench_dp(plan, args.tiny)
    if "federated" not in args.skip:
        out["federated"] = fed_bench.bench_cohorts(plan.federated, plan.federated_repeats)
    if "federation" not in args.skip:
        out["federation"] = fed_bench.bench_federation(plan.federated)
    if "dp_sgd" in out and "federated" in out:
        out["summary"] = summary(out)
    out["device_memory_end"] = fed_bench.device_memory()
    out["seconds"] = time.perf_counter() - start
    out["plan"] = {
        "dp_models": list(plan.dp_models),
        "dp_batch_sizes": list(plan.dp_batch_sizes),
        "dp_repeats": plan.dp_repeats,
        "dp_min_time_s": plan.dp_min_time,
        "federated": dataclasses.asdict(plan.federated),
        "federated_repeats": plan.federated_repeats,
    }
    out["command"] = " ".join(
        ["python", "benchmarks/accelerator.py", *(sys.argv[1:] if argv is None else argv)]
    )
    _check_finite(out)
    print(f"\nwhole run: {out['seconds']:.0f} s")
    if args.json:
        fed_bench.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
