"""Attacks against a trained run: restore its model, score its members, bound its pixels.

Shared by ``fedjax-med attack`` (one workdir) and ``fedjax-med report`` (many settings). A run is a
:class:`~fedjax_med.trainers.run.Run` (``config``, ``splits``, ``normalizer``, ``model`` and
parameters), which is all the attacks need.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from fedjax_med import randomness
from fedjax_med.attacks import membership
from fedjax_med.models import losses
from fedjax_med.trainers import registry
from fedjax_med.trainers import run as run_lib
from fedjax_med.training import evaluate


def restore(workdir: str) -> tuple[run_lib.Run, Any]:
    """The run of ``workdir`` (data, normaliser, model) and its latest parameters."""
    run = registry.restore(workdir)
    return run, run.params


def initial_params(run: run_lib.Run) -> Any:
    """The parameters the run started from (the trainers' own initialisation from the seed):
    the model of the first round, whose updates a curious server sees first."""
    return run.initial_params


def split_losses(experiment: Any, params: Any, split: str) -> np.ndarray:
    """Per-example losses of the model on ``split`` (``train``, ``val`` or ``test``)."""
    predict = evaluate.make_predict_fn(experiment.model.apply, experiment.splits.info.task)
    _, losses = evaluate.predict_dataset(
        predict,
        params,
        experiment.splits.split(split),
        experiment.normalizer,
        experiment.config.train.eval_batch_size,
    )
    return losses


def loss_threshold_attack(experiment: Any, params: Any) -> dict[str, Any]:
    """Yeom et al. (CSF 2018) with the training split as members and the test split as not.

    Returns :func:`~fedjax_med.attacks.membership.summarize` plus the mean losses.
    """
    member_losses = split_losses(experiment, params, "train")
    nonmember_losses = split_losses(experiment, params, "test")
    summary = membership.summarize(
        membership.loss_threshold_scores(member_losses),
        membership.loss_threshold_scores(nonmember_losses),
    )
    return {
        "attack": "loss_threshold",
        **summary,
        "mean_member_loss": float(member_losses.mean()),
        "mean_nonmember_loss": float(nonmember_losses.mean()),
    }


def dice_threshold_attack(experiment: Any, params: Any) -> dict[str, Any]:
    """The loss threshold with the per-example soft Dice loss as the loss (segmentation):
    :func:`~fedjax_med.attacks.membership.dice_loss_scores` of the training split (members)
    against the test split, plus the mean Dice losses."""
    predict = evaluate.make_predict_fn(experiment.model.apply, experiment.splits.info.task)
    scores = {}
    for split in ("train", "test"):
        data = experiment.splits.split(split)
        probs, _ = evaluate.predict_dataset(
            predict, params, data, experiment.normalizer, experiment.config.train.eval_batch_size
        )
        scores[split] = membership.dice_loss_scores(probs, np.asarray(data.labels))
    summary = membership.summarize(scores["train"], scores["test"])
    return {
        "attack": "dice_threshold",
        **summary,
        "mean_member_dice_loss": float(-scores["train"].mean()),
        "mean_nonmember_dice_loss": float(-scores["test"].mean()),
    }


def pixel_bounds(normalizer: Any, sites: np.ndarray) -> tuple[float, float]:
    """``(low, high)``: where raw pixels ``[0, 1]`` land after normalising for ``sites``."""
    sites = np.unique(np.asarray(sites))
    lo = (0.0 - normalizer.mean[sites]) / normalizer.std[sites]
    hi = (1.0 - normalizer.mean[sites]) / normalizer.std[sites]
    return float(lo.min()), float(hi.max())


class LiraShadows:
    """LiRA (Carlini et al., IEEE S&P 2022) against a run: shadow models trained under ``vmap``.

    The candidate pool is ``pool_size / 2`` random training and as many test examples of the
    run's splits; shadow ``n`` trains on the half of the pool that
    :func:`~fedjax_med.attacks.membership.balanced_membership` gives it (SGD with momentum,
    ``steps`` steps of ``batch_size`` examples, or full-batch), so every example is IN for half
    the shadows and OUT for the others. :meth:`attack` scores a target model with online LiRA
    (global variance, better with few shadows); its members are the pool's training examples.
    Shadows depend only on the data and the architecture, so one set serves many targets.
    """

    def __init__(
        self,
        experiment: Any,
        *,
        num_models: int,
        steps: int,
        lr: float,
        batch_size: int | None,
        pool_size: int,
        seed: int,
        key: Any,
    ):
        if num_models < 2:
            raise ValueError(f"{num_models=} must be >= 2 (LiRA fits IN and OUT Gaussians)")
        if pool_size < 4:
            raise ValueError(f"{pool_size=} must be >= 4")
        splits, normalizer = experiment.splits, experiment.normalizer
        rng = np.random.default_rng([seed, *randomness.MEMBERSHIP_POOL])
        half = pool_size // 2
        train_idx = rng.permutation(len(splits.train))[: min(half, len(splits.train))]
        test_idx = rng.permutation(len(splits.test))[: min(half, len(splits.test))]
        train, test = splits.train.take(train_idx), splits.test.take(test_idx)
        self.images = np.concatenate(
            [normalizer(train.images, train.sites), normalizer(test.images, test.sites)]
        )
        self.labels = np.concatenate([train.labels, test.labels]).astype(np.int32)
        self.is_member = np.arange(len(self.labels)) < len(train_idx)
        self.apply = experiment.model.apply
        self.shadow_in = membership.balanced_membership(rng, num_models, len(self.labels))
        stacked = membership.train_shadow_models(
            experiment.model.init,
            losses.example_loss_fn(self.apply, splits.info.task),
            self.images,
            self.labels,
            self.shadow_in,
            steps=steps,
            lr=lr,
            key=key,
            batch_size=batch_size,
        )
        self.shadow_phi = membership.confidences(self.apply, stacked, self.images, self.labels)

    def attack(self, params: Any) -> dict[str, Any]:
        """Online LiRA against ``params``: :func:`membership.summarize` plus the attack's name."""
        stacked = jax.tree.map(lambda p: p[None], params)
        target = membership.confidences(self.apply, stacked, self.images, self.labels)[0]
        scores = membership.lira_online_scores(
            self.shadow_phi, self.shadow_in, target, global_variance=True
        )
        summary = membership.summarize(scores[self.is_member], scores[~self.is_member])
        return {"attack": "lira_online", "shadow_models": len(self.shadow_phi), **summary}
