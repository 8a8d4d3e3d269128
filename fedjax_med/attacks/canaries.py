"""Canary audits of the library's own DP-SGD step and DP-FedAvg round.

Each trial runs the release the trainers run, on the same code path, with a canary present
(half the trials) or absent, and a white-box attacker scores the release; the scores go through
:func:`fedjax_med.attacks.auditing.audit_scores` (the statistics of ``jax_privacy.auditing``,
threshold chosen on a random half of the trials), which gives an epsilon that the mechanism
provably exceeds with probability at least ``confidence`` (Jagielski, Ullman, Oprea,
NeurIPS 2020, https://arxiv.org/abs/2006.07709; Nasr et al., IEEE S&P 2021,
https://arxiv.org/abs/2101.04535).

* :func:`audit_dp_sgd_step`: the canary is one *example* added to a batch; the batch goes
  through :func:`fedjax_med.privacy.clipping.clipped_grad_sum` and the noise through
  :func:`fedjax_med.privacy.noise.dp_aggregate`, exactly as in
  :mod:`fedjax_med.trainers.dp_sgd`. The attacker knows the model and the other examples
  (the worst case DP allows) and scores the release's projection on the canary's gradient
  direction, the white-box gradient canary of Nasr et al., USENIX Security 2023
  (https://arxiv.org/abs/2302.07956).
* :func:`audit_local_dp_step`: the same canary example, but the release is one local DP-SGD
  step of a federated client, :func:`fedjax_med.federated.client.private_step_release` (the
  function ``LocalUpdate`` calls at every local step: the on-device Poisson draw, the clipped sum
  of ``client.local_grad_sum`` with the trainer's ``method`` / ``per_layer`` /
  ``microbatch_size``, and :func:`fedjax_med.privacy.noise.privatize_sum`).
  :func:`audit_per_layer_dp_sgd_step` is it with per-layer clipping.
* :func:`audit_patient_dp_sgd_step`: the canary is one *patient* with several images, released
  through the same local step at patient level
  (:func:`~fedjax_med.privacy.clipping.clipped_unit_grad_sum` + ``privatize_sum``); its extra
  broken variant ``example_clipping`` clips each image instead of the patient.
* :func:`audit_dp_fedavg_round`: the canary is a malicious *client* that sends a Dirac update
  (one coordinate, norm far above ``S``); other clients' deltas and the release go through
  :func:`fedjax_med.federated.dp_fedavg.noisy_clipped_mean`, the DP-FedAvg trainer's code.

The audited event is one release with the canary certainly present or absent, so its
accountant epsilon is that of ``GaussianDpEvent(sigma)`` (no sampling amplification); a whole
run's epsilon is smaller per step but composed over steps. Broken variants of the same code
(``no_noise``, ``wrong_scale``: noise 10x too small, ``no_clipping``) show that the audit
catches an implementation that does not keep its claim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_med import randomness
from fedjax_med.attacks import auditing
from fedjax_med.federated import client, dp_fedavg
from fedjax_med.privacy import accounting, clipping, noise, sampling

MECHANISMS = ("correct", "no_noise", "wrong_scale", "no_clipping")
# The run audit also checks the sampler: "no_subsampling" puts every canary in every step while
# the claim still counts Poisson sampling at rate q.
RUN_MECHANISMS = (*MECHANISMS, "no_subsampling")
# The patient audit also checks the unit: "example_clipping" clips every image of the canary
# patient separately (sensitivity k C) while the claim is patient-level (sensitivity C).
PATIENT_MECHANISMS = (*MECHANISMS, "example_clipping")
MAX_TRIAL_FLOATS = 2**25  # floats of releases materialised at once (128 MiB), bounds memory


@dataclasses.dataclass(frozen=True)
class CanaryAudit:
    """Outcome of a canary audit.

    Attributes:
      mechanism: which variant of the code ran (one of :data:`MECHANISMS`).
      epsilon_lower_bound: the empirical bound (holds at ``confidence``).
      accountant_epsilon: the epsilon the accountant claims for the audited release
        (one Gaussian release with the *claimed* noise multiplier, whatever variant ran).
      noise_multiplier, clip_norm: the claim.
      delta, confidence, trials: the audit's parameters.
      canary_norm: the canary's gradient (update) norm before clipping.
      max_detectable_epsilon: the bound a perfect attack would get from these trials; an audit
        can only catch a violation of a claim below it (more trials raise it).
    """

    mechanism: str
    epsilon_lower_bound: float
    accountant_epsilon: float
    noise_multiplier: float
    clip_norm: float
    delta: float
    confidence: float
    trials: int
    canary_norm: float
    max_detectable_epsilon: float

    @property
    def consistent(self) -> bool:
        """True when the empirical bound does not exceed the accountant (no violation found)."""
        return self.epsilon_lower_bound <= self.accountant_epsilon

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "consistent": self.consistent}


def claimed_epsilon(noise_multiplier: float, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of one Gaussian release with noise multiplier ``sigma`` (``inf`` for 0)."""
    if noise_multiplier <= 0:
        return math.inf
    return accounting.epsilon(dp_accounting.GaussianDpEvent(noise_multiplier), delta, accountant)


def _variant(mechanism: str, clip_norm: float, noise_multiplier: float) -> tuple[float, float]:
    """``(clip norm used, noise multiplier used)`` of each variant of the same code."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r} must be one of {MECHANISMS}")
    return {
        "correct": (clip_norm, noise_multiplier),
        "no_noise": (clip_norm, 0.0),
        "wrong_scale": (clip_norm, noise_multiplier / 10),
        "no_clipping": (math.inf, noise_multiplier),
    }[mechanism]


def _check(clip_norm, noise_multiplier, num_trials, delta, confidence):
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"{clip_norm=} must be finite and > 0")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"{noise_multiplier=} must be finite and > 0 (the claim under audit)")
    if int(num_trials) != num_trials or num_trials < 8:
        raise ValueError(f"{num_trials=} must be an integer >= 8")
    if not 0 < delta < 1:
        raise ValueError(f"{delta=} must be in (0, 1)")
    if not 0 < confidence < 1:
        raise ValueError(f"{confidence=} must be in (0, 1)")


def trials_per_chunk(num_trials: int, floats_per_trial: int, platform: str | None = None) -> int:
    """Trials vectorised together in each iteration of the audit's ``lax.map``.

    CPU: one (a plain loop over trials). Vectorising a release that recomputes clipped
    per-example gradients (the local, per-layer and patient-level audits) over a chunk of ~1000
    trials made XLA:CPU compile for ~25 s against ~8 s for one trial, and ran no faster on two
    cores: the report's three such audits took 53 s chunked against 35 s one by one.
    GPU/TPU: as many as fit in :data:`MAX_TRIAL_FLOATS` floats of releases.

    Examples:
      >>> trials_per_chunk(2000, 10_000, "cpu"), trials_per_chunk(2000, 10_000, "gpu")
      (1, 2000)
    """
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return 1
    return max(1, min(num_trials, MAX_TRIAL_FLOATS // max(floats_per_trial, 1)))


def _trial_scores(score_fn, num_trials, key, floats_per_trial) -> tuple[np.ndarray, ...]:
    """``score_fn(trial_key, present)`` of ``num_trials`` trials, alternately IN and OUT.

    Trials run under ``lax.map`` in chunks of :func:`trials_per_chunk` trials.
    """
    has_canary = jnp.arange(num_trials) % 2 == 0
    keys = jax.random.split(key, num_trials)
    chunk = trials_per_chunk(num_trials, floats_per_trial)
    scores = jax.jit(
        lambda k, h: jax.lax.map(
            lambda args: score_fn(*args), (k, h), batch_size=chunk if chunk > 1 else None
        )
    )(keys, has_canary)
    scores, has_canary = np.asarray(scores, np.float64), np.asarray(has_canary)
    return scores[has_canary], scores[~has_canary]


def _scores(release_fn, sum_in, sum_out, direction, num_trials, key) -> tuple[np.ndarray, ...]:
    """Projections ``<release_t - sum_out, u>`` of ``num_trials`` releases, half with the canary.

    ``release_fn(key, total) -> flat release`` (already multiplied back by any public
    denominator).
    """
    base = ravel_pytree(sum_out)[0]

    def one(trial_key, present):
        total = jax.tree.map(lambda a, b: jnp.where(present, a, b), sum_in, sum_out)
        return jnp.dot(release_fn(trial_key, total) - base, direction)

    return _trial_scores(one, num_trials, key, direction.size)


def _result(
    mechanism,
    scores_in,
    scores_out,
    noise_multiplier,
    clip_norm,
    delta,
    confidence,
    accountant,
    canary_norm,
    seed,
) -> CanaryAudit:
    audit = functools.partial(auditing.audit_scores, delta=delta, confidence=confidence, seed=seed)
    eps = audit(scores_in, scores_out)
    # The same split with a perfect attack: the most these trials can ever certify.
    perfect = audit(np.ones(scores_in.size), np.zeros(scores_out.size))
    return CanaryAudit(
        mechanism=mechanism,
        epsilon_lower_bound=eps,
        accountant_epsilon=claimed_epsilon(noise_multiplier, delta, accountant),
        noise_multiplier=float(noise_multiplier),
        clip_norm=float(clip_norm),
        delta=float(delta),
        confidence=float(confidence),
        trials=int(scores_in.size + scores_out.size),
        canary_norm=float(canary_norm),
        max_detectable_epsilon=perfect,
    )


def _split_seed(key: jax.Array) -> int:
    """A seed for the audit's random split of the trials, from the audit's key."""
    return int(
        jax.random.randint(jax.random.fold_in(key, randomness.AUDIT_SPLIT), (), 0, 2**31 - 1)
    )


def audit_dp_sgd_step(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    canary_image: jax.Array,
    canary_label: jax.Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_trials: int,
    key: jax.Array,
    mechanism: str = "correct",
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "rdp",
    method: str = "vmap",
) -> CanaryAudit:
    """Audits one DP-SGD release ``(sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / L`` with a canary.

    The batch is ``images`` plus the canary example; in OUT trials the canary's mask is off,
    which is how the trainer drops a Poisson-unsampled slot. The clipped sums come from
    :func:`~fedjax_med.privacy.clipping.clipped_grad_sum` (``method`` as in the trainer) and the
    noise from :func:`~fedjax_med.privacy.noise.dp_aggregate` with a fresh key per trial. The
    attacker multiplies the release by the public ``L``, subtracts the others' clipped sum and
    projects on the direction of the canary's gradient.

    Args:
      loss_fn: loss of one example ``(params, image, label) -> scalar``, as the trainer's.
      params: the model parameters the step is taken at.
      images, labels: the other examples of the batch, ``(B, H, W, C)`` and ``(B,)``.
      canary_image, canary_label: the canary example, ``(H, W, C)`` and a scalar label (or a
        mask ``(H, W)`` for segmentation).
      clip_norm, noise_multiplier: the claim ``(C, sigma)`` under audit.
      num_trials: releases drawn, half with the canary (>= 8).
      key: PRNG key of the trials' noise.
      mechanism: ``"correct"`` or a deliberately broken variant (:data:`MECHANISMS`).
      delta, confidence: of the audit; ``accountant``: for the claimed epsilon.
      method: ``"vmap"`` or ``"ghost"`` clipped sums.

    Returns:
      A :class:`CanaryAudit`.
    """
    _check(clip_norm, noise_multiplier, num_trials, delta, confidence)
    used_clip, used_sigma = _variant(mechanism, clip_norm, noise_multiplier)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    if images.shape[1:] != jnp.shape(canary_image) or labels.shape[1:] != jnp.shape(canary_label):
        raise ValueError(
            f"canary_image {jnp.shape(canary_image)} must match images {images.shape[1:]} and "
            f"labels must be (B, *canary_label.shape), got {labels.shape}"
        )
    batch = jnp.concatenate([images, jnp.asarray(canary_image)[None]])
    batch_labels = jnp.concatenate([labels, jnp.asarray(canary_label, labels.dtype)[None]])
    mask_in = jnp.ones(batch.shape[0], bool)
    mask_out = mask_in.at[-1].set(False)
    grad_sum = jax.jit(clipping.clipped_grad_sum(loss_fn, clip_norm=used_clip, method=method).fn)
    sum_in, _ = grad_sum(params, batch, batch_labels, mask_in)
    sum_out, _ = grad_sum(params, batch, batch_labels, mask_out)
    canary_grad = ravel_pytree(jax.grad(loss_fn)(params, canary_image, canary_label))[0]
    canary_norm = float(jnp.linalg.norm(canary_grad))
    if not canary_norm > 0:
        raise ValueError("the canary's gradient is zero at these params: pick another canary")
    expected_batch_size = float(batch.shape[0])  # public; multiplied back by the attacker

    def release(trial_key, total):
        tx = noise.dp_aggregate(used_sigma, clip_norm, expected_batch_size, trial_key)
        update, _ = tx.update(total, tx.init(total))
        return ravel_pytree(update)[0] * expected_batch_size

    scores_in, scores_out = _scores(
        release, sum_in, sum_out, canary_grad / canary_norm, num_trials, key
    )
    return _result(
        mechanism,
        scores_in,
        scores_out,
        noise_multiplier,
        clip_norm,
        delta,
        confidence,
        accountant,
        canary_norm,
        _split_seed(key),
    )


def _canary_direction(loss_fn, params, canary_images, canary_labels) -> tuple[jax.Array, float]:
    """Unit direction of the canary's (summed) gradient and its norm; raises if it is zero."""
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, canary_images, canary_labels)
    flat = ravel_pytree(jax.tree.map(lambda g: jnp.sum(g, axis=0), grads))[0]
    norm = float(jnp.linalg.norm(flat))
    if not norm > 0:
        raise ValueError("the canary's gradient is zero at these params: pick another canary")
    return flat / norm, norm


def _with_canary(images, labels, canary_images, canary_labels):
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    canary_images = jnp.asarray(canary_images)
    canary_labels = jnp.asarray(canary_labels)
    if images.shape[1:] != canary_images.shape[1:] or labels.shape[1:] != canary_labels.shape[1:]:
        raise ValueError(
            f"canary_image {canary_images.shape[1:]} must match images {images.shape[1:]} and "
            f"labels must be (B, *canary_label.shape), got {labels.shape}"
        )
    rows = jnp.concatenate([images, canary_images])
    row_labels = jnp.concatenate([labels, jnp.asarray(canary_labels, labels.dtype)])
    mask_in = jnp.ones(rows.shape[0], bool)
    mask_out = mask_in.at[images.shape[0] :].set(False)
    return rows, row_labels, mask_in, mask_out


def _audit_local_release(
    grad_sum,
    mechanism,
    loss_fn,
    params,
    rows,
    row_labels,
    masks,
    canary,
    *,
    clip_norm,
    noise_multiplier,
    used_sigma,
    expected,
    capacity,
    num_trials,
    key,
    delta,
    confidence,
    accountant,
    unit_ids=None,
    max_per_unit=None,
) -> CanaryAudit:
    """Scores ``client.private_step_release`` at rate 1 with the canary in (IN) or out (OUT)."""
    mask_in, mask_out = masks
    direction, canary_norm = _canary_direction(loss_fn, params, *canary)
    sensitivity = clipping.sensitivity(clip_norm)  # the claim's, whatever variant ran

    def release(trial_key, mask, sigma=used_sigma):
        # Rate 1: the audited event is one release with the canary certainly present or absent.
        update, _ = client.private_step_release(
            grad_sum,
            params,
            rows,
            row_labels,
            mask,
            trial_key,
            rate=1.0,
            expected_batch_size=expected,
            noise_multiplier=sigma,
            sensitivity=sensitivity,
            capacity=capacity,
            unit_ids=unit_ids,
            max_per_unit=max_per_unit,
        )
        return ravel_pytree(update)[0] * expected  # the attacker multiplies back the public L

    # The others' clipped sum, known to the attacker: the same code without noise.
    base = jax.jit(functools.partial(release, sigma=0.0))(key, mask_out)

    def score(trial_key, present):
        return jnp.dot(release(trial_key, jnp.where(present, mask_in, mask_out)) - base, direction)

    scores_in, scores_out = _trial_scores(score, num_trials, key, direction.size * rows.shape[0])
    return _result(
        mechanism,
        scores_in,
        scores_out,
        noise_multiplier,
        clip_norm,
        delta,
        confidence,
        accountant,
        canary_norm,
        _split_seed(key),
    )


def audit_local_dp_step(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    canary_image: jax.Array,
    canary_label: jax.Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_trials: int,
    key: jax.Array,
    mechanism: str = "correct",
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "rdp",
    method: str = "vmap",
    per_layer: bool = False,
    microbatch_size: int | None = None,
) -> CanaryAudit:
    """Audits one local DP-SGD step of a federated client with a canary example.

    The client's rows are ``images`` plus the canary; OUT trials mask the canary's row off. Each
    trial runs :func:`fedjax_med.federated.client.private_step_release`, the release
    ``LocalUpdate`` computes at every local step, with the clipped sum of
    ``client.local_grad_sum(loss_fn, method=, per_layer=, microbatch_size=)`` (example level),
    Poisson rate 1 (so the canary is certainly in or out: one ``GaussianDpEvent(sigma)``),
    ``L`` the number of rows (public, multiplied back by the attacker) and the trial's key as
    the step key. The attacker scores the projection on the canary's gradient direction.

    Args:
      loss_fn: loss of one example ``(params, image, label) -> scalar``
        (``client.example_loss`` of the federated loss).
      params, images, labels, canary_image, canary_label: as in :func:`audit_dp_sgd_step`.
      clip_norm, noise_multiplier: the claim ``(C, sigma)`` under audit.
      num_trials, key, mechanism, delta, confidence, accountant: as in
        :func:`audit_dp_sgd_step` (``mechanism`` in :data:`MECHANISMS`).
      method, per_layer, microbatch_size: the local update's ``dp_method``, ``dp_per_layer``,
        ``dp_microbatch_size``.

    Returns:
      A :class:`CanaryAudit`.
    """
    _check(clip_norm, noise_multiplier, num_trials, delta, confidence)
    used_clip, used_sigma = _variant(mechanism, clip_norm, noise_multiplier)
    canary = (jnp.asarray(canary_image)[None], jnp.asarray(canary_label)[None])
    rows, row_labels, mask_in, mask_out = _with_canary(images, labels, *canary)
    grad_sum = client.local_grad_sum(
        loss_fn,
        clip_norm=used_clip,
        unit="example",
        method=method,
        per_layer=per_layer,
        microbatch_size=microbatch_size,
    )
    return _audit_local_release(
        grad_sum,
        mechanism,
        loss_fn,
        params,
        rows,
        row_labels,
        (mask_in, mask_out),
        canary,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        used_sigma=used_sigma,
        expected=float(rows.shape[0]),
        capacity=int(rows.shape[0]),
        num_trials=num_trials,
        key=key,
        delta=delta,
        confidence=confidence,
        accountant=accountant,
    )


def audit_per_layer_dp_sgd_step(*args, **kwargs) -> CanaryAudit:
    """:func:`audit_local_dp_step` with per-layer clipping (McMahan et al. 2018,
    arXiv:1710.06963): each leaf clipped to ``C / sqrt(#leaves)``, the whole contribution to ``C``.

    Same arguments as :func:`audit_local_dp_step`, without ``per_layer``.
    """
    if "per_layer" in kwargs:
        raise ValueError("per_layer is fixed to True by audit_per_layer_dp_sgd_step")
    return audit_local_dp_step(*args, per_layer=True, **kwargs)


def audit_patient_dp_sgd_step(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    unit_ids: jax.Array,
    canary_images: jax.Array,
    canary_labels: jax.Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_trials: int,
    key: jax.Array,
    mechanism: str = "correct",
    max_per_unit: int | None = None,
    microbatch_size: int | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "rdp",
) -> CanaryAudit:
    """Audits one patient-level local DP-SGD step with a canary *patient* of several images.

    The client's rows are ``images`` (patients ``unit_ids``) plus the canary patient's
    ``canary_images``, all of one new unit; OUT trials mask all of them off. Each trial runs
    :func:`fedjax_med.federated.client.private_step_release` at patient level: the on-device
    unit draw (rate 1, at most ``max_per_unit`` images per patient), the clipped sum of
    :func:`~fedjax_med.privacy.clipping.clipped_unit_grad_sum` (each patient's summed gradient
    clipped once) and :func:`~fedjax_med.privacy.noise.privatize_sum`, with ``L`` the number of
    patients (public). The attacker projects on the canary patient's summed gradient.

    Args:
      loss_fn: loss of one example ``(params, image, label) -> scalar``.
      params: the parameters the step is taken at.
      images, labels, unit_ids: the other patients' rows, ``(B, ...)``, ``(B,)``, ``(B,)`` ints
        in ``[0, B)``.
      canary_images, canary_labels: the canary patient's ``P >= 1`` images ``(P, ...)``, ``(P,)``.
      clip_norm, noise_multiplier: the patient-level claim ``(C, sigma)``.
      mechanism: one of :data:`PATIENT_MECHANISMS`; ``"example_clipping"`` clips every image
        (the canary patient then moves the sum by up to ``min(k, P) C``).
      max_per_unit: ``k`` (default ``P``: every canary image is used).
      microbatch_size: the local update's ``dp_microbatch_size``.
      num_trials, key, delta, confidence, accountant: as in :func:`audit_dp_sgd_step`.

    Returns:
      A :class:`CanaryAudit`.
    """
    _check(clip_norm, noise_multiplier, num_trials, delta, confidence)
    if mechanism not in PATIENT_MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r} must be one of {PATIENT_MECHANISMS}")
    by_example = mechanism == "example_clipping"
    used_clip, used_sigma = _variant(
        "correct" if by_example else mechanism, clip_norm, noise_multiplier
    )
    canary_images = jnp.asarray(canary_images)
    canary_labels = jnp.asarray(canary_labels)
    if canary_images.ndim < 1 or canary_labels.shape != canary_images.shape[:1]:
        raise ValueError(
            f"canary_images {canary_images.shape} and canary_labels {canary_labels.shape} must "
            "be (P, ...) and (P,)"
        )
    unit_ids = np.asarray(unit_ids)
    if unit_ids.shape != (len(images),) or (unit_ids < 0).any() or (unit_ids >= len(images)).any():
        raise ValueError(f"unit_ids must be ({len(images)},) ints in [0, {len(images)})")
    k = int(canary_images.shape[0]) if max_per_unit is None else max_per_unit
    canary = (canary_images, canary_labels)
    rows, row_labels, mask_in, mask_out = _with_canary(images, labels, *canary)
    canary_unit = int(unit_ids.max()) + 1 if unit_ids.size else 0
    ids = jnp.asarray(
        np.concatenate([unit_ids, np.full(canary_images.shape[0], canary_unit)]), jnp.int32
    )
    num_patients = np.unique(unit_ids).size + 1
    grad_sum = client.local_grad_sum(
        loss_fn,
        clip_norm=used_clip,
        unit="example" if by_example else "patient",
        microbatch_size=microbatch_size,
    )
    return _audit_local_release(
        grad_sum,
        mechanism,
        loss_fn,
        params,
        rows,
        row_labels,
        (mask_in, mask_out),
        canary,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        used_sigma=used_sigma,
        expected=float(num_patients),
        capacity=int(rows.shape[0]) if by_example else int(num_patients),
        num_trials=num_trials,
        key=key,
        delta=delta,
        confidence=confidence,
        accountant=accountant,
        unit_ids=None if by_example else ids,
        max_per_unit=None if by_example else k,
    )


def audit_dp_fedavg_round(
    params: Any,
    *,
    num_clients: int,
    clip_norm: float,
    noise_multiplier: float,
    num_trials: int,
    key: jax.Array,
    mechanism: str = "correct",
    canary_scale: float = 10.0,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "rdp",
) -> CanaryAudit:
    """Audits one DP-FedAvg release ``(sum_k clip(delta_k) + N(0, z^2 S^2 I)) / qN``.

    ``num_clients - 1`` honest clients send Gaussian deltas shaped like ``params`` with norm
    about ``3 S`` (so clipping acts); the canary client sends ``canary_scale * S`` times a
    coordinate vector chosen from ``key`` (a Dirac canary, Nasr et al. 2023). OUT trials mark
    it as not reporting (``kept`` False), as the trainer does for a dropped client. The release
    is :func:`~fedjax_med.federated.dp_fedavg.noisy_clipped_mean`; the attacker multiplies by
    the public ``qN``, subtracts the honest sum and reads the canary's coordinate.

    Args:
      params: a pytree with the model's parameter shapes (values unused).
      num_clients: clients in the round, canary included (>= 2).
      clip_norm, noise_multiplier: the claim ``(S, z)`` under audit.
      num_trials, key, mechanism, delta, confidence, accountant: as in
        :func:`audit_dp_sgd_step`.
      canary_scale: the canary update's norm over ``S`` (> 0).

    Returns:
      A :class:`CanaryAudit`.
    """
    _check(clip_norm, noise_multiplier, num_trials, delta, confidence)
    if int(num_clients) != num_clients or num_clients < 2:
        raise ValueError(f"{num_clients=} must be an integer >= 2")
    if not canary_scale > 0:
        raise ValueError(f"{canary_scale=} must be > 0")
    used_clip, used_sigma = _variant(mechanism, clip_norm, noise_multiplier)
    flat, unravel = ravel_pytree(params)
    dim = flat.size
    honest_key, coord_key, trial_key = jax.random.split(key, 3)
    honest = jax.random.normal(honest_key, (num_clients - 1, dim)) * (3 * clip_norm / dim**0.5)
    coordinate = jax.random.randint(coord_key, (), 0, dim)
    canary = jnp.zeros(dim).at[coordinate].set(canary_scale * clip_norm)
    deltas = jax.vmap(unravel)(jnp.concatenate([honest, canary[None]]))
    kept_in = jnp.ones(num_clients, bool)
    kept_out = kept_in.at[-1].set(False)
    expected = float(num_clients)  # public; multiplied back by the attacker

    def clipped_sum(kept):
        mean = dp_fedavg.noisy_clipped_mean(deltas, kept, used_clip, 0.0, expected, trial_key)
        return jax.tree.map(lambda m: m * expected, mean)

    sum_in, sum_out = clipped_sum(kept_in), clipped_sum(kept_out)

    def release(k, total):
        # noised_mean is the noise step of noisy_clipped_mean, applied to the clipped sum.
        mean = dp_fedavg.noised_mean(total, clip_norm, used_sigma, expected, k)
        return ravel_pytree(mean)[0] * expected

    direction = jnp.zeros(dim).at[coordinate].set(1.0)
    scores_in, scores_out = _scores(release, sum_in, sum_out, direction, num_trials, trial_key)
    return _result(
        mechanism,
        scores_in,
        scores_out,
        noise_multiplier,
        clip_norm,
        delta,
        confidence,
        accountant,
        canary_scale * clip_norm,
        _split_seed(key),
    )


def audit_dp_sgd_run(
    *,
    num_canaries: int,
    steps: int,
    sampling_rate: float,
    clip_norm: float,
    noise_multiplier: float,
    key: jax.Array,
    seed: int = 0,
    mechanism: str = "correct",
    canary_scale: float = 10.0,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "rdp",
) -> CanaryAudit:
    """One-run audit of a whole DP-SGD run, sampling and composition included.

    Privacy auditing with one training run (Steinke, Nasr, Jagielski, NeurIPS 2023,
    https://arxiv.org/abs/2305.08846): each of ``m`` canaries is included in the training set
    with probability 1/2; every step, the library's
    :class:`~fedjax_med.privacy.sampling.PoissonSampler` draws the step's batch at rate ``q``
    (over all ``m`` canary slots, included or not, as the run's sampler would), each sampled
    included canary contributes its own coordinate gradient of norm ``canary_scale * C``,
    clipped with :func:`~fedjax_med.privacy.clipping.clip_factors`, and
    :func:`~fedjax_med.privacy.noise.dp_aggregate` noises the sum with its own key stream across
    the ``T`` steps. The white-box attacker sees every release and scores canary ``j`` by the
    sum of coordinate ``j`` over the run; ``jax_privacy.auditing`` turns the scores of included
    and excluded canaries into the one-run lower bound. The claim it is compared with is the
    whole run's: ``dpsgd_event(sigma, q, T)`` (other examples only add a known constant to each
    release, so they are left out).

    Args:
      num_canaries: ``m`` (>= 8); each gets its own coordinate.
      steps: ``T >= 1``.
      sampling_rate: ``q`` in ``(0, 1]``.
      clip_norm, noise_multiplier: the claim ``(C, sigma)`` under audit.
      key: PRNG key of the noise; ``seed`` seeds inclusion and the sampler.
      mechanism: ``"correct"`` or a broken variant (:data:`RUN_MECHANISMS`).
      canary_scale: the canaries' gradient norm over ``C`` (> 0), so clipping matters.
      delta, confidence, accountant: as in :func:`audit_dp_sgd_step`.

    Returns:
      A :class:`CanaryAudit` whose ``accountant_epsilon`` is the whole run's.
    """
    from jax_privacy import auditing as jp_auditing

    if int(num_canaries) != num_canaries or num_canaries < 8:
        raise ValueError(f"{num_canaries=} must be an integer >= 8")
    _check(clip_norm, noise_multiplier, num_canaries, delta, confidence)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"{steps=} must be an integer >= 1")
    if not canary_scale > 0:
        raise ValueError(f"{canary_scale=} must be > 0")
    if mechanism not in RUN_MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r} must be one of {RUN_MECHANISMS}")
    broken_sampler = mechanism == "no_subsampling"
    used_clip, used_sigma = _variant(
        "correct" if broken_sampler else mechanism, clip_norm, noise_multiplier
    )
    rng = np.random.default_rng([seed, *randomness.RUN_AUDIT_CANARIES])
    included = rng.random(num_canaries) < 0.5
    sampler = sampling.PoissonSampler(num_canaries, sampling_rate, seed=seed)
    sampled = np.full((steps, num_canaries), broken_sampler)
    for t in range(0 if broken_sampler else steps):  # host-side selection, as in the trainer
        for chunk in sampler.sample(t).chunks:
            sampled[t, chunk.indices[chunk.mask]] = True
    norm = canary_scale * clip_norm
    factor = float(clipping.clip_factors(jnp.asarray([norm]), used_clip)[0])
    contributions = jnp.asarray(sampled & included[None], jnp.float32) * (norm * factor)
    expected = sampler.expected_batch_size  # public; multiplied back by the attacker
    tx = noise.dp_aggregate(used_sigma, clip_norm, expected, key)

    @jax.jit
    def scores_of(contributions):
        def step(state, total):
            release, state = tx.update({"g": total}, state)
            return state, release["g"] * expected

        _, releases = jax.lax.scan(step, tx.init({"g": contributions[0]}), contributions)
        return releases.sum(axis=0)

    scores = np.asarray(scores_of(contributions), np.float64)
    auditor = jp_auditing.CanaryScoreAuditor(scores[included], scores[~included])
    eps = float(auditor.epsilon_one_run(1 - confidence, delta))
    perfect = jp_auditing.CanaryScoreAuditor(np.ones(included.sum()), np.zeros((~included).sum()))
    event = accounting.dpsgd_event(noise_multiplier, sampling_rate, steps)
    return CanaryAudit(
        mechanism=mechanism,
        epsilon_lower_bound=eps,
        accountant_epsilon=accounting.epsilon(event, delta, accountant),
        noise_multiplier=float(noise_multiplier),
        clip_norm=float(clip_norm),
        delta=float(delta),
        confidence=float(confidence),
        trials=int(num_canaries),
        canary_norm=float(norm),
        max_detectable_epsilon=float(perfect.epsilon_one_run(1 - confidence, delta)),
    )
