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
from fedjax_med.data import pipeline, preprocess
from fedjax_med.models import registry
from fedjax_med.trainers import dp_sgd
from fedjax_med.trainers import run as run_lib
from fedjax_med.training import checkpoint, evaluate, losses, optimizers, parallel, report, setup
from fedjax_med.training import state as state_lib
from fedjax_med.training import workdir as workdir_lib

logger = logging.getLogger("fedjax_med")

STREAM_PARAMS = 0
STREAM_STEPS = 1


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything built from a config before training starts."""

    config: ml_collections.ConfigDict
    splits: dataset_lib.DatasetSplits
    normalizer: preprocess.Normalizer
    model: registry.Model
    optimizer: optax.GradientTransformation
    plan: dp_sgd.PrivatePlan | None = None  # DP-SGD plan when config.privacy.enabled


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Loads the data and builds normaliser, model and optimizer from ``config``."""
    splits, normalizer, model = setup.build_data_and_model(config)
    optimizer = optimizers.make_optimizer(config.optimizer, config.train.steps)
    plan = None
    if config.privacy.enabled:
        num_devices = parallel.make_data_parallel(config.train.num_devices).size
        plan = dp_sgd.make_plan(config, splits.train, num_devices)
        optimizer = dp_sgd.make_private_optimizer(plan, optimizer)
    return Experiment(config, splits, normalizer, model, optimizer, plan)


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


def make_step_runner(experiment: Experiment, devices: parallel.DataParallel) -> Callable:
    """``run(state, step) -> (state, metrics)``: one training step, private or not.

    Batches are a pure function of ``(seed, step)`` in both modes, so resumed runs see the same
    batches. Metrics are host floats; ``examples`` is the number of real examples processed.
    Private steps report no training loss (it is not covered by the DP guarantee), only the
    fraction of clipped units and the mean gradient norm.
    """
    config, info = experiment.config, experiment.splits.info
    train = experiment.splits.train
    if experiment.plan is None:
        train_step = make_train_step(experiment.model.apply, experiment.optimizer, info.task)
        batches = pipeline.ShuffledBatches(len(train), config.train.batch_size, config.seed)

        def run(state, step):
            images, labels = pipeline.gather(train, batches.indices(step), experiment.normalizer)
            state, metrics = train_step(
                state, devices.shard_batch(images), devices.shard_batch(labels)
            )
            loss = float(metrics["loss"])  # blocks, so step timing is honest
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss} at step {step}; lower optimizer.learning_rate"
                )
            return state, {"loss": loss, "examples": config.train.batch_size}

        return run

    plan = experiment.plan
    grad_sum = dp_sgd.make_grad_sum_fn(config, experiment.model.apply, info.task, plan)
    apply_update = dp_sgd.make_apply_fn(experiment.optimizer)

    def run(state, step):
        batch = plan.sampler.sample(step)
        total, clipped, units, norm_sum = None, 0, 0, 0.0
        for chunk in batch.chunks:
            images, labels = pipeline.gather(train, chunk.indices, experiment.normalizer)
            unit_index = chunk.unit_index if chunk.unit_index is not None else chunk.mask
            chunk_sum, aux = grad_sum(
                state.params,
                devices.shard_batch(images),
                devices.shard_batch(labels),
                devices.shard_batch(chunk.mask),
                devices.shard_batch(unit_index),
            )
            total = dp_sgd.add_trees(total, chunk_sum)
            count = int(aux["count"])
            clipped += int(aux["num_clipped"])
            units += count
            norm_sum += float(aux["mean_grad_norm"]) * count
        state = apply_update(state, total)
        norm = dp_sgd.finite_or_raise(norm_sum / max(units, 1), "mean gradient norm", step)
        return state, {
            "clipped_fraction": clipped / max(units, 1),
            "grad_norm": norm,
            "examples": batch.realised_size,
        }

    return run


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
    checkpointer = workdir_lib.prepare_workdir(workdir, resume, config)
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
        state, metadata = checkpointer.restore(latest, dp_sgd.secret_free(state, experiment.plan))
        state = dp_sgd.with_fresh_secrets(state, experiment.plan)
        elapsed.update(metadata["elapsed"])
        if is_chief:
            kept = [r for r in workdir_lib.read_metrics(metrics_path) if r["step"] <= latest]
            workdir_lib.rewrite_metrics(metrics_path, kept)
        logger.info("resumed from step %d", latest)
    elif is_chief:
        workdir_lib.rewrite_metrics(metrics_path, [])
    if is_chief:
        checkpoint.write_json_atomic(
            os.path.join(workdir, "config.json"), loading.to_json_dict(config)
        )

    run_step = make_step_runner(experiment, devices)
    predict_fn = evaluate.make_predict_fn(
        experiment.model.apply, info.task, devices.replicated_sharding
    )
    plan = experiment.plan
    ledger = plan.ledger if plan else None
    if plan and resume:
        ledger = type(ledger).from_dict(metadata["privacy_ledger"])
        dp_sgd.check_resumed_ledger(ledger, plan.ledger)

    def save(step: int) -> None:
        meta = {"step": step, "elapsed": dict(elapsed)}
        if ledger is not None:
            meta["privacy_ledger"] = ledger.to_dict()
        checkpointer.save(step, dp_sgd.secret_free(state, plan), meta)

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
            workdir_lib.append_metrics(metrics_path, record)
        return result

    start = int(state.step)
    end = train_cfg.steps if stop_at_step is None else min(stop_at_step, train_cfg.steps)
    if ledger is not None:
        allowed = dp_sgd.allowed_steps(ledger, end - start)
        if allowed < end - start:
            logger.warning(
                "privacy budget epsilon=%.4g allows only %d more steps: stopping at step %d",
                ledger.target_epsilon,
                allowed,
                start + allowed,
            )
        end = start + allowed
    stopped_by_budget = ledger is not None and end < min(
        train_cfg.steps, stop_at_step or train_cfg.steps
    )
    run_start = time.perf_counter()
    window: dict[str, float] = {}
    window_steps, window_time, accounted = 0, 0.0, start
    bar = tqdm.tqdm(
        total=train_cfg.steps, initial=start, disable=quiet, file=sys.stderr, unit="step"
    )

    def privacy_extra(done: int) -> dict[str, Any]:
        nonlocal ledger, accounted
        if ledger is None:
            return {}
        ledger = ledger.record(done - accounted)  # refuses (raises) past the target
        accounted = done
        return {"epsilon": ledger.epsilon(), "delta": ledger.delta}

    for step in range(start, end):
        t0 = time.perf_counter()
        state, step_metrics = run_step(state, step)
        dt = time.perf_counter() - t0
        elapsed["train_time_s"] += dt
        elapsed["examples_seen"] += step_metrics.pop("examples")
        for k, v in step_metrics.items():
            window[k] = window.get(k, 0.0) + v
        window_steps, window_time = window_steps + 1, window_time + dt
        bar.update(1)
        done = step + 1
        if done % train_cfg.log_every == 0 or done == end:
            bar.set_postfix(
                **{k: f"{v / window_steps:.4f}" for k, v in window.items()},
                ex_s=f"{train_cfg.batch_size * window_steps / max(window_time, 1e-9):.0f}",
            )
        if done % train_cfg.eval_every == 0 and done != end:
            extra = {f"train_{k}": v / window_steps for k, v in window.items()}
            run_eval(done, "val", {**extra, **privacy_extra(done)})
            window, window_steps, window_time = {}, 0, 0.0
        if done % train_cfg.checkpoint_every == 0 or done == end:
            privacy_extra(done)
            elapsed["wall_time_s"] += time.perf_counter() - run_start
            run_start = time.perf_counter()
            save(done)
    bar.close()
    elapsed["wall_time_s"] += time.perf_counter() - run_start
    checkpointer.close()
    if end < train_cfg.steps and not stopped_by_budget:
        logger.info("stopped at step %d of %d; resume with --resume", end, train_cfg.steps)
        return {"stopped_at_step": end}

    final_step = end
    val = run_eval(final_step, "val", privacy_extra(final_step))
    test = run_eval(final_step, "test", {})
    extra = {}
    if plan is not None:
        claim = dp_sgd.privacy_claim(plan, ledger, config, stopped_by_budget)
        extra["privacy"] = claim.to_report()
    result = report.build_report(
        config=config,
        info=info,
        test=test,
        val=val,
        steps=final_step,
        num_params=experiment.model.num_params(state.params),
        elapsed=elapsed,
        extra=extra,
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
        final_step,
        result["wall_time_s"],
    )
    if plan is not None:
        logger.info(
            "privacy: epsilon %.4g at delta %.3g (%s, %s-level, noise seed %s)",
            result["privacy"]["epsilon"],
            ledger.delta,
            ledger.accountant,
            plan.unit,
            plan.randomness.mode,
        )
    return result


def restore_for_eval(workdir: str) -> tuple[Experiment, state_lib.TrainState]:
    """Rebuilds the experiment of ``workdir`` from its config.json and its latest checkpoint."""
    config = workdir_lib.load_workdir_config(workdir)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    latest = checkpointer.latest_step()
    if latest is None:
        raise workdir_lib.WorkdirError(f"workdir '{workdir}' has no checkpoint")
    experiment = build_experiment(config)
    state, _ = checkpointer.restore(latest, init_state(experiment))
    checkpointer.close()
    return experiment, state


def restore(workdir: str) -> run_lib.Run:
    """The centralized run of ``workdir`` as a :class:`~fedjax_med.trainers.run.Run`."""
    experiment, state = restore_for_eval(workdir)
    return run_lib.Run(
        trainer="central",
        config=experiment.config,
        splits=experiment.splits,
        normalizer=experiment.normalizer,
        model=experiment.model,
        params=state.params,
        initial_params=init_state(experiment).params,
        step=int(state.step),
    )


def _train(config, workdir, *, resume=False, quiet=False, stop_at=None):
    return train_and_evaluate(config, workdir, resume=resume, quiet=quiet, stop_at_step=stop_at)


TRAINER = run_lib.Trainer(name="central", train=_train, restore=restore)
