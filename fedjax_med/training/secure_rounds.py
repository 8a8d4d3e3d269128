"""Federated rounds whose aggregate goes through secure aggregation: the server sees only sums.

A round runs the clients' local training as usual, then, instead of averaging the deltas on the
server, every reporting client submits ``v_k = [n_k / M * clip_c(delta_k), n_k / M]`` (``M`` the
public padded client size, ``clip_c`` per-coordinate clipping to ``federated.secagg_clip``) to
:func:`fedjax_med.secure.secagg.secure_sum` (SecAgg, Bonawitz et al. CCS 2017; SecAgg+ with
``k = ceil(2 log2 n)`` neighbours, Bell et al. CCS 2020) or to the additive-sharing backend. The
server decodes only ``sum_k v_k``, from which the example-weighted mean delta
``Delta = sum n_k delta_k / sum n_k`` follows, and takes its optimizer step on ``-Delta``.
Sampled clients that drop out (or whose update is non-finite) are treated as dropping after the
key-sharing round: the protocol removes their masks, and the round fails loudly if fewer than
the threshold survive. Fixed-point error per coordinate is bounded by the field encoder
(:meth:`~fedjax_med.secure.field.FieldEncoder.error_bound`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fedjax_med.federated import aggregation, algorithms, dp_fedavg
from fedjax_med.secure import additive, secagg

logger = logging.getLogger("fedjax_med")

SECURE_METHODS = ("secagg", "secagg_plus", "additive")
SUPPORTED_ALGORITHMS = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "dp_fedavg",
)


def make_secure_round(plan: Any, server_optimizer: optax.GradientTransformation):
    """``round(state, cohort) -> (state, metrics)`` with the aggregate computed securely."""
    f = plan.config.federated
    method = f.secure_aggregation
    if f.algorithm not in SUPPORTED_ALGORITHMS:
        raise ValueError(
            f"federated.secure_aggregation={method!r} supports federated.algorithm in "
            f"{SUPPORTED_ALGORITHMS}, not {f.algorithm!r}"
        )
    data = plan.client_data
    padded_size = float(data.mask.shape[1])
    for_each = plan.algorithm.for_each
    options_dropout = f.dropout_prob
    max_norm = f.max_update_norm or None

    @jax.jit
    def prepare(state, indices, mask):
        return algorithms.gather_cohort(state, data, indices, mask, options_dropout)

    @jax.jit
    def screen(deltas, reporting):
        return aggregation.screen(deltas, reporting, max_norm)

    @jax.jit
    def server_step(state, mean_delta):
        updates, opt_state = server_optimizer.update(
            jax.tree.map(jnp.negative, mean_delta), state.server_opt_state, state.params
        )
        params = optax.apply_updates(state.params, updates)
        return state.replace(round=state.round + 1, params=params, server_opt_state=opt_state)

    central_dp = f.algorithm == "dp_fedavg"
    if central_dp and f.adaptive_clipping:
        raise ValueError(
            "federated.adaptive_clipping is not supported with federated.secure_aggregation "
            "(the clipped-count estimate would need its own secure sum)"
        )

    @jax.jit
    def clip_deltas(deltas, clip_norm):
        return aggregation.clip_updates(deltas, clip_norm)

    @jax.jit
    def dp_server_step(state, total):
        # DP-FedAvg (McMahan et al. 2018) on the securely summed clipped deltas: the server adds
        # N(0, z^2 S^2) to the sum it decoded and divides by the expected cohort q K, with the
        # same key stream as the plaintext algorithm.
        key = jax.random.fold_in(algorithms.round_key(state), algorithms.STREAM_NOISE)
        delta_key, _ = jax.random.split(key)
        mean_delta = dp_fedavg.noised_mean(
            total, state.clip_norm, plan.noise_multiplier, plan.sampler.expected_clients, delta_key
        )
        updates, opt_state = server_optimizer.update(
            jax.tree.map(jnp.negative, mean_delta), state.server_opt_state, state.params
        )
        params = optax.apply_updates(state.params, updates)
        return state.replace(round=state.round + 1, params=params, server_opt_state=opt_state)

    ddp = None
    if f.distributed_dp != "none":
        ddp = DistributedDP(plan.config, expected_clients=float(plan.sampler.cohort_size))

    def run(state, cohort):
        indices = np.asarray(cohort.indices, np.int32)
        mask = np.asarray(cohort.mask, bool)
        inputs = prepare(state, indices, mask)
        outputs = for_each(
            state.params,
            inputs.images,
            inputs.labels,
            inputs.mask,
            inputs.counts,
            inputs.keys,
            client_mask=inputs.reporting,
        )
        kept, num_excluded = screen(outputs.delta, inputs.reporting)
        kept = np.asarray(kept)
        sampled = np.flatnonzero(mask)
        deltas = clip_deltas(outputs.delta, state.clip_norm) if central_dp else outputs.delta
        flat = jax.vmap(lambda d: ravel_pytree(d)[0])(deltas)
        _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], outputs.delta))
        if central_dp:
            # Each client's clipped delta with weight 1; |coordinate| <= S after L2 clipping.
            clip = float(state.clip_norm)
            flat_np = np.asarray(flat, np.float64)
            vectors = np.where(np.isfinite(flat_np), flat_np, 0.0)[sampled]
        else:
            weights = np.asarray(outputs.num_examples, np.float64) / padded_size
            clip = float(f.secagg_clip)
            values = np.clip(np.asarray(flat, np.float64), -clip, clip) * weights[:, None]
            vectors = np.concatenate([values, weights[:, None]], axis=1)[sampled]
        dropped = [i for i, slot in enumerate(sampled) if not kept[slot]]
        n = len(sampled)
        aborted = False
        t0 = time.perf_counter()
        if ddp is not None:
            total_sum, bytes_per_client, aborted = ddp.aggregate(
                np.asarray(flat, np.float64)[sampled], dropped, int(state.round)
            )
            secure_seconds = time.perf_counter() - t0
            contributed = 0 if aborted else n - len(dropped)
            if contributed:
                # DP-FedAvg normalisation: the public expected cohort size, not the survivors.
                mean = total_sum / ddp.expected_clients
                new_state = server_step(state, unravel(jnp.asarray(mean, jnp.float32)))
            else:
                new_state = state.replace(round=state.round + 1)
            losses = np.asarray(outputs.loss)[kept]
            return new_state, {
                "loss": float(losses.mean()) if losses.size else float("nan"),
                "num_sampled": n,
                "num_dropped": int(inputs.num_dropped),
                "num_excluded": int(num_excluded),
                "num_clients": contributed,
                "secure_bytes_per_client": bytes_per_client,
                "plaintext_bytes_per_client": 4.0 * flat.shape[1],
                "secure_aggregation_seconds": secure_seconds,
                "secure_round_aborted": int(aborted),
            }
        if method == "additive":
            survivors = [i for i in range(n) if i not in dropped]
            total, stats = additive.secure_sum(
                vectors[survivors], clip=max(clip, 1.0), num_servers=2, seed=int(state.round)
            )
            bytes_per_client = float(np.mean(list(stats["bytes_sent"].values())))
            received_per_client = 0.0  # clients receive nothing in additive sharing
        else:
            neighbours = (
                "all" if method == "secagg" else max(2, math.ceil(2 * math.log2(max(n, 2))))
            )
            threshold = min(n, max(2, math.ceil(f.secagg_threshold * n)))
            try:
                total, stats = secagg.secure_sum(
                    vectors,
                    clip=max(clip, 1.0),
                    threshold=threshold,
                    dropout_after_masking=dropped,
                    neighbours=neighbours,
                    seed=int(state.round),
                )
                bytes_per_client = float(np.mean(list(stats.bytes_sent.values())))
                received_per_client = float(np.mean(list(stats.bytes_received.values())))
            except secagg.TooFewSurvivorsError as err:
                # The protocol aborts rather than reveal anything: the round makes no update.
                logger.warning("round %d: secure aggregation aborted (%s)", int(state.round), err)
                total, bytes_per_client, aborted = np.zeros(vectors.shape[1]), 0.0, True
                received_per_client = 0.0
        secure_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.sum(vectors, axis=0)  # what the same aggregation costs in plaintext, for the report
        plaintext_seconds = time.perf_counter() - t0
        contributed = 0 if aborted else n - len(dropped)
        if central_dp:
            # As in plaintext DP-FedAvg, noise is added even when no client contributed.
            summed = total if contributed else np.zeros_like(total)
            new_state = dp_server_step(state, unravel(jnp.asarray(summed, jnp.float32)))
        elif contributed == 0 or float(total[-1]) <= 0:
            new_state = state.replace(round=state.round + 1)
        else:
            mean_delta = unravel(jnp.asarray(total[:-1] / float(total[-1]), jnp.float32))
            new_state = server_step(state, mean_delta)
        losses = np.asarray(outputs.loss)[kept]
        metrics = {
            "loss": float(losses.mean()) if losses.size else float("nan"),
            "num_sampled": n,
            "num_dropped": int(inputs.num_dropped),
            "num_excluded": int(num_excluded),
            "num_clients": contributed,
            "secure_bytes_per_client": bytes_per_client,
            "plaintext_bytes_per_client": 4.0 * vectors.shape[1],
            "secure_aggregation_seconds": secure_seconds,
            "plaintext_aggregation_seconds": plaintext_seconds,
            "secure_bytes_received_per_client": received_per_client,
            "secure_round_aborted": int(aborted),
        }
        return new_state, metrics

    run.ddp = ddp
    return run


class DistributedDP:
    """Client-side integer noise summed by SecAgg: distributed DP (Kairouz, Liu, Steinke 2021).

    Each client clips its delta to L2 norm ``S`` (``privacy.clip_norm``), quantises it with the
    field scale, adds integer noise (discrete Gaussian, Canonne, Kamath, Steinke 2020, or Skellam,
    Agarwal, Kairouz, Liu 2021) calibrated so that any ``t`` surviving clients (the protocol's
    threshold) together carry noise multiplier ``z`` (``privacy.noise_multiplier``) on the L2
    sensitivity of a quantised update, and submits the sum to SecAgg, so the server only ever sees
    the noisy total. Epsilon is :func:`fedjax_med.secure.distributed_dp.distributed_epsilon` with
    ``t`` clients per round (dropouts cannot lower the noise below that), composed over rounds,
    for replacing one client's update (no amplification by client sampling is claimed).
    """

    def __init__(self, config, expected_clients: float):
        from fedjax_med.secure import distributed_dp

        self.lib = distributed_dp
        f, p = config.federated, config.privacy
        self.kind = f.distributed_dp
        self.z = float(p.noise_multiplier)
        self.clip = float(p.clip_norm)
        self.delta = float(p.delta)
        self.expected_clients = expected_clients
        self.threshold_fraction = f.secagg_threshold
        self.method = f.secure_aggregation
        self.seed = config.seed
        self.secure_noise = p.noise_seed == "secure"
        self.bits = 32  # keeps integer noise variances within the samplers' range
        self.dim = None
        self.sensitivity_l2 = None
        self.threshold = None

    def setup(self, n: int, dim: int):
        from fedjax_med.secure import field

        # Room in the ring for n clipped updates plus the summed noise (far beyond 8 sigma).
        self.encoder = field.FieldEncoder(self.clip * (1 + 8 * self.z), n, self.bits)
        self.dim = dim
        self.sensitivity_l2 = self.lib.quantised_l2_sensitivity(
            self.clip, self.encoder.scale, dim, rounding="nearest"
        )
        self.sensitivity_l1 = self.lib.l1_sensitivity_bound(self.sensitivity_l2, dim)
        self.threshold = min(n, max(2, math.ceil(self.threshold_fraction * n)))

    def epsilon(self, rounds: int) -> float:
        if rounds == 0 or self.threshold is None:
            return 0.0
        return self.lib.distributed_epsilon(
            self.kind,
            self.z,
            self.sensitivity_l2,
            self.sensitivity_l1,
            self.threshold,
            rounds,
            self.delta,
            dim=self.dim,
        )

    def aggregate(self, updates: np.ndarray, dropped: list[int], round_num: int):
        """Noisy securely summed clipped updates (float), bytes per client, aborted flag."""
        from fedjax_med.secure import field

        n, dim = updates.shape
        # Excluded (non-finite) clients never submit; zero their rows so encoding stays defined.
        updates = np.where(np.isfinite(updates), updates, 0.0)
        if self.threshold is None:
            self.setup(n, dim)
        norms = np.linalg.norm(updates, axis=1, keepdims=True)
        clipped = updates * np.minimum(1.0, self.clip / np.maximum(norms, 1e-12))
        rows = []
        for k in range(n):
            # Noise must be unpredictable in deployments: OS entropy in secure mode.
            rng = (
                np.random.default_rng()
                if self.secure_noise
                else np.random.default_rng([self.seed, 7919, round_num, k])
            )
            noise_k = self.lib.client_noise(
                self.kind, self.z, self.sensitivity_l2, self.threshold, dim, rng
            )
            encoded = self.encoder.encode(clipped[k])
            rows.append(field.add(encoded, field.to_ring(noise_k, self.bits), self.bits))
        neighbours = "all" if self.method == "secagg" else max(2, math.ceil(2 * math.log2(n)))
        try:
            total, stats, _ = secagg.secure_sum_ring(
                np.stack(rows),
                threshold=self.threshold,
                bits=self.bits,
                neighbours=neighbours,
                dropout_after_masking=dropped,
                seed=round_num,
            )
        except secagg.TooFewSurvivorsError as err:
            logger.warning("round %d: secure aggregation aborted (%s)", round_num, err)
            return np.zeros(dim), 0.0, True
        summed = field.from_ring(total, self.bits).astype(np.float64) / self.encoder.scale
        return summed, float(np.mean(list(stats.bytes_sent.values()))), False
