"""DP-SGD in the trainer: sampler, clipped sums, noise, optimizer and budget (``config.privacy``).

One private step (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133):

1. the sampler draws the step's batch: Poisson with rate ``q = L / N`` over examples, or over
   patients (``privacy.unit = "patient"``, at most ``k`` images each), as fixed-shape chunks
   with a mask (a batch larger than a chunk becomes several chunks, never truncated);
2. each chunk gives the sum of clipped per-example (per-patient) gradients, norm ``<= C`` each;
3. ``N(0, (sigma C)^2 I)`` is added once to the total and it is divided by the expected batch
   size ``L`` (public), then the configured optimizer applies it.

Large batches (the recipe of De et al. 2022, https://arxiv.org/abs/2204.13650, and Tramer and
Boneh 2021, https://arxiv.org/abs/2011.11660: batches of thousands, learning-rate warmup):
``train.batch_size`` is the *logical* batch ``L`` that the sampler draws, the ledger accounts and
the noise is calibrated to; ``privacy.microbatch_size`` is the physical batch, the per-example work
done at once. The clipped sums of the microbatches are accumulated (``lax.scan`` in
:func:`~fedjax_med.privacy.clipping.clipped_grad_sum`, chunk by chunk in the trainer) and noised
once per logical step, so accumulation changes memory, never the privacy or the update (tested:
equal to the one-shot sum plus one noise draw). ``optimizer.warmup_steps`` ramps the learning rate
linearly from 0 over the first steps.

A ScatterNet with private DataNorm (``model.kwargs.norm = "data"``, Tramer & Boneh 2021) first
releases the training set's feature statistics (:func:`data_norm_stats`, two Gaussian releases
of :mod:`~fedjax_med.privacy.data_norm`); the ledger composes those two events with the steps,
and a calibrated noise multiplier leaves room for them.

The :class:`~fedjax_med.privacy.budget.PrivacyLedger` accounts the same event the sampler
realises; the run stops before a step that would pass ``privacy.target_epsilon``. The noise key
lives in the optimizer state, so checkpoints resume the exact noise stream; in ``secure`` mode the
key comes from the operating system's entropy, never from ``config.seed``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedjax_med import randomness
from fedjax_med.config import schema
from fedjax_med.data import augment, pipeline, preprocess
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.models import losses, registry, scatternet
from fedjax_med.privacy import accounting, augmult, budget, clipping, data_norm, noise, sampling
from fedjax_med.privacy import claim as claim_lib
from fedjax_med.trainers import ledgers
from fedjax_med.training import finetune
from fedjax_med.training import state as state_lib

logger = logging.getLogger("fedjax_med")


@dataclasses.dataclass(frozen=True)
class PrivatePlan:
    """Everything DP-SGD needs that is fixed before step 0."""

    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    expected_batch_size: float
    num_units: int
    unit: str
    sampler: Any
    noise_key: jax.Array
    randomness: randomness.Randomness
    ledger: budget.PrivacyLedger
    planned_steps: int  # train.steps; the budget may allow fewer (see allowed_steps)


def unit_ids(train: dataset_lib.ImageDataset, unit: str) -> np.ndarray:
    """The unit of privacy of each training example: its index, or one id per (site, patient).

    Raises:
      ValueError: ``privacy.unit=... must be 'example' or 'patient'``.
    """
    if unit == "example":
        return np.arange(len(train))
    if unit == "patient":
        # Patient ids are unique within a site; the pair identifies the person.
        return train.sites.astype(np.int64) * (int(train.patient_ids.max()) + 1) + train.patient_ids
    raise ValueError(f"privacy.unit={unit!r} must be 'example' or 'patient'")


def make_sampler(config, ids, q, sampling_kind, num_devices, rng):
    """The batch sampler the ledger's event assumes: Poisson over examples or patients (padded
    chunks, a multiple of the device count), or fixed-size batches for ``shuffle``."""
    p, batch, num_units = config.privacy, config.train.batch_size, int(np.unique(ids).size)
    capacity = sampling.poisson_batch_capacity(
        num_units, q, overflow_prob=p.overflow_prob, multiple_of=num_devices
    )
    if p.unit == "patient":
        # Example slots per sampled patient: at most k, fewer if no patient has k images.
        largest_patient = int(np.unique(ids, return_counts=True)[1].max())
        per_unit = min(p.max_images_per_patient, largest_patient)
        sampler = sampling.PoissonUnitSampler(
            ids,
            q,
            p.max_images_per_patient,
            capacity=-(-capacity * per_unit // num_devices) * num_devices,
            seed=config.seed,
            randomness=rng,
        )
    elif sampling_kind == "poisson":
        sampler = sampling.PoissonSampler(
            num_units, q, capacity=capacity, seed=config.seed, randomness=rng
        )
    else:
        sampler = sampling.ShuffledSampler(num_units, batch, seed=config.seed, randomness=rng)
    return sampler


def preceding_releases(
    config: ml_collections.ConfigDict, model: registry.Model | None
) -> tuple[float, ...]:
    """The noise multipliers of the releases made before step 0: DataNorm's two, or none.

    Raises:
      ValueError: DataNorm with ``privacy.unit = "patient"`` (a patient's images would add
        several clipped vectors to each sum, a sensitivity the releases are not scaled to).
    """
    module = None if model is None else scatternet.data_norm_of(model.module)
    if module is None:
        return ()
    if config.privacy.unit != "example":
        raise ValueError(
            "config field 'model.kwargs.norm'='data' estimates the feature statistics per "
            f"example; privacy.unit={config.privacy.unit!r} must be 'example' with it, or use "
            "model.kwargs.norm='group' (no privacy spent)"
        )
    return tuple(e.noise_multiplier for e in data_norm.events(module.norm_noise))


def make_plan(
    config: ml_collections.ConfigDict,
    train: dataset_lib.ImageDataset,
    num_devices: int,
    model: registry.Model | None = None,
) -> PrivatePlan:
    """Calibrates noise (if asked), builds the sampler and the ledger, checks the budget.

    The noise multiplier is ``privacy.noise_multiplier`` when > 0, otherwise the smallest one that
    reaches ``privacy.target_epsilon`` in ``train.steps`` steps at ``q = train.batch_size / N``
    under the run's own sampling, after the releases ``model`` makes before step 0
    (:func:`preceding_releases`). Poisson batches are split into chunks whose capacity is a
    multiple of ``num_devices``.

    Raises:
      ValueError: if ``train.batch_size`` exceeds the number of units, or ``privacy.delta`` is not
        in ``(0, 1)`` (:func:`~fedjax_med.privacy.accounting.check_delta`, which only warns when
        it is ``>= 1 / N``).
    """
    p = config.privacy
    ids = unit_ids(train, p.unit)
    num_units = int(np.unique(ids).size)
    batch = config.train.batch_size
    if batch > num_units:
        raise ValueError(
            f"train.batch_size={batch} (the expected batch, in {p.unit}s) must be <= the "
            f"{num_units} {p.unit}s in the training split"
        )
    q = batch / num_units
    accounting.check_delta(p.delta, num_units)
    steps = config.train.steps
    sampling_kind = "poisson" if p.sampling == "poisson" else "shuffle"
    extra = {}
    if sampling_kind == "shuffle":
        extra = {"num_examples": num_units, "batch_size": batch}
    preceding = preceding_releases(config, model)
    if p.noise_multiplier > 0:
        sigma = float(p.noise_multiplier)
    else:
        # Calibrated in the run's own sampling mode: the event the ledger will account.
        sigma = accounting.calibrate_noise_multiplier(
            p.target_epsilon,
            q,
            steps,
            p.delta,
            accountant=p.accountant,
            sampling=sampling_kind,
            preceding_noise_multipliers=preceding,
            **extra,
        )
        logger.info(
            "calibrated noise multiplier %.4f for epsilon %.3g at delta %.3g over %d steps",
            sigma,
            p.target_epsilon,
            p.delta,
            steps,
        )
    ledger = budget.planned_ledger(
        noise_multiplier=sigma,
        sampling_rate=q,
        planned_steps=steps,
        delta=p.delta,
        target_epsilon=p.target_epsilon,
        accountant=p.accountant,
        unit=p.unit,
        sampling=sampling_kind,
        preceding_noise_multipliers=preceding,
        **extra,
    )
    budget.check_affords_one(ledger, release="step")
    # Sampling and noise draw from the same mode: secure runs take both from the OS's entropy.
    rng = randomness.Randomness(p.noise_seed, config.seed)
    sampler = make_sampler(config, ids, q, sampling_kind, num_devices, rng)
    key = rng.key(randomness.NOISE)
    return PrivatePlan(
        noise_multiplier=sigma,
        clip_norm=float(p.clip_norm),
        sampling_rate=q,
        expected_batch_size=float(sampler.expected_batch_size),
        num_units=num_units,
        unit=p.unit,
        sampler=sampler,
        noise_key=key,
        randomness=rng,
        ledger=ledger,
        planned_steps=steps,
    )


# Examples per jitted call of the feature statistics (padded; one compilation).
DATA_NORM_CHUNK = 256


def data_norm_stats(
    model: registry.Model,
    train: dataset_lib.ImageDataset,
    normalizer: preprocess.Normalizer,
    plan: PrivatePlan | None,
) -> dict[str, jax.Array] | None:
    """DataNorm's ``{"mean", "var"}`` of ``model``'s features on ``train`` (``None``: no DataNorm).

    Private with ``plan`` (:func:`fedjax_med.privacy.data_norm.release` with the model's clip
    norms and noise multiplier, the noise key from the run's
    :data:`~fedjax_med.randomness.DATA_NORM` stream, the sensitivity under the plan's relation):
    exactly the two releases the plan's ledger composes. Without ``plan`` (a non-private run) the
    exact statistics (no clipping, no noise).
    """
    module = scatternet.data_norm_of(model.module)
    if module is None:
        return None
    clips = module.norm_clip if plan is not None else (math.inf, math.inf)

    @jax.jit
    def chunk_sums(images, mask):
        first, second = scatternet.channel_moments(images)
        return data_norm.clipped_sums(first, second, mask, *clips)

    sums = None
    for start in range(0, len(train), DATA_NORM_CHUNK):
        indices = np.arange(start, start + DATA_NORM_CHUNK)
        mask = indices < len(train)
        images, _ = pipeline.gather(train, np.minimum(indices, len(train) - 1), normalizer)
        sums = add_trees(sums, chunk_sums(images, mask))
    if plan is None:
        mean, var = data_norm.release(*sums, len(train), *clips, 0.0, jax.random.key(0))
    else:
        relation = accounting.sensitivity_relation(plan.ledger.sampling)
        key = plan.randomness.key(randomness.DATA_NORM)
        mean, var = data_norm.release(
            *sums, plan.num_units, *clips, module.norm_noise, key, relation=relation
        )
    return {"mean": mean, "var": var}


@dataclasses.dataclass
class StepLedger:
    """The central trainer's ledger: DP-SGD steps accounted in batches (``plan`` None: none).

    ``record_to(done)`` accounts every step up to ``done`` (refusing, by raising, any step past
    the target); the loop calls it at each evaluation and checkpoint, so the ledger in a
    checkpoint always covers the steps of its parameters.
    """

    plan: PrivatePlan | None
    ledger: budget.PrivacyLedger | None = None
    accounted: int = 0
    stopped_by_budget: bool = False

    def __post_init__(self):
        if self.plan is not None and self.ledger is None:
            self.ledger = self.plan.ledger

    def allowed(self, start: int, planned: int) -> int:
        """How many of ``planned`` more steps from ``start`` the budget allows; warns if fewer."""
        self.accounted = start
        if self.ledger is None:
            return max(planned, 0)
        allowed = allowed_steps(self.ledger, planned)
        if allowed < planned:
            self.stopped_by_budget = True
            logger.warning(
                "privacy budget epsilon=%.4g allows only %d more steps: stopping at step %d",
                self.ledger.target_epsilon,
                allowed,
                start + allowed,
            )
        return allowed

    def record_to(self, done: int) -> dict[str, Any]:
        """Accounts every step up to ``done``; returns ``{"epsilon", "delta"}``.

        Returns ``{}`` for a non-private run.

        Raises:
          BudgetExceededError: if those steps would pass ``privacy.target_epsilon``.
        """
        if self.ledger is None:
            return {}
        self.ledger = self.ledger.record(done - self.accounted)  # raises past the target
        self.accounted = done
        return {"epsilon": self.ledger.epsilon(), "delta": self.ledger.delta}

    def state_dict(self) -> dict[str, Any]:
        """The ledger as checkpoint metadata: ``{"privacy_ledger": ...}`` (``{}``: not private)."""
        return {} if self.ledger is None else {"privacy_ledger": self.ledger.to_dict()}

    def load_state_dict(self, metadata: dict[str, Any]) -> None:
        """Restores the saved ledger; raises ``ValueError`` if it accounted other settings."""
        if self.ledger is None:
            return
        saved = budget.PrivacyLedger.from_dict(metadata["privacy_ledger"])
        check_resumed_ledger(saved, self.ledger)
        self.ledger = saved

    def claim(self, config) -> claim_lib.PrivacyClaim | None:
        """The run's privacy claim for ``report.json`` (``None``: not private)."""
        if self.plan is None:
            return None
        return privacy_claim(self.plan, self.ledger, config, self.stopped_by_budget)


def allowed_steps(ledger: budget.PrivacyLedger, planned: int) -> int:
    """How many of the ``planned`` remaining steps the budget allows (one search, not per step)."""
    if planned <= 0:
        return 0
    if ledger.can_take(planned):
        return planned
    return min(planned, ledger.steps_remaining())


def make_private_optimizer(
    plan: PrivatePlan, optimizer: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``dp_aggregate`` (noise the clipped sum, divide by L) chained before the optimizer."""
    relation = accounting.sensitivity_relation(plan.ledger.sampling)
    return optax.chain(
        noise.dp_aggregate(
            plan.noise_multiplier,
            plan.clip_norm,
            plan.expected_batch_size,
            plan.noise_key,
            relation=relation,
        ),
        optimizer,
    )


def make_grad_sum_fn(
    config: ml_collections.ConfigDict,
    apply_fn: Callable,
    task: str,
    plan: PrivatePlan,
    trainable: Any = None,
) -> Callable:
    """Jitted ``(params, images, labels, mask, unit_index, indices, step) -> (clipped sum, aux)``
    for one chunk.

    With ``privacy.augmult = K > 0`` each example's loss is the mean over K augmented views
    (:func:`~fedjax_med.privacy.augmult.augmult_loss_fn`, De et al. 2022), whose keys follow from
    the run's :data:`~fedjax_med.randomness.AUGMULT` key, ``step`` and the examples' ``indices``;
    it is clipped once, so the sensitivity, and the ledger, are those of K = 1. With a
    ``trainable`` mask (``train.trainable``), the frozen leaves' gradients are stopped, so each
    per-example norm and its clipping cover only the trained parameters.
    """
    p = config.privacy
    loss_fn = losses.example_loss_fn(apply_fn, task)
    if trainable is not None:
        loss_fn = finetune.frozen_loss_fn(loss_fn, trainable)
    method = p.method
    if p.augmult > 0:
        if task == "segmentation":
            raise ValueError(
                f"config field 'privacy.augmult'={p.augmult} must be 0 for data.task="
                "'segmentation': the views would move the images but not their masks"
            )
        ops = augment.parse_operations(p.augmentations)
        shift = int(p.augment_shift)
        loss_fn = augmult.augmult_loss_fn(
            loss_fn, lambda key, image: augment.augment(key, image, ops, shift), int(p.augmult)
        )
    microbatch = p.microbatch_size or None
    # Public randomness (the guarantee does not rest on it): always from the seed.
    aug_key = jax.random.fold_in(jax.random.key(int(config.seed)), randomness.AUGMULT)

    def inputs(images, indices, step):
        if p.augmult == 0:
            return images
        return images, augmult.example_keys(aug_key, step, indices)

    if p.unit == "patient":
        fn = clipping.clipped_unit_grad_sum(
            loss_fn, clip_norm=p.clip_norm, unit="patient", microbatch_size=microbatch
        )
        slots = plan.sampler.num_unit_slots

        def unit_fn(params, x, y, mask, unit_index, indices, step):
            return fn(params, inputs(x, indices, step), y, mask, unit_index, slots)

        return jax.jit(unit_fn)
    fn = clipping.clipped_grad_sum(
        loss_fn,
        clip_norm=p.clip_norm,
        per_layer=p.per_layer_clipping,
        microbatch_size=microbatch,
        method=method,
    )

    def example_fn(params, x, y, mask, unit_index, indices, step):
        return fn(params, inputs(x, indices, step), y, mask)

    return jax.jit(example_fn)


def make_apply_fn(optimizer: optax.GradientTransformation) -> Callable:
    """Jitted ``(state, clipped_sum) -> state``: noise, normalise, optimizer step."""

    @jax.jit
    def apply(state: state_lib.TrainState, clipped_sum):
        updates, opt_state = optimizer.update(clipped_sum, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    return apply


def add_trees(a, b):
    """``a + b`` leaf by leaf; ``b`` when ``a`` is ``None`` (the first chunk of a step).

    Examples:
      >>> add_trees(None, {"w": 1.0})
      {'w': 1.0}
      >>> add_trees({"w": 1.0}, {"w": 2.0})
      {'w': 3.0}
    """
    return b if a is None else jax.tree.map(lambda x, y: x + y, a, b)


def privacy_claim(
    plan: PrivatePlan, ledger: budget.PrivacyLedger, config, stopped_by_budget: bool
) -> claim_lib.PrivacyClaim:
    """The run's :class:`~fedjax_med.privacy.claim.PrivacyClaim` (``privacy`` of report.json)."""
    relation = accounting.sensitivity_relation(ledger.sampling)
    return claim_lib.PrivacyClaim(
        mechanism=schema.mechanism(config),  # "dp_sgd", checked against privacy.mechanism
        epsilon=ledger.epsilon(),
        delta=ledger.delta,
        unit=plan.unit,
        relation=relation,
        accountant=ledger.accountant,
        noise_multiplier=plan.noise_multiplier,
        clip_norm=plan.clip_norm,
        sampling=ledger.sampling,
        sampling_rate=plan.sampling_rate,
        steps=ledger.steps_taken,
        randomness_mode=plan.randomness.mode,
        trusted="the trainer, which holds the training images and computes the clipped sums",
        adversary=(
            "anyone who sees the released models or any checkpoint's parameters (the public, "
            "other hospitals, an eavesdropper)"
        ),
        released_outside=(
            "per-step diagnostics from the private batch: clipped fraction and mean gradient "
            "norm (metrics.jsonl train_clipped_fraction, train_grad_norm)",
            f"the number of {plan.unit}s in the training split ({plan.num_units})",
            "validation and test metrics (held-out splits, not the training units)",
        ),
        details={
            "expected_batch_size": plan.expected_batch_size,
            "num_units": plan.num_units,
            "target_epsilon": ledger.target_epsilon,
            "max_images_per_patient": (
                config.privacy.max_images_per_patient if plan.unit == "patient" else None
            ),
            "preceding_noise_multipliers": list(ledger.preceding_noise_multipliers),
            "budget_exhausted": not ledger.can_take(1),
            "stopped_by_budget": stopped_by_budget,
        },
    )


def secret_free(state: state_lib.TrainState, plan: PrivatePlan | None) -> state_lib.TrainState:
    """``state`` as it may be written to disk: in secure mode, without the noise key.

    The noise key of :func:`~fedjax_med.privacy.noise.dp_aggregate` fixes every later noise draw,
    so a checkpoint holding it would let its reader regenerate (and subtract) the noise of the
    steps after it. Secure runs store zeros in its place; :func:`with_fresh_secrets` draws a new
    secret key on resume.
    """
    if plan is None or plan.randomness.persistable:
        return state
    key = optax.tree_utils.tree_get(state.opt_state, "rng_key")
    zeros = jax.random.wrap_key_data(
        jnp.zeros_like(jax.random.key_data(key)), impl=jax.random.key_impl(key)
    )
    return state.replace(opt_state=optax.tree_utils.tree_set(state.opt_state, rng_key=zeros))


def with_fresh_secrets(
    state: state_lib.TrainState, plan: PrivatePlan | None
) -> state_lib.TrainState:
    """A resumed secure run's state with a new secret noise key (reproducible: unchanged)."""
    if plan is None or plan.randomness.persistable:
        return state
    fresh = plan.randomness.key(randomness.NOISE)
    return state.replace(opt_state=optax.tree_utils.tree_set(state.opt_state, rng_key=fresh))


def check_resumed_ledger(saved: budget.PrivacyLedger, planned: budget.PrivacyLedger) -> None:
    """Refuses a resume whose plan would account a different mechanism than the checkpoint's.

    Raises:
      ValueError: naming every field of the ledger that differs (old -> new).
    """
    fields = ("noise_multiplier", "sampling_rate", "delta", "accountant", "unit", "sampling")
    fields += ("num_examples", "batch_size", "target_epsilon", "preceding_noise_multipliers")
    ledgers.check_unchanged(
        {f: getattr(saved, f) for f in fields},
        {f: getattr(planned, f) for f in fields},
        "privacy ledger",
    )


def finite_or_raise(value: float, what: str, step: int) -> float:
    """``value`` if it is finite.

    Raises:
      FloatingPointError: ``<what> became <value> at step <step>`` for NaN or inf.

    Examples:
      >>> finite_or_raise(0.5, "mean gradient norm", 3)
      0.5
    """
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} became {value} at step {step}")
    return value
