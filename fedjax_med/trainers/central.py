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
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedjax_med.config import loading, scope
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import pipeline, preprocess
from fedjax_med.models import losses, registry
from fedjax_med.trainers import dp_sgd
from fedjax_med.trainers import run as run_lib
from fedjax_med.training import (
    averaging,
    checkpoint,
    curves,
    evaluate,
    finetune,
    metrics,
    optimizers,
    parallel,
    progress,
    report,
    setup,
)
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
    trainable: Any = None  # bool per parameter leaf (train.trainable); None: all train
    data_stats: Any = None  # DataNorm's statistics (registry.DATA_STATS params), or None


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Loads the data and builds normaliser, model and optimizer from ``config``."""
    splits, normalizer, model = setup.build_data_and_model(config)
    optimizer = optimizers.make_optimizer(config.optimizer, config.train.steps)
    plan = None
    if config.privacy.enabled:
        num_devices = parallel.make_data_parallel(config.train.num_devices).size
        plan = dp_sgd.make_plan(config, splits.train, num_devices, model)
        optimizer = dp_sgd.make_private_optimizer(plan, optimizer)
    data_stats = dp_sgd.data_norm_stats(model, splits.train, normalizer, plan)
    mask = None
    if config.train.trainable != "all" or data_stats is not None:
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
        mask = finetune.trainable_mask(shapes, config.train.trainable)
        # Noise and updates reach only the trained leaves; the frozen ones stay bit-identical.
        optimizer = finetune.freeze(optimizer, mask)
    # Last in the chain: the averages see the final parameters of every step.
    optimizer = averaging.with_averages(
        optimizer, config.train.ema_decay, config.train.polyak_start
    )
    return Experiment(config, splits, normalizer, model, optimizer, plan, mask, data_stats)


def pretrained_params(path: str) -> Any:
    """The parameters ``model.init_from`` names: a flax msgpack file, or a central workdir's
    latest checkpoint."""
    if os.path.isdir(path):
        return restore_for_eval(path)[1].params
    return finetune.read_msgpack(path)


def init_state(experiment: Experiment) -> state_lib.TrainState:
    """The step-0 :class:`TrainState` of ``experiment``, a pure function of ``config.seed``.

    With ``root = PRNGKey(config.seed)``: parameters are initialised from
    ``fold_in(root, STREAM_PARAMS)``, the optimizer state is ``optimizer.init(params)`` and
    ``rng`` is ``fold_in(root, STREAM_STEPS)``. Restores use it as the template of the checkpoint.
    DataNorm's statistics, released before step 0, replace the module
    :data:`~fedjax_med.models.registry.DATA_STATS` (after any pretrained parameters).
    """
    root = jax.random.PRNGKey(experiment.config.seed)
    params = experiment.model.init(jax.random.fold_in(root, STREAM_PARAMS))
    if experiment.config.model.init_from:
        pretrained = pretrained_params(experiment.config.model.init_from)
        params = finetune.merge_pretrained(params, pretrained)
    if experiment.data_stats is not None:
        params = {**params, registry.DATA_STATS: dict(experiment.data_stats)}
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
    grad_sum = dp_sgd.make_grad_sum_fn(
        config, experiment.model.apply, info.task, plan, experiment.trainable
    )
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
                devices.shard_batch(np.asarray(chunk.indices, np.int32)),
                np.int32(step),
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
    """Logs the devices, the data (task, classes, image shape, sites, split sizes) and the model."""
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
    """The eval batch size rounded up to a multiple of the device count.

    Examples:
      >>> eval_batch_for(100, 8)
      104
    """
    return -(-batch_size // num_devices) * num_devices


@dataclasses.dataclass
class MetricsWindow:
    """Training metrics summed since the last evaluation, for the log and the progress bar.

    It is saved in each checkpoint's metadata (:meth:`to_dict`), so after a resume the ``train_*``
    means of the next evaluation cover the same steps as in an uninterrupted run.
    """

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    def add(self, metrics: dict[str, float], seconds: float) -> None:
        """Adds one step's ``metrics`` and its duration (``seconds``) to the window."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds

    def means(self, prefix: str = "") -> dict[str, float]:
        """Each metric's mean per step since the window opened, its key prefixed by ``prefix``.

        Examples:
          >>> window = MetricsWindow()
          >>> window.add({"loss": 1.0}, 0.1)
          >>> window.add({"loss": 3.0}, 0.1)
          >>> window.means("train_")
          {'train_loss': 2.0}
        """
        return {f"{prefix}{k}": v / max(self.steps, 1) for k, v in self.sums.items()}

    def to_dict(self) -> dict[str, Any]:
        """The window as JSON; ``MetricsWindow(**window.to_dict())`` rebuilds it exactly."""
        return {"sums": dict(self.sums), "steps": self.steps, "seconds": self.seconds}


@dataclasses.dataclass
class CentralRun:
    """The pieces of one run of :func:`train_and_evaluate` that its steps share."""

    experiment: Experiment
    devices: parallel.DataParallel
    checkpointer: checkpoint.Checkpointer
    metrics_path: str
    ledger: dp_sgd.StepLedger
    is_chief: bool
    window: MetricsWindow = dataclasses.field(default_factory=MetricsWindow)
    elapsed: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"wall_time_s": 0.0, "train_time_s": 0.0, "examples_seen": 0}
    )

    def start(self, resume: bool) -> state_lib.TrainState:
        """The initial state, or the checkpoint's (ledger and metrics restored with it)."""
        plan = self.experiment.plan
        state = self.devices.replicate(init_state(self.experiment))
        describe_run(self.experiment, state.params)
        if not resume:
            if self.is_chief:
                workdir_lib.rewrite_metrics(self.metrics_path, [])
            return state
        latest, state, metadata = self.checkpointer.restore_latest(
            dp_sgd.secret_free(state, plan), discard_damaged=self.is_chief
        )
        state = dp_sgd.with_fresh_secrets(state, plan)
        self.elapsed.update(metadata["elapsed"])
        self.window = MetricsWindow(**metadata.get("window", {}))  # older runs saved none
        self.ledger.load_state_dict(metadata)
        if self.is_chief:
            kept = [r for r in workdir_lib.read_metrics(self.metrics_path) if r["step"] <= latest]
            workdir_lib.rewrite_metrics(self.metrics_path, kept)
        logger.info("resumed from step %d", latest)
        return state

    def save(self, state: state_lib.TrainState, step: int) -> None:
        """Accounts the ledger up to ``step``, then checkpoints ``state`` with the run's metadata.

        The metadata holds ``step``, the elapsed times, the metrics window and the ledger; in
        secure mode the noise key is zeroed first (:func:`~fedjax_med.trainers.dp_sgd.secret_free`).

        Raises:
          BudgetExceededError: if the steps up to ``step`` would pass ``privacy.target_epsilon``.
        """
        self.ledger.record_to(step)
        meta = {
            "step": step,
            "elapsed": dict(self.elapsed),
            "window": self.window.to_dict(),
            **self.ledger.state_dict(),
        }
        self.checkpointer.save(step, dp_sgd.secret_free(state, self.experiment.plan), meta)

    def evaluate(
        self, params, step: int, split: str, extra: dict[str, Any], *, log: bool = True
    ) -> dict[str, Any]:
        """Evaluates ``params`` on ``split`` and logs it to ``metrics.jsonl`` (chief only; not
        when ``log`` is False).

        The record is ``{"step", "split", "<split>_<metric>"..., **extra}``.

        Returns:
          :func:`fedjax_med.training.evaluate.evaluate`'s dict (overall, per-site, per-subgroup).
        """
        experiment, devices = self.experiment, self.devices
        predict_fn = evaluate.make_predict_fn(
            experiment.model.apply, experiment.splits.info.task, devices.replicated_sharding
        )
        result = evaluate.evaluate(
            predict_fn,
            params,
            experiment.splits.split(split),
            experiment.splits.info,
            experiment.normalizer,
            eval_batch_for(experiment.config.train.eval_batch_size, devices.size),
            devices.shard_batch,
        )
        record = {"step": step, "split": split, **evaluate.prefixed(result["metrics"], split)}
        record.update(extra)
        if self.is_chief and log:
            workdir_lib.append_metrics(self.metrics_path, record)
        return result


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` and returns the report (also written to report.json).

    ``stop_at_step`` ends the run early after checkpointing that step, as a preemption would, and
    returns ``{"stopped_at_step": step}``; calling again with ``resume=True`` finishes it exactly.

    Raises:
      WorkdirError: if ``workdir`` holds a run and ``resume`` is False, has none to resume, or
        the resumed config changes a field the run fixed.
      FloatingPointError: if the training loss (or a private step's gradient norm) stops being
        finite.
    """
    scope.check(config)  # a field this trainer would ignore is refused, not dropped
    checkpointer = workdir_lib.prepare_workdir(workdir, resume, config)
    experiment = build_experiment(config)
    train_cfg = config.train
    devices = parallel.make_data_parallel(train_cfg.num_devices)
    devices.check_batch_size(train_cfg.batch_size, "train.batch_size")
    run = CentralRun(
        experiment,
        devices,
        checkpointer,
        os.path.join(workdir, "metrics.jsonl"),
        dp_sgd.StepLedger(experiment.plan),
        jax.process_index() == 0,
    )
    state = run.start(resume)
    if run.is_chief:
        checkpoint.write_json_atomic(
            os.path.join(workdir, "config.json"), loading.to_json_dict(config)
        )
    run_step = make_step_runner(experiment, devices)
    start = int(state.step)
    planned = train_cfg.steps if stop_at_step is None else min(stop_at_step, train_cfg.steps)
    end = start + run.ledger.allowed(start, planned - start)
    bar = progress.progress_bar(train_cfg.steps, start, "step", quiet, train_cfg.log_every)
    run_start = time.perf_counter()
    for step in range(start, end):
        t0 = time.perf_counter()
        state, step_metrics = run_step(state, step)
        dt = time.perf_counter() - t0
        run.elapsed["train_time_s"] += dt
        run.elapsed["examples_seen"] += step_metrics.pop("examples")
        run.window.add(step_metrics, dt)
        bar.update(1)
        done = step + 1
        if done % train_cfg.log_every == 0 or done == end:
            throughput = train_cfg.batch_size * run.window.steps / max(run.window.seconds, 1e-9)
            bar.set_postfix(
                **{k: f"{v:.4f}" for k, v in run.window.means().items()}, ex_s=f"{throughput:.0f}"
            )
        if done % train_cfg.eval_every == 0 and done != end:
            extra = {**run.window.means("train_"), **run.ledger.record_to(done)}
            run.evaluate(state.params, done, "val", extra)
            run.window = MetricsWindow()
        if done % train_cfg.checkpoint_every == 0 or done == end:
            run.elapsed["wall_time_s"] += time.perf_counter() - run_start
            run_start = time.perf_counter()
            run.save(state, done)
    bar.close()
    run.elapsed["wall_time_s"] += time.perf_counter() - run_start
    checkpointer.close()
    if end < train_cfg.steps and not run.ledger.stopped_by_budget:
        logger.info("stopped at step %d of %d; resume with --resume", end, train_cfg.steps)
        return {"stopped_at_step": end}
    return finish(run, state, workdir, end)


def finish(run: CentralRun, state, workdir: str, final_step: int) -> dict[str, Any]:
    """Final evaluation, the privacy claim, report.json."""
    experiment = run.experiment
    config = experiment.config
    extra = {**run.window.means("train_"), **run.ledger.record_to(final_step)}
    val = run.evaluate(state.params, final_step, "val", extra)
    test = run.evaluate(state.params, final_step, "test", {})
    claim = run.ledger.claim(config)
    # Averaged parameters (post-processing of the iterates): test_<metric>_<ema|polyak>.
    averaged, averaged_val = {}, {}
    for name, params in averaging.averaged_params(state.opt_state).items():
        for split, out in (("test", averaged), ("val", averaged_val)):
            values = run.evaluate(params, final_step, split, {}, log=False)["metrics"]
            out.update({f"{k}_{name}": v for k, v in evaluate.prefixed(values, split).items()})
    result = report.build_report(
        config=config,
        info=experiment.splits.info,
        test=test,
        val=val,
        steps=final_step,
        num_params=experiment.model.num_params(state.params),
        elapsed=run.elapsed,
        extra={} if claim is None else {"privacy": claim.to_report()},
    )
    result["metrics"].update(report.json_safe(averaged))
    result["val_metrics"].update(report.json_safe(averaged_val))
    if run.is_chief:
        checkpoint.write_json_atomic(os.path.join(workdir, "report.json"), result)
        curves.write_curves(workdir, run.metrics_path, unit="step")
    m = result["metrics"]
    logger.info(
        "test %s (%d steps, %.1f s)%s",
        metrics.headline(m, experiment.splits.info.task, "test_"),
        final_step,
        result["wall_time_s"],
        f"; {claim.guarantee}" if claim is not None else "",
    )
    return result


def restore_for_eval(workdir: str) -> tuple[Experiment, state_lib.TrainState]:
    """Rebuilds the experiment of ``workdir`` from its config.json and its latest checkpoint.

    A damaged newest checkpoint is skipped for the newest intact one.

    Raises:
      WorkdirError: if ``workdir`` has no config.json or no checkpoint.
      CheckpointError: if every checkpoint is damaged.
    """
    config = workdir_lib.load_workdir_config(workdir)

    def build():
        experiment = build_experiment(config)
        return experiment, init_state(experiment)

    return workdir_lib.restore_checkpoint(workdir, build)


def restore(workdir: str) -> run_lib.Run:
    """The centralized run of ``workdir`` as a :class:`~fedjax_med.trainers.run.Run`."""
    experiment, state = restore_for_eval(workdir)
    initial = init_state(experiment).params
    if registry.DATA_STATS in state.params:
        # The statistics the run released (a secure run's rebuild drew fresh noise, discarded).
        initial = {**initial, registry.DATA_STATS: state.params[registry.DATA_STATS]}
    return run_lib.Run(
        trainer="central",
        config=experiment.config,
        splits=experiment.splits,
        normalizer=experiment.normalizer,
        model=experiment.model,
        params=state.params,
        initial_params=initial,
        step=int(state.step),
    )


def _train(config, workdir, *, resume=False, quiet=False, stop_at=None):
    return train_and_evaluate(config, workdir, resume=resume, quiet=quiet, stop_at_step=stop_at)


TRAINER = run_lib.Trainer(name="central", train=_train, restore=restore)
