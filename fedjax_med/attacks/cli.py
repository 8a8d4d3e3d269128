"""``fedjax-med attack``: run an attack against the trained model of a workdir.

* ``attack membership --workdir W``: the loss-threshold membership attack (Yeom et al., CSF 2018)
  with the run's training split as members and its test split as non-members; writes
  ``W/attack_membership.json`` with AUC and TPR at 0.1% and 1% FPR (Carlini et al. 2022).
* ``attack inversion --workdir W [--index I]``: Inverting Gradients (Geiping et al. 2020) on the
  gradient the checkpoint's model would share for training example ``I`` (a FedSGD update of
  batch 1, label read by iDLG); writes ``W/attack_inversion.json`` (PSNR, SSIM, label recovered)
  and ``W/attack_inversion.png`` (original | reconstruction).

Both print their main number last. The workdir may hold a centralized or a federated run.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.attacks import gradient_inversion, image_metrics, runs


def register(subparsers) -> None:
    attack = subparsers.add_parser(
        "attack",
        help="attack the model of a trained run (membership inference, gradient inversion)",
        description="Run an attack against the latest checkpoint in --workdir.",
    )
    sub = attack.add_subparsers(dest="attack_command", required=True, metavar="ATTACK")
    mia = sub.add_parser(
        "membership",
        help="loss-threshold membership inference: train split vs test split",
        description="Loss-threshold membership inference (Yeom et al. 2018); writes "
        "attack_membership.json and prints the AUC last.",
    )
    mia.add_argument("--workdir", required=True, help="folder of a run made by train")
    inv = sub.add_parser(
        "inversion",
        help="reconstruct a training image from the gradient the model would share",
        description="Inverting Gradients (Geiping et al. 2020) on one training example's "
        "gradient; writes attack_inversion.json and attack_inversion.png, prints the PSNR last.",
    )
    inv.add_argument("--workdir", required=True, help="folder of a run made by train")
    inv.add_argument("--index", type=int, default=0, help="training example to attack")
    inv.add_argument("--steps", type=int, default=300, help="attack optimisation steps")
    inv.add_argument("--restarts", type=int, default=2, help="restarts run together (vmap)")
    for parser in (mia, inv):
        parser.add_argument("--quiet", action="store_true", help="warnings only")
        parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def membership_attack(workdir: str) -> dict[str, Any]:
    result = runs.loss_threshold_attack(*runs.restore(workdir))
    return {k: v for k, v in result.items() if k not in ("fpr", "tpr")}


def inversion_attack(workdir: str, index: int, steps: int, restarts: int) -> dict[str, Any]:
    experiment, params = runs.restore(workdir)
    info = experiment.splits.info
    if info.task != "multiclass":
        raise ValueError(f"attack inversion supports multiclass tasks, not {info.task!r}")
    train = experiment.splits.train
    if not 0 <= index < len(train):
        raise ValueError(f"--index={index} must lie in [0, {len(train)})")
    image = experiment.normalizer(train.images[index : index + 1], train.sites[index : index + 1])
    label = jnp.asarray(train.labels[index : index + 1])
    lo, hi = runs.pixel_bounds(experiment.normalizer, train.sites[index : index + 1])
    target = gradient_inversion.shared_gradient(experiment.model.apply, params, image, label)
    kernel = gradient_inversion.get_at_path(target, gradient_inversion.last_kernel_path(target))
    recovered_label = int(gradient_inversion.idlg_label(kernel))
    result = gradient_inversion.invert_gradients(
        experiment.model.apply,
        params,
        target,
        image_shape=info.image_shape,
        labels=jnp.asarray([recovered_label]),
        steps=steps,
        restarts=restarts,
        key=jax.random.PRNGKey(index),
        bounds=(lo, hi),
    )
    x = jnp.asarray(image)
    guess = jnp.asarray(result.images)
    noise = jax.random.uniform(jax.random.PRNGKey(1), x.shape, minval=lo, maxval=hi)
    save_gallery(
        os.path.join(workdir, "attack_inversion.png"), np.asarray(x), np.asarray(guess), lo, hi
    )
    return {
        "attack": "inverting_gradients",
        "index": index,
        "true_label": int(label[0]),
        "recovered_label": recovered_label,
        "psnr": float(image_metrics.psnr(x, guess, hi - lo)[0]),
        "ssim": float(image_metrics.ssim(x, guess, hi - lo)[0]),
        "psnr_random_baseline": float(image_metrics.psnr(x, noise, hi - lo)[0]),
        "steps": steps,
        "restarts": restarts,
    }


def save_gallery(path: str, originals: np.ndarray, guesses: np.ndarray, lo: float, hi: float):
    """Originals (top) and reconstructions (bottom) as one grayscale/RGB PNG, 4x upscaled."""
    from PIL import Image

    def to_uint8(a):
        a = np.clip((a - lo) / (hi - lo), 0, 1)
        a = np.concatenate(list(a), axis=1)  # batch side by side
        return (a * 255).astype(np.uint8)

    grid = np.concatenate([to_uint8(originals), to_uint8(guesses)], axis=0)
    grid = grid[..., 0] if grid.shape[-1] == 1 else grid
    img = Image.fromarray(grid)
    img.resize((img.width * 4, img.height * 4), Image.NEAREST).save(path)


def run(args: argparse.Namespace) -> int:
    if args.attack_command == "membership":
        result = membership_attack(args.workdir)
        path, last = os.path.join(args.workdir, "attack_membership.json"), "auc"
    else:
        result = inversion_attack(args.workdir, args.index, args.steps, args.restarts)
        path, last = os.path.join(args.workdir, "attack_inversion.json"), "psnr"
    from fedjax_med.training import checkpoint

    checkpoint.write_json_atomic(path, result)
    print(json.dumps(result, indent=2))
    print(f"{last} = {result[last]:.6g}")
    return 0
