"""The trainers, chosen by ``config.trainer`` from one table: the one place to add a trainer.

``train(config, workdir)`` runs the trainer the config names; ``restore(workdir)`` rebuilds a
finished or interrupted run as a :class:`~fedjax_med.trainers.run.Run`;
``evaluate_workdir(workdir, split)`` evaluates its latest checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from fedjax_med.trainers import central, federated
from fedjax_med.trainers import run as run_lib
from fedjax_med.training import checkpoint, evaluate
from fedjax_med.training import workdir as workdir_lib

TRAINERS: dict[str, run_lib.Trainer] = {t.name: t for t in (central.TRAINER, federated.TRAINER)}


def get_trainer(name: str) -> run_lib.Trainer:
    """The trainer called ``name``.

    Raises:
      ValueError: ``config field 'trainer'=... must be one of [...]``, naming the known trainers.
    """
    if name not in TRAINERS:
        raise ValueError(f"config field 'trainer'={name!r} must be one of {sorted(TRAINERS)}")
    return TRAINERS[name]


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` with the trainer it names; returns the report."""
    trainer = get_trainer(config.trainer)
    return trainer.train(config, workdir, resume=resume, quiet=quiet, stop_at=stop_at)


def restore(workdir: str) -> run_lib.Run:
    """The run of ``workdir`` (config, data, model, latest parameters)."""
    config = workdir_lib.load_workdir_config(workdir)
    return get_trainer(config.trainer).restore(workdir)


def evaluate_workdir(workdir: str, split: str = "test") -> dict[str, Any]:
    """Evaluates the latest checkpoint of ``workdir`` on ``split``; writes eval_<split>.json.

    Returns:
      ``{"step", "split", "metrics", "per_site"}`` with metric keys prefixed by ``split``.
    """
    workdir_lib.check_writable(workdir, inside=(f"eval_{split}.json",))
    run = restore(workdir)
    predict_fn = evaluate.make_predict_fn(run.model.apply, run.splits.info.task)
    result = evaluate.evaluate(
        predict_fn,
        run.params,
        run.splits.split(split),
        run.splits.info,
        run.normalizer,
        run.config.train.eval_batch_size,
    )
    out = {
        "step": run.step,
        "split": split,
        "metrics": evaluate.prefixed(result["metrics"], split),
        "per_site": {k: evaluate.prefixed(v, split) for k, v in result["per_site"].items()},
    }
    checkpoint.write_json_atomic(os.path.join(workdir, f"eval_{split}.json"), out)
    return out
