"""Attacks against a trained run: restore its model, score its members, bound its pixels.

Shared by ``fedjax-med attack`` (one workdir) and ``fedjax-med report`` (many settings). A run is
either a centralized :class:`~fedjax_med.training.central.Experiment` or a federated
:class:`~fedjax_med.training.federated.FederatedPlan`; both carry ``config``, ``splits``,
``normalizer`` and ``model``, which is all the attacks need.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_med.attacks import membership


def restore(workdir: str) -> tuple[Any, Any]:
    """The experiment (data, normaliser, model) and parameters of the run in ``workdir``."""
    from fedjax_med.training import central

    if central.load_workdir_config(workdir).trainer == "federated":
        from fedjax_med.training import federated

        experiment, state = federated.restore_for_eval(workdir)
    else:
        experiment, state = central.restore_for_eval(workdir)
    return experiment, state.params


def initial_params(experiment: Any) -> Any:
    """The parameters the run started from (the trainers' own initialisation from the seed):
    the model of the first round, whose updates a curious server sees first."""
    if hasattr(experiment, "federation"):
        from fedjax_med.training import federated

        return federated.init_server_state(experiment).params
    from fedjax_med.training import central

    return central.init_state(experiment).params


def split_losses(experiment: Any, params: Any, split: str) -> np.ndarray:
    """Per-example losses of the model on ``split`` (``train``, ``val`` or ``test``)."""
    from fedjax_med.training import evaluate

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


def pixel_bounds(normalizer: Any, sites: np.ndarray) -> tuple[float, float]:
    """``(low, high)``: where raw pixels ``[0, 1]`` land after normalising for ``sites``."""
    sites = np.unique(np.asarray(sites))
    lo = (0.0 - normalizer.mean[sites]) / normalizer.std[sites]
    hi = (1.0 - normalizer.mean[sites]) / normalizer.std[sites]
    return float(lo.min()), float(hi.max())
