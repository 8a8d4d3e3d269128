"""What an honest-but-curious server sees in each setting, and the attacks run on it.

* Gradient inversion (Geiping et al., NeurIPS 2020) against the update the server receives
  that carries the victims' images:

  - centralized training: the server holds the images; nothing to invert;
  - FedAvg: the victim client's update (its FedSGD gradient, or the delta of
    ``report.inversion_local_steps`` local SGD steps), computed as the trainer's client would;
  - secure aggregation: only the *sum* of the round's client updates (the victim's plus the
    other clients', one batch each); the attacker inverts the sum for all the images behind it
    and is scored on the victim's, with the labels given;
  - DP-SGD (central or inside each site): one step's release, the clipped sum of the victim
    batch's per-example gradients plus ``N(0, sigma^2 C^2 I)``, from
    :func:`~fedjax_med.privacy.clipping.clipped_grad_sum` and
    :func:`~fedjax_med.privacy.noise.dp_aggregate`;
  - DP-FedAvg: the round's release with the victim's clipped update and the server noise,
    from :func:`~fedjax_med.federated.dp_fedavg.noisy_clipped_mean` (other clients left out,
    which only helps the attacker).

* Canary audits (:mod:`fedjax_med.attacks.canaries`) of each setting's DP release at the trained
  parameters, with the setting's own noise multiplier and clipping norm.

Segmentation tasks are attacked the same way, with the victims' masks given to the attacker (only
the images are reconstructed; ``labels_given`` is true).

Every reconstruction is scored by PSNR and SSIM against the victim's images (each victim image
against its best-matching reconstruction, the attacker's best case), beside two scores of
guessing without the update: uniform random images, and the mean training image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.attacks import canaries, gradient_inversion, image_metrics
from fedjax_med.federated import dp_fedavg
from fedjax_med.models import losses
from fedjax_med.privacy import claim as claim_lib
from fedjax_med.privacy import clipping, noise
from fedjax_med.reporting import runs
from fedjax_med.reporting import settings as settings_lib


@dataclasses.dataclass(frozen=True)
class Victims:
    """The images behind the attacked update, normalised as the model sees them.

    ``images`` holds one batch per client, ``group_sizes`` long each; the first is the victim's,
    the others belong to other clients whose updates the secure sum mixes in.
    """

    images: np.ndarray  # (n, H, W, C)
    labels: np.ndarray  # (n,)
    group_sizes: tuple[int, ...]
    bounds: tuple[float, float]

    @property
    def num_victim(self) -> int:
        return self.group_sizes[0]

    def groups(self) -> list[tuple[jax.Array, jax.Array]]:
        """``(images, labels)`` of each client's batch, the victim's first."""
        cuts = np.cumsum(self.group_sizes)[:-1]
        return [
            (jnp.asarray(x), jnp.asarray(y))
            for x, y in zip(np.split(self.images, cuts), np.split(self.labels, cuts), strict=True)
        ]


def pick_victims(setting: settings_lib.Setting, experiment: Any, batch_size: int) -> Victims:
    """The victim batch (and, under secure aggregation, one batch per other client of a round of
    ``federated.clients_per_round`` clients, all of them when 0)."""
    normalizer = experiment.normalizer
    if setting.federated:
        federation = experiment.federation
        # The secure sum mixes the round's cohort: the victim and (cohort - 1) other clients.
        cohort = setting.config.federated.clients_per_round or federation.num_clients
        cohort = min(cohort, federation.num_clients)
        others = range(1, cohort) if "secure_aggregation" in setting.defences else ()
        parts = []
        for k in (0, *others):
            client = federation.client(k)
            take = min(batch_size, len(client))
            parts.append(client.take(np.arange(take)))
    else:
        train = experiment.splits.train
        parts = [train.take(np.arange(min(batch_size, len(train))))]
    images = np.concatenate([normalizer(p.images, p.sites) for p in parts])
    labels = np.concatenate([np.asarray(p.labels) for p in parts]).astype(np.int32)
    sites = np.concatenate([p.sites for p in parts])
    sizes = tuple(len(p) for p in parts)
    return Victims(images, labels, sizes, runs.pixel_bounds(normalizer, sites))


def _client_update(setting, experiment, params, images, labels, local_steps):
    """A federated client's delta (``local_steps`` SGD steps at the client learning rate)."""
    return gradient_inversion.fedavg_update(
        experiment.model.apply,
        params,
        images,
        labels,
        local_steps=local_steps,
        local_lr=setting.config.federated.client_lr,
        task=experiment.splits.info.task,
    )


def server_view(
    setting: settings_lib.Setting,
    experiment: Any,
    params: Any,
    privacy: dict[str, Any] | None,
    victims: Victims,
    local_steps: int,
    key: jax.Array,
) -> tuple[Any, str, int]:
    """``(update, description, local_steps)``: what the server receives carrying the victims.

    ``local_steps == 0`` in the result means the update is a gradient (central DP-SGD's release);
    otherwise it is a client delta of that many local steps at the client learning rate.
    """
    apply_fn = experiment.model.apply
    x, y = jnp.asarray(victims.images), jnp.asarray(victims.labels)
    defences = setting.defences
    if "dp_sgd" in defences or "local_dp_sgd" in defences:
        c = setting.config.privacy
        loss_fn = losses.example_loss_fn(apply_fn, experiment.splits.info.task)
        grad_sum = clipping.clipped_grad_sum(loss_fn, clip_norm=c.clip_norm, method=c.method)
        total, _ = jax.jit(grad_sum.fn)(params, x, y, jnp.ones(x.shape[0], bool))
        # The trainer's relation: fixed-size batches (replace-one) noise with sensitivity 2C.
        poisson = privacy.get("sampling", "poisson") == "poisson"
        relation = "add_or_remove_one" if poisson else "replace_one"
        tx = noise.dp_aggregate(
            privacy["noise_multiplier"], c.clip_norm, x.shape[0], key, relation=relation
        )
        release, _ = tx.update(total, tx.init(total))
        return release, "one DP-SGD step's noisy clipped gradient of the victim's batch", 0
    if not setting.federated:
        return None, "the training images themselves (data are pooled)", 0
    n = victims.num_victim
    if "secure_aggregation" in defences:
        # One update per client of the round: a handful, not a hot path.
        deltas = [
            _client_update(setting, experiment, params, xi, yi, local_steps)
            for xi, yi in victims.groups()
        ]
        stacked = jax.tree.map(lambda *d: jnp.stack(d), *deltas)
        kept = jnp.ones(len(deltas), bool)
        if "dp_fedavg" in defences:
            c = setting.config.privacy
            update = dp_fedavg.noisy_clipped_mean(
                stacked, kept, c.clip_norm, privacy["noise_multiplier"], len(deltas), key
            )
            what = "the noisy mean of the round's clipped client updates (secure sum + DP)"
        else:
            update = jax.tree.map(lambda d: d.sum(axis=0), stacked)
            what = f"only the sum of the round's {len(deltas)} client updates"
        return update, what, local_steps
    delta = _client_update(setting, experiment, params, x[:n], y[:n], local_steps)
    if "dp_fedavg" in defences:
        c = setting.config.privacy
        stacked = jax.tree.map(lambda d: d[None], delta)
        update = dp_fedavg.noisy_clipped_mean(
            stacked, jnp.ones(1, bool), c.clip_norm, privacy["noise_multiplier"], 1.0, key
        )
        return update, "the victim's clipped update plus the round's DP noise", local_steps
    return delta, "the victim client's model update", local_steps


def invert(
    setting: settings_lib.Setting,
    experiment: Any,
    params: Any,
    privacy: dict[str, Any] | None,
    victims: Victims,
    *,
    local_steps: int,
    steps: int,
    restarts: int,
    key: jax.Array,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Runs Inverting Gradients on :func:`server_view`; ``(result, reconstructions)``."""
    view_key, attack_key, noise_key = jax.random.split(key, 3)
    update, what, view_steps = server_view(
        setting, experiment, params, privacy, victims, local_steps, view_key
    )
    result: dict[str, Any] = {"server_sees": what}
    if update is None:
        return {**result, "attacked": False}, None
    task = experiment.splits.info.task
    if task not in gradient_inversion.INVERTIBLE_TASKS:
        reason = f"inversion needs one of the tasks {gradient_inversion.INVERTIBLE_TASKS}"
        return {**result, "attacked": False, "reason": reason}, None
    lo, hi = victims.bounds
    n_all, n = len(victims.images), victims.num_victim
    # A segmentation attacker is given the victims' masks and reconstructs the images.
    read_label = n_all == 1 and task == "multiclass"
    labels = None if read_label else jnp.asarray(victims.labels)
    fedavg = dict(local_steps=view_steps, local_lr=setting.config.federated.client_lr)
    out = gradient_inversion.invert_gradients(
        experiment.model.apply,
        params,
        update,
        image_shape=experiment.splits.info.image_shape,
        batch_size=n_all,
        labels=labels,
        steps=steps,
        restarts=restarts,
        key=attack_key,
        bounds=(lo, hi),
        task=task,
        **(fedavg if view_steps else {}),
    )
    guesses = np.asarray(out.images)
    truth = victims.images[:n]
    # Each victim image against every reconstruction: the attacker's best match counts.
    pairs_t = np.repeat(truth, n_all, axis=0)
    pairs_g = np.tile(guesses, (n, 1, 1, 1))
    psnr = np.asarray(image_metrics.psnr(pairs_t, pairs_g, hi - lo)).reshape(n, n_all)
    best = psnr.argmax(axis=1)
    matched = guesses[best]
    ssim = np.asarray(image_metrics.ssim(truth, matched, hi - lo))
    random_images = jax.random.uniform(noise_key, truth.shape, minval=lo, maxval=hi)
    baseline = np.asarray(image_metrics.psnr(truth, random_images, hi - lo))
    mean_image = np.broadcast_to(population_mean(experiment), truth.shape)
    prior = np.asarray(image_metrics.psnr(truth, mean_image, hi - lo))
    result.update(
        attacked=True,
        images_behind_update=n_all,
        victim_images=n,
        psnr=float(psnr.max(axis=1).mean()),
        ssim=float(ssim.mean()),
        psnr_random_baseline=float(baseline.mean()),
        psnr_mean_image_baseline=float(prior.mean()),
        labels_given=not read_label,
        local_steps=view_steps,
    )
    if read_label:  # what invert_gradients read: iDLG on a gradient, the bias on a delta
        if view_steps:
            recovered = gradient_inversion.fedavg_label(update)
        else:
            path = gradient_inversion.last_kernel_path(update)
            recovered = gradient_inversion.idlg_label(gradient_inversion.get_at_path(update, path))
        result["label_recovered"] = int(recovered) == int(victims.labels[0])
    return result, matched


def population_mean(experiment: Any, max_images: int = 2048) -> np.ndarray:
    """The mean normalised training image: what an attacker guesses knowing only the data's
    distribution (a stronger baseline than random pixels for smooth medical images)."""
    train = experiment.splits.train
    take = train.take(np.arange(min(max_images, len(train))))
    return experiment.normalizer(take.images, take.sites).mean(axis=0)


def canary_example(experiment: Any, params: Any, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A bright noise image with the label the model finds least likely: a large gradient
    (for segmentation, a mask of each pixel's least likely class)."""
    shape = experiment.splits.info.image_shape
    image = 3.0 * jax.random.normal(key, shape)
    logits = experiment.model.apply(params, image[None])[0]
    return image, jnp.argmin(logits, axis=-1).astype(jnp.int32)


def audit(
    setting: settings_lib.Setting,
    experiment: Any,
    params: Any,
    privacy: dict[str, Any],
    victims: Victims,
    *,
    mechanism: str,
    trials: int,
    confidence: float,
    key: jax.Array,
) -> canaries.CanaryAudit | None:
    """The canary audit of the setting's DP release, through the functions that trained it.

    The run's :class:`~fedjax_med.privacy.claim.PrivacyClaim` says which mechanism and unit ran:
    central DP-SGD per example (:func:`~fedjax_med.attacks.canaries.audit_dp_sgd_step`), with
    per-layer clipping (:func:`~fedjax_med.attacks.canaries.audit_per_layer_dp_sgd_step`) or per
    patient (:func:`~fedjax_med.attacks.canaries.audit_patient_dp_sgd_step`); local DP-SGD in a
    site (:func:`~fedjax_med.attacks.canaries.audit_local_dp_step`, the client's own release);
    DP-FedAvg (:func:`~fedjax_med.attacks.canaries.audit_dp_fedavg_round`). ``None`` where there
    is nothing we audit: no noise, distributed DP, or a replace-one claim from fixed-size batches
    (the canaries are added or removed, not swapped).
    """
    claim = claim_lib.PrivacyClaim.from_report(privacy)
    c = setting.config.privacy
    if claim.noise_multiplier <= 0 or claim.mechanism == "distributed_dp":
        return None
    if claim.relation != "add_or_remove_one":
        return None
    canary_key, trial_key = jax.random.split(key)
    common = dict(
        clip_norm=float(c.clip_norm),
        noise_multiplier=claim.noise_multiplier,
        num_trials=trials,
        key=trial_key,
        mechanism=mechanism,
        delta=claim.delta,
        confidence=confidence,
        accountant=c.accountant,
    )
    if claim.mechanism == "dp_fedavg":
        expected = float(claim.sampling_rate) * experiment.federation.num_clients
        return canaries.audit_dp_fedavg_round(params, num_clients=max(2, round(expected)), **common)
    loss_fn = losses.example_loss_fn(experiment.model.apply, experiment.splits.info.task)
    n = victims.num_victim
    images, labels = victims.images[:n], victims.labels[:n]
    microbatch = c.microbatch_size or None
    if claim.unit == "patient":
        k = int(c.max_images_per_patient)
        keys = jax.random.split(canary_key, k)
        canary = [canary_example(experiment, params, kk) for kk in keys]
        return canaries.audit_patient_dp_sgd_step(
            loss_fn,
            params,
            images,
            labels,
            np.arange(n),
            jnp.stack([x for x, _ in canary]),
            jnp.stack([y for _, y in canary]),
            max_per_unit=k,
            microbatch_size=microbatch,
            **common,
        )
    canary_image, canary_label = canary_example(experiment, params, canary_key)
    args = (loss_fn, params, images, labels, canary_image, canary_label)
    if claim.mechanism == "local_dp_sgd" or c.per_layer_clipping:
        return canaries.audit_local_dp_step(
            *args,
            method=c.method,
            per_layer=c.per_layer_clipping,
            microbatch_size=microbatch,
            **common,
        )
    return canaries.audit_dp_sgd_step(*args, method=c.method, **common)


def run_audit(
    setting: settings_lib.Setting,
    privacy: dict[str, Any],
    *,
    mechanism: str,
    canaries_count: int,
    confidence: float,
    key: jax.Array,
) -> canaries.CanaryAudit | None:
    """The one-run audit (Steinke et al. 2023) of a central DP-SGD setting's whole run, with its
    own noise multiplier, sampling rate and number of steps (``None`` for other settings)."""
    claim = claim_lib.PrivacyClaim.from_report(privacy)
    if claim.mechanism != "dp_sgd" or claim.sampling != "poisson" or claim.unit != "example":
        return None
    if setting.config.privacy.per_layer_clipping:  # the run audit clips flat
        return None
    sigma, steps = float(privacy["noise_multiplier"]), int(privacy["steps"])
    if sigma <= 0 or steps < 1:
        return None
    return canaries.audit_dp_sgd_run(
        num_canaries=canaries_count,
        steps=steps,
        sampling_rate=float(privacy["sampling_rate"]),
        clip_norm=float(privacy["clip_norm"]),
        noise_multiplier=sigma,
        key=key,
        seed=setting.config.seed,
        mechanism=mechanism,
        delta=float(privacy["delta"]),
        confidence=confidence,
        accountant=privacy.get("accountant", "rdp"),
    )
