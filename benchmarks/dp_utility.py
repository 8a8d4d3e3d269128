"""What each ingredient of the DP-SGD utility recipe buys at one fixed epsilon (synthetic data).

Run from the repository root::

  python benchmarks/dp_utility.py --json runs/bench/dp_utility.json   # the README's table
  python benchmarks/dp_utility.py --quick --variants dp_sgd,finetune  # seconds, smoke test

Every variant is the central DP-SGD trainer on the embedded synthetic multi-site data at the
privacy report's size (four hospitals, 16x16 images, 4 classes; the ``dp_sgd`` config: Poisson
sampling, C = 1, RDP accountant, momentum 0.9 at learning rate 0.5), with the noise multiplier
calibrated so that the whole run is ``(--epsilon, 1e-5)``-DP; they differ in one ingredient each:

* ``dp_sgd``: plain DP-SGD, the small tanh CNN (Abadi et al. 2016; Papernot et al. 2021);
* ``augmult``: + augmentation multiplicity K = 4, flips and shifts (De et al. 2022), same epsilon;
* ``augmult_ema``: + an EMA of the parameters (decay 0.99), post-processing, same epsilon;
* ``scatter_linear``: ScatterNet features + GroupNorm + a linear model (Tramer & Boneh 2021);
* ``scatter_linear_datanorm``: the same with private DataNorm statistics (noise 8, clip norms
  0.5, about the 70th percentile of the channel-moment norms of these images), whose two releases
  the calibration leaves room for, so the total epsilon is the same;
* ``finetune``: the small CNN pretrained without privacy (Adam) on *other* synthetic data (another
  seed, five classes: a public stand-in), then fine-tuned with DP-SGD (``model.init_from``, all
  layers; the head is fresh, sized for four classes).

Prints a table of test accuracy (and the EMA's), the run's epsilon, noise multiplier and time;
``--json`` writes it with the command and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from fedjax_med.config import loading
from fedjax_med.trainers import central

# name -> (what it adds, config overrides)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dp_sgd": ("plain DP-SGD, small CNN", ()),
    "augmult": ("+ augmentation multiplicity K=4", ("privacy.augmult=4",)),
    "augmult_ema": (
        "+ augmult K=4 + EMA 0.99",
        ("privacy.augmult=4", "train.ema_decay=0.99"),
    ),
    "scatter_linear": (
        "ScatterNet + GroupNorm + linear",
        ("model.name=scatter_linear",),
    ),
    "scatter_linear_datanorm": (
        "ScatterNet + private DataNorm + linear",
        (
            "model.name=scatter_linear",
            "model.kwargs.norm=data",
            "model.kwargs.norm_clip=(0.5,0.5)",
            "model.kwargs.norm_noise=8.0",
        ),
    ),
    "finetune": ("small CNN pretrained on other synthetic data, DP fine-tuned", ()),
}
# The "public" pretraining data: another seed, five classes, more steps, no privacy (Adam: the
# DP learning rate is sized for clipped gradients, far too large for raw ones).
PRETRAIN = (
    "seed=1",
    "data.synthetic.num_classes=5",
    "privacy.enabled=False",
    "optimizer.name=adam",
    "optimizer.learning_rate=0.002",
)


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The settings every variant shares (data size, steps, batch, the fixed epsilon)."""
    out = [
        "data.cache_dir=none",
        "data.synthetic.num_sites=4",
        "data.synthetic.image_size=16",
        "optimizer.learning_rate=0.5",
        f"data.synthetic.examples_per_site={args.examples_per_site}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "privacy.noise_multiplier=0.0",
        f"privacy.target_epsilon={args.epsilon}",
    ]
    if args.quick:
        out += ["data.synthetic.num_sites=2"]
    return out


def load(overrides: Sequence[str]):
    return loading.load_config("dp_sgd", [f"--config.{o}" for o in overrides])


def run_variant(name: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Trains one variant in ``root/<name>``; returns its row of the table."""
    overrides = [*common_overrides(args), *VARIANTS[name][1]]
    if name == "finetune":
        pretrain_dir = os.path.join(root, "pretrain")
        steps = f"train.steps={args.pretrain_steps}"
        every = f"train.eval_every={args.pretrain_steps}"
        ckpt = f"train.checkpoint_every={args.pretrain_steps}"
        pretrain = load([*common_overrides(args), *PRETRAIN, steps, every, ckpt])
        pretrained = central.train_and_evaluate(pretrain, pretrain_dir, quiet=True)
        pretrain_accuracy = pretrained["metrics"]["test_accuracy"]
        overrides.append(f"model.init_from={pretrain_dir}")
    else:
        pretrain_accuracy = None
    config = load(overrides)
    start = time.perf_counter()
    report = central.train_and_evaluate(config, os.path.join(root, name), quiet=True)
    metrics, privacy = report["metrics"], report["privacy"]
    return {
        "variant": name,
        "adds": VARIANTS[name][0],
        "test_accuracy": metrics["test_accuracy"],
        "test_accuracy_ema": metrics.get("test_accuracy_ema"),
        "pretrain_test_accuracy": pretrain_accuracy,  # on its own (5-class) task
        "epsilon": privacy["epsilon"],
        "delta": privacy["delta"],
        "noise_multiplier": privacy["noise_multiplier"],
        "steps": privacy["steps"],
        "seconds": time.perf_counter() - start,
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| variant | adds | test accuracy | EMA | epsilon | sigma | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ema = "" if r["test_accuracy_ema"] is None else f"{r['test_accuracy_ema']:.3f}"
        lines.append(
            f"| `{r['variant']}` | {r['adds']} | {r['test_accuracy']:.3f} | {ema} | "
            f"{r['epsilon']:.2f} | {r['noise_multiplier']:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--epsilon", type=float, default=4.0, help="the fixed epsilon (delta 1e-5)")
    parser.add_argument("--steps", type=int, default=None, help="DP-SGD steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=None, help="expected batch (256)")
    parser.add_argument("--examples-per-site", type=int, default=None, help="4 sites (1500)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="(default 600)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--json", default=None, help="write the table to this JSON file")
    args = parser.parse_args(argv)
    quick = {"steps": 2, "batch_size": 16, "examples_per_site": 40, "pretrain_steps": 2}
    full = {"steps": 300, "batch_size": 256, "examples_per_site": 1500, "pretrain_steps": 600}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants {unknown} must be among {list(VARIANTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.variants:
            rows.append(run_variant(name, args, root))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    out = {
        "rows": rows,
        "epsilon": args.epsilon,
        "settings": {
            k: getattr(args, k) for k in ("steps", "batch_size", "examples_per_site", "quick")
        },
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(
            ["python", "benchmarks/dp_utility.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
