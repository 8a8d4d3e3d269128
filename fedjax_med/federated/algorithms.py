"""Federated algorithms as ``FederatedAlgorithm(init, apply_round)`` over a ``ServerState``.

One round, for a cohort drawn on the host (:mod:`fedjax_med.federated.sampling`):

1. gather the cohort's padded arrays from :class:`~fedjax_med.federated.client.ClientData` and
   derive each client's key ``fold_in(fold_in(fold_in(rng, round), STREAM_CLIENTS), k)``;
2. drop each sampled client with probability ``dropout_rate`` (simulated failures);
3. run the local update of every slot with a ``for_each_client`` backend;
4. exclude non-finite or out-of-range updates (``max_update_norm``) and count them;
5. combine the rest and take the server step.

Two hooks of :class:`RoundOptions` change a round without a new algorithm: ``tamper`` rewrites
what the cohort submits after step 3 (malicious clients, :mod:`fedjax_med.attacks.poisoning`),
and ``aggregator`` replaces the mean of the FedAvg family's step 5 by a robust rule
(:mod:`~fedjax_med.federated.robust_aggregation`).

Algorithms:

* FedAvg (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629): example-weighted mean
  of client deltas, ``x <- x + Delta`` (server SGD with learning rate 1 on ``-Delta``).
* FedAvgM (Hsu, Qi, Brown 2019, https://arxiv.org/abs/1909.06335): server momentum on
  ``-Delta``.
* FedProx (Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127): FedAvg whose clients
  minimise ``f_k(y) + (mu/2)||y - x||^2``.
* FedAdagrad / FedYogi / FedAdam (Reddi et al., ICLR 2021, https://arxiv.org/abs/2003.00295):
  ``-Delta`` is the pseudo-gradient of an adaptive server optimizer
  (:mod:`~fedjax_med.federated.server_optimizers`).
* SCAFFOLD (Karimireddy et al., ICML 2020, https://arxiv.org/abs/1910.06378), option II:
  ``x <- x + eta_g mean_S(Delta y)``, ``c <- c + (1/N) sum_S Delta c``, ``c_k <- c_k + Delta c_k``
  for the clients that reported; ``c`` and every ``c_k`` (stored ``(N, ...)``) start at 0.
* FedBN (Li et al., ICLR 2021, https://arxiv.org/abs/2102.07623): FedAvg of the shared leaves;
  each site keeps its own normalisation ``scale`` and ``bias`` (:mod:`~fedjax_med.federated.
  personal`), which it never submits.
* Ditto (Li et al., ICML 2021, https://arxiv.org/abs/2012.04989): FedAvg for the global model;
  each site also trains a personal model ``v_k`` on ``f_k(v) + (lambda/2)||v - w||^2``.

FedBN's local leaves and Ditto's personal models are stored ``(N, ...)`` in
``ServerState.site_params`` like SCAFFOLD's ``c_k``, as the simulation's stand-in for the sites'
disks: the round writes what each site kept (:func:`keep_site_params`) and no server step or
aggregate reads it.

Every round has the shapes of the padded cohort, so it compiles once; with the ``loop`` backend
the gather and the server step are jitted and the clients run one by one in between.

A round in which no client contributes leaves parameters and server optimizer state unchanged
(only the round counter advances). DP-FedAvg is in :mod:`~fedjax_med.federated.dp_fedavg`.

Secure aggregation: an algorithm whose server step needs only a *sum* of per-client vectors
carries a :class:`MessageSpec` (what each client submits, and the server step from the summed
vector); :attr:`FederatedAlgorithm.secure` then exposes the round's pieces (:class:`SecureParts`)
for :func:`fedjax_med.federated.secure_rounds.secure_algorithm`, which runs the same round with
the sum computed by a secure-aggregation protocol. SCAFFOLD (per-client control variates on the
server) and adaptive clipping (a second, count query) have none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from fedjax_med import randomness
from fedjax_med.federated import (
    aggregation,
    personal,
    robust_aggregation,
    sampling,
    server_optimizers,
)
from fedjax_med.federated import client as client_lib
from fedjax_med.federated import for_each_client as fec

Params = Any
Metrics = dict[str, jax.Array]

# fold_in streams under the round key.
STREAM_CLIENTS = 0
STREAM_DROPOUT = 1
STREAM_NOISE = 2
STREAM_AGGREGATOR = randomness.ROUND_AGGREGATOR_NOISE

WEIGHTINGS = ("examples", "uniform")


@flax.struct.dataclass
class ServerState:
    """Everything the server carries from round to round, as one pytree.

    Attributes:
      round: number of rounds applied so far (int32 scalar).
      params: the global model ``x``.
      server_opt_state: state of the server optimizer.
      rng: root PRNG key of the run's on-device randomness; round ``t`` uses
        ``fold_in(rng, t)``, so the key itself never changes. A raw ``jax.random.PRNGKey``
        (uint32) checkpoints like any array; typed ``jax.random.key`` keys work too.
      server_control: SCAFFOLD's ``c`` (params-shaped); ``None`` for other algorithms.
      client_controls: SCAFFOLD's ``c_k`` of all ``N`` clients, params with a leading ``N``.
      clip_norm: DP-FedAvg's current clipping norm ``S`` (adapted by adaptive clipping).
      site_params: FedBN's local normalisation leaves or Ditto's personal models of all ``N``
        sites, stacked ``(N, ...)``. A simulation's stand-in for the sites' own disks: in a
        deployment they never leave the site; no server step reads them (``None`` otherwise).
    """

    round: jax.Array
    params: Params
    server_opt_state: optax.OptState
    rng: jax.Array
    server_control: Params | None = None
    client_controls: Params | None = None
    clip_norm: jax.Array | None = None
    site_params: Params | None = None


@dataclasses.dataclass(frozen=True)
class RoundOptions:
    """How a round runs, shared by every algorithm.

    Attributes:
      weighting: ``"examples"`` (weights ``n_k``) or ``"uniform"``; ``None`` = the algorithm's
        paper (``"uniform"`` for SCAFFOLD, ``"examples"`` otherwise).
      max_update_norm: updates with a larger L2 norm are excluded (``None``: only non-finite
        updates are).
      dropout_rate: probability that a sampled client fails to report, per round.
      backend: ``for_each_client`` backend (``"auto"``, ``"vmap"``, ``"sharded"``, ``"loop"``).
      chunk_size: clients vmapped together; ``None`` = all.
      mesh: the ``clients`` mesh of the sharded backend.
      aggregator: the FedAvg family's server rule over the kept deltas (default: the weighted
        mean); DP-FedAvg and secure aggregation keep their own sum.
      tamper: ``tamper(indices, reporting, deltas) -> deltas``, what the cohort submits instead
        of its honest deltas (malicious clients); ``None``: honest.
    """

    weighting: str | None = None
    max_update_norm: float | None = None
    dropout_rate: float = 0.0
    backend: str = "auto"
    chunk_size: int | None = None
    mesh: Mesh | None = None
    aggregator: robust_aggregation.Aggregator = robust_aggregation.MEAN
    tamper: Callable[[jax.Array, jax.Array, Params], Params] | None = None

    def __post_init__(self):
        if self.weighting is not None and self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} must be one of {WEIGHTINGS} or None")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"max_update_norm={self.max_update_norm} must be > 0 or None")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate={self.dropout_rate} must lie in [0, 1)")


@dataclasses.dataclass(frozen=True)
class MessageSpec:
    """An algorithm's round as "clients submit vectors, the server steps from their sum".

    Attributes:
      message: ``message(state, outputs, clip) -> (C, D)``: row k is what client k submits
        (FedAvg: ``[w_k clip_c(delta_k), w_k]`` with ``w_k = n_k / M``; DP-FedAvg: the L2-clipped
        delta); ``clip`` is the wrapper's per-coordinate clip ``c``.
      bound: ``bound(state, clip) -> float``: no coordinate of a message exceeds it (the
        fixed-point encoder's range).
      server_update: ``server_update(state, total) -> (state, metrics)`` from the (D,) sum of
        the submitted rows; the round counter is not advanced.
    """

    message: Callable[[ServerState, client_lib.ClientOutput, Any], jax.Array]
    bound: Callable[[ServerState, float], float]
    server_update: Callable[[ServerState, jax.Array], tuple[ServerState, Metrics]]


@dataclasses.dataclass(frozen=True)
class SecureParts:
    """The steps of a round, separately callable, for a secure-aggregation wrapper.

    Attributes:
      check: validates a cohort, returns ``(indices, mask)`` as NumPy arrays.
      prepare: ``prepare(state, indices, mask) -> CohortInputs`` (jitted gather and dropout).
      run_clients: ``run_clients(state, inputs) -> ClientOutput`` (local training).
      screen: ``screen(outputs, reporting) -> (kept, num_excluded)``: each client's check of its
        own update (finite, norm <= ``max_update_norm``); a failing client does not submit.
      message: :attr:`MessageSpec.message`, jitted.
      bound: :attr:`MessageSpec.bound`.
      server_update: :attr:`MessageSpec.server_update`, jitted.
      clipped_deltas: ``clipped_deltas(outputs, clip) -> (C, d)`` flat deltas clipped to L2
        norm ``clip`` (distributed DP's client message).
      server_step: ``server_step(state, mean_delta_flat) -> state``: the server optimizer's step
        on a flat mean delta (``-mean`` is the pseudo-gradient); round not advanced.
      keep_site_params: :func:`keep_site_params`, jitted: what each site keeps (FedBN, Ditto),
        written to the simulation's per-site store, outside the secure sum.
      jitted: the jitted functions (``_cache_size()`` shows recompilations).
    """

    check: Callable[[sampling.Cohort], tuple[np.ndarray, np.ndarray]]
    prepare: Callable[..., CohortInputs]
    run_clients: Callable[..., client_lib.ClientOutput]
    screen: Callable[..., tuple[jax.Array, jax.Array]]
    message: Callable[..., jax.Array]
    bound: Callable[[ServerState, float], float]
    server_update: Callable[..., tuple[ServerState, Metrics]]
    clipped_deltas: Callable[..., jax.Array]
    server_step: Callable[..., ServerState]
    keep_site_params: Callable[..., ServerState]
    jitted: tuple[Any, ...]


def flatten_clients(updates: Params) -> jax.Array:
    """Stacked per-client pytrees -> ``(C, d)`` rows (``ravel_pytree`` order)."""
    return jax.vmap(lambda u: ravel_pytree(u)[0])(updates)


@dataclasses.dataclass(frozen=True)
class FederatedAlgorithm:
    """A federated algorithm: ``init(params, rng) -> ServerState`` and ``apply_round``.

    ``apply_round(state, cohort) -> (state, metrics)`` runs one round for a
    :class:`~fedjax_med.federated.sampling.Cohort`; ``metrics`` are device scalars:
    ``loss`` (weighted mean client training loss), ``num_sampled``, ``num_dropped``,
    ``num_excluded``, ``num_clients`` (contributing), ``update_norm`` (of the applied mean
    delta), plus algorithm-specific entries.

    Attributes:
      name: the algorithm's name.
      init: builds the initial server state from parameters and a PRNG key.
      apply_round: one round.
      for_each: the cohort runner.
      jitted: the jitted functions a round calls (``_cache_size()`` shows recompilations).
      sampler: the cohort sampler the algorithm was built for (DP-FedAvg's Poisson sampler,
        whose rate its accounting assumes); ``None`` when any cohort will do.
      secure: the round's pieces for secure aggregation (:class:`SecureParts`); ``None`` when
        the server step needs more than a sum of client vectors.
      finish: the server half of a round, jitted: ``finish(state, indices, cohort_mask, inputs,
        outputs) -> (state, metrics)`` screens the outputs of the slots ``inputs.reporting``
        marks, combines the rest and advances the round (steps 4-5 of the module doc), for
        clients whose local updates ran elsewhere (``fedjax_med.deploy``).
      site_model: ``site_model(state, k) -> params``: site ``k``'s own model (FedBN: the global
        shared leaves with its normalisation leaves; Ditto: its personal model); ``None`` when
        the sites have no model of their own.
    """

    name: str
    init: Callable[[Params, jax.Array], ServerState]
    apply_round: Callable[[ServerState, sampling.Cohort], tuple[ServerState, Metrics]]
    for_each: fec.ForEachClient
    jitted: tuple[Any, ...]
    sampler: Any = None
    secure: SecureParts | None = None
    finish: Callable[..., tuple[ServerState, Metrics]] | None = None
    site_model: Callable[[ServerState, int], Params] | None = None


@flax.struct.dataclass
class CohortInputs:
    """The cohort's gathered arrays and per-slot keys, ready for ``for_each_client``."""

    images: jax.Array
    labels: jax.Array
    mask: jax.Array
    counts: jax.Array
    keys: jax.Array
    client_controls: Params | None
    reporting: jax.Array  # (C,) bool: sampled and not dropped
    num_dropped: jax.Array
    unit_ids: jax.Array | None = None  # (C, M): each row's patient (patient-level local DP)
    indices: jax.Array | None = None  # (C,): each slot's client
    site_params: Params | None = None  # (C, ...): each slot's own parameters (FedBN, Ditto)


def round_key(state: ServerState) -> jax.Array:
    """The key of the state's current round: ``fold_in(rng, round)``."""
    return jax.random.fold_in(state.rng, state.round)


def gather_cohort(
    state: ServerState,
    data: client_lib.ClientData,
    indices: jax.Array,
    cohort_mask: jax.Array,
    dropout_rate: float,
) -> CohortInputs:
    """Step 1-2 of a round: the cohort's arrays, client keys and the dropout draw."""
    key = round_key(state)
    client_root = jax.random.fold_in(key, STREAM_CLIENTS)
    keys = jax.vmap(lambda k: jax.random.fold_in(client_root, k))(indices)
    reporting, num_dropped = aggregation.dropout(
        jax.random.fold_in(key, STREAM_DROPOUT), cohort_mask, dropout_rate
    )
    controls = None
    if state.client_controls is not None:
        controls = jax.tree.map(lambda c: c[indices], state.client_controls)
    return CohortInputs(
        images=data.images[indices],
        labels=data.labels[indices],
        mask=data.mask[indices],
        counts=data.counts[indices],
        keys=keys,
        client_controls=controls,
        reporting=reporting,
        num_dropped=num_dropped,
        unit_ids=None if data.unit_ids is None else data.unit_ids[indices],
        indices=indices,
        site_params=None if state.site_params is None else personal.row(state.site_params, indices),
    )


def keep_site_params(
    state: ServerState, indices: jax.Array, outputs: client_lib.ClientOutput, kept: jax.Array
) -> ServerState:
    """``state`` with each kept client's ``outputs.site_params`` in its row of the per-site store.

    What a site keeps after training (FedBN's local leaves, Ditto's personal model); a client
    that was dropped or excluded keeps its previous row. No aggregate reads them.
    """
    if state.site_params is None:
        return state
    stored = personal.scatter_rows(state.site_params, indices, outputs.site_params, kept)
    return state.replace(site_params=stored)


def tree_select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``where(pred, a, b)`` for a scalar ``pred``."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


# combine(state, indices, outputs, kept) -> (state, metrics): the server step of an algorithm.
Combine = Callable[
    [ServerState, jax.Array, client_lib.ClientOutput, jax.Array], tuple[ServerState, Metrics]
]


def build_algorithm(
    name: str,
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    server_optimizer: optax.GradientTransformation,
    combine: Combine,
    options: RoundOptions,
    init_extra: Callable[[Params], dict[str, Any]] | None = None,
    sampler: Any = None,
    message_spec: MessageSpec | None = None,
    split: personal.ParamSplit = personal.ALL_SHARED,
    site_model: Callable[[ServerState, int], Params] | None = None,
) -> FederatedAlgorithm:
    """Assembles a :class:`FederatedAlgorithm` from its server step (the round of the module doc).

    Args:
      name: algorithm name.
      local_update: the clients' local training.
      data: all clients' arrays; passed to the jitted round as an argument, never baked in.
      server_optimizer: optax transformation of the pseudo-gradient.
      combine: ``combine(state, indices, outputs, kept) -> (state, metrics)``: aggregates the
        kept clients' outputs and takes the server step; the round counter is advanced after it.
      options: :class:`RoundOptions`.
      init_extra: extra :class:`ServerState` fields from the initial parameters.
      sampler: recorded as :attr:`FederatedAlgorithm.sampler`.
      message_spec: the round as a sum of client messages, for secure aggregation.
      split: which leaves the server updates (``shared``; FedBN keeps the normalisation leaves
        at the sites); the server optimizer's state covers only those.
      site_model: recorded as :attr:`FederatedAlgorithm.site_model`.
    """
    for_each = fec.for_each_client(
        local_update, backend=options.backend, chunk_size=options.chunk_size, mesh=options.mesh
    )

    def init(params: Params, rng: jax.Array) -> ServerState:
        extra = init_extra(params) if init_extra is not None else {}
        return ServerState(
            round=jnp.zeros((), jnp.int32),
            params=params,
            server_opt_state=server_optimizer.init(split.shared(params)),
            rng=rng,
            **extra,
        )

    def prepare(state, data, indices, cohort_mask):
        return gather_cohort(state, data, indices, cohort_mask, options.dropout_rate)

    def run_clients(state, inputs):
        outputs = for_each(
            state.params,
            inputs.images,
            inputs.labels,
            inputs.mask,
            inputs.counts,
            inputs.keys,
            state.server_control,
            inputs.client_controls,
            client_mask=inputs.reporting,
            unit_ids=inputs.unit_ids,
            site_params=inputs.site_params,
        )
        if options.tamper is None:
            return outputs
        return outputs.replace(
            delta=options.tamper(inputs.indices, inputs.reporting, outputs.delta)
        )

    def finish(state, indices, cohort_mask, inputs, outputs):
        kept, num_excluded = aggregation.screen(
            outputs.delta, inputs.reporting, options.max_update_norm
        )
        new_state, metrics = combine(state, indices, outputs, kept)
        new_state = keep_site_params(new_state, indices, outputs, kept)
        metrics.update(
            num_sampled=jnp.sum(cohort_mask).astype(jnp.int32),
            num_dropped=inputs.num_dropped,
            num_excluded=num_excluded,
            num_clients=jnp.sum(kept).astype(jnp.int32),
        )
        return new_state.replace(round=state.round + 1), metrics

    def check(cohort: sampling.Cohort):
        indices = np.asarray(cohort.indices, np.int32)
        mask = np.asarray(cohort.mask, bool)
        if indices.ndim != 1 or indices.shape != mask.shape:
            raise ValueError(f"cohort indices {indices.shape} and mask {mask.shape} must be (C,)")
        if indices.size and (indices.min() < 0 or indices.max() >= data.num_clients):
            raise ValueError(f"cohort indices must lie in [0, {data.num_clients})")
        return indices, mask

    if for_each.traceable:

        def round_fn(state, data, indices, cohort_mask):
            inputs = prepare(state, data, indices, cohort_mask)
            outputs = run_clients(state, inputs)
            return finish(state, indices, cohort_mask, inputs, outputs)

        jitted_round = jax.jit(round_fn)

        def apply_round(state, cohort):
            indices, mask = check(cohort)
            return jitted_round(state, data, indices, mask)

        jitted = (jitted_round,)
        jitted_finish = jax.jit(finish)
    else:
        jitted_prepare = jax.jit(prepare)
        jitted_finish = jax.jit(finish)

        def apply_round(state, cohort):
            indices, mask = check(cohort)
            inputs = jitted_prepare(state, data, indices, mask)
            outputs = run_clients(state, inputs)
            return jitted_finish(state, indices, mask, inputs, outputs)

        jitted = (jitted_prepare, for_each._jitted, jitted_finish)

    secure = None
    if message_spec is not None:
        secure = _secure_parts(
            data,
            options,
            server_optimizer,
            message_spec,
            (check, prepare, run_clients),
            for_each,
            split,
        )
    return FederatedAlgorithm(
        name,
        init,
        apply_round,
        for_each,
        jitted,
        sampler,
        secure,
        finish=jitted_finish,
        site_model=site_model,
    )


def _secure_parts(data, options, server_optimizer, spec, round_steps, for_each, split):
    check, prepare, run_clients = round_steps

    def screen(outputs, reporting):
        return aggregation.screen(outputs.delta, reporting, options.max_update_norm)

    def clipped_deltas(outputs, clip):
        return flatten_clients(aggregation.clip_updates(outputs.delta, clip))

    def server_step(state, mean_flat):
        shared = split.shared(state.params)
        _, unravel = ravel_pytree(shared)
        mean = unravel(mean_flat.astype(jnp.float32))
        updates, opt_state = server_optimizer.update(
            jax.tree.map(jnp.negative, mean), state.server_opt_state, shared
        )
        params = split.merge(optax.apply_updates(shared, updates), split.local(state.params))
        return state.replace(params=params, server_opt_state=opt_state)

    jitted_prepare = jax.jit(prepare)
    jitted_run = jax.jit(run_clients) if for_each.traceable else run_clients
    fns = [jax.jit(f) for f in (screen, spec.message, spec.server_update, clipped_deltas)]
    jitted_step = jax.jit(server_step)
    def keep(state, indices, outputs, kept):
        # A closure per algorithm: jit caches by function, and _cache_size() is per algorithm.
        return keep_site_params(state, indices, outputs, kept)

    jitted_keep = jax.jit(keep)
    jitted = (jitted_prepare, *fns, jitted_step, jitted_keep)
    if for_each.traceable:
        jitted = (jitted_run, *jitted)
    return SecureParts(
        check=check,
        prepare=lambda state, indices, mask: jitted_prepare(state, data, indices, mask),
        run_clients=jitted_run,
        screen=fns[0],
        message=fns[1],
        bound=spec.bound,
        server_update=fns[2],
        clipped_deltas=fns[3],
        server_step=jitted_step,
        keep_site_params=jitted_keep,
        jitted=jitted,
    )


def fedopt_combine(
    server_optimizer: optax.GradientTransformation,
    weighting: str,
    num_clients: int,
    aggregator: robust_aggregation.Aggregator = robust_aggregation.MEAN,
    split: personal.ParamSplit = personal.ALL_SHARED,
) -> Combine:
    """The server step of FedAvg / FedAvgM / FedProx / FedOpt, and SCAFFOLD's when controls exist.

    ``Delta = sum_k w_k delta_k / sum_k w_k`` over kept clients (``w_k = n_k`` or 1), or the
    ``aggregator``'s robust rule over them; the server optimizer takes ``-Delta``. SCAFFOLD
    (state with controls) also applies ``c <- c + (1/N) sum_S Delta c_k`` and
    ``c_k <- c_k + Delta c_k``. A robust rule adds the metric ``below_breakdown`` (1 when fewer
    clients took part than it needs to tolerate its ``f``). With a FedBN ``split`` the deltas and
    the step cover the shared leaves only; the local leaves of ``state.params`` stay as they are.
    """

    def combine(state, indices, outputs, kept):
        weights = kept.astype(jnp.float32)
        if weighting == "examples":
            weights = weights * outputs.num_examples
        key = jax.random.fold_in(round_key(state), STREAM_AGGREGATOR)
        mean_delta = aggregator.aggregate(outputs.delta, weights, key)
        pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
        shared = split.shared(state.params)
        updates, opt_state = server_optimizer.update(pseudo_grad, state.server_opt_state, shared)
        params = split.merge(optax.apply_updates(shared, updates), split.local(state.params))
        contributed = jnp.sum(weights) > 0
        new_state = state.replace(
            params=tree_select(contributed, params, state.params),
            server_opt_state=tree_select(contributed, opt_state, state.server_opt_state),
        )
        if state.server_control is not None:
            control_sum = aggregation.masked_sum(outputs.control_delta, kept)
            server_control = jax.tree.map(
                lambda c, s: c + s / num_clients, state.server_control, control_sum
            )

            def scatter(stored, delta):
                keep = kept.reshape(kept.shape + (1,) * (delta.ndim - 1))
                return stored.at[indices].add(jnp.where(keep, delta, 0.0))

            client_controls = jax.tree.map(scatter, state.client_controls, outputs.control_delta)
            new_state = new_state.replace(
                server_control=server_control, client_controls=client_controls
            )
        metrics = {
            "loss": aggregation.weighted_mean(outputs.loss, weights),
            "update_norm": optax.global_norm(mean_delta),
        }
        if aggregator is not robust_aggregation.MEAN:
            metrics["below_breakdown"] = aggregator.below_breakdown(weights).astype(jnp.int32)
        return new_state, metrics

    return combine


def fedopt_message_spec(
    server_optimizer: optax.GradientTransformation,
    weighting: str,
    padded_size: int,
    split: personal.ParamSplit = personal.ALL_SHARED,
) -> MessageSpec:
    """FedAvg / FedOpt as a sum: client k submits ``[w_k clip_c(delta_k), w_k]``.

    ``w_k = n_k / M`` (``M`` the public padded client size) for example weighting, 1 for
    uniform; ``clip_c`` clips each coordinate to ``[-c, c]``. The server divides the first ``d``
    coordinates of the sum by the last, ``sum_k w_k``, to get the weighted mean delta ``Delta``
    (McMahan et al. 2017), and its optimizer steps on ``-Delta``; a zero total weight leaves the
    state unchanged. With a FedBN ``split``, ``delta_k`` and ``d`` are those of the shared leaves:
    no coordinate of a message is a site's local parameter.
    """

    def message(state, outputs, clip):
        del state
        flat = flatten_clients(outputs.delta)
        if weighting == "examples":
            w = outputs.num_examples.astype(jnp.float32) / padded_size
        else:
            w = jnp.ones(flat.shape[0], jnp.float32)
        return jnp.concatenate([jnp.clip(flat, -clip, clip) * w[:, None], w[:, None]], axis=1)

    def bound(state, clip):
        del state
        return max(float(clip), 1.0)

    def server_update(state, total):
        shared = split.shared(state.params)
        _, unravel = ravel_pytree(shared)
        weight = total[-1]
        contributed = weight > 0
        mean = unravel((total[:-1] / jnp.where(contributed, weight, 1.0)).astype(jnp.float32))
        updates, opt_state = server_optimizer.update(
            jax.tree.map(jnp.negative, mean), state.server_opt_state, shared
        )
        params = split.merge(optax.apply_updates(shared, updates), split.local(state.params))
        new_state = state.replace(
            params=tree_select(contributed, params, state.params),
            server_opt_state=tree_select(contributed, opt_state, state.server_opt_state),
        )
        return new_state, {"update_norm": optax.global_norm(mean)}

    return MessageSpec(message, bound, server_update)


def _check_local_update(local_update: client_lib.LocalUpdate, scaffold: bool, name: str) -> None:
    if local_update.scaffold != scaffold:
        raise ValueError(
            f"{name} needs a local update built with scaffold={scaffold}, got "
            f"scaffold={local_update.scaffold}"
        )


def fedopt(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    server_optimizer: optax.GradientTransformation,
    *,
    options: RoundOptions | None = None,
    name: str = "fedopt",
    init_extra: Callable[[Params], dict[str, Any]] | None = None,
    site_model: Callable[[ServerState, int], Params] | None = None,
) -> FederatedAlgorithm:
    """FedAvg-style rounds with any optax server optimizer of the pseudo-gradient ``-Delta``.

    Reddi et al. 2021 (arXiv:2003.00295), Algorithm 1 with ServerOpt = ``server_optimizer``.

    Args:
      local_update: the clients' training (``scaffold=False``).
      data: all clients' arrays.
      server_optimizer: optax transformation applied to ``-Delta``.
      options: :class:`RoundOptions`; ``None`` = defaults (weighting ``"examples"``).
      name: reported name.
      init_extra, site_model: as in :func:`build_algorithm` (FedBN and Ditto's per-site store).
    """
    options = RoundOptions() if options is None else options
    _check_local_update(local_update, False, name)
    weighting = options.weighting or "examples"
    split = local_update.split
    return build_algorithm(
        name,
        local_update,
        data,
        server_optimizer=server_optimizer,
        combine=fedopt_combine(
            server_optimizer, weighting, data.num_clients, options.aggregator, split
        ),
        options=options,
        init_extra=init_extra,
        # A robust rule needs every individual update: it has no form as a secure sum.
        message_spec=fedopt_message_spec(server_optimizer, weighting, data.mask.shape[1], split)
        if options.aggregator is robust_aggregation.MEAN
        else None,
        split=split,
        site_model=site_model,
    )


def fedavg(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    server_lr: float = 1.0,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """FedAvg (McMahan et al. 2017, arXiv:1602.05629): ``x <- x + server_lr * Delta``.

    ``Delta`` is the example-weighted mean of the kept clients' deltas (``options.weighting``).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from fedjax_med.federated import client, sampling
      >>> quadratic = lambda p, x, y: 0.5 * jnp.sum((p - x) ** 2, axis=-1)
      >>> update = client.make_local_update_for_loss(
      ...     quadratic, local_steps=1, batch_size=1, client_lr=1.0)
      >>> data = client.client_data(np.array([[[1.0]], [[4.0]]]), np.zeros((2, 1)),
      ...                           np.ones((2, 1), bool), np.array([1, 1]))
      >>> algorithm = fedavg(update, data, options=RoundOptions(backend="vmap"))
      >>> state = algorithm.init(jnp.zeros(1), jax.random.key(0))
      >>> state, metrics = algorithm.apply_round(state, sampling.padded_cohort(np.arange(2), 2))
      >>> state.params.tolist(), int(metrics["num_clients"])  # (1 + 4) / 2
      ([2.5], 2)
    """
    return fedopt(
        local_update, data, server_optimizers.fedavg(server_lr), options=options, name="fedavg"
    )


def fedavgm(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    server_lr: float = 1.0,
    momentum: float = 0.9,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """FedAvgM (Hsu et al. 2019, arXiv:1909.06335): ``v <- beta v - Delta; x <- x - eta v``."""
    return fedopt(
        local_update,
        data,
        server_optimizers.fedavgm(server_lr, momentum),
        options=options,
        name="fedavgm",
    )


def fedprox(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    mu: float,
    server_lr: float = 1.0,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """FedProx (Li et al. 2020, arXiv:1812.06127): FedAvg with the proximal local objective.

    The clients minimise ``f_k(y) + (mu/2)||y - x||^2``; ``local_update``'s own ``prox_mu`` is
    replaced by ``mu``. ``mu = 0`` is FedAvg.
    """
    if not mu >= 0:
        raise ValueError(f"{mu=} must be >= 0")
    local_update = dataclasses.replace(local_update, prox_mu=float(mu))
    return fedopt(
        local_update, data, server_optimizers.fedavg(server_lr), options=options, name="fedprox"
    )


def fedadam(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    server_lr: float,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """FedAdam (Reddi et al. 2021, arXiv:2003.00295, Algorithm 2; see ``server_optimizers``)."""
    tx = server_optimizers.fedadam(server_lr, b1, b2, tau)
    return fedopt(local_update, data, tx, options=options, name="fedadam")


def fedyogi(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    server_lr: float,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """FedYogi (Reddi et al. 2021, arXiv:2003.00295, Algorithm 2; see ``server_optimizers``)."""
    tx = server_optimizers.fedyogi(server_lr, b1, b2, tau)
    return fedopt(local_update, data, tx, options=options, name="fedyogi")


def fedadagrad(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    server_lr: float,
    b1: float = 0.9,
    tau: float = 1e-3,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """FedAdagrad (Reddi et al. 2021, arXiv:2003.00295, Algorithm 2; see ``server_optimizers``)."""
    tx = server_optimizers.fedadagrad(server_lr, b1, tau)
    return fedopt(local_update, data, tx, options=options, name="fedadagrad")


def scaffold(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    server_lr: float = 1.0,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """SCAFFOLD, option II (Karimireddy et al. 2020, arXiv:1910.06378, Algorithm 1).

    Clients step ``y <- y - lr (g_k(y) - c_k + c)`` and return ``Delta y`` and
    ``Delta c_k = -c + (x - y) / (S lr)``; the server sets ``x <- x + eta_g mean_S(Delta y)``,
    ``c <- c + (1/N) sum_S Delta c_k`` and stores ``c_k <- c_k + Delta c_k``. ``local_update``
    is switched to SCAFFOLD mode (it must use plain SGD). The mean is uniform over the reporting
    clients as in the paper, unless ``options.weighting`` says otherwise.
    """
    options = RoundOptions() if options is None else options
    if local_update.optimizer_name != "sgd":
        raise ValueError("scaffold needs a local update with client_optimizer='sgd'")
    local_update = dataclasses.replace(local_update, scaffold=True)
    weighting = options.weighting or "uniform"
    tx = server_optimizers.fedavg(server_lr)
    num_clients = data.num_clients

    def init_extra(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        stacked = jax.tree.map(lambda p: jnp.zeros((num_clients, *p.shape), p.dtype), params)
        return {"server_control": zeros, "client_controls": stacked}

    return build_algorithm(
        "scaffold",
        local_update,
        data,
        server_optimizer=tx,
        combine=fedopt_combine(tx, weighting, num_clients, options.aggregator),
        options=options,
        init_extra=init_extra,
    )


def fedbn(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    server_lr: float = 1.0,
    split: personal.ParamSplit = personal.NORM_LOCAL,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """FedBN (Li, Jiang, Zhang, Kamp, Dou, ICLR 2021, arXiv:2102.07623): local normalisation.

    FedAvg over the shared leaves only: site ``k`` trains ``(theta_s, theta_l^k)`` from the
    global ``theta_s`` and its own ``theta_l^k`` (every ``theta_l^k`` starts at the initial
    model's), submits ``Delta theta_s`` and keeps ``theta_l^k``; the server steps
    ``theta_s <- theta_s + server_lr Delta`` on the example-weighted mean. ``split`` picks
    ``theta_l`` (default: every normalisation ``scale`` and ``bias``,
    :func:`fedjax_med.federated.personal.is_norm_param`). The released global model's local
    leaves stay at their initial values (the server never learns a site's); site ``k``'s model
    is :attr:`FederatedAlgorithm.site_model`. The sites' ``theta_l^k`` are stored
    ``(N, ...)`` in ``ServerState.site_params`` for the simulation only: in a deployment they
    never leave the site, and here no server step reads them. Composes with secure
    aggregation: the submitted vector has only shared coordinates.

    Raises:
      ValueError: at ``init``, for a model without leaves ``split`` keeps local.
    """
    if not split.keeps_local:
        raise ValueError("fedbn needs a split with a local-leaf predicate (personal.NORM_LOCAL)")
    local_update = dataclasses.replace(local_update, split=split)
    num_clients = data.num_clients

    def init_extra(params):
        local = split.local(params)
        if not jax.tree.leaves(local):
            raise ValueError(
                "fedbn keeps each site's normalisation parameters, but the model has none (no "
                "'scale' or 'bias' under a module whose name contains 'norm'): use a model with "
                "GroupNorm, e.g. model.name='resnet_gn'"
            )
        return {"site_params": personal.stack(local, num_clients)}

    def site_model(state, k):
        return split.merge(split.shared(state.params), personal.row(state.site_params, k))

    return fedopt(
        local_update,
        data,
        server_optimizers.fedavg(server_lr),
        options=options,
        name="fedbn",
        init_extra=init_extra,
        site_model=site_model,
    )


def ditto(
    local_update: client_lib.LocalUpdate,
    data: client_lib.ClientData,
    *,
    lam: float,
    server_lr: float = 1.0,
    options: RoundOptions | None = None,
) -> FederatedAlgorithm:
    """Ditto (Li, Hu, Beirami, Smith, ICML 2021, arXiv:2012.04989, Algorithm 1).

    The global model ``w`` is trained by FedAvg; every sampled site ``k`` also takes ``S`` steps
    ``v_k <- v_k - eta (grad f_k(v_k) + lam (v_k - w^t))`` of its personal model (the same local
    training, with the proximal term towards the round's global model ``w^t``) and keeps
    ``v_k``; it submits only ``w_k^t - w^t``. Every ``v_k`` starts at the initial model.
    ``lam = 0`` is purely local training of ``v_k``; a large ``lam`` keeps ``v_k`` near ``w``.
    The personal models are stored ``(N, ...)`` in ``ServerState.site_params`` for the
    simulation only (in a deployment they stay on site; no server step reads them). Under local
    DP-SGD the personal steps are privatised like the global ones: a site's ledger counts
    ``2 S`` steps per round (:attr:`~fedjax_med.federated.client.LocalUpdate.steps_per_round`).

    Raises:
      ValueError: if ``lam < 0``, or ``lam >= 2 / client_lr`` for SGD clients (the explicit
        proximal step diverges).
    """
    local_update = dataclasses.replace(local_update, ditto_lambda=float(lam))
    client_lib.check_site_params(local_update)
    num_clients = data.num_clients

    def init_extra(params):
        return {"site_params": personal.stack(params, num_clients)}

    def site_model(state, k):
        return personal.row(state.site_params, k)

    return fedopt(
        local_update,
        data,
        server_optimizers.fedavg(server_lr),
        options=options,
        name="ditto",
        init_extra=init_extra,
        site_model=site_model,
    )
