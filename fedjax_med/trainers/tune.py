"""``fedjax-med tune``: a private hyperparameter search whose whole privacy cost is reported.

Papernot and Steinke, "Hyperparameter tuning with Renyi differential privacy", ICLR 2022
(https://arxiv.org/abs/2110.03620): the number of trials ``K`` is random, drawn from the
truncated negative binomial ``D_{eta, gamma}`` (Theorem 2) or from ``Poisson(mu)`` (Theorem 6;
:mod:`fedjax_med.privacy.tuning`); each trial is a DP-SGD run of the config with hyperparameters
drawn uniformly from the search space; the best trial by its validation metric is released, and
the epsilon of the *whole search* is the theorem's bound on the trials' common RDP curve. ``E[K]``
trials composed naively would cost more (tested). A Poisson draw of ``K = 0`` runs nothing and
releases no model (``best_trial`` null), as the theorem allows; the epsilon is still that of the
search. Each trial's event is the one its plan accounts (:func:`trial_event`), which the config
fixes before any trial runs. With matplotlib installed, ``tune.png`` shows each trial's score and
the best so far against the trial number.

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
from fedjax_med.trainers import dp_sgd, registry
from fedjax_med.training import figures, setup

DISTRIBUTIONS = ("negative_binomial", "poisson")

FIXED_PREFIXES = ("privacy.", "data.", "federated.", "secure_aggregation.")
# model.kwargs.norm*: ScatterNet's DataNorm releases statistics before step 0 (its own events).
FIXED_FIELDS = ("train.batch_size", "train.steps", "trainer", "seed")
FIXED_MODEL_PREFIX = "model.kwargs.norm"


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
        if field.startswith((*FIXED_PREFIXES, FIXED_MODEL_PREFIX)) or field in FIXED_FIELDS:
            raise ValueError(
                f"--space field {field!r} would change each trial's privacy event; the search "
                f"space may not set fields under {FIXED_PREFIXES}, {FIXED_MODEL_PREFIX}* nor "
                f"{FIXED_FIELDS}"
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


def trial_event(config: ml_collections.ConfigDict):
    """The ``DpEvent`` every trial of ``config`` accounts: its plan's ledger over ``train.steps``
    (the planned steps: an upper bound for a run the budget stops), calibration included."""
    splits, _, model = setup.build_data_and_model(config)
    plan = dp_sgd.make_plan(config, splits.train, 1, model)
    return plan.ledger.event(config.train.steps)


def _distribution(distribution: str, eta: float, gamma: float, mu: float) -> dict[str, Any]:
    if distribution == "negative_binomial":
        tuning.check_distribution(eta, gamma)
        return {"name": "truncated_negative_binomial", "eta": eta, "gamma": gamma}
    if distribution == "poisson":
        tuning.check_poisson(mu)
        return {"name": "poisson", "mu": mu}
    raise ValueError(f"--distribution={distribution!r} must be one of {DISTRIBUTIONS}")


def plot_trials(result: dict[str, Any], path: str) -> str | None:
    """``tune.png``: each trial's score and the best so far against the trial number (``None``
    without matplotlib or without trials)."""
    if not result["trials"] or not figures.matplotlib_available():
        return None
    scores = np.array([t["score"] for t in result["trials"]], float)
    trials = np.arange(1, scores.size + 1)
    fig = figures.new_figure(figures.load_matplotlib(), (5.0, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(trials, scores, "o", label="trial")
    ax.step(trials, np.maximum.accumulate(scores), where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(result["metric"])
    ax.set_title(
        f"{result['distribution']['name']}: epsilon {result['epsilon']:.3g} "
        f"(one trial {result['epsilon_one_trial']:.3g})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    return figures.save(fig, path)


def tune(
    config: ml_collections.ConfigDict,
    workdir: str,
    space: dict[str, list[Any]],
    *,
    eta: float = 1.0,
    gamma: float = 0.2,
    distribution: str = "negative_binomial",
    mu: float = 5.0,
    metric: str = "val_accuracy",
    quiet: bool = True,
) -> dict[str, Any]:
    """Runs the search into ``workdir/trial_<i>``; writes and returns ``workdir/tune.json``.

    Raises:
      ValueError: without DP-SGD in the central trainer (``privacy.enabled``), or for a bad
        ``distribution``, ``eta`` / ``gamma``
        (:func:`~fedjax_med.privacy.tuning.check_distribution`) or ``mu``
        (:func:`~fedjax_med.privacy.tuning.check_poisson`).
    """
    dist = _distribution(distribution, eta, gamma, mu)
    if schema.mechanism(config) != "dp_sgd":
        raise ValueError(
            "fedjax-med tune needs DP-SGD in the central trainer (privacy.enabled, trainer "
            f"central); the config's mechanism is {schema.mechanism(config)!r}"
        )
    event = trial_event(config)
    rng = _rng(config)
    if distribution == "poisson":
        num_trials = tuning.draw_poisson_trials(rng, mu)
    else:
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
    best = int(np.argmax([t["score"] for t in trials])) if trials else None
    delta = float(config.privacy.delta)
    if distribution == "poisson":
        expected, eps = mu, tuning.poisson_search_epsilon(event, delta, mu)
    else:
        expected = tuning.expected_trials(eta, gamma)
        eps = tuning.search_epsilon(event, delta, eta, gamma)
    result = {
        "metric": metric,
        "distribution": dist,
        "expected_trials": expected,
        "num_trials": num_trials,
        "trials": trials,
        "best_trial": best,
        "best_workdir": None if best is None else os.path.join(workdir, f"trial_{best}"),
        "best_hyperparameters": None if best is None else trials[best]["hyperparameters"],
        "epsilon": eps,
        "epsilon_one_trial": accounting.epsilon(event, delta, "rdp"),
        "delta": delta,
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "tune.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_trials(result, os.path.join(workdir, "tune.png"))
    return result
