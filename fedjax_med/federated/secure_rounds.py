"""Secure aggregation around a federated algorithm: the server sees only protocol messages.

:func:`secure_algorithm` wraps a :class:`~fedjax_med.federated.algorithms.FederatedAlgorithm`
that has a :class:`~fedjax_med.federated.algorithms.MessageSpec` (FedAvg, FedAvgM, FedProx,
FedOpt, DP-FedAvg with fixed clipping) and returns one with the same ``apply_round(state,
cohort) -> (state, metrics)``. Each round is a sequence of steps, one function each:

1. ``_train``: the cohort is gathered and trained exactly as in the base algorithm (same keys,
   same dropout);
2. ``_screen``: *on each client*, its own update is screened (finite, norm <=
   ``max_update_norm``); a client whose update fails does not submit, like a dropout after
   masking;
3. ``_messages`` / ``_submissions``: each submitting client's message ``m_k`` is
   :attr:`MessageSpec.message` (FedAvg: ``[w_k clip_c(delta_k), w_k]``), or with distributed DP
   its flat update clipped to L2 norm ``S``, quantised and noised on the client
   (``encode(clip_S(delta_k)) + z_k mod 2^bits``, :meth:`DistributedDP.encode`);
4. ``_secure_sum``: the server learns only ``sum_k m_k`` over the survivors, from SecAgg
   (Bonawitz et al., CCS 2017, https://eprint.iacr.org/2017/281), SecAgg+ on a secret random
   k-regular graph with Bell et al.'s (k, t) (CCS 2020, https://eprint.iacr.org/2020/704;
   :func:`fedjax_med.secure.secagg.secagg_plus_parameters`) or additive sharing among
   non-colluding servers, or CKKS homomorphic encryption (:mod:`fedjax_med.secure.he_ckks`:
   the server adds ciphertexts, a separate key holder decrypts only the sum);
5. ``_server_update``: the server decodes only the sum and takes the base algorithm's step from
   it (:attr:`MessageSpec.server_update`; DP-FedAvg adds its Gaussian noise there with
   :func:`fedjax_med.federated.dp_fedavg.noised_mean`); with distributed DP (Kairouz, Liu,
   Steinke 2021; Agarwal, Kairouz, Liu 2021) it steps with the base's server optimizer on
   ``Delta = decode(sum_k m_k) / N``, ``N`` the public ``num_clients``;
6. ``_metrics``: what the round cost and released.

The steps share a frozen :class:`_Setup` (the wrapper's fixed choices) and a frozen
:class:`_Submissions` (one round's rows as the protocol sees them); the returned
``apply_round`` captures nothing else and calls no jitted function the base does not provide.

A round whose protocol aborts (too few survivors, a disconnected survivors' graph) releases
nothing and leaves the parameters unchanged: ``secure_round_aborted = 1`` and
``secure_sum_released = 0``, so a distributed-DP accountant counts only released rounds
(:meth:`fedjax_med.secure.distributed_dp.DistributedDP.epsilon`).

What the server reads: the protocol messages and the decoded sum, never a plaintext update,
norm or client loss. The ``loss`` metric is therefore NaN (the clients' training losses are
not released); ``update_norm`` is the norm of the applied mean, a function of the released sum.

Example (4 clients at 1, 2, 3, 4; one FedAvg round over SecAgg):

    >>> import math, jax, jax.numpy as jnp, numpy as np
    >>> from fedjax_med import randomness
    >>> from fedjax_med.federated import algorithms, client, sampling
    >>> quadratic = lambda p, x, y: 0.5 * jnp.sum((p - x) ** 2, axis=-1)
    >>> update = client.make_local_update_for_loss(
    ...     quadratic, local_steps=1, batch_size=1, client_lr=1.0)
    >>> data = client.client_data(np.arange(1.0, 5.0).reshape(4, 1, 1), np.zeros((4, 1)),
    ...                           np.ones((4, 1), bool), np.ones(4, int))
    >>> plain = algorithms.fedavg(update, data, options=algorithms.RoundOptions(backend="vmap"))
    >>> secure = secure_algorithm(plain, method="secagg", secagg_clip=8.0,
    ...                           randomness=randomness.Randomness("reproducible", 0))
    >>> state = secure.init(jnp.zeros(1), jax.random.key(0))
    >>> state, metrics = secure.apply_round(state, sampling.padded_cohort(np.arange(4), 4))
    >>> round(float(state.params[0]), 4), metrics["num_clients"]  # (1 + 2 + 3 + 4) / 4
    (2.5, 4)
    >>> secure.name, math.isnan(metrics["loss"]), metrics["secure_sum_released"]
    ('fedavg+secagg', True, 1)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med import randomness as randomness_lib
from fedjax_med.federated import algorithms, sampling
from fedjax_med.federated import client as client_lib
from fedjax_med.secure import additive, distributed_dp, he_ckks, secagg

logger = logging.getLogger("fedjax_med")

METHODS = ("secagg", "secagg_plus", "additive", "he_ckks")
_NO_SHAMIR = ("additive", "he_ckks")  # methods without neighbours or a threshold


@dataclasses.dataclass(frozen=True)
class SecureSum:
    """One round's secure sum: the decoded float vector (zeros if aborted) and its stats."""

    total: np.ndarray
    stats: secagg.SecureSumStats
    neighbours: int
    threshold: int
    extra: dict[str, float] = dataclasses.field(default_factory=dict)  # method's own metrics


@dataclasses.dataclass(frozen=True)
class _Setup:
    """The wrapper's fixed choices, read by every step of every round."""

    parts: algorithms.SecureParts
    method: str
    randomness: randomness_lib.Randomness
    secagg_clip: float
    dropout_rate: float
    corrupted_fraction: float
    ddp: distributed_dp.DistributedDP | None
    num_servers: int
    bits: int
    key_holder: he_ckks.KeyHolder | None = None


@dataclasses.dataclass(frozen=True)
class _Submissions:
    """One round's input to the secure sum, indexed by sampled client, plus its counters."""

    rows: np.ndarray  # (n, D) float64: row i is client i's message, zeros if it does not submit
    dropped: set[int]  # rows of clients that do not submit (never sent)
    round_index: int
    num_sampled: int
    num_dropped: jax.Array
    num_excluded: jax.Array


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
    he_poly_modulus_degree: int = 4096,
) -> algorithms.FederatedAlgorithm:
    """``base`` with its aggregate computed by secure aggregation (see the module docstring).

    Args:
      base: an algorithm with ``base.secure`` (built with a ``MessageSpec``).
      method: ``"secagg"`` (complete graph), ``"secagg_plus"``, ``"additive"`` or ``"he_ckks"``.
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
      he_poly_modulus_degree: CKKS ring degree ``N`` of ``"he_ckks"``
        (:class:`fedjax_med.secure.he_ckks.CKKSParameters`).

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
    setup = _setup(
        base,
        method=method,
        randomness=randomness,
        secagg_clip=secagg_clip,
        dropout_rate=dropout_rate,
        corrupted_fraction=corrupted_fraction,
        ddp=distributed_dp,
        num_servers=num_servers,
        bits=bits,
        he_poly_modulus_degree=he_poly_modulus_degree,
    )

    def apply_round(state, cohort):
        """One secure round of ``base`` (see :func:`_apply_round`)."""
        return _apply_round(setup, state, cohort)

    return algorithms.FederatedAlgorithm(
        name=f"{base.name}+{method}",
        init=base.init,
        apply_round=apply_round,
        for_each=base.for_each,
        jitted=setup.parts.jitted,
        sampler=base.sampler,
        secure=None,
    )


def _setup(
    base: algorithms.FederatedAlgorithm,
    *,
    method: str,
    randomness: randomness_lib.Randomness,
    secagg_clip: float,
    dropout_rate: float,
    corrupted_fraction: float,
    ddp: distributed_dp.DistributedDP | None,
    num_servers: int,
    bits: int,
    he_poly_modulus_degree: int = 4096,
) -> _Setup:
    """Validates :func:`secure_algorithm`'s arguments into the record every step reads."""
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
    if ddp is not None:
        if base.name.startswith("dp_fedavg"):
            raise ValueError("distributed_dp replaces DP-FedAvg's server noise: wrap fedavg")
        bits = ddp.bits
    key_holder = None
    if method == "he_ckks":
        if ddp is not None:
            raise ValueError("distributed_dp sums ring vectors: use secagg or secagg_plus")
        # The key holder is a separate party; its keys live for the whole run.
        key_holder = he_ckks.KeyHolder(he_ckks.CKKSParameters(he_poly_modulus_degree))
    return _Setup(
        parts=parts,
        method=method,
        randomness=randomness,
        secagg_clip=secagg_clip,
        dropout_rate=dropout_rate,
        corrupted_fraction=corrupted_fraction,
        ddp=ddp,
        num_servers=num_servers,
        bits=bits,
        key_holder=key_holder,
    )


def _apply_round(setup: _Setup, state: algorithms.ServerState, cohort: sampling.Cohort):
    """One round: train, screen, submit, securely sum, step the server, report."""
    inputs, outputs, mask = _train(setup, state, cohort)
    kept, num_excluded = _screen(setup, outputs, inputs)
    messages = _messages(setup, state, outputs)
    subs = _submissions(state, inputs, mask, kept, num_excluded, messages)
    result, secure_seconds, plaintext_seconds = _timed_sum(setup, state, subs)
    new_state, server_metrics = _server_update(setup, state, result)
    # What each site kept (FedBN, Ditto) stays outside the sum, whether or not it was released.
    new_state = setup.parts.keep_site_params(new_state, inputs.indices, outputs, kept)
    metrics = _metrics(server_metrics, subs, result, secure_seconds, plaintext_seconds)
    return new_state.replace(round=state.round + 1), metrics


def _train(setup: _Setup, state: algorithms.ServerState, cohort: sampling.Cohort):
    """Step 1: the base's gather, dropout draw and local training -> ``(inputs, outputs, mask)``."""
    parts = setup.parts
    indices, mask = parts.check(cohort)
    inputs = parts.prepare(state, indices, mask)
    return inputs, parts.run_clients(state, inputs), mask


def _screen(setup: _Setup, outputs: client_lib.ClientOutput, inputs: algorithms.CohortInputs):
    """Step 2: each client checks its own update; one that fails does not submit (a dropout)."""
    return setup.parts.screen(outputs, inputs.reporting)


def _messages(setup: _Setup, state, outputs: client_lib.ClientOutput) -> jax.Array:
    """Step 3: the ``(C, D)`` messages: L2-clipped deltas under distributed DP, else the spec's."""
    if setup.ddp is not None:
        return setup.parts.clipped_deltas(outputs, setup.ddp.clip)
    return setup.parts.message(state, outputs, setup.secagg_clip)


def _submissions(state, inputs, mask, kept, num_excluded, messages) -> _Submissions:
    """Step 3 (cont.): the sampled clients' rows; a client that does not submit sends zeros."""
    sampled = np.flatnonzero(mask)
    submits = np.asarray(kept)[sampled]
    # Row i is client i's own vector; rows of clients that do not submit are never sent.
    rows = np.where(submits[:, None], np.asarray(messages, np.float64)[sampled], 0.0)
    return _Submissions(
        rows=rows,
        dropped=set(np.flatnonzero(~submits).tolist()),
        round_index=int(state.round),
        num_sampled=int(sampled.size),
        num_dropped=inputs.num_dropped,
        num_excluded=num_excluded,
    )


def _timed_sum(setup: _Setup, state, subs: _Submissions) -> tuple[SecureSum, float, float]:
    """Step 4 timed: the secure sum, and what the same sum costs in plaintext, for the report."""
    tic = time.perf_counter()
    result = _secure_sum(setup, state, subs)
    secure_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    np.sum(subs.rows, axis=0)
    return result, secure_seconds, time.perf_counter() - tic


def _protocol(setup: _Setup, n: int) -> tuple[int, int]:
    """(neighbours k, threshold t) for n clients; additive sharing has neither."""
    if setup.method in _NO_SHAMIR:
        return 0, 0
    k, t = secagg.secagg_plus_parameters(
        n, setup.dropout_rate, setup.corrupted_fraction, complete=setup.method == "secagg"
    )
    if setup.ddp is not None:
        t = max(t, setup.ddp.threshold)  # never release fewer clients' noise than accounted
    return k, t


def _aborted(setup: _Setup, rows: np.ndarray, k: int, t: int) -> SecureSum:
    """The result of a round that releases nothing: zeros and aborted stats."""
    n, d = rows.shape
    return SecureSum(np.zeros(d), secagg.aborted_stats(setup.method, n), k, t)


def _secure_sum(setup: _Setup, state, subs: _Submissions) -> SecureSum:
    """Step 4: one secure sum of the submitted rows; an aborted protocol releases zeros."""
    n = subs.rows.shape[0]
    if n < 2:  # a "sum" of one client is its update
        return _aborted(setup, subs.rows, 0, 0)
    k, t = _protocol(setup, n)
    if setup.method not in _NO_SHAMIR and t > k + 1:
        logger.warning("round %d: threshold %d > %d holders: aborted", subs.round_index, t, k + 1)
        return _aborted(setup, subs.rows, k, t)
    try:
        if setup.key_holder is not None:
            return _he_sum(setup, state, subs)
        if setup.ddp is not None:
            return _ring_sum(setup, subs, k, t)
        return _float_sum(setup, state, subs, k, t)
    except secagg.RoundAbortedError as err:
        # The protocol aborts rather than reveal anything: the round releases nothing.
        logger.warning("round %d: secure aggregation aborted (%s)", subs.round_index, err)
        return _aborted(setup, subs.rows, k, t)


def _neighbours(setup: _Setup, k: int) -> str | int:
    """SecAgg's graph argument: the complete graph for ``"secagg"``, else k-regular."""
    return "all" if setup.method == "secagg" else k


def _encode(ddp: distributed_dp.DistributedDP, subs: _Submissions) -> np.ndarray:
    """Distributed DP, on each client: its noisy ring vector (zeros if it does not submit)."""
    n, d = subs.rows.shape
    if n > ddp.num_clients:
        raise ValueError(f"{n} clients exceed distributed_dp.num_clients")
    return np.stack(
        [
            np.zeros(d, np.uint64) if i in subs.dropped else ddp.encode(row, subs.round_index, i)
            for i, row in enumerate(subs.rows)
        ]
    )


def _ring_sum(setup: _Setup, subs: _Submissions, k: int, t: int) -> SecureSum:
    """Step 4 with distributed DP: sum the clients' noisy ring vectors, decode the noisy sum."""
    ddp = setup.ddp
    ring = _encode(ddp, subs)
    common = dict(bits=setup.bits, randomness=setup.randomness, round_index=subs.round_index)
    if setup.method == "additive":
        ring_sum, stats = additive.secure_sum_ring(
            ring, num_servers=setup.num_servers, dropped=subs.dropped, **common
        )
        if len(stats.survivors) < ddp.threshold:
            raise secagg.TooFewSurvivorsError(
                f"{len(stats.survivors)} survivors < threshold={ddp.threshold}"
            )
    else:
        ring_sum, stats, _ = secagg.secure_sum_ring(
            ring,
            threshold=t,
            neighbours=_neighbours(setup, k),
            dropout_after_masking=subs.dropped,
            **common,
        )
    return SecureSum(ddp.decode(ring_sum), stats, k, t)


def _float_sum(setup: _Setup, state, subs: _Submissions, k: int, t: int) -> SecureSum:
    """Step 4 without distributed DP: fixed-point sum of the messages within the spec's bound."""
    common = dict(
        clip=setup.parts.bound(state, setup.secagg_clip),
        dropped=subs.dropped,
        randomness=setup.randomness,
        round_index=subs.round_index,
        bits=setup.bits,
    )
    if setup.method == "additive":
        total, stats = additive.secure_sum(subs.rows, num_servers=setup.num_servers, **common)
        if len(stats.survivors) < 2:
            raise secagg.TooFewSurvivorsError("fewer than 2 clients reached the servers")
    else:
        total, stats = secagg.secure_sum(
            subs.rows, threshold=t, neighbours=_neighbours(setup, k), **common
        )
    return SecureSum(total, stats, k, t)


def _he_sum(setup: _Setup, state, subs: _Submissions) -> SecureSum:
    """Step 4 with CKKS: the server adds encrypted rows, the key holder decrypts only the sum."""
    total, stats = he_ckks.secure_sum(
        subs.rows,
        clip=setup.parts.bound(state, setup.secagg_clip),
        key_holder=setup.key_holder,
        dropped=subs.dropped,
        round_index=subs.round_index,
    )
    return SecureSum(total, stats, 0, 0, he_ckks.round_metrics(stats, setup.key_holder))


def _released(result: SecureSum) -> bool:
    """Whether the round released a sum (the protocol finished with survivors)."""
    return result.stats.released and bool(result.stats.survivors)


def _server_update(setup: _Setup, state, result: SecureSum):
    """Step 5: the base's server step from the released sum; an aborted round changes nothing."""
    if not _released(result):
        return state, {}
    total = jnp.asarray(result.total, jnp.float32)
    if setup.ddp is not None:
        return setup.parts.server_step(state, total / setup.ddp.num_clients), {}
    return setup.parts.server_update(state, total)


def _metrics(
    server_metrics, subs: _Submissions, result: SecureSum, secure_s: float, plaintext_s: float
) -> dict[str, float]:
    """Step 6: the server step's metrics as floats, then what the round cost and released."""
    stats = result.stats
    released = _released(result)
    metrics = {k: float(v) for k, v in server_metrics.items()}
    metrics.update(
        loss=math.nan,  # client losses are not released under secure aggregation
        num_sampled=subs.num_sampled,
        num_dropped=int(subs.num_dropped),
        num_excluded=int(subs.num_excluded),
        num_clients=len(stats.survivors) if released else 0,
        secure_bytes_per_client=stats.mean_bytes_sent,
        secure_bytes_received_per_client=stats.mean_bytes_received,
        plaintext_bytes_per_client=4.0 * subs.rows.shape[1],
        secure_aggregation_seconds=secure_s,
        plaintext_aggregation_seconds=plaintext_s,
        secure_round_aborted=int(stats.aborted),
        secure_sum_released=int(released),
        secagg_neighbours=result.neighbours,
        secagg_threshold=result.threshold,
    )
    metrics.update(result.extra)
    return metrics
