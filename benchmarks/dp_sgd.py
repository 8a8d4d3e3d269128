"""Examples/second of the DP-SGD step next to the non-private step, and next to Opacus.

Run from the repository root::

  python benchmarks/dp_sgd.py --json runs/bench/dp_sgd.json          # full settings
  python benchmarks/dp_sgd.py --quick --models cnn --no-opacus        # seconds, smoke test

Two settings, the same model and batch for every variant:

* ``cnn``: the small tanh CNN (``small_cnn``), 28x28x1 images, batch 256, 10 classes;
* ``resnet``: the pre-activation ResNet-18 layout with GroupNorm (``resnet_gn``, width 16),
  64x64x3 images, batch 64, 10 classes.

Variants, each one training step with plain SGD:

* ``jax_nonprivate``: the trainer's jitted non-private step
  (:func:`fedjax_med.trainers.central.make_train_step`, mean loss, one update);
* ``jax_dp_vmap`` / ``jax_dp_ghost``: the trainer's DP-SGD step, a jitted
  :func:`fedjax_med.privacy.clipping.clipped_grad_sum` (``method="vmap"`` or ``"ghost"``) then the
  jitted ``optax.chain(dp_aggregate(...), sgd)`` update of
  :func:`fedjax_med.trainers.dp_sgd.make_apply_fn`; the faster one is "our DP";
* with PyTorch and Opacus installed, JAX on CPU and no ``--no-opacus``: ``torch_nonprivate``,
  and Opacus DP-SGD in its hooks mode (``opacus_hooks``) and ghost clipping mode
  (``opacus_ghost``), on PyTorch modules written to match ours layer for layer (same parameter
  counts, printed); each PyTorch variant runs on CPU in the fastest of the NCHW and NHWC
  (``channels_last``) memory layouts with 1 or all CPU threads, chosen when it is set up.

The machine may be shared with other jobs, so the variants are interleaved (one repetition of
each, in rotating order, then the next round) and the median over ``--repeats`` rounds is
reported. Printed ratios (CPU targets of issue 19): best DP / non-private (>= 0.6 on both
models), our best DP / the best Opacus mode (>= 1.0) and our non-private / PyTorch's (>= 0.8).

Optional dependencies: ``pip install -e ".[bench]"`` (``opacus>=1.5``, ``torch>=2.3``). On a
machine where pip would pick the multi-GB CUDA build of torch, install the CPU wheel of torch
first (``pip install torch --index-url https://download.pytorch.org/whl/cpu``), then the extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med.models import losses, registry
from fedjax_med.models import resnet as resnet_lib
from fedjax_med.privacy import clipping, noise
from fedjax_med.trainers import central, dp_sgd
from fedjax_med.training import state as state_lib

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 0.05
TASK = "multiclass"
JAX_VARIANTS = ("jax_nonprivate", "jax_dp_vmap", "jax_dp_ghost")
TORCH_VARIANTS = ("torch_nonprivate", "opacus_hooks", "opacus_ghost")
TARGETS = {"cnn": 0.6, "resnet": 0.6}  # best DP / non-private
OPACUS_TARGET = 1.0  # our best DP / the best Opacus mode
TORCH_TARGET = 0.8  # our non-private / PyTorch's non-private


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmarked model and batch."""

    name: str
    model: str
    input_shape: tuple[int, int, int]
    batch_size: int
    num_classes: int = 10


SETTINGS = {
    "cnn": Setting("cnn", "small_cnn", (28, 28, 1), 256),
    "resnet": Setting("resnet", "resnet_gn", (64, 64, 3), 64),
}
# --quick: tiny batches and images, so that compiling dominates and the run takes seconds.
QUICK_SETTINGS = {
    "cnn": dataclasses.replace(SETTINGS["cnn"], batch_size=8),
    "resnet": dataclasses.replace(SETTINGS["resnet"], input_shape=(32, 32, 3), batch_size=4),
}


# ----------------------------------------------------------------------------------------------
# Timing


def measure(
    steps: dict[str, Callable[[], None]], batch_size: int, repeats: int, min_time: float
) -> dict[str, list[float]]:
    """Examples/second of each step function in every one of ``repeats`` interleaved rounds.

    Each function runs one training step and blocks until it is done. After two warm-up calls
    (the first compiles), a repetition of a variant is as many steps as fill ``min_time``
    seconds (at least one); round ``r`` runs one repetition of every variant, starting with
    variant ``r mod n``, so slow phases of a shared machine hit all variants alike.
    """
    per_rep = {}
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        step()
        per_rep[name] = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-9)))
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(per_rep[name]):
                steps[name]()
            samples[name].append(per_rep[name] * batch_size / (time.perf_counter() - start))
    return samples


# ----------------------------------------------------------------------------------------------
# JAX: the trainer's steps


def jax_steps(
    setting: Setting, images: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, Callable[[], None]], int]:
    """The three JAX step functions on one batch, and the model's parameter count."""
    model = registry.get_model(
        setting.model, input_shape=setting.input_shape, num_outputs=setting.num_classes
    )
    params = model.init(jax.random.key(0))
    x, y = jnp.asarray(images), jnp.asarray(labels)
    mask = jnp.ones((setting.batch_size,), bool)
    sgd = optax.sgd(LEARNING_RATE)

    def new_state(optimizer):
        return state_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(1)),
        )

    nonprivate = {"state": new_state(sgd)}
    train_step = central.make_train_step(model.apply, sgd, TASK)
    train_step = train_step.lower(nonprivate["state"], x, y).compile()

    def nonprivate_step():
        nonprivate["state"], metrics = train_step(nonprivate["state"], x, y)
        jax.block_until_ready((nonprivate["state"], metrics))

    nonprivate_step.xla_bytes = xla_buffer_bytes(train_step)
    steps = {"jax_nonprivate": nonprivate_step}
    loss_fn = losses.example_loss_fn(model.apply, TASK)
    dp_optimizer = optax.chain(
        noise.dp_aggregate(NOISE_MULTIPLIER, CLIP_NORM, float(setting.batch_size), 0), sgd
    )
    for method in ("vmap", "ghost"):
        holder = {"state": new_state(dp_optimizer)}
        grad_sum = jax.jit(clipping.clipped_grad_sum(loss_fn, clip_norm=CLIP_NORM, method=method))
        grad_sum = grad_sum.lower(holder["state"].params, x, y, mask).compile()
        total_shape = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
        apply_update = dp_sgd.make_apply_fn(dp_optimizer).lower(holder["state"], total_shape)
        apply_update = apply_update.compile()

        def dp_step(grad_sum=grad_sum, apply_update=apply_update, holder=holder):
            total, aux = grad_sum(holder["state"].params, x, y, mask)
            holder["state"] = apply_update(holder["state"], total)
            jax.block_until_ready((holder["state"], aux))

        # The two programs run one after the other: the step needs the larger of the two.
        dp_step.xla_bytes = max_or_none(xla_buffer_bytes(grad_sum), xla_buffer_bytes(apply_update))
        steps[f"jax_dp_{method}"] = dp_step
    return steps, model.num_params(params)


def xla_buffer_bytes(compiled: Any) -> int | None:
    """Bytes XLA's buffer assignment reserves for one call of a compiled program.

    Arguments + outputs + temporaries - aliased (donated) bytes, from
    ``compiled.memory_analysis()``: the program's planned peak, fixed at compile time. It is the
    honest per-variant figure on CPU, where ``memory_stats()`` does not exist and the process RSS
    is a high-water mark over every variant; it leaves out the runtime's own scratch memory
    (e.g. convolution workspaces). ``None`` where the backend reports no analysis.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def max_or_none(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


# ----------------------------------------------------------------------------------------------
# PyTorch / Opacus: the same architectures


def torch_available() -> bool:
    try:
        import opacus  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """``(low, high)`` padding of XLA's "SAME" (output ``ceil(size / stride)``, extra at high)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def torch_model(setting: Setting):
    """A ``torch.nn.Module`` matching the registered JAX model of ``setting`` layer for layer."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    height, width, channels = setting.input_shape

    class SmallCNN(nn.Module):
        # fedjax_med.models.cnn.SmallCNN: SAME conv 8x8/2 (16) -> tanh -> max_pool 2/1 -> VALID
        # conv 4x4/2 (32) -> tanh -> max_pool 2/1 -> dense 32 -> tanh -> dense.
        def __init__(self):
            super().__init__()
            (top, bottom), (left, right) = same_padding(height, 8, 2), same_padding(width, 8, 2)
            self.padding = (left, right, top, bottom)
            self.conv1 = nn.Conv2d(channels, 16, 8, stride=2)
            self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
            h = (-(-height // 2) - 1 - 4) // 2 + 1 - 1
            w = (-(-width // 2) - 1 - 4) // 2 + 1 - 1
            self.fc1 = nn.Linear(32 * h * w, 32)
            self.fc2 = nn.Linear(32, setting.num_classes)

        def forward(self, x):
            x = F.max_pool2d(torch.tanh(self.conv1(F.pad(x, self.padding))), 2, stride=1)
            x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, stride=1)
            return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))

    def group_norm(c):
        # flax.linen.GroupNorm: affine, epsilon 1e-6; groups clamped as in resnet.group_count.
        return nn.GroupNorm(resnet_lib.group_count(c, 8), c, eps=1e-6)

    class PreActBlock(nn.Module):
        # fedjax_med.models.resnet.PreActBlock: bias-free convs with symmetric k // 2 padding.
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.norm1 = group_norm(c_in)
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
            self.norm2 = group_norm(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
            self.shortcut = None
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

        def forward(self, x):
            y = F.relu(self.norm1(x))
            shortcut = x if self.shortcut is None else self.shortcut(y)
            return shortcut + self.conv2(F.relu(self.norm2(self.conv1(y))))

    class PreActResNet18(nn.Module):
        # fedjax_med.models.resnet.resnet_gn defaults: 3x3 stem, stages (2, 2, 2, 2) of
        # 16, 32, 64, 128 channels, final GroupNorm + ReLU + global mean + dense.
        def __init__(self, base=16):
            super().__init__()
            self.stem = nn.Conv2d(channels, base, 3, padding=1, bias=False)
            blocks, c_in = [], base
            for stage in range(4):
                c_out = base * 2**stage
                for block in range(2):
                    blocks.append(PreActBlock(c_in, c_out, 2 if stage > 0 and block == 0 else 1))
                    c_in = c_out
            self.blocks = nn.Sequential(*blocks)
            self.final_norm = group_norm(c_in)
            self.head = nn.Linear(c_in, setting.num_classes)

        def forward(self, x):
            x = F.relu(self.final_norm(self.blocks(self.stem(x))))
            return self.head(x.mean(dim=(2, 3)))

    if setting.model == "small_cnn":
        return SmallCNN()
    if setting.model == "resnet_gn":
        return PreActResNet18()
    raise ValueError(f"no PyTorch version of model {setting.model!r}")


def torch_steps(
    setting: Setting, images: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, Callable[[], None]], int, dict[str, str], dict[str, str]]:
    """PyTorch non-private and Opacus step functions on one batch.

    Every variant is built in both memory layouts, NCHW ("contiguous") and NHWC
    ("channels_last", the layout of the JAX models), and with 1 or all CPU threads, and keeps the
    fastest of these four, so the comparison is with PyTorch at its best on this machine. (With
    other jobs on the machine, PyTorch's OpenMP threads can wait at barriers for a descheduled
    sibling, making a multi-threaded step many times slower than a single-threaded one.)

    Returns:
      ``(steps, num_params, configs, errors)``: step functions by variant name, the model's
      parameter count, the layout and thread count each variant kept, and the setup error of any
      Opacus mode that could not run.
    """
    import torch

    # Opacus warns about its non-secure RNG (our runs use a seeded key too) and about full
    # backward hooks on inputs that need no gradient; neither matters here.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(0)
    num_params = sum(p.numel() for p in torch_model(setting).parameters())
    thread_counts = sorted({1, os.cpu_count() or 1})
    steps, configs, errors = {}, {}, {}
    for variant in TORCH_VARIANTS:
        best = None
        try:
            for layout in ("contiguous", "channels_last"):
                for threads in thread_counts:
                    step = _torch_step(variant, setting, images, labels, layout, threads)
                    seconds = _seconds_per_step(step, best[0] if best else math.inf)
                    if best is None or seconds < best[0]:
                        best = (seconds, f"{layout}, {threads} thread(s)", step)
        except Exception as e:  # an Opacus version without the mode, or a layer it rejects
            errors[variant] = f"{type(e).__name__}: {e}"
            continue
        steps[variant], configs[variant] = best[2], best[1]
    return steps, num_params, configs, errors


def _seconds_per_step(step: Callable[[], None], best: float, calls: int = 2) -> float:
    """Fastest of ``calls`` timed steps after a warm-up; gives up early on a hopeless choice."""
    start = time.perf_counter()
    step()  # warm-up
    times = [time.perf_counter() - start]
    if times[0] > 4 * best:  # even a first call this slow will not beat the best choice
        return times[0]
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _torch_step(
    variant: str,
    setting: Setting,
    images: np.ndarray,
    labels: np.ndarray,
    layout: str,
    threads: int,
) -> Callable[[], None]:
    import opacus
    import torch

    memory_format = getattr(
        torch, "channels_last" if layout == "channels_last" else "contiguous_format"
    )
    model = torch_model(setting).to(memory_format=memory_format)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous(memory_format=memory_format)
    y = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    criterion = torch.nn.CrossEntropyLoss()
    if variant != "torch_nonprivate":
        mode = variant.removeprefix("opacus_")
        # Fixed batches (no Poisson sampling), so every variant sees the same batch; the loader
        # only tells Opacus the batch size.
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=setting.batch_size
        )
        made = opacus.PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=CLIP_NORM,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if mode == "ghost":  # also returns a criterion that runs both backward passes
            model, optimizer, criterion, _ = made
        else:
            model, optimizer, _ = made

    def step():
        torch.set_num_threads(threads)
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    return step


# ----------------------------------------------------------------------------------------------
# Driver


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(with_torch: bool) -> dict[str, Any]:
    import flax

    device = jax.devices()[0]
    info = {
        "date": datetime.date.today().isoformat(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": cpu_model(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }
    if with_torch:
        import opacus
        import torch

        info.update(torch=torch.__version__, opacus=opacus.__version__)
        info["torch_default_threads"] = torch.get_num_threads()
    return info


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def run_setting(
    setting: Setting, *, repeats: int, min_time: float, with_torch: bool
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((setting.batch_size, *setting.input_shape), dtype=np.float32)
    labels = rng.integers(0, setting.num_classes, setting.batch_size).astype(np.int32)
    steps, jax_params = jax_steps(setting, images, labels)
    params = {"jax": jax_params}
    configs: dict[str, str] = {}
    errors: dict[str, str] = {}
    if with_torch:
        extra, params["torch"], configs, errors = torch_steps(setting, images, labels)
        steps.update(extra)
    samples = measure(steps, setting.batch_size, repeats, min_time)
    speeds = {
        name: statistics.median(samples[name]) if name in samples else None
        for name in JAX_VARIANTS + TORCH_VARIANTS
    }
    dp = max(speeds["jax_dp_vmap"], speeds["jax_dp_ghost"])
    opacus_modes = [speeds[k] for k in ("opacus_hooks", "opacus_ghost") if speeds[k] is not None]
    return {
        "examples_per_second": speeds,
        "examples_per_second_range": {k: [min(v), max(v)] for k, v in samples.items()},
        "num_params": params,
        "torch_configs": configs,
        "errors": errors,
        "xla_buffer_bytes": {
            name: getattr(step, "xla_bytes", None) for name, step in steps.items()
        },
        "dp_over_nonprivate": ratio(dp, speeds["jax_nonprivate"]),
        "ours_over_opacus": ratio(dp, max(opacus_modes) if opacus_modes else None),
    }


def print_setting(setting: Setting, result: dict[str, Any]) -> None:
    shape = "x".join(map(str, setting.input_shape))
    counts = ", ".join(f"{k} {v:,}" for k, v in result["num_params"].items())
    print(f"\n== {setting.name}: {setting.model}, {shape}, batch {setting.batch_size}")
    print(f"   parameters: {counts}")
    if len(set(result["num_params"].values())) > 1:
        print("   WARNING: parameter counts differ; the PyTorch model does not match")
    speeds = result["examples_per_second"]
    base = speeds["jax_nonprivate"]
    for name, value in speeds.items():
        if value is not None:
            config = result["torch_configs"].get(name, "")
            size = result["xla_buffer_bytes"].get(name)
            memory = "" if size is None else f"  XLA buffers {size / 2**20:7.1f} MB"
            print(
                f"   {name:<18} {value:10.1f} ex/s  {value / base:5.2f}x jax_nonprivate"
                f"{memory}  {config}"
            )
    print(
        "   (XLA buffers: the compiled step's planned arguments + outputs + temporaries; the"
        " PyTorch side has no per-variant figure here, and process RSS is a high-water mark)"
    )
    for name, message in result["errors"].items():
        print(f"   {name:<18} failed: {message}")
    target = TARGETS[setting.name]
    print(f"   DP / non-private   {result['dp_over_nonprivate']:.2f}x (target >= {target})")
    if result["ours_over_opacus"] is not None:
        print(
            f"   ours / Opacus best {result['ours_over_opacus']:.2f}x (target >= {OPACUS_TARGET})"
        )
    torch_speed = speeds.get("torch_nonprivate")
    if torch_speed:
        print(
            f"   ours / PyTorch non-private {base / torch_speed:.2f}x (target >= {TORCH_TARGET})"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn,resnet", help="comma-separated: cnn, resnet")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 7, quick 2)")
    parser.add_argument(
        "--min-time", type=float, default=None, help="seconds per repetition (default 1, quick 0)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny batches: a smoke test")
    parser.add_argument("--no-opacus", action="store_true", help="skip PyTorch and Opacus")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in SETTINGS:
            parser.error(f"--models: unknown {m!r}; choose from {tuple(SETTINGS)}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 1.0
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with_torch = not args.no_opacus and torch_available()
    if not args.no_opacus and not with_torch:
        print("PyTorch/Opacus not installed: skipping them (pip install -e '.[bench]')")
    if with_torch and jax.default_backend() != "cpu":
        # The PyTorch side runs on CPU tensors; a ratio against JAX on an accelerator means little.
        print(f"JAX runs on {jax.default_backend()}: skipping the CPU-only PyTorch/Opacus side")
        with_torch = False
    info = device_info(with_torch)
    line = f"{info['cpu_count']} CPUs ({info['processor']}), JAX {info['jax']} ({info['platform']})"
    if with_torch:
        line += f", torch {info['torch']}, opacus {info['opacus']}"
    print(line)
    print(
        f"The machine may be shared: variants are interleaved and each number is the median of "
        f"{args.repeats} repetitions (>= {args.min_time:g} s each)."
    )
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    results = {}
    for name in args.models:
        results[name] = run_setting(
            settings[name], repeats=args.repeats, min_time=args.min_time, with_torch=with_torch
        )
        print_setting(settings[name], results[name])
    out = {
        "examples_per_second": {k: v["examples_per_second"] for k, v in results.items()},
        "examples_per_second_range": {
            k: v["examples_per_second_range"] for k, v in results.items()
        },
        "num_params": {k: v["num_params"] for k, v in results.items()},
        "xla_buffer_bytes": {k: v["xla_buffer_bytes"] for k, v in results.items()},
        "torch_configs": {k: v["torch_configs"] for k, v in results.items() if v["torch_configs"]},
        "errors": {k: v["errors"] for k, v in results.items() if v["errors"]},
        "settings": {k: dataclasses.asdict(settings[k]) for k in args.models},
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "quick": args.quick,
        "device": info,
        "command": " ".join(
            ["python", "benchmarks/dp_sgd.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    for name in SETTINGS:
        result = results.get(name, {})
        out[f"{name}_dp_over_nonprivate"] = result.get("dp_over_nonprivate")
        out[f"{name}_ours_over_opacus"] = result.get("ours_over_opacus")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
