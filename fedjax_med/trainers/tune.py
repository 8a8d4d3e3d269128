"""``fedjax-med tune``: a private hyperparameter search whose whole privacy cost is reported.

Papernot and Steinke, "Hyperparameter tuning with Renyi differential privacy", ICLR 2022
(https://arxiv.org/abs/2110.03620): the number of trials ``K`` is random, drawn from the
truncated negative binomial ``D_{eta, gamma}`` (:mod:`fedjax_med.privacy.tuning`); each trial is
a DP-SGD run of the config with hyperparameters drawn uniformly from the search space; the best
trial by its validation metric is released, and the epsilon of the *whole search* is Theorem 2's
bound on the trials' common RDP curve. ``E[K]`` trials composed naively would cost more (tested).

The search space may change only fields that leave each trial's privacy event unchanged
(optimizer, model and averaging fields): fields under ``privacy.``, ``data.``, ``federated.``
and ``train.batch_size`` / ``train.steps`` are refused, so every trial is the same mechanism and
the theorem's per-trial RDP bound holds for all of them. ``K`` and the draws come from a CSPRNG
in ``secure`` mode (``privacy.noise_seed``), from ``seed`` otherwise; ``K`` is not released
beyond the trials' folders, which the search's owner keeps (only the best run is released).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from fedjax_med import randomness
from fedjax_med.config import loading, schema
from fedjax_med.privacy import accounting, tuning
from fedjax_med.trainers import registry

FIXED_PREFIXES = ("privacy.", "data.", "federated.", "secure_aggregation.")
FIXED_FIELDS = ("train.batch_size", "train.steps", "trainer", "seed")


def parse_space(text: str, config: ml_collections.ConfigDict) -> dict[str, list[Any]]:
    """``"FIELD=V1,V2;FIELD=V1,..."`` as ``{field: [values]}``, each value of the field's type.

    Raises:
      ValueError: an empty space, an unknown field, or a field that would change the privacy
        event of a trial.

    Examples:
      >>> from fedjax_med.config import base
      >>> parse_space("optimizer.learning_rate=0.5,1", base.get_base_config())
      {'optimizer.learning_rate': [0.5, 1.0]}
    """
    space = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        field, _, values = part.partition("=")
        field = field.strip()
        if field.startswith(FIXED_PREFIXES) or field in FIXED_FIELDS:
            raise ValueError(
                f"--space field {field!r} would change each trial's privacy event; the search "
                f"space may not set fields under {FIXED_PREFIXES} nor {FIXED_FIELDS}"
            )
        node = config
        for name in field.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise ValueError(f"--space field {field!r} is not a config field")
            node = node[name]
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise ValueError(f"--space field {field!r} needs at least one value")
        space[field] = [loading.parse_value(v, node, field) for v in choices]
    if not space:
        raise ValueError("--space must name at least one FIELD=V1,V2")
    return space


def _rng(config: ml_collections.ConfigDict) -> np.random.Generator:
    if config.privacy.noise_seed == "secure":
        return randomness.csprng()
    return np.random.default_rng([int(config.seed), *randomness.TUNE_TRIALS])


def _trial_event(report: dict[str, Any], config: ml_collections.ConfigDict):
    privacy = report["privacy"]
    extra = {}
    if config.privacy.sampling == "shuffle":
        extra = {"num_examples": privacy["num_units"], "batch_size": config.train.batch_size}
    return accounting.dpsgd_event(
        privacy["noise_multiplier"],
        privacy["sampling_rate"],
        config.train.steps,  # the planned steps: an upper bound for a run the budget stops
        config.privacy.sampling,
        **extra,
    )


def tune(
    config: ml_collections.ConfigDict,
    workdir: str,
    space: dict[str, list[Any]],
    *,
    eta: float = 1.0,
    gamma: float = 0.2,
    metric: str = "val_accuracy",
    quiet: bool = True,
) -> dict[str, Any]:
    """Runs the search into ``workdir/trial_<i>``; writes and returns ``workdir/tune.json``.

    Raises:
      ValueError: without DP-SGD in the central trainer (``privacy.enabled``), or for a bad
        ``eta`` / ``gamma`` (:func:`~fedjax_med.privacy.tuning.check_distribution`).
    """
    tuning.check_distribution(eta, gamma)
    if schema.mechanism(config) != "dp_sgd":
        raise ValueError(
            "fedjax-med tune needs DP-SGD in the central trainer (privacy.enabled, trainer "
            f"central); the config's mechanism is {schema.mechanism(config)!r}"
        )
    rng = _rng(config)
    num_trials = tuning.draw_num_trials(rng, eta, gamma)
    trials = []
    for i in range(num_trials):
        chosen = {field: values[int(rng.integers(len(values)))] for field, values in space.items()}
        trial = ml_collections.ConfigDict(config.to_dict())
        for field, value in chosen.items():
            *parents, name = field.split(".")
            node = trial
            for parent in parents:
                node = node[parent]
            node[name] = value
        trial = schema.validate(trial)
        report = registry.train(trial, os.path.join(workdir, f"trial_{i}"), quiet=quiet)
        trials.append({"hyperparameters": chosen, "score": report["val_metrics"][metric]})
        event = _trial_event(report, trial)
    best = int(np.argmax([t["score"] for t in trials]))
    delta = float(config.privacy.delta)
    result = {
        "metric": metric,
        "distribution": {"name": "truncated_negative_binomial", "eta": eta, "gamma": gamma},
        "expected_trials": tuning.expected_trials(eta, gamma),
        "num_trials": num_trials,
        "trials": trials,
        "best_trial": best,
        "best_workdir": os.path.join(workdir, f"trial_{best}"),
        "best_hyperparameters": trials[best]["hyperparameters"],
        "epsilon": tuning.search_epsilon(event, delta, eta, gamma),
        "epsilon_one_trial": accounting.epsilon(event, delta, "rdp"),
        "delta": delta,
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "tune.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
