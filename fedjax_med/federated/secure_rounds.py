"""Secure aggregation around a federated algorithm: the server sees only protocol messages.

:func:`secure_algorithm` wraps a :class:`~fedjax_med.federated.algorithms.FederatedAlgorithm`
that has a :class:`~fedjax_med.federated.algorithms.MessageSpec` (FedAvg, FedAvgM, FedProx,
FedOpt, DP-FedAvg with fixed clipping) and returns one with the same ``apply_round(state,
cohort) -> (state, metrics)``. Each round:

1. the cohort is gathered and trained exactly as in the base algorithm (same keys, same dropout);
2. *on each client*, its own update is screened (finite, norm <= ``max_update_norm``); a client
   whose update fails does not submit, like a dropout after masking;
3. each submitting client's message (:attr:`MessageSpec.message`; with distributed DP its
   update clipped to L2 norm ``S``, quantised and noised on the client) goes into a secure sum:
   SecAgg (Bonawitz et al., CCS 2017, https://eprint.iacr.org/2017/281), SecAgg+ on a secret
   random k-regular graph with Bell et al.'s (k, t) (CCS 2020, https://eprint.iacr.org/2020/704;
   :func:`fedjax_med.secure.secagg.secagg_plus_parameters`) or additive sharing among
   non-colluding servers;
4. the server decodes only the sum and takes the base algorithm's step from it
   (:attr:`MessageSpec.server_update`; DP-FedAvg adds its Gaussian noise there with
   :func:`fedjax_med.federated.dp_fedavg.noised_mean`); with distributed DP (Kairouz, Liu,
   Steinke 2021; Agarwal, Kairouz, Liu 2021) it divides the noisy sum by the public
   ``num_clients`` and steps with the base's server optimizer.

A round whose protocol aborts (too few survivors, a disconnected survivors' graph) releases
nothing and leaves the parameters unchanged: ``secure_round_aborted = 1`` and
``secure_sum_released = 0``, so a distributed-DP accountant counts only released rounds
(:meth:`fedjax_med.secure.distributed_dp.DistributedDP.epsilon`).

What the server reads: the protocol messages and the decoded sum, never a plaintext update,
norm or client loss. The ``loss`` metric is therefore NaN (the clients' training losses are
not released); ``update_norm`` is the norm of the applied mean, a function of the released sum.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax.numpy as jnp
import numpy as np

from fedjax_med import randomness as randomness_lib
from fedjax_med.federated import algorithms
from fedjax_med.secure import additive, distributed_dp, secagg

logger = logging.getLogger("fedjax_med")

METHODS = ("secagg", "secagg_plus", "additive")


@dataclasses.dataclass(frozen=True)
class SecureSum:
    """One round's secure sum: the decoded float vector (zeros if aborted) and its stats."""

    total: np.ndarray
    stats: secagg.SecureSumStats
    neighbours: int
    threshold: int


def secure_algorithm(
    base: algorithms.FederatedAlgorithm,
    *,
    method: str = "secagg_plus",
    randomness: randomness_lib.Randomness,
    secagg_clip: float = 1.0,
    dropout_rate: float = 0.05,
    corrupted_fraction: float = 0.0,
    distributed_dp: distributed_dp.DistributedDP | None = None,
    num_servers: int = 2,
    bits: int = 32,
) -> algorithms.FederatedAlgorithm:
    """``base`` with its aggregate computed by secure aggregation (see the module docstring).

    Args:
      base: an algorithm with ``base.secure`` (built with a ``MessageSpec``).
      method: ``"secagg"`` (complete graph), ``"secagg_plus"`` or ``"additive"``.
      randomness: where every key, mask, share, graph and client noise comes from; use
        ``Randomness("secure")`` for any claim (OS-keyed CSPRNGs, nothing from the seed).
      secagg_clip: per-coordinate clip ``c`` of FedAvg-style messages (DP-FedAvg's L2 clip
        ``S`` bounds its own).
      dropout_rate: fraction of clients the protocol must tolerate losing (the design ``delta``
        of Bell et al.'s parameters; the simulated failures are ``base``'s
        ``RoundOptions.dropout_rate``).
      corrupted_fraction: fraction of clients assumed to collude with the server (``gamma``).
      distributed_dp: client-side integer noise; replaces the base's aggregation by
        ``sum_k noisy(clip_S(delta_k)) / num_clients`` (not with DP-FedAvg, whose server noise
        it would duplicate).
      num_servers: servers of additive sharing.
      bits: ring size ``2^bits`` (``distributed_dp.bits`` when given).

    Returns:
      A :class:`~fedjax_med.federated.algorithms.FederatedAlgorithm` named
      ``"<base>+<method>"`` with the same ``init``; ``apply_round`` metrics: ``loss`` (NaN),
      ``num_sampled``, ``num_dropped``, ``num_excluded``, ``num_clients`` (in the released
      sum), ``secure_bytes_per_client``, ``secure_bytes_received_per_client``,
      ``plaintext_bytes_per_client``, ``secure_aggregation_seconds``,
      ``plaintext_aggregation_seconds``, ``secure_round_aborted``, ``secure_sum_released``,
      ``secagg_neighbours``, ``secagg_threshold`` and the base server step's own
      (``update_norm``, DP-FedAvg's ``clip_norm``).
    """
    parts = base.secure
    if parts is None:
        raise ValueError(
            f"{base.name} cannot run over secure aggregation: its server step needs more than a "
            "sum of client vectors (SCAFFOLD controls, adaptive clipping, unclipped DP-FedAvg)"
        )
    if method not in METHODS:
        raise ValueError(f"{method=} must be one of {METHODS}")
    if not secagg_clip > 0:
        raise ValueError(f"{secagg_clip=} must be > 0")
    ddp = distributed_dp
    if ddp is not None:
        if base.name.startswith("dp_fedavg"):
            raise ValueError("distributed_dp replaces DP-FedAvg's server noise: wrap fedavg")
        bits = ddp.bits

    def protocol(n: int) -> tuple[int, int]:
        """(neighbours k, threshold t) for n clients; additive sharing has neither."""
        if method == "additive":
            return 0, 0
        k, t = secagg.secagg_plus_parameters(
            n, dropout_rate, corrupted_fraction, complete=method == "secagg"
        )
        if ddp is not None:
            t = max(t, ddp.threshold)  # never release fewer clients' noise than accounted
        return k, t

    def secure_sum(state, rows, dropped, round_index) -> SecureSum:
        n, d = rows.shape
        if n < 2:  # a "sum" of one client is its update
            return SecureSum(np.zeros(d), secagg.aborted_stats(method, n), 0, 0)
        k, t = protocol(n)
        if method != "additive" and t > k + 1:
            logger.warning("round %d: threshold %d > %d holders: aborted", round_index, t, k + 1)
            return SecureSum(np.zeros(d), secagg.aborted_stats(method, n), k, t)
        neighbours = "all" if method == "secagg" else k
        try:
            if ddp is not None:
                if n > ddp.num_clients:
                    raise ValueError(f"{n} clients exceed distributed_dp.num_clients")
                ring = np.stack(
                    [
                        np.zeros(d, np.uint64) if i in dropped else ddp.encode(row, round_index, i)
                        for i, row in enumerate(rows)
                    ]
                )
                if method == "additive":
                    ring_sum, stats = additive.secure_sum_ring(
                        ring,
                        num_servers=num_servers,
                        bits=bits,
                        dropped=dropped,
                        randomness=randomness,
                        round_index=round_index,
                    )
                    if len(stats.survivors) < ddp.threshold:
                        raise secagg.TooFewSurvivorsError(
                            f"{len(stats.survivors)} survivors < threshold={ddp.threshold}"
                        )
                else:
                    ring_sum, stats, _ = secagg.secure_sum_ring(
                        ring,
                        threshold=t,
                        bits=bits,
                        neighbours=neighbours,
                        dropout_after_masking=dropped,
                        randomness=randomness,
                        round_index=round_index,
                    )
                return SecureSum(ddp.decode(ring_sum), stats, k, t)
            clip = parts.bound(state, secagg_clip)
            common = dict(
                clip=clip,
                dropped=dropped,
                randomness=randomness,
                round_index=round_index,
                bits=bits,
            )
            if method == "additive":
                total, stats = additive.secure_sum(rows, num_servers=num_servers, **common)
                if len(stats.survivors) < 2:
                    raise secagg.TooFewSurvivorsError("fewer than 2 clients reached the servers")
            else:
                total, stats = secagg.secure_sum(rows, threshold=t, neighbours=neighbours, **common)
            return SecureSum(total, stats, k, t)
        except secagg.RoundAbortedError as err:
            # The protocol aborts rather than reveal anything: the round releases nothing.
            logger.warning("round %d: secure aggregation aborted (%s)", round_index, err)
            return SecureSum(np.zeros(d), secagg.aborted_stats(method, n), k, t)

    def apply_round(state, cohort):
        indices, mask = parts.check(cohort)
        inputs = parts.prepare(state, indices, mask)
        outputs = parts.run_clients(state, inputs)
        # Each client checks its own update; one that fails does not submit (like a dropout).
        kept, num_excluded = parts.screen(outputs, inputs.reporting)
        if ddp is not None:
            messages = parts.clipped_deltas(outputs, ddp.clip)
        else:
            messages = parts.message(state, outputs, secagg_clip)
        sampled = np.flatnonzero(mask)
        submits = np.asarray(kept)[sampled]
        # Row i is client i's own vector; rows of clients that do not submit are never sent.
        rows = np.where(submits[:, None], np.asarray(messages, np.float64)[sampled], 0.0)
        dropped = set(np.flatnonzero(~submits).tolist())
        round_index = int(state.round)
        tic = time.perf_counter()
        result = secure_sum(state, rows, dropped, round_index)
        secure_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        np.sum(rows, axis=0)  # what the same aggregation costs in plaintext, for the report
        plaintext_seconds = time.perf_counter() - tic
        stats = result.stats
        released = stats.released and bool(stats.survivors)
        metrics = {}
        new_state = state
        if released:
            total = jnp.asarray(result.total, jnp.float32)
            if ddp is not None:
                new_state = parts.server_step(state, total / ddp.num_clients)
            else:
                new_state, metrics = parts.server_update(state, total)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(
            loss=math.nan,  # client losses are not released under secure aggregation
            num_sampled=int(sampled.size),
            num_dropped=int(inputs.num_dropped),
            num_excluded=int(num_excluded),
            num_clients=len(stats.survivors) if released else 0,
            secure_bytes_per_client=stats.mean_bytes_sent,
            secure_bytes_received_per_client=stats.mean_bytes_received,
            plaintext_bytes_per_client=4.0 * rows.shape[1],
            secure_aggregation_seconds=secure_seconds,
            plaintext_aggregation_seconds=plaintext_seconds,
            secure_round_aborted=int(stats.aborted),
            secure_sum_released=int(released),
            secagg_neighbours=result.neighbours,
            secagg_threshold=result.threshold,
        )
        return new_state.replace(round=state.round + 1), metrics

    return algorithms.FederatedAlgorithm(
        name=f"{base.name}+{method}",
        init=base.init,
        apply_round=apply_round,
        for_each=base.for_each,
        jitted=parts.jitted,
        sampler=base.sampler,
        secure=None,
    )
