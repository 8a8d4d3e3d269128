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

from fedjax_med.federated import aggregation, algorithms
from fedjax_med.secure import additive, secagg

logger = logging.getLogger("fedjax_med")

SECURE_METHODS = ("secagg", "secagg_plus", "additive")
SUPPORTED_ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")


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
        flat = jax.vmap(lambda d: ravel_pytree(d)[0])(outputs.delta)
        _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], outputs.delta))
        weights = np.asarray(outputs.num_examples, np.float64) / padded_size
        clip = float(f.secagg_clip)
        values = np.clip(np.asarray(flat, np.float64), -clip, clip) * weights[:, None]
        vectors = np.concatenate([values, weights[:, None]], axis=1)[sampled]
        dropped = [i for i, slot in enumerate(sampled) if not kept[slot]]
        n = len(sampled)
        aborted = False
        t0 = time.perf_counter()
        if method == "additive":
            survivors = [i for i in range(n) if i not in dropped]
            total, stats = additive.secure_sum(
                vectors[survivors], clip=max(clip, 1.0), num_servers=2, seed=int(state.round)
            )
            bytes_per_client = float(np.mean(list(stats["bytes_sent"].values())))
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
            except secagg.TooFewSurvivorsError as err:
                # The protocol aborts rather than reveal anything: the round makes no update.
                logger.warning("round %d: secure aggregation aborted (%s)", int(state.round), err)
                total, bytes_per_client, aborted = np.zeros(vectors.shape[1]), 0.0, True
        secure_seconds = time.perf_counter() - t0
        weight_sum = float(total[-1])
        contributed = 0 if aborted else n - len(dropped)
        if contributed == 0 or weight_sum <= 0:
            new_state = state.replace(round=state.round + 1)
        else:
            mean_delta = unravel(jnp.asarray(total[:-1] / weight_sum, jnp.float32))
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
            "secure_round_aborted": int(aborted),
        }
        return new_state, metrics

    return run
