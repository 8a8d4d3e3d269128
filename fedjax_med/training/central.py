"""Centralized training: config -> data -> model -> optimizer -> jitted step -> eval -> outputs.

``train_and_evaluate(config, workdir)`` is the loop behind ``fedjax-med train`` for
``config.trainer = "central"``. Outputs in ``workdir``:

* ``config.json``: the resolved config (``fedjax-med eval`` rebuilds the run from it);
* ``metrics.jsonl``: one JSON object per evaluation (``step``, ``split``, metrics, throughput);
* ``checkpoints/``: atomic orbax checkpoints of the :class:`TrainState` and the run's metadata;
* ``report.json``: final test metrics, per-site and per-subgroup metrics, timing, config and
  package versions (schema in the README).

Randomness: one root key from ``config.seed``; parameters use ``fold_in(root, STREAM_PARAMS)``;
training batches are a pure function of ``(seed, step)`` on the host. A run resumed from a
checkpoint therefore continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from fedjax_med.config import loading
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import pipeline, preprocess, sources
from fedjax_med.models import registry
from fedjax_med.training import checkpoint, evaluate, losses, optimizers, parallel, report
from fedjax_med.training import state as state_lib

logger = logging.getLogger("fedjax_med")

STREAM_PARAMS = 0
STREAM_STEPS = 1


class WorkdirError(ValueError):
    """The workdir holds a run that this command would overwrite, or none to resume."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything built from a config before training starts."""

    config: ml_collections.ConfigDict
    splits: dataset_lib.DatasetSplits
    normalizer: preprocess.Normalizer
    model: registry.Model
    optimizer: optax.GradientTransformation


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Loads the data and builds normaliser, model and optimizer from ``config``."""
    splits = sources.load_splits(config.data, config.seed)
    info = splits.info
    normalizer = preprocess.fit_normalizer(
        splits.train,
        len(info.site_names),
        method=config.data.normalization,
        mean=config.data.mean,
        std=config.data.std,
    )
    model = registry.get_model(
        config.model.name,
        input_shape=info.image_shape,
        num_outputs=info.num_outputs,
        **config.model.kwargs.to_dict(),
    )
    optimizer = optimizers.make_optimizer(config.optimizer, config.train.steps)
    return Experiment(config, splits, normalizer, model, optimizer)


def init_state(experiment: Experiment) -> state_lib.TrainState:
    root = jax.random.PRNGKey(experiment.config.seed)
    params = experiment.model.init(jax.random.fold_in(root, STREAM_PARAMS))
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=experiment.optimizer.init(params),
        rng=jax.random.fold_in(root, STREAM_STEPS),
    )


def make_train_step(
    apply_fn: Callable, optimizer: optax.GradientTransformation, task: str
) -> Callable:
    """Jitted non-private step: mean loss over the batch, one optimizer update."""

    def batch_loss(params, images, labels):
        example_losses = losses.per_example_loss(apply_fn(params, images), labels, task)
        return example_losses.mean()

    @jax.jit
    def train_step(state: state_lib.TrainState, images, labels):
        loss, grads = jax.value_and_grad(batch_loss)(state.params, images, labels)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step


def describe_run(experiment: Experiment, params: Any) -> None:
    info = experiment.splits.info
    devices = jax.devices()
    logger.info("devices: %d x %s (%s)", len(devices), devices[0].platform, devices[0].device_kind)
    logger.info(
        "data: %s, task %s, %d classes, image %s, %d sites; train %d / val %d / test %d",
        info.name,
        info.task,
        info.num_classes,
        "x".join(map(str, info.image_shape)),
        len(info.site_names),
        len(experiment.splits.train),
        len(experiment.splits.val),
        len(experiment.splits.test),
    )
    logger.info(
        "model: %s, %s parameters; optimizer %s lr %g",
        experiment.model.name,
        f"{experiment.model.num_params(params):,}",
        experiment.config.optimizer.name,
        experiment.config.optimizer.learning_rate,
    )


def eval_batch_for(batch_size: int, num_devices: int) -> int:
    """The eval batch size rounded up to a multiple of the device count."""
    return -(-batch_size // num_devices) * num_devices


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rewrite_metrics(path: str, records: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(report.json_safe(record)) + "\n")
    os.replace(tmp, path)


def append_metrics(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(report.json_safe(record)) + "\n")
        f.flush()


def prepare_workdir(workdir: str, resume: bool) -> checkpoint.Checkpointer:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    has_checkpoint = os.path.isdir(ckpt_dir) and any(
        name.isdigit() for name in os.listdir(ckpt_dir)
    )
    if has_checkpoint and not resume:
        raise WorkdirError(
            f"workdir '{workdir}' already holds a run; pass --resume to continue it or choose "
            "a new --workdir"
        )
    if resume and not has_checkpoint:
        raise WorkdirError(f"--resume: workdir '{workdir}' has no checkpoint to resume from")
    os.makedirs(workdir, exist_ok=True)
    return checkpoint.Checkpointer(ckpt_dir)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` and returns the report (also written to report.json).

    ``stop_at_step`` ends the run early after checkpointing that step, as a preemption would;
    calling again with ``resume=True`` finishes it exactly.
    """
    checkpointer = prepare_workdir(workdir, resume)
    experiment = build_experiment(config)
    info = experiment.splits.info
    train_cfg = config.train
    devices = parallel.make_data_parallel(train_cfg.num_devices)
    devices.check_batch_size(train_cfg.batch_size, "train.batch_size")
    eval_batch_size = eval_batch_for(train_cfg.eval_batch_size, devices.size)
    state = devices.replicate(init_state(experiment))
    describe_run(experiment, state.params)
    is_chief = jax.process_index() == 0

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    elapsed = {"wall_time_s": 0.0, "train_time_s": 0.0, "examples_seen": 0}
    if resume:
        latest = checkpointer.latest_step()
        state, metadata = checkpointer.restore(latest, state)
        elapsed.update(metadata["elapsed"])
        if is_chief:
            kept = [r for r in read_metrics(metrics_path) if r["step"] <= latest]
            rewrite_metrics(metrics_path, kept)
        logger.info("resumed from step %d", latest)
    elif is_chief:
        rewrite_metrics(metrics_path, [])
    if is_chief:
        checkpoint.write_json_atomic(
            os.path.join(workdir, "config.json"), loading.to_json_dict(config)
        )

    train_step = make_train_step(experiment.model.apply, experiment.optimizer, info.task)
    predict_fn = evaluate.make_predict_fn(
        experiment.model.apply, info.task, devices.replicated_sharding
    )
    batches = pipeline.ShuffledBatches(
        len(experiment.splits.train), train_cfg.batch_size, config.seed
    )

    def save(step: int) -> None:
        checkpointer.save(step, state, {"step": step, "elapsed": dict(elapsed)})

    def run_eval(step: int, split: str, extra: dict[str, Any]) -> dict[str, Any]:
        data = experiment.splits.split(split)
        result = evaluate.evaluate(
            predict_fn,
            state.params,
            data,
            info,
            experiment.normalizer,
            eval_batch_size,
            devices.shard_batch,
        )
        record = {"step": step, "split": split, **evaluate.prefixed(result["metrics"], split)}
        record.update(extra)
        if is_chief:
            append_metrics(metrics_path, record)
        return result

    start = int(state.step)
    end = train_cfg.steps if stop_at_step is None else min(stop_at_step, train_cfg.steps)
    run_start = time.perf_counter()
    window_loss, window_steps, window_time = 0.0, 0, 0.0
    bar = tqdm.tqdm(
        total=train_cfg.steps, initial=start, disable=quiet, file=sys.stderr, unit="step"
    )
    for step in range(start, end):
        images, labels = pipeline.gather(
            experiment.splits.train, batches.indices(step), experiment.normalizer
        )
        t0 = time.perf_counter()
        state, step_metrics = train_step(
            state, devices.shard_batch(images), devices.shard_batch(labels)
        )
        loss = float(step_metrics["loss"])  # blocks, so the timing below is honest
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss} at step {step}; lower optimizer.learning_rate"
            )
        dt = time.perf_counter() - t0
        elapsed["train_time_s"] += dt
        elapsed["examples_seen"] += train_cfg.batch_size
        window_loss, window_steps, window_time = (
            window_loss + loss,
            window_steps + 1,
            window_time + dt,
        )
        bar.update(1)
        done = step + 1
        if done % train_cfg.log_every == 0 or done == end:
            bar.set_postfix(
                loss=f"{window_loss / window_steps:.4f}",
                ex_s=f"{train_cfg.batch_size * window_steps / max(window_time, 1e-9):.0f}",
            )
        if done % train_cfg.eval_every == 0 and done != train_cfg.steps:
            run_eval(done, "val", {"train_loss": window_loss / window_steps})
            window_loss, window_steps, window_time = 0.0, 0, 0.0
        if done % train_cfg.checkpoint_every == 0 or done == end:
            elapsed["wall_time_s"] += time.perf_counter() - run_start
            run_start = time.perf_counter()
            save(done)
    bar.close()
    elapsed["wall_time_s"] += time.perf_counter() - run_start
    checkpointer.close()
    if end < train_cfg.steps:
        logger.info("stopped at step %d of %d; resume with --resume", end, train_cfg.steps)
        return {"stopped_at_step": end}

    val = run_eval(train_cfg.steps, "val", {})
    test = run_eval(train_cfg.steps, "test", {})
    result = report.build_report(
        config=config,
        info=info,
        test=test,
        val=val,
        steps=train_cfg.steps,
        num_params=experiment.model.num_params(state.params),
        elapsed=elapsed,
    )
    if is_chief:
        checkpoint.write_json_atomic(os.path.join(workdir, "report.json"), result)
    m = result["metrics"]
    logger.info(
        "test accuracy %.4f, AUROC %.4f, balanced accuracy %.4f, ECE %.4f (%d steps, %.1f s)",
        m["test_accuracy"],
        m["test_auroc"],
        m["test_balanced_accuracy"],
        m["test_ece"],
        train_cfg.steps,
        result["wall_time_s"],
    )
    return result


def restore_for_eval(workdir: str) -> tuple[Experiment, state_lib.TrainState]:
    """Rebuilds the experiment of ``workdir`` from its config.json and its latest checkpoint."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise WorkdirError(f"workdir '{workdir}' has no config.json (was it trained here?)")
    with open(config_path) as f:
        config = loading.from_json_dict(json.load(f))
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    latest = checkpointer.latest_step()
    if latest is None:
        raise WorkdirError(f"workdir '{workdir}' has no checkpoint")
    experiment = build_experiment(config)
    state, _ = checkpointer.restore(latest, init_state(experiment))
    checkpointer.close()
    return experiment, state


def evaluate_workdir(workdir: str, split: str = "test") -> dict[str, Any]:
    """Evaluates the latest checkpoint of ``workdir`` on ``split``; writes eval_<split>.json."""
    experiment, state = restore_for_eval(workdir)
    predict_fn = evaluate.make_predict_fn(experiment.model.apply, experiment.splits.info.task)
    result = evaluate.evaluate(
        predict_fn,
        state.params,
        experiment.splits.split(split),
        experiment.splits.info,
        experiment.normalizer,
        experiment.config.train.eval_batch_size,
    )
    out = {
        "step": int(state.step),
        "split": split,
        "metrics": evaluate.prefixed(result["metrics"], split),
        "per_site": {k: evaluate.prefixed(v, split) for k, v in result["per_site"].items()},
    }
    checkpoint.write_json_atomic(os.path.join(workdir, f"eval_{split}.json"), out)
    return out
