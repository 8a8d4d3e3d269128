"""Secure aggregation in a deployed run: our SecAgg / SecAgg+ protocol over Flower messages.

With ``secure_aggregation.method = "secagg" | "secagg_plus"`` a deployed round is the four rounds
of :mod:`fedjax_med.secure.secagg` (Bonawitz et al., CCS 2017,
https://eprint.iacr.org/2017/281; SecAgg+ of Bell et al., CCS 2020,
https://eprint.iacr.org/2020/704) between the server and the sampled sites, one Flower message
exchange each:

1. ``train`` with a ``secure`` record (the site's protocol id, its neighbours, the threshold
   ``t``, the ring ``2^bits``, the clip ``c`` and the number of clients ``n``): the site trains,
   forms its message ``m_k = [w_k clip_c(delta_k), w_k]`` (:func:`site_message`, the
   simulation's :func:`fedjax_med.federated.algorithms.fedopt_message_spec`), encodes it into
   the ring and answers only its two public keys (``AdvertiseKeys``); with distributed DP
   (``secure_aggregation.distributed_dp``, Kairouz, Liu, Steinke 2021; Agarwal, Kairouz, Liu
   2021) its message is instead its L2-clipped delta, quantised, plus its own share of the
   integer noise (:func:`site_noisy_update`, the simulation's client message);
2. ``query.secagg_share_keys``: the neighbours' public keys in, encrypted Shamir shares out;
3. ``query.secagg_masked_input``: the shares addressed to the site in, ``y_k = m_k + masks`` out;
4. ``query.secagg_unmask``: the survivors and the dropped in, the site's shares out.

The server (:func:`secure_round`) routes, checks and logs each message with
:class:`fedjax_med.secure.secagg.Server`, rebuilds only the sum ``sum_k m_k`` and takes the
algorithm's server step from it (``MessageSpec.server_update`` of
:mod:`fedjax_med.federated.algorithms`; with distributed DP the server optimizer's step on the
decoded noisy sum over the calibrated number of clients ``N``), as
:mod:`fedjax_med.federated.secure_rounds` does in the simulation: the same quantisation (and,
in reproducible mode, the same noise), so the deployed model equals the simulated one. It never
receives a delta, a loss or a plaintext message; the sender of a message is the node that sent
it, never what the message claims.

The site's protocol state (its keys and shares) lives in the process that answers its messages
(:data:`SESSIONS`), so secure aggregation needs the hospital's long-lived ClientApp process
(``deploy client --isolation process``, the default).

Guarantees: those of :mod:`fedjax_med.secure.secagg` against an honest-but-curious server, with
each site's keys from its operating system's entropy; a round whose protocol aborts (too few
survivors, a disconnected SecAgg+ graph) releases nothing and leaves the model unchanged. With
distributed DP, each site calibrates its noise from its own config (the server names only the
number of clients it is shared among) and, in ``secure`` mode, draws it from a fresh OS-keyed
CSPRNG that is never stored; the threshold is at least distributed DP's, so no released sum
holds fewer clients' noise than the accountant (:class:`~fedjax_med.secure.distributed_dp.
DistributedDP`) counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med import randomness as randomness_lib
from fedjax_med.deploy import flower, protocol
from fedjax_med.federated import aggregation, algorithms
from fedjax_med.secure import distributed_dp, field, secagg

logger = logging.getLogger("fedjax_med")

METHODS = ("secagg", "secagg_plus")
STAGES = ("secagg_share_keys", "secagg_masked_input", "secagg_unmask")
# (run, node, round) -> the site's protocol party; one per round, dropped after unmasking.
SESSIONS: dict[tuple[int, int, str], secagg.Client] = {}


# ---- wire format -----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A protocol value as JSON: bytes and ring vectors as hex, sets sorted, maps as pairs."""
    if isinstance(value, bytes):
        return {"b": value.hex()}
    if isinstance(value, np.ndarray):
        return {"u64": value.astype("<u8").tobytes().hex()}
    if isinstance(value, Mapping):
        return {"m": [[int(k), _plain(v)] for k, v in sorted(value.items())]}
    if isinstance(value, frozenset | set):
        return {"s": sorted(int(v) for v in value)}
    if isinstance(value, tuple | list):
        return {"l": [_plain(v) for v in value]}
    return value


def _unplain(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((tag, body),) = value.items()
    if tag == "b":
        return bytes.fromhex(body)
    if tag == "u64":
        return np.frombuffer(bytes.fromhex(body), "<u8").astype(np.uint64)
    if tag == "m":
        return {int(k): _unplain(v) for k, v in body}
    if tag == "s":
        return frozenset(int(v) for v in body)
    return tuple(_unplain(v) for v in body)


def to_record(message: Any) -> Any:
    """A :mod:`~fedjax_med.secure.secagg` message as a Flower ``ConfigRecord``.

    Examples:
      >>> m = secagg.UnmaskRequest(frozenset({0, 2}), frozenset({1}))
      >>> from_record(secagg.UnmaskRequest, to_record(m)) == m
      True
    """
    fields = {f.name: _plain(getattr(message, f.name)) for f in dataclasses.fields(message)}
    return flower.require().app.ConfigRecord({"json": json.dumps(fields)})


def from_record(kind: type, record: Any, sender: int | None = None) -> Any:
    """The message of ``kind`` in ``record``; a client message gets ``sender`` (its node's id).

    Raises:
      secagg.MalformedMessageError: for a record that does not hold a ``kind``.
    """
    try:
        fields = {k: _unplain(v) for k, v in json.loads(record["json"]).items()}
        if sender is not None:
            fields["sender"] = sender
        return kind(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise secagg.MalformedMessageError(f"not a {kind.__name__} message: {e}") from e


# ---- the site's side -------------------------------------------------------------------------
def site_message(output: Any, padded_size: int, clip: float) -> np.ndarray:
    """``m_k = [w_k clip_c(delta_k), w_k]``, ``w_k = n_k / M``: what the site submits (float64)."""
    spec = algorithms.fedopt_message_spec(optax.identity(), "examples", padded_size)
    stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], output)
    return np.asarray(spec.message(None, stacked, clip), np.float64)[0]


def site_noisy_update(
    output: Any, ddp: distributed_dp.DistributedDP, round_index: int, client: int
) -> np.ndarray:
    """Distributed DP at the site: ``encode(clip_S(delta_k)) + z_k mod 2^bits``, a ring vector.

    The simulation's client message (``SecureParts.clipped_deltas`` then
    :meth:`~fedjax_med.secure.distributed_dp.DistributedDP.encode`): the flat delta clipped to
    L2 norm ``S``, quantised, plus this site's share of the integer noise, drawn from
    ``ddp.randomness`` (in ``secure`` mode a fresh OS-keyed CSPRNG, never stored).

    Raises:
      ValueError: for a non-finite update (the site does not submit it).
    """
    delta = jax.tree.map(lambda x: jnp.asarray(x)[None], output.delta)
    row = np.asarray(algorithms.flatten_clients(aggregation.clip_updates(delta, ddp.clip)))[0]
    if not np.all(np.isfinite(row)):
        raise ValueError("the local update is not finite: not submitted")
    return ddp.encode(row.astype(np.float64), round_index, client)


def begin(
    output: Any,
    padded_size: int,
    secure: Any,
    session: tuple[int, int, str],
    ddp: distributed_dp.DistributedDP | None = None,
    round_index: int = 0,
):
    """Step 1 at the site: its protocol party for this round and its ``AdvertiseKeys``.

    ``ddp``: the site's own distributed DP (from its config; the server's record names only
    the number of clients it is calibrated for): the site submits its noisy ring vector
    (:func:`site_noisy_update`) instead of the FedAvg message.

    Raises:
      ValueError: for a non-finite update (the site does not submit it).
    """
    bits = int(secure["bits"])
    if ddp is not None:
        if ddp.bits != bits:
            raise ValueError(f"the server's ring 2^{bits} is not distributed DP's 2^{ddp.bits}")
        vector = site_noisy_update(output, ddp, round_index, int(secure["id"]))
    else:
        row = site_message(output, padded_size, float(secure["clip"]))
        if not np.all(np.isfinite(row)):
            raise ValueError("the local update is not finite: not submitted")
        encoder = field.FieldEncoder(float(secure["bound"]), int(secure["num_clients"]), bits)
        vector = encoder.encode(row)
    client = secagg.Client(
        int(secure["id"]),
        vector,
        neighbours=frozenset(int(v) for v in secure["neighbours"] if int(v) >= 0),
        threshold=int(secure["threshold"]),
        bits=bits,
        key_rng=randomness_lib.csprng(),  # the site's own secret keys, whatever the run's mode
    )
    SESSIONS[session] = client
    return client.advertise_keys()


_SITE_STEPS = {
    "secagg_share_keys": (secagg.KeyBroadcast, "share_keys"),
    "secagg_masked_input": (secagg.RoutedShares, "masked_input"),
    "secagg_unmask": (secagg.UnmaskRequest, "unmask"),
}


def site_step(stage: str, content: Any, session: tuple[int, int, str]) -> Any:
    """Steps 2-4 at the site: the reply record of ``stage`` from the round's party.

    Raises:
      KeyError: if this process holds no party for the round (a fresh ClientApp process).
    """
    if session not in SESSIONS:
        raise KeyError(
            f"no secure-aggregation state for {session[2]} in this process: run the "
            "hospital with 'deploy client --isolation process'"
        )
    kind, method = _SITE_STEPS[stage]
    reply = getattr(SESSIONS[session], method)(from_record(kind, content["secagg"]))
    if stage == "secagg_unmask":
        del SESSIONS[session]
    return to_record(reply)


# ---- the server's side -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SecureSetup:
    """The protocol of one round: ``n`` clients, SecAgg+ neighbours ``k``, threshold ``t``."""

    method: str
    n: int
    k: int
    t: int
    bits: int
    clip: float
    bound: float
    graph: Mapping[int, frozenset[int]]
    ddp_clients: int = 0  # distributed DP's calibrated number of clients (0: no distributed DP)

    @property
    def encoder(self) -> field.FieldEncoder:
        return field.FieldEncoder(self.bound, self.n, self.bits)


def setup_round(config, plan, state, n: int) -> SecureSetup:
    """The round's ``(k, t)`` (Bell et al.'s choice) and masking graph, as the simulation's."""
    sa = config.secure_aggregation
    k, t = secagg.secagg_plus_parameters(
        n, sa.dropout_rate, sa.corrupted_fraction, complete=sa.method == "secagg"
    )
    ids = list(range(n))
    rng = plan.randomness.generator(randomness_lib.SECAGG_GRAPH, int(state.round))
    graph = secagg.neighbour_graph(ids, "all" if sa.method == "secagg" else k, rng=rng)
    bound = plan.algorithm.secure.bound(state, sa.clip)
    ddp = plan.ddp
    if ddp is None:
        return SecureSetup(sa.method, n, k, t, 32, float(sa.clip), float(bound), graph)
    # Never release a sum of fewer clients' noise than the accountant counts (as simulated).
    t = max(t, ddp.threshold)
    return SecureSetup(
        sa.method, n, k, t, ddp.bits, ddp.clip, float(bound), graph, ddp_clients=ddp.num_clients
    )


def _secure_record(setup: SecureSetup, i: int) -> Any:
    return flower.require().app.ConfigRecord(
        {
            "id": i,
            "neighbours": sorted(setup.graph[i]) or [-1],  # -1: none (a list is never empty)
            "threshold": setup.t,
            "bits": setup.bits,
            "clip": setup.clip,
            "bound": setup.bound,
            "num_clients": setup.n,
            "ddp_clients": setup.ddp_clients,
        }
    )


def _stage(grid, server, nodes, outgoing, stage, kind, state, timeout, exchange):
    """Sends ``outgoing[i]`` to node ``nodes[i]``, hands the replies to ``server``; counts."""
    fl = flower.require()
    messages = []
    for i, msg in outgoing.items():
        content = fl.app.RecordDict({"secagg": to_record(msg)})
        group = f"round-{int(state.round)}"
        messages.append(fl.app.Message(content, nodes[i], f"query.{stage}", group_id=group))
    return _collect(server, nodes, exchange(grid, messages, timeout=timeout), kind, state)


def _collect(server, nodes, replies, kind, state) -> tuple[int, int]:
    """Hands each reply to ``server``; ``(malformed, not answered or refused)``."""
    ids = {node: i for i, node in nodes.items()}
    malformed = 0
    answered = set()
    for reply in replies:
        i = ids.get(reply.metadata.src_node_id)
        problem = protocol.reply_problem(reply)
        if i is None or problem is not None:
            logger.warning(
                "round %d: secure aggregation: client %s dropped: %s",
                int(state.round) + 1,
                i,
                problem,
            )
            continue
        answered.add(i)
        try:
            server.receive(from_record(kind, reply.content["secagg"], sender=i))
        except (secagg.ProtocolError, KeyError) as e:
            logger.warning(
                "round %d: secure aggregation: client %d excluded: malformed message (%s)",
                int(state.round) + 1,
                i,
                e,
            )
            malformed += 1
    return malformed, len(nodes) - len(answered) if kind is secagg.AdvertiseKeys else 0


def _to_survivors(request: secagg.UnmaskRequest) -> dict[int, secagg.UnmaskRequest]:
    return {u: request for u in request.survivors}


def secure_round(
    grid: Any, plan: Any, state: Any, cohort: Any, *, timeout: float, gather: Any
) -> tuple[Any, dict[str, float]]:
    """One deployed round over secure aggregation (steps 1-4 of the module docstring).

    Returns the new state (unchanged but for the round counter if the protocol aborts) and the
    round's metrics (those of the simulation's secure rounds, plus ``num_malformed``).
    """
    exchange = protocol.exchange
    indices = np.asarray(cohort.indices, np.int32)
    mask = np.asarray(cohort.mask, bool)
    inputs = gather(state, plan.client_data, indices, mask, 0.0)
    padded = int(plan.client_data.mask.shape[1])
    sampled = np.flatnonzero(mask)
    nodes = {j: plan.federation.node_ids[int(indices[i])] for j, i in enumerate(sampled)}
    setup = setup_round(plan.config, plan, state, len(nodes))
    # The FedAvg message carries its weight w_k; distributed DP's noisy delta does not.
    dim = int(sum(x.size for x in jax.tree.leaves(state.params))) + (plan.ddp is None)
    server = secagg.Server(
        range(setup.n), threshold=setup.t, dim=dim, bits=setup.bits, graph=setup.graph
    )
    messages = []
    for j, i in enumerate(sampled):
        message = protocol.train_message(nodes[j], state, inputs, int(i), padded)
        message.content["secure"] = _secure_record(setup, j)
        messages.append(message)
    replies = exchange(grid, messages, timeout=timeout)
    malformed, dropped = _collect(server, nodes, replies, secagg.AdvertiseKeys, state)
    released, total = False, np.zeros(dim)
    steps = (
        (server.close_advertise_keys, STAGES[0], secagg.ShareKeys),
        (server.close_share_keys, STAGES[1], secagg.MaskedInput),
        (lambda: _to_survivors(server.close_masked_input()), STAGES[2], secagg.UnmaskResponse),
    )
    try:
        if setup.n < 2:
            raise secagg.TooFewSurvivorsError("a sum of one client would be its update")
        for close, stage, kind in steps:
            outgoing = close()
            bad, _ = _stage(grid, server, nodes, outgoing, stage, kind, state, timeout, exchange)
            malformed += bad
        ring = server.finalize()
        if plan.ddp is not None:
            total = plan.ddp.decode(ring)
        else:
            total = setup.encoder.decode_sum(ring, len(server.u3))
        released = True
    except secagg.RoundAbortedError as e:
        logger.warning("round %d: secure aggregation aborted (%s)", int(state.round) + 1, e)
    metrics: dict[str, float] = {}
    if released and plan.ddp is not None:
        # The simulation's step: the server optimizer on decode(sum_k m_k) / N, N public.
        mean = jnp.asarray(total, jnp.float32) / plan.ddp.num_clients
        state = plan.algorithm.secure.server_step(state, mean)
    elif released:
        state, server_metrics = plan.algorithm.secure.server_update(
            state, jnp.asarray(total, jnp.float32)
        )
        metrics.update({k: float(v) for k, v in server_metrics.items()})
    survivors = len(server.u3) if released else 0
    metrics.update(
        loss=math.nan,  # the sites' losses are not released under secure aggregation
        num_sampled=float(setup.n),
        num_dropped=float(dropped),
        num_excluded=float(malformed),
        num_malformed=float(malformed),
        num_clients=float(survivors),
        secure_round_aborted=float(not released),
        secure_sum_released=float(released),
        secagg_neighbours=float(setup.k),
        secagg_threshold=float(setup.t),
    )
    return state.replace(round=state.round + 1), metrics
