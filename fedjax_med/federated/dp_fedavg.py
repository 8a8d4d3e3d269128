"""DP-FedAvg: client-level differential privacy, with optional adaptive clipping.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, https://arxiv.org/abs/1710.06963), the
fixed-denominator estimator with uniform client weights: each round

1. sample every client independently with probability ``q``
   (:class:`~fedjax_med.federated.sampling.PoissonCohortSampler`);
2. each sampled client trains locally and clips its delta to ``S``:
   ``delta_k * min(1, S / ||delta_k||)``;
3. the server releases ``Delta = (sum_k clip(delta_k) + N(0, z^2 S^2 I)) / (q N)``, dividing by
   the *expected* number of clients ``q N``, a public constant, and steps with ``-Delta`` as the
   pseudo-gradient (``x + Delta`` with the default server SGD of learning rate 1).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021,
https://arxiv.org/abs/1905.03871) tracks the ``gamma`` quantile of the update norms: with
``b_k = 1[||delta_k|| <= S]``,
``b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2`` and ``S <- S exp(-eta (b~ - gamma))``.
The pair of releases must have the intended total noise multiplier ``z``, so the delta's noise
multiplier is ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (the paper's formula).

Checking the formula: under add/remove-one-client, the clipped sum has sensitivity ``S`` and the
count ``sum_k (b_k - 1/2)`` has sensitivity ``1/2``, so the count's noise multiplier is
``sigma_b / (1/2) = 2 sigma_b``. Two Gaussian mechanisms with multipliers ``z_1``, ``z_2``
compose (exactly, for Renyi DP and for the subsampled pair, as one Gaussian on the concatenated
query) to multiplier ``(z_1^-2 + z_2^-2)^(-1/2)``; setting it to ``z`` gives the formula. The
factor 2 needs the *centered* indicators ``b_k - 1/2`` used here; summing uncentered ``b_k``
(sensitivity 1) with the same ``sigma_b`` would spend more than the accounted budget.

Over secure aggregation (:func:`fedjax_med.federated.secure_rounds.secure_algorithm`) each client
submits its clipped delta and the server adds the same noise to the decoded sum (fixed clipping
only: adaptive clipping would need a second, secure count).

Guarantees: with Poisson client sampling at rate ``q``, ``T`` rounds are
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)`` under the
add/remove-one-client relation (:func:`client_level_event`): a client's whole dataset is the
unit of privacy. This assumes the cohort is not revealed; the metrics a round returns besides
``clip_norm`` (client counts, training loss, norms) are diagnostics that are not privatised.
"""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedjax_med.federated import aggregation, algorithms, sampling, server_optimizers
from fedjax_med.federated import client as client_lib
from fedjax_med.privacy import accounting, clipping, noise

ACCOUNTANTS = accounting.ACCOUNTANTS


def delta_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: the delta's share of a total multiplier ``z``.

    Args:
      noise_multiplier: the total ``z`` of the (delta, count) pair, >= 0 (0 = no privacy).
      clipped_count_stddev: ``sigma_b``, the stddev of the count noise; must exceed ``z / 2``.

    Examples:
      >>> round(delta_noise_multiplier(1.0, 2.5), 4)  # (1 - 1/25) ** -0.5
      1.0206
    """
    if noise_multiplier < 0:
        raise ValueError(f"{noise_multiplier=} must be >= 0")
    if noise_multiplier == 0:
        return 0.0
    if not 2 * clipped_count_stddev > noise_multiplier:
        raise ValueError(
            f"{clipped_count_stddev=} must be > noise_multiplier / 2 = {noise_multiplier / 2}: "
            "the count would use the whole budget"
        )
    return (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5


def client_level_event(
    noise_multiplier: float, sampling_rate: float, rounds: int
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``rounds`` DP-FedAvg rounds (with or without adaptive clipping).

    The DP-SGD event of :func:`fedjax_med.privacy.accounting.dpsgd_event` with clients as
    the units: ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)``.

    Examples:
      >>> client_level_event(1.0, 0.1, 3).count
      3
    """
    return accounting.dpsgd_event(noise_multiplier, sampling_rate, rounds)


def client_level_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Client-level epsilon after ``rounds`` rounds: :func:`fedjax_med.privacy.accounting.epsilon`.

    Args:
      noise_multiplier: total noise multiplier ``z`` (0: no privacy, epsilon ``inf``).
      sampling_rate: Poisson client-sampling rate ``q``.
      rounds: number of rounds ``T``.
      delta: target delta.
      accountant: ``"rdp"`` (Renyi DP, Mironov et al. 2019) or ``"pld"`` (privacy loss
        distributions, Doroshenko et al. 2022), with the library's orders and discretisation.

    Examples:
      >>> 0 < client_level_epsilon(1.0, 0.1, 10, 1e-5) < 10
      True
    """
    accounting.check_accountant(accountant)
    if noise_multiplier == 0:
        return math.inf
    return accounting.epsilon(
        client_level_event(noise_multiplier, sampling_rate, rounds), delta, accountant
    )


def noised_mean(
    total,
    clip_norm: jax.Array | float,
    noise_multiplier: float,
    expected_clients: float,
    key: jax.Array,
):
    """``(total + N(0, z^2 S^2 I)) / qN``: the server's noise on a clipped sum, then the mean.

    ``total`` is the sum of client deltas each clipped to ``S = clip_norm``; ``z`` is the noise
    multiplier (0 adds nothing) and ``qN = expected_clients`` the public denominator (McMahan et
    al. 2018). The noise is :func:`fedjax_med.privacy.noise.add_gaussian_noise`. Shared by the
    plaintext round and the round over secure aggregation.
    """
    if noise_multiplier > 0:
        total = noise.add_gaussian_noise(total, key, noise_multiplier * clip_norm)
    return jax.tree.map(lambda t: t / expected_clients, total)


def noisy_clipped_mean(
    deltas,
    kept: jax.Array,
    clip_norm: jax.Array | float,
    noise_multiplier: float,
    expected_clients: float,
    key: jax.Array,
):
    """One round's release: ``(sum_k kept_k clip(delta_k) + N(0, z^2 S^2 I)) / qN``.

    ``deltas`` are stacked client deltas (leading client axis), ``kept`` the mask of clients that
    reported and ``clip(d) = d min(1, S / ||d||)``. This and :func:`noised_mean` are where
    DP-FedAvg clips and noises, so the canary audit (``fedjax_med.attacks.canaries``) calls
    them to audit the trainer's own code.
    """
    clipped = aggregation.clip_updates(deltas, clip_norm)
    total = aggregation.masked_sum(clipped, kept)
    return noised_mean(total, clip_norm, noise_multiplier, expected_clients, key)


def dp_fedavg(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    sampler: sampling.PoissonCohortSampler,
    *,
    noise_multiplier: float,
    clip_norm: float,
    server_optimizer: optax.GradientTransformation | None = None,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_lr: float = 0.2,
    clipped_count_stddev: float | None = None,
    options: algorithms.RoundOptions | None = None,
) -> algorithms.FederatedAlgorithm:
    """DP-FedAvg with Gaussian noise on the clipped sum (see the module docstring).

    Args:
      local_update: the clients' training (no SCAFFOLD).
      data: all clients' arrays.
      sampler: the Poisson sampler whose cohorts the rounds will get; its ``rate`` is the ``q``
        of the accounting and ``rate * num_clients`` the denominator.
      noise_multiplier: total ``z`` (0 disables noise: no privacy, for testing).
      clip_norm: ``S`` (the initial ``S`` when ``adaptive``); ``inf`` disables clipping.
      server_optimizer: optax transformation of ``-Delta``; default SGD with learning rate 1.
      adaptive: adapt ``S`` to the ``target_quantile`` of update norms (Andrew et al. 2021).
      target_quantile: ``gamma``, the fraction of updates to leave unclipped.
      clip_lr: ``eta`` of the geometric update (the paper recommends 0.2).
      clipped_count_stddev: ``sigma_b``; default ``q N / 20`` as the paper recommends.
      options: :class:`~fedjax_med.federated.algorithms.RoundOptions` (default: defaults);
        weighting must be ``None`` or ``"uniform"`` (each client's clipped delta has weight 1).

    Returns:
      The :class:`~fedjax_med.federated.algorithms.FederatedAlgorithm`; its metrics add
      ``clip_norm`` (the ``S`` used this round) and, when adaptive, ``unclipped_fraction``
      (``b~``, private).

    Guarantees: see the module docstring; epsilon from :func:`client_level_epsilon` with
    ``(noise_multiplier, sampler.rate, rounds)``.
    """
    options = algorithms.RoundOptions() if options is None else options
    if local_update.scaffold:
        raise ValueError("dp_fedavg needs a local update with scaffold=False")
    if sampler.num_clients != data.num_clients:
        raise ValueError(
            f"sampler.num_clients={sampler.num_clients} must equal data.num_clients="
            f"{data.num_clients}"
        )
    if options.weighting not in (None, "uniform"):
        raise ValueError(f"weighting={options.weighting!r}: DP-FedAvg here weights clients 1")
    if not clip_norm > 0:
        raise ValueError(f"{clip_norm=} must be > 0")
    if noise_multiplier < 0:
        raise ValueError(f"{noise_multiplier=} must be >= 0")
    expected = sampler.expected_clients
    if adaptive:
        if not 0 < target_quantile < 1:
            raise ValueError(f"{target_quantile=} must lie in (0, 1)")
        if not clip_lr > 0:
            raise ValueError(f"{clip_lr=} must be > 0")
        if not math.isfinite(clip_norm):
            raise ValueError("adaptive clipping needs a finite initial clip_norm")
        sigma_b = expected / 20 if clipped_count_stddev is None else float(clipped_count_stddev)
        z_delta = delta_noise_multiplier(noise_multiplier, sigma_b)
    else:
        sigma_b = 0.0
        z_delta = float(noise_multiplier)
    tx = server_optimizers.fedavg(1.0) if server_optimizer is None else server_optimizer

    def combine(state, indices, outputs, kept):
        del indices
        s = state.clip_norm
        norms = clipping.global_norms(outputs.delta)
        key = jax.random.fold_in(algorithms.round_key(state), algorithms.STREAM_NOISE)
        delta_key, count_key = jax.random.split(key)
        mean_delta = noisy_clipped_mean(outputs.delta, kept, s, z_delta, expected, delta_key)
        pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
        updates, opt_state = tx.update(pseudo_grad, state.server_opt_state, state.params)
        new_state = state.replace(
            params=optax.apply_updates(state.params, updates), server_opt_state=opt_state
        )
        metrics = {
            "loss": aggregation.uniform_mean(outputs.loss, kept),
            "update_norm": optax.global_norm(mean_delta),
            "clip_norm": s,
        }
        if adaptive:
            unclipped = jnp.where(kept, norms <= s, False)
            centered = jnp.sum(unclipped) - 0.5 * jnp.sum(kept)
            noised = centered + sigma_b * jax.random.normal(count_key, (), jnp.float32)
            fraction = noised / expected + 0.5
            new_state = new_state.replace(
                clip_norm=s * jnp.exp(-clip_lr * (fraction - target_quantile))
            )
            metrics["unclipped_fraction"] = fraction
        return new_state, metrics

    def init_extra(params):
        del params
        return {"clip_norm": jnp.asarray(clip_norm, jnp.float32)}

    message_spec = None
    if not adaptive and math.isfinite(clip_norm):
        message_spec = _message_spec(tx, z_delta, expected)

    return algorithms.build_algorithm(
        "dp_fedavg_adaptive" if adaptive else "dp_fedavg",
        local_update,
        data,
        server_optimizer=tx,
        combine=combine,
        options=options,
        init_extra=init_extra,
        sampler=sampler,
        message_spec=message_spec,
    )


def _message_spec(tx, noise_multiplier: float, expected: float) -> algorithms.MessageSpec:
    """DP-FedAvg as a sum: each client submits its delta clipped to ``S``; noise on the server.

    The server adds ``N(0, z^2 S^2 I)`` to the sum it decoded with :func:`noised_mean` and the
    same key as the plaintext round, so the two agree up to the fixed-point error.
    """

    def message(state, outputs, clip):
        del clip  # |coordinate| <= ||clip_S(delta)|| <= S already
        return algorithms.flatten_clients(aggregation.clip_updates(outputs.delta, state.clip_norm))

    def bound(state, clip):
        del clip
        return float(state.clip_norm)

    def server_update(state, total):
        _, unravel = ravel_pytree(state.params)
        key = jax.random.fold_in(algorithms.round_key(state), algorithms.STREAM_NOISE)
        delta_key, _ = jax.random.split(key)
        mean = noised_mean(
            unravel(total.astype(jnp.float32)),
            state.clip_norm,
            noise_multiplier,
            expected,
            delta_key,
        )
        updates, opt_state = tx.update(
            jax.tree.map(jnp.negative, mean), state.server_opt_state, state.params
        )
        new_state = state.replace(
            params=optax.apply_updates(state.params, updates), server_opt_state=opt_state
        )
        return new_state, {"update_norm": optax.global_norm(mean), "clip_norm": state.clip_norm}

    return algorithms.MessageSpec(message, bound, server_update)
