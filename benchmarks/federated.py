"""Examples/second of a federated round: client loop vs vectorised cohort vs centralized SGD.

Run from the repository root::

  python benchmarks/federated.py --federation-1000 --json runs/bench/federated.json  # full
  python benchmarks/federated.py --quick                                            # seconds

For each cohort size ``K`` (default 8, 64, 256 clients per round), the small CNN on 32x32x1
images, 10 classes, every client holding 64 examples and taking ``S = 5`` local SGD steps of
batch ``B = 32`` (:func:`fedjax_med.federated.client.make_local_update`, plain SGD, lr 0.1):

* ``loop``: a Python loop over the ``K`` clients calling one jitted local update
  (``for_each_client(..., backend="loop")``), the baseline;
* ``vmap``: the whole cohort as one jitted program (``backend="vmap"``); with several devices
  also ``sharded`` (the cohort split over a ``clients`` mesh);
* ``centralized``: the trainer's non-private jitted step
  (:func:`fedjax_med.trainers.central.make_train_step`, mean loss, SGD) taken ``K * S`` times
  on batches of ``B`` drawn in turn from the same ``K * 64`` examples, i.e. the same number of
  SGD steps of the same batch size as all clients together (``K * S * B`` examples).

Every variant processes ``K * S * B`` training examples per call. After one untimed call
(compilation), the variants are interleaved (one call of each, in rotating order, then the next
repetition) because the machine may be shared, and each number is the median of ``--repeats``
calls. Printed: examples/second, ``vmap / loop`` and ``vmap / centralized`` (CPU targets at
``K = 64``: >= 1.0 and >= 0.8), the fastest backend measured and its speed over centralized
(``best_over_centralized``, target >= 0.9 at ``K = 64``), the backend ``"auto"`` resolves to
(:func:`fedjax_med.federated.for_each_client.auto_backend`) and ``auto / loop``.

Memory: the process's peak resident set (``resource.getrusage``, a high-water mark that never
goes down) at the start and after every variant's first call, and how much each first call
raised it; a variant needing less than an earlier one raises it by 0. Device memory statistics
are added when ``jax.devices()[0].memory_stats()`` has them (not on CPU).

``--federation-1000`` then simulates a federation of 1,000 clients holding 32 examples each
(32x32x1 float32 on device, about 131 MB) and runs 3 rounds of
:func:`fedjax_med.federated.algorithms.fedavg` with ``UniformSampler(1000, 100, seed)`` on the
``"auto"`` backend, reporting seconds per round and the peak resident set (``--federation-only``
runs just this section, so the peak is its own). ``--unroll`` adds one
client's local loop as a rolled ``lax.scan`` against the fully unrolled one (the measurement
behind :func:`fedjax_med.federated.client.default_unroll`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med.federated import algorithms, sampling
from fedjax_med.federated import client as client_lib
from fedjax_med.federated import for_each_client as fec
from fedjax_med.models import registry
from fedjax_med.trainers import central
from fedjax_med.training import state as state_lib

TARGET_K = "64"
TARGETS = {"vmap_over_loop": 1.0, "vmap_over_centralized": 0.8}  # CPU, at K = 64
BEST_TARGET = 0.9  # the fastest backend / centralized, at K = 64 on every device
NUM_CLASSES = 10
CLIENT_LR = 0.1


@dataclasses.dataclass(frozen=True)
class Setting:
    """Shapes of one benchmark run."""

    clients: tuple[int, ...] = (8, 64, 256)
    local_steps: int = 5
    batch_size: int = 32
    examples_per_client: int = 64
    image_size: int = 32
    model: str = "small_cnn"
    # --federation-1000
    federation_clients: int = 1000
    federation_cohort: int = 100
    federation_examples: int = 32
    federation_rounds: int = 3


FULL = Setting()
QUICK = Setting(
    clients=(2, 4),
    local_steps=2,
    batch_size=4,
    examples_per_client=8,
    image_size=16,
    federation_clients=20,
    federation_cohort=4,
    federation_examples=4,
    federation_rounds=2,
)


# ----------------------------------------------------------------------------------------------
# Measurement helpers


def peak_rss_mb() -> float:
    """The process's peak resident set so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """The process's resident set now, in MiB (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def device_memory() -> dict[str, Any] | None:
    """``memory_stats()`` of the first device (bytes), or ``None`` where it has none (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def timed_call(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleaved_median(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant, one call of each per repetition, order rotating."""
    names = list(calls)
    seconds = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timed_call(calls[name]))
    return {name: statistics.median(s) for name, s in seconds.items()}


def random_clients(num_clients: int, examples: int, size: int, seed: int):
    """Gaussian images and uniform labels, every client full (no padding rows)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num_clients, examples, size, size, 1)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(num_clients, examples)).astype(np.int32)
    mask = np.ones((num_clients, examples), bool)
    counts = np.full((num_clients,), examples, np.int32)
    return client_lib.client_data(images, labels, mask, counts)


def make_centralized(step: Callable, params: Any, data: client_lib.ClientData, setting: Setting):
    """``run()``: ``K * S`` trainer steps of batch ``B`` over the cohort's pooled examples.

    ``step`` is :func:`fedjax_med.trainers.central.make_train_step` with plain SGD.
    """
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optax.sgd(CLIENT_LR).init(params),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    pooled_images = np.asarray(data.images).reshape(-1, *data.images.shape[2:])
    pooled_labels = np.asarray(data.labels).reshape(-1)
    num_steps = data.num_clients * setting.local_steps
    rows = np.arange(num_steps * setting.batch_size) % pooled_images.shape[0]
    rows = rows.reshape(num_steps, setting.batch_size)
    # Batches already on device, as a data pipeline with prefetching would hand them over.
    batches = [(jnp.asarray(pooled_images[r]), jnp.asarray(pooled_labels[r])) for r in rows]

    def run():
        s = state
        for images, labels in batches:
            s, _ = step(s, images, labels)
        return s.params

    return run


# ----------------------------------------------------------------------------------------------
# Sections


def bench_cohorts(setting: Setting, repeats: int) -> dict[str, Any]:
    """Examples/second, ratios and memory of every variant for each ``K`` (printed as it goes)."""
    shape = (setting.image_size, setting.image_size, 1)
    model = registry.get_model(setting.model, input_shape=shape, num_outputs=NUM_CLASSES)
    params = model.init(jax.random.key(0))
    update = client_lib.make_local_update(
        model.apply,
        "multiclass",
        local_steps=setting.local_steps,
        batch_size=setting.batch_size,
        client_lr=CLIENT_LR,
    )
    backends = ["loop", "vmap"] + (["sharded"] if jax.device_count() > 1 else [])
    # Built once: the loop backend's single-client program and the centralized step have the
    # same shapes for every K, so they compile once.
    runners = {}
    for backend in backends:
        run = fec.for_each_client(update, backend=backend)
        runners[backend] = run if backend == "loop" else jax.jit(run)
    central_step = central.make_train_step(model.apply, optax.sgd(CLIENT_LR), "multiclass")
    auto = fec.auto_backend()
    out = {
        "examples_per_second": {},
        "seconds_per_call": {},
        "compile_seconds": {},
        "vmap_over_loop": {},
        "vmap_over_centralized": {},
        "best_backend": {},
        "best_over_centralized": {},
        "auto_over_loop": {},
        "rss_after_first_call_mb": {},
        "rss_raised_mb": {},
    }
    print(
        f"\n== cohorts: {setting.model} {'x'.join(map(str, shape))}, S={setting.local_steps} "
        f"local steps x batch {setting.batch_size}, {setting.examples_per_client} examples per "
        f"client; auto backend here: {auto}"
    )
    print(
        f"   {'K':>4} {'variant':<12} {'ex/s':>9} {'s/call':>8} {'compile s':>9} "
        f"{'peak RSS MB':>11} {'raised MB':>9}"
    )
    for k in setting.clients:
        key = str(k)
        data = random_clients(k, setting.examples_per_client, setting.image_size, seed=k)
        keys = jax.random.split(jax.random.key(1), k)
        args = (params, data.images, data.labels, data.mask, data.counts, keys)
        calls = {b: functools.partial(runners[b], *args) for b in backends}
        calls["centralized"] = make_centralized(central_step, params, data, setting)
        examples = k * setting.local_steps * setting.batch_size
        compile_s, rss, raised = {}, {}, {}
        for name, call in calls.items():
            before = peak_rss_mb()
            compile_s[name] = timed_call(call)
            rss[name] = peak_rss_mb()
            raised[name] = rss[name] - before
        seconds = interleaved_median(calls, repeats)
        speed = {name: examples / s for name, s in seconds.items()}
        for name in calls:
            print(
                f"   {k:>4} {name:<12} {speed[name]:9.0f} {seconds[name]:8.3f} "
                f"{compile_s[name]:9.2f} {rss[name]:11.0f} {raised[name]:9.0f}"
            )
        best = max(backends, key=lambda b: speed[b])
        out["examples_per_second"][key] = speed
        out["seconds_per_call"][key] = seconds
        out["compile_seconds"][key] = compile_s
        out["vmap_over_loop"][key] = speed["vmap"] / speed["loop"]
        out["vmap_over_centralized"][key] = speed["vmap"] / speed["centralized"]
        out["best_backend"][key] = best
        out["best_over_centralized"][key] = speed[best] / speed["centralized"]
        out["auto_over_loop"][key] = speed[auto] / speed["loop"]
        out["rss_after_first_call_mb"][key] = rss
        out["rss_raised_mb"][key] = raised
        print(
            f"        vmap/loop {out['vmap_over_loop'][key]:.2f}  "
            f"vmap/centralized {out['vmap_over_centralized'][key]:.2f}  "
            f"best backend {best} ({out['best_over_centralized'][key]:.2f}x centralized)  "
            f"auto={auto}: auto/loop {out['auto_over_loop'][key]:.2f}"
        )
    out["auto_backend"] = auto
    out["examples_per_call"] = {
        str(k): k * setting.local_steps * setting.batch_size for k in setting.clients
    }
    return out


def bench_federation(setting: Setting, seed: int = 0) -> dict[str, Any]:
    """Rounds of FedAvg over ``federation_clients`` clients, ``federation_cohort`` per round."""
    shape = (setting.image_size, setting.image_size, 1)
    n, c = setting.federation_clients, setting.federation_cohort
    print(
        f"\n== federation: {n} clients x {setting.federation_examples} examples "
        f"({'x'.join(map(str, shape))} float32), {c} per round, FedAvg, backend auto "
        f"({fec.auto_backend()})"
    )
    rss_start = peak_rss_mb()
    t0 = time.perf_counter()
    data = random_clients(n, setting.federation_examples, setting.image_size, seed=seed)
    jax.block_until_ready(data.images)
    build_s = time.perf_counter() - t0
    model = registry.get_model(setting.model, input_shape=shape, num_outputs=NUM_CLASSES)
    update = client_lib.make_local_update(
        model.apply,
        "multiclass",
        local_steps=setting.local_steps,
        batch_size=min(setting.batch_size, setting.federation_examples),
        client_lr=CLIENT_LR,
    )
    algorithm = algorithms.fedavg(update, data, options=algorithms.RoundOptions(backend="auto"))
    sampler = sampling.UniformSampler(n, c, seed)
    state = algorithm.init(model.init(jax.random.key(seed)), jax.random.key(seed + 1))
    round_seconds = []
    for t in range(setting.federation_rounds):
        t0 = time.perf_counter()
        state, metrics = algorithm.apply_round(state, sampler.sample(t))
        jax.block_until_ready(state.params)
        round_seconds.append(time.perf_counter() - t0)
        print(
            f"   round {t}: {round_seconds[-1]:6.2f} s  clients {int(metrics['num_clients'])}  "
            f"RSS now {current_rss_mb() or float('nan'):.0f} MB, peak {peak_rss_mb():.0f} MB"
        )
    # Round 0 includes compilation.
    steady = round_seconds[1:] or round_seconds
    out = {
        "num_clients": n,
        "clients_per_round": c,
        "examples_per_client": setting.federation_examples,
        "data_mb": data.images.nbytes / 2**20,
        "build_seconds": build_s,
        "round_seconds": round_seconds,
        "seconds_per_round_after_first": statistics.mean(steady),
        "rss_before_mb": rss_start,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_mb": current_rss_mb(),
        "backend": fec.auto_backend(),
        "device_memory": device_memory(),
    }
    print(
        f"   images on device {out['data_mb']:.0f} MB (built in {build_s:.1f} s); "
        f"{out['seconds_per_round_after_first']:.2f} s/round after the first; "
        f"peak RSS {out['peak_rss_mb']:.0f} MB (process-wide: includes earlier sections)"
    )
    return out


def bench_unroll(setting: Setting, repeats: int) -> dict[str, float]:
    """One client's local loop, rolled ``lax.scan`` (``unroll=1``) vs fully unrolled."""
    shape = (setting.image_size, setting.image_size, 1)
    model = registry.get_model(setting.model, input_shape=shape, num_outputs=NUM_CLASSES)
    params = model.init(jax.random.key(0))
    one = random_clients(1, setting.examples_per_client, setting.image_size, seed=0)
    args = (params, one.images[0], one.labels[0], one.mask[0], one.counts[0], jax.random.key(1))
    calls = {}
    for name, unroll in (("rolled", 1), ("unrolled", True)):
        update = client_lib.make_local_update(
            model.apply,
            "multiclass",
            local_steps=setting.local_steps,
            batch_size=setting.batch_size,
            client_lr=CLIENT_LR,
            unroll=unroll,
        )
        calls[name] = functools.partial(jax.jit(update), *args)
        timed_call(calls[name])
    seconds = interleaved_median(calls, repeats)
    examples = setting.local_steps * setting.batch_size
    speed = {name: examples / s for name, s in seconds.items()}
    print("\n== one client's local loop")
    for name, value in speed.items():
        print(f"   {name:<9} {value:9.0f} ex/s  {seconds[name] * 1e3:8.1f} ms")
    return speed


# ----------------------------------------------------------------------------------------------
# Driver


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="K per round")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls (default 3, quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument(
        "--federation-1000", action="store_true", help="also run 1000 clients, 100 per round"
    )
    parser.add_argument(
        "--federation-only", action="store_true", help="only the federation (own peak RSS)"
    )
    parser.add_argument("--unroll", action="store_true", help="also time rolled vs unrolled")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    args.federation_1000 = args.federation_1000 or args.federation_only
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    if args.clients is not None and min(args.clients) < 1:
        parser.error(f"--clients={args.clients} must all be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setting = QUICK if args.quick else FULL
    if args.clients is not None:
        setting = dataclasses.replace(setting, clients=tuple(args.clients))
    info = device_info()
    print(
        f"{info['cpu_count']} CPUs, JAX {info['jax']} on {info['platform']} "
        f"({info['device_kind']}, {info['num_devices']} device(s)); median of {args.repeats} "
        "interleaved calls after one compile call"
    )
    rss_start = peak_rss_mb()
    if args.federation_only:
        out = {"federation": bench_federation(setting), "device": info}
        if args.json:
            write_json(args.json, out)
        return out
    cohorts = bench_cohorts(setting, args.repeats)
    rss_after = cohorts.pop("rss_after_first_call_mb")
    rss_raised = cohorts.pop("rss_raised_mb")
    out = {
        "vmap_over_centralized": cohorts.pop("vmap_over_centralized"),
        "vmap_over_loop": cohorts.pop("vmap_over_loop"),
        "examples_per_second": cohorts.pop("examples_per_second"),
        **cohorts,
        "peak_memory": {
            "rss_start_mb": rss_start,
            "rss_peak_mb": peak_rss_mb(),
            "rss_after_first_call_mb": rss_after,
            "rss_raised_mb": rss_raised,
            "device": device_memory(),
        },
        "targets": {"K": TARGET_K, **TARGETS, "best_over_centralized": BEST_TARGET},
        "setting": dataclasses.asdict(setting),
        "repeats": args.repeats,
        "quick": args.quick,
        "device": info,
        "command": " ".join(
            ["python", "benchmarks/federated.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    if TARGET_K in out["vmap_over_loop"]:
        for name, target in TARGETS.items():
            value = out[name][TARGET_K]
            verdict = "meets" if value >= target else "misses"
            print(f"   K={TARGET_K} {name} {value:.2f} {verdict} the CPU target >= {target}")
        best = out["best_over_centralized"][TARGET_K]
        verdict = "meets" if best >= BEST_TARGET else "misses"
        print(
            f"   K={TARGET_K} fastest backend ({out['best_backend'][TARGET_K]}) / centralized "
            f"{best:.2f} {verdict} the target >= {BEST_TARGET}"
        )
    if args.unroll:
        out["unroll_examples_per_second"] = bench_unroll(setting, args.repeats)
    if args.federation_1000:
        out["federation"] = bench_federation(setting)
    if args.json:
        write_json(args.json, out)
    return out


def write_json(path: str, out: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
