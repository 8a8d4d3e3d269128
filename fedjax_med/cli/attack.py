"""``fedjax-med attack``: run an attack against the trained model of a workdir.

* ``attack membership --workdir W``: the loss-threshold membership attack (Yeom et al., CSF 2018)
  with the run's training split as members and its test split as non-members; writes
  ``W/attack_membership.json`` with AUC and TPR at 0.1% and 1% FPR (Carlini et al. 2022).
  With ``--shadow-models N``, also LiRA (Carlini et al., IEEE S&P 2022) with N shadow models
  trained together under ``vmap``; ROC curves in ``W/attack_membership_roc.png``.
* ``attack audit --workdir W``: a white-box canary audit of a DP run's own release code
  (:mod:`fedjax_med.attacks.canaries`) at its noise multiplier; writes ``W/attack_audit.json``.
* ``attack inversion --workdir W --view server``: the attack of ``fedjax-med report`` against
  what this run's server receives (a client's update, the secure sum, a DP release).
* ``attack inversion --workdir W [--index I]``: Inverting Gradients (Geiping et al. 2020) on the
  gradient the checkpoint's model would share for training example ``I`` (a FedSGD update of
  batch 1, label read by iDLG); writes ``W/attack_inversion.json`` (PSNR, SSIM, label recovered)
  and ``W/attack_inversion.png`` (original | reconstruction).

Each prints its main number last. The workdir may hold a centralized or a federated run.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med import randomness
from fedjax_med.attacks import gradient_inversion, image_metrics
from fedjax_med.reporting import runs, settings, threats
from fedjax_med.training import checkpoint
from fedjax_med.training import workdir as workdir_lib


def register(subparsers) -> None:
    """Adds the ``attack`` command (subcommands ``membership``, ``audit``, ``inversion``)."""
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
    mia.add_argument(
        "--shadow-models",
        type=int,
        default=0,
        help="also run LiRA (Carlini et al. 2022) with this many shadow models trained "
        "together under vmap (0: loss threshold only)",
    )
    mia.add_argument("--shadow-steps", type=int, default=300, help="SGD steps per shadow")
    mia.add_argument("--pool-size", type=int, default=600, help="examples LiRA scores")
    audit = sub.add_parser(
        "audit",
        help="canary audit of a DP run's own release code: an empirical lower bound on epsilon",
        description="White-box canary audit (Nasr et al. 2023) of the DP-SGD step or the "
        "DP-FedAvg round of the run in --workdir, at its noise multiplier and clipping norm; "
        "writes attack_audit.json and prints the lower bound last. It must not exceed "
        "accountant_epsilon, the accountant's epsilon for one release.",
    )
    audit.add_argument("--workdir", required=True, help="folder of a DP run made by train")
    audit.add_argument("--trials", type=int, default=4000, help="releases, half with the canary")
    audit.add_argument(
        "--mechanism",
        default="correct",
        choices=("correct", "no_noise", "wrong_scale", "no_clipping", "no_subsampling"),
        help="audit the code as it is, or a deliberately broken copy of it (no_subsampling: "
        "--whole-run only)",
    )
    audit.add_argument(
        "--whole-run",
        action="store_true",
        help="one-run audit (Steinke et al. 2023) of the whole DP-SGD run, sampler and "
        "composition included, against the run's epsilon (--trials canaries)",
    )
    audit.add_argument("--confidence", type=float, default=0.95, help="of the lower bound")
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
    inv.add_argument(
        "--view",
        choices=("gradient", "server"),
        default="gradient",
        help="gradient: the unprotected FedSGD gradient of training example --index at the "
        "trained model; server: what this run's server receives (a client's update, only the "
        "secure sum, or a DP release), the same attack as fedjax-med report",
    )
    inv.add_argument(
        "--round",
        choices=("first", "last"),
        default="first",
        help="with --view server: attack the first round's update (the initial model) or the "
        "last (the trained model)",
    )
    inv.add_argument("--batch-size", type=int, default=1, help="with --view server: images")
    for parser in (mia, inv, audit):
        parser.add_argument("--quiet", action="store_true", help="warnings only")
        parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def membership_attack(
    workdir: str, shadow_models: int = 0, shadow_steps: int = 300, pool_size: int = 600
) -> dict[str, Any]:
    """Loss threshold on the whole splits; LiRA too when ``shadow_models`` is not 0.

    Loss threshold: Yeom et al., CSF 2018 (https://arxiv.org/abs/1709.01604); LiRA: Carlini et al.,
    IEEE S&P 2022 (https://arxiv.org/abs/2112.03570). The ROC curves go to
    ``attack_membership_roc.png`` when matplotlib is installed.

    Returns:
      The loss-threshold attack's AUC and TPRs at low FPR, under ``lira`` the same for LiRA, and
      ``roc_png`` (the file name, or ``None`` without matplotlib).

    Raises:
      ValueError: if ``shadow_models`` is neither 0 nor >= 2 (LiRA fits IN and OUT Gaussians),
        or, with LiRA, ``pool_size`` < 4.
    """
    experiment, params = runs.restore(workdir)
    curves = [runs.loss_threshold_attack(experiment, params)]
    if shadow_models:
        shadows = runs.LiraShadows(
            experiment,
            num_models=shadow_models,
            steps=shadow_steps,
            lr=0.05,
            batch_size=32,
            pool_size=pool_size,
            seed=experiment.config.seed,
            key=jax.random.key(experiment.config.seed),
        )
        curves.append(shadows.attack(params))
    result = {k: v for k, v in curves[0].items() if k not in ("fpr", "tpr")}
    if shadow_models:
        result["lira"] = {k: v for k, v in curves[1].items() if k not in ("fpr", "tpr")}
    try:
        from fedjax_med.reporting import plots

        path = os.path.join(workdir, "attack_membership_roc.png")
        plots.roc_curves(path, [{"name": c["attack"], **c} for c in curves])
        result["roc_png"] = os.path.basename(path)
    except ImportError:
        result["roc_png"] = None  # matplotlib is an optional extra
    return result


def _setting_and_privacy(workdir: str, experiment: Any):
    """The run as a report setting (its defences) and, for a DP run, its ``privacy`` report."""
    setting = settings.Setting(
        name=os.path.basename(os.path.normpath(workdir)), config=experiment.config
    )
    if not setting.private:
        return setting, None
    report_path = os.path.join(workdir, "report.json")
    if not os.path.exists(report_path):
        raise FileNotFoundError(f"'{report_path}' is missing: let the run finish first")
    with open(report_path) as f:
        return setting, json.load(f)["privacy"]


def audit_attack(
    workdir: str, trials: int, mechanism: str, confidence: float, whole_run: bool = False
) -> dict[str, Any]:
    """:func:`fedjax_med.reporting.threats.audit` (or ``run_audit``) on the run in ``workdir``."""
    experiment, params = runs.restore(workdir)
    setting, privacy = _setting_and_privacy(workdir, experiment)
    if not setting.private:
        raise ValueError(
            f"attack audit needs a DP run (privacy.enabled, or federated.algorithm="
            f"'dp_fedavg'); the run in '{workdir}' is not private"
        )
    if whole_run:
        result = threats.run_audit(
            setting,
            privacy,
            mechanism=mechanism,
            canaries_count=trials,
            confidence=confidence,
            key=jax.random.key(experiment.config.seed),
        )
        if result is None:
            raise ValueError(
                f"--whole-run audits central DP-SGD runs with Poisson sampling; '{workdir}' "
                "is not one"
            )
        return {
            "attack": "one_run_audit",
            "run_epsilon": privacy.get("epsilon"),
            **result.as_dict(),
        }
    if mechanism == "no_subsampling":
        raise ValueError("--mechanism=no_subsampling needs --whole-run (it breaks the sampler)")
    victims = threats.pick_victims(setting, experiment, batch_size=8)
    result = threats.audit(
        setting,
        experiment,
        params,
        privacy,
        victims,
        mechanism=mechanism,
        trials=trials,
        confidence=confidence,
        key=jax.random.key(experiment.config.seed),
    )
    if result is None:
        raise ValueError(
            f"the run in '{workdir}' has no release this audit covers (it audits add/remove-one "
            "claims of DP-SGD with Poisson sampling and of DP-FedAvg)"
        )
    return {"attack": "canary_audit", "run_epsilon": privacy.get("epsilon"), **result.as_dict()}


def inversion_attack(workdir: str, index: int, steps: int, restarts: int) -> dict[str, Any]:
    """Inverting Gradients on the gradient the model would share for training example ``index``.

    Geiping et al., NeurIPS 2020 (https://arxiv.org/abs/2003.14053), with the label first read
    from the last layer's gradient by iDLG (Zhao et al. 2020, https://arxiv.org/abs/2001.02610).
    Writes ``attack_inversion.png`` (original above reconstruction) into ``workdir``.

    Returns:
      ``psnr`` and ``ssim`` of the reconstruction, ``psnr_random_baseline`` (uniform noise in the
      pixel range), the true and recovered labels, and the attack's settings.

    Raises:
      ValueError: for a task that is not multiclass, or an ``index`` outside the training split.
    """
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
    noise = jax.random.uniform(
        jax.random.PRNGKey(randomness.INVERSION_BASELINE), x.shape, minval=lo, maxval=hi
    )
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
        "view": "gradient",
    }


def server_view_inversion(
    workdir: str, steps: int, restarts: int, round_: str, batch_size: int
) -> dict[str, Any]:
    """:func:`fedjax_med.reporting.threats.invert` on the run in ``workdir``: the attack of
    ``fedjax-med report`` against what this run's server receives."""
    if not 1 <= batch_size <= 8:
        raise ValueError(f"--batch-size={batch_size} must lie in [1, 8]")
    experiment, params = runs.restore(workdir)
    setting, privacy = _setting_and_privacy(workdir, experiment)
    victims = threats.pick_victims(setting, experiment, batch_size)
    attacked = runs.initial_params(experiment) if round_ == "first" else params
    result, reconstruction = threats.invert(
        setting,
        experiment,
        attacked,
        privacy,
        victims,
        local_steps=1,
        steps=steps,
        restarts=restarts,
        key=jax.random.key(experiment.config.seed),
    )
    if reconstruction is not None:
        lo, hi = victims.bounds
        originals = victims.images[: victims.num_victim]
        save_gallery(
            os.path.join(workdir, "attack_inversion.png"), originals, reconstruction, lo, hi
        )
    return {"attack": "inverting_gradients", "view": "server", "round": round_, **result}


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
    """Executes ``attack membership|audit|inversion``; writes ``attack_<name>.json`` to the workdir.

    Prints the result as JSON and its main number last (``auc``, ``epsilon_lower_bound``, ``psnr``
    or, when the server sees nothing to attack, ``server_sees``).

    Returns:
      The exit code, 0.
    """
    workdir_lib.check_writable(args.workdir, inside=(f"attack_{args.attack_command}.json",))
    if args.attack_command == "membership":
        result = membership_attack(
            args.workdir, args.shadow_models, args.shadow_steps, args.pool_size
        )
        path, last = os.path.join(args.workdir, "attack_membership.json"), "auc"
    elif args.attack_command == "audit":
        result = audit_attack(
            args.workdir, args.trials, args.mechanism, args.confidence, args.whole_run
        )
        path, last = os.path.join(args.workdir, "attack_audit.json"), "epsilon_lower_bound"
    else:
        path, last = os.path.join(args.workdir, "attack_inversion.json"), "psnr"
        if args.view == "server":
            result = server_view_inversion(
                args.workdir, args.steps, args.restarts, args.round, args.batch_size
            )
            if not result.get("attacked"):
                last = "server_sees"
        else:
            result = inversion_attack(args.workdir, args.index, args.steps, args.restarts)
    checkpoint.write_json_atomic(path, result)
    print(json.dumps(result, indent=2))
    value = result[last]
    print(f"{last} = {value:.6g}" if isinstance(value, float) else f"{last} = {value}")
    return 0
