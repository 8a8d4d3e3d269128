"""Federated training: config -> sites -> clients -> rounds -> global and per-site evaluation.

``run_rounds(config, workdir)`` is the loop behind ``fedjax-med train`` for
``config.trainer = "federated"``. The training split is partitioned into clients by
``config.federated.partition`` (by default one client per hospital); each round the loop

1. samples a cohort (uniformly, or Poisson with rate ``q`` for client-level DP),
2. asks the run's privacy ledger (:mod:`fedjax_med.trainers.ledgers`) which sampled clients
   their budgets admit,
3. runs the algorithm's round (local training of every admitted client, vectorised or looped,
   see :mod:`fedjax_med.federated.for_each_client`; secure aggregation wraps the algorithm),
4. records the round in the ledger and ``metrics.jsonl``, evaluates and checkpoints.

The loop knows no mechanism: DP-FedAvg, local DP-SGD, distributed DP and no privacy differ only
in the algorithm and the ledger :func:`build_plan` chooses (:func:`fedjax_med.config.schema.
mechanism`). Outputs in ``workdir`` are those of the centralized trainer; ``metrics.jsonl`` gets
one ``split = "round"`` record per round and ``report.json`` gets ``federated`` (algorithm,
clients, rounds) and, for a private run, ``privacy``: the ledger's
:class:`~fedjax_med.privacy.claim.PrivacyClaim`. With per-site models (``fedbn``, ``ditto``:
:func:`site_model_metrics`) each ``per_site[site]`` also gets the site's own model's
``personal_test_*`` metrics, and ``personal_site_summary`` their worst, mean and spread.

Randomness (:mod:`fedjax_med.randomness`): cohorts, client training, dropouts and noise all
derive from the server key and the cohort sampler. In ``reproducible`` mode both follow from
``config.seed`` and resume is exact; in ``secure`` mode they come from the operating system, the
server key is never written to a checkpoint, and a resumed run draws new ones (exact in
everything but those draws).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_med import randomness
from fedjax_med.config import loading, schema, scope
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import partition, preprocess
from fedjax_med.federated import (
    algorithms,
    dp_fedavg,
    personal,
    robust_aggregation,
    sampling,
    secure_rounds,
    server_optimizers,
)
from fedjax_med.federated import client as client_lib
from fedjax_med.models import registry, scatternet
from fedjax_med.privacy import accounting, budget
from fedjax_med.secure import distributed_dp, he_ckks, secagg
from fedjax_med.trainers import ledgers
from fedjax_med.trainers import poisoning as poisoning_lib
from fedjax_med.trainers import run as run_lib
from fedjax_med.training import checkpoint, curves, evaluate, metrics, progress, report, setup
from fedjax_med.training import workdir as workdir_lib

logger = logging.getLogger("fedjax_med")

CohortSampler = sampling.UniformSampler | sampling.PoissonCohortSampler


@dataclasses.dataclass(frozen=True)
class RoundParts:
    """What the rounds of a run need besides the data (:func:`build_round_parts`).

    Attributes:
      algorithm: the round (secure aggregation included when configured).
      sampler: the cohort sampler.
      ledger: the privacy ledger of the mechanism (:class:`~ledgers.NoPrivacy` if none).
      randomness: where the server key and the cohorts come from.
      server_key: root of every round key (``fold_in(server_key, round)``).
      mechanism: :func:`fedjax_med.config.schema.mechanism` of the config.
    """

    algorithm: algorithms.FederatedAlgorithm
    sampler: CohortSampler
    ledger: ledgers.PrivacyAccountant
    randomness: randomness.Randomness
    server_key: jax.Array
    mechanism: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class FederatedPlan(RoundParts):
    """Everything built from a config before the first round.

    The :class:`RoundParts` (algorithm, sampler, ledger, randomness, server key, mechanism) and
    the data and model they run on.

    Attributes:
      config: the validated config.
      splits, normalizer, model: the data, its per-site normaliser and the model.
      federation: the clients' examples (host), and ``client_data`` the same on device.
      threat: the malicious clients and the server's aggregation rule
        (:mod:`fedjax_med.trainers.poisoning`).
    """

    config: ml_collections.ConfigDict
    splits: dataset_lib.DatasetSplits
    normalizer: preprocess.Normalizer
    model: registry.Model
    federation: partition.FederatedDataset
    client_data: client_lib.ClientData
    threat: poisoning_lib.Threat


def parse_site_targets(text: str, names: tuple[str, ...], default: float) -> np.ndarray:
    """``"hospital_0=2,hospital_3=4"`` -> per-client targets (``default`` elsewhere).

    A ``default`` <= 0 means no budget (``inf``) for the clients the text does not name.

    Raises:
      ValueError: for an item that is not ``NAME=EPSILON`` with a known name, or an epsilon <= 0.

    Examples:
      >>> parse_site_targets("b=2", ("a", "b"), 0.0).tolist()
      [inf, 2.0]
    """
    targets = np.full(len(names), default if default > 0 else np.inf, np.float64)
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise ValueError(
                f"federated.site_target_epsilons item {item!r} must be NAME=EPSILON with NAME "
                f"one of {list(names)}"
            )
        eps = float(value)
        if not eps > 0:
            raise ValueError(f"federated.site_target_epsilons: {name}={eps} must be > 0")
        targets[names.index(name.strip())] = eps
    return targets


def build_federation(
    config: ml_collections.ConfigDict, splits: dataset_lib.DatasetSplits
) -> partition.FederatedDataset:
    """Partitions the training split into clients per ``config.federated.partition``.

    The partition always draws from ``config.seed`` (it is the study's layout, not a privacy draw).

    Raises:
      ValueError: for ``method='by_site'`` when a site has no training images.
    """
    p = config.federated.partition
    info = splits.info
    num_clients = p.num_clients or len(info.site_names)
    # The partition is the study's data layout, not a privacy draw: always from the seed.
    rng = randomness.Randomness("reproducible", config.seed).generator(randomness.PARTITION)
    if p.method == "by_site":
        present = np.unique(splits.train.sites)
        if len(present) != len(info.site_names):
            missing = sorted(set(range(len(info.site_names))) - set(present.tolist()))
            raise ValueError(
                f"federated.partition.method='by_site' needs training images at every site; "
                f"site {info.site_names[missing[0]]!r} has none"
            )
        if p.num_clients not in (0, len(info.site_names)):
            raise ValueError(
                f"config field 'federated.partition.num_clients'={p.num_clients} must be 0 or "
                f"the number of sites ({len(info.site_names)}) with method='by_site' (each site "
                "is one client); use iid, dirichlet or quantity_skew for another number"
            )
        num_clients = len(info.site_names)
    indices, names = partition.partition(
        splits.train,
        p.method,
        num_clients,
        rng,
        alpha=p.alpha,
        beta=p.beta,
        site_names=info.site_names,
    )
    return partition.make_federated(splits.train, indices, names)


# ---- algorithms, by name ---------------------------------------------------------------------
# federated.algorithm -> the server learning rate ``federated.server_lr = 0`` stands for: each
# converges on the embedded data (tests/trainers/server_lr_test.py). The adaptive optimizers take
# steps of about ``server_lr`` per coordinate whatever the update's scale, so they need the small
# rates Reddi et al. 2021 (arXiv:2003.00295) tune per optimizer: ~1e-2 for Adam and Yogi, 1e-1 for
# Adagrad (whose steps shrink as squared updates accumulate). The averaging family applies the
# mean client delta itself (1.0); FedAvgM's momentum 0.9 already scales it up tenfold.
DEFAULT_SERVER_LR = {
    "fedavg": 1.0,
    "fedprox": 1.0,
    "scaffold": 1.0,
    "fedavgm": 1.0,
    "dp_fedavg": 1.0,
    "fedadam": 1e-2,
    "fedyogi": 1e-2,
    "fedadagrad": 1e-1,
    "fedbn": 1.0,
    "ditto": 1.0,
}


def server_lr(f: ml_collections.ConfigDict) -> float:
    """``federated.server_lr``, or the algorithm's :data:`DEFAULT_SERVER_LR` where it is 0."""
    return float(f.server_lr) or DEFAULT_SERVER_LR[f.algorithm]


def _server_optimizer(f: ml_collections.ConfigDict):
    """The server optimizer of ``federated.algorithm`` (Reddi et al. 2021 for the adaptive)."""
    lr = server_lr(f)
    builders = {
        "fedavgm": lambda: server_optimizers.fedavgm(lr, f.server_momentum),
        "fedadam": lambda: server_optimizers.fedadam(lr, tau=f.server_tau),
        "fedyogi": lambda: server_optimizers.fedyogi(lr, tau=f.server_tau),
        "fedadagrad": lambda: server_optimizers.fedadagrad(lr, tau=f.server_tau),
    }
    return builders.get(f.algorithm, lambda: server_optimizers.fedavg(lr))()


@dataclasses.dataclass(frozen=True)
class AlgorithmInputs:
    """What every algorithm builder takes."""

    config: ml_collections.ConfigDict
    local_update: client_lib.LocalUpdate
    data: client_lib.ClientData
    options: algorithms.RoundOptions
    sampler: CohortSampler
    noise_multiplier: float


def _fedopt(inputs: AlgorithmInputs) -> algorithms.FederatedAlgorithm:
    f = inputs.config.federated
    return algorithms.fedopt(
        inputs.local_update,
        inputs.data,
        _server_optimizer(f),
        options=inputs.options,
        name=f.algorithm,
    )


def _dp_fedavg(inputs: AlgorithmInputs) -> algorithms.FederatedAlgorithm:
    f, p = inputs.config.federated, inputs.config.privacy
    expected = inputs.sampler.expected_clients
    if f.adaptive_clipping and not expected > 10 * inputs.noise_multiplier:
        # The count of unclipped clients gets noise q N / 20, which must exceed z / 2.
        raise ValueError(
            f"federated.adaptive_clipping needs more expected clients per round ({expected:g}) "
            f"than 10 x the noise multiplier ({inputs.noise_multiplier:g}): raise "
            "federated.clients_per_round (and federated.partition.num_clients), lower "
            "privacy.noise_multiplier (or raise privacy.target_epsilon), or set "
            "federated.adaptive_clipping=false"
        )
    return dp_fedavg.dp_fedavg(
        inputs.local_update,
        inputs.data,
        inputs.sampler,
        noise_multiplier=inputs.noise_multiplier,
        clip_norm=p.clip_norm,
        server_optimizer=_server_optimizer(f),
        adaptive=f.adaptive_clipping,
        target_quantile=f.target_quantile,
        options=inputs.options,
    )


# federated.algorithm -> builder: the one table of algorithms the trainer runs.
ALGORITHMS = {
    "fedavg": lambda i: algorithms.fedavg(
        i.local_update, i.data, server_lr=server_lr(i.config.federated), options=i.options
    ),
    "fedprox": lambda i: algorithms.fedprox(
        i.local_update,
        i.data,
        mu=i.config.federated.prox_mu,
        server_lr=server_lr(i.config.federated),
        options=i.options,
    ),
    "scaffold": lambda i: algorithms.scaffold(
        i.local_update, i.data, server_lr=server_lr(i.config.federated), options=i.options
    ),
    "fedavgm": _fedopt,
    "fedadam": _fedopt,
    "fedyogi": _fedopt,
    "fedadagrad": _fedopt,
    "dp_fedavg": _dp_fedavg,
    "fedbn": lambda i: algorithms.fedbn(
        i.local_update, i.data, server_lr=server_lr(i.config.federated), options=i.options
    ),
    "ditto": lambda i: algorithms.ditto(
        i.local_update,
        i.data,
        lam=i.config.federated.ditto_lambda,
        server_lr=server_lr(i.config.federated),
        options=i.options,
    ),
}


def make_local_update(
    config: ml_collections.ConfigDict, model: registry.Model, task: str, local_steps: int
) -> client_lib.LocalUpdate:
    """The clients' local training; local DP-SGD in every site when ``privacy.enabled``."""
    f, p = config.federated, config.privacy
    return client_lib.make_local_update(
        model.apply,
        task,
        local_steps=local_steps,
        batch_size=f.client_batch_size,
        client_lr=f.client_lr,
        client_optimizer=f.client_optimizer,
        prox_mu=f.prox_mu if f.algorithm == "fedprox" else 0.0,
        scaffold=f.algorithm == "scaffold",
        dp_clip_norm=p.clip_norm if p.enabled else None,
        dp_noise_multiplier=p.noise_multiplier if p.enabled else 0.0,
        dp_method=p.method,
        dp_per_layer=p.per_layer_clipping,
        dp_microbatch_size=p.microbatch_size or None,
        dp_unit=p.unit,
        dp_max_per_unit=p.max_images_per_patient if p.unit == "patient" else None,
    )


# ---- ledgers, by mechanism -------------------------------------------------------------------
def _client_level_ledger(config, federation, noise_multiplier):
    p, f = config.privacy, config.federated
    ledger = budget.planned_ledger(
        noise_multiplier=noise_multiplier,
        sampling_rate=(f.clients_per_round or federation.num_clients) / federation.num_clients,
        planned_steps=f.rounds,
        delta=p.delta,
        target_epsilon=p.target_epsilon,
        accountant=p.accountant,
        unit="client",
        num_examples=federation.num_clients,
    )
    return ledgers.ClientLevelLedger(budget.check_affords_one(ledger, release="round"))


def _site_ledgers(config, federation, data, noise_multiplier, steps_per_round):
    p, f = config.privacy, config.federated
    names = tuple(federation.client_names)
    # Patient-level: each site's Poisson sampling and accounting run over its patients.
    counts = np.asarray(
        client_lib.num_units(data) if p.unit == "patient" else federation.counts, np.int64
    )
    accounting.check_delta(p.delta, int(counts.min()))
    site_ledgers = ledgers.SiteLedgers(
        names=names,
        num_units=counts,
        unit=p.unit,
        targets=parse_site_targets(f.site_target_epsilons, names, p.target_epsilon),
        noise_multiplier=float(p.noise_multiplier),
        batch_size=f.client_batch_size,
        local_steps=steps_per_round,
        delta=p.delta,
        accountant=p.accountant,
    )
    # A site that cannot afford one round would silently never contribute: refuse it up front.
    for k, name in enumerate(names):
        if not site_ledgers.can_take(k, steps_per_round):
            one = site_ledgers.epsilon(k, steps_per_round)
            raise ValueError(
                f"site {name!r}: target epsilon {site_ledgers.targets[k]:g} (privacy."
                "target_epsilon or federated.site_target_epsilons) cannot afford one round: "
                f"{steps_per_round} local steps at privacy.noise_multiplier={p.noise_multiplier:g} "
                f"and sampling rate {site_ledgers.sampling_rate(k):.4g} already spend epsilon "
                f"{one:.4g} at delta {p.delta:g}; set that site's target >= {one:.4g}, or raise "
                "the noise or lower federated.local_steps"
            )
    return site_ledgers


def _distributed_ledger(config, federation, data, noise_multiplier, ddp, steps_per_round):
    del steps_per_round  # client-level: the sum of a round is one release
    sa, p = config.secure_aggregation, config.privacy
    return ledgers.DistributedLedger(
        epsilon_fn=ddp.epsilon,  # counts only rounds that released a sum
        delta=float(p.delta),
        noise_multiplier=float(p.noise_multiplier),
        clip_norm=float(p.clip_norm),
        accountant=f"rdp ({config.secure_aggregation.distributed_dp} sum bound)",
        settings={
            "kind": config.secure_aggregation.distributed_dp,
            "noise_multiplier": float(p.noise_multiplier),
            "clip_norm": float(p.clip_norm),
            "delta": float(p.delta),
            "method": config.secure_aggregation.method,
        },
        claim_details=lambda: {
            "mechanism_detail": f"distributed {sa.distributed_dp} via {sa.method}",
            "min_clients_per_round": ddp.min_noisy_clients,
            "secagg_threshold": ddp.threshold,
        },
    )


# mechanism -> ledger builder (config, federation, client data, noise multiplier, distributed DP,
# each site's private steps per round: S, or 2 S with Ditto's personal steps).
LEDGERS = {
    "none": lambda *_: ledgers.NoPrivacy(),
    "dp_fedavg": lambda c, fed, data, sigma, *_: _client_level_ledger(c, fed, sigma),
    "local_dp_sgd": lambda c, fed, data, sigma, _, steps: _site_ledgers(c, fed, data, sigma, steps),
    "distributed_dp": _distributed_ledger,
}


def _distributed_dp(
    config, model, sampler, rng, split=personal.ALL_SHARED
) -> distributed_dp.DistributedDP | None:
    """Client-side integer noise summed by secure aggregation, or ``None``.

    Its dimension is that of what a client submits: the ``split``'s shared leaves (FedBN keeps
    the normalisation leaves at the site; deployment, which refuses per-site models, shares all).
    """
    f, p = config.federated, config.privacy
    if config.secure_aggregation.distributed_dp == "none":
        return None
    if f.algorithm == "dp_fedavg":
        raise ValueError(
            "secure_aggregation.distributed_dp replaces DP-FedAvg's server noise: use "
            "federated.algorithm='fedavg' with it"
        )
    n = sampler.cohort_size
    _, threshold = secagg.secagg_plus_parameters(
        n,
        config.secure_aggregation.dropout_rate,
        config.secure_aggregation.corrupted_fraction,
        complete=config.secure_aggregation.method == "secagg",
    )
    return distributed_dp.DistributedDP(
        config.secure_aggregation.distributed_dp,
        num_clients=n,
        dim=model.num_params(split.shared(model.init(jax.random.PRNGKey(0)))),
        clip=p.clip_norm,
        noise_multiplier=p.noise_multiplier,
        delta=p.delta,
        threshold=threshold,
        randomness=rng,
        corrupted_fraction=config.secure_aggregation.corrupted_fraction,
    )


def _secure(config, algorithm, rng, ddp) -> algorithms.FederatedAlgorithm:
    """``algorithm`` behind secure aggregation (with distributed DP's client noise, if any)."""
    return secure_rounds.secure_algorithm(
        algorithm,
        method=config.secure_aggregation.method,
        randomness=rng,
        secagg_clip=config.secure_aggregation.clip,
        dropout_rate=config.secure_aggregation.dropout_rate,
        corrupted_fraction=config.secure_aggregation.corrupted_fraction,
        distributed_dp=ddp,
        he_poly_modulus_degree=config.secure_aggregation.he_poly_modulus_degree,
    )


def _noise_multiplier(config, mechanism: str, rate: float) -> float:
    p = config.privacy
    if mechanism == "none":
        return 0.0
    if p.noise_multiplier > 0 or mechanism != "dp_fedavg":
        return float(p.noise_multiplier)
    return accounting.calibrate_noise_multiplier(
        p.target_epsilon, rate, config.federated.rounds, p.delta, accountant=p.accountant
    )


def _cohort_sampler(config, mechanism, num_clients, rng) -> CohortSampler:
    per_round = config.federated.clients_per_round or num_clients
    if per_round > num_clients:
        raise ValueError(
            f"federated.clients_per_round={per_round} must be <= the {num_clients} clients"
        )
    if mechanism == "dp_fedavg":  # the Poisson sampling its accounting assumes
        return sampling.PoissonCohortSampler(
            num_clients, per_round / num_clients, seed=config.seed, randomness=rng
        )
    return sampling.UniformSampler(num_clients, per_round, config.seed, randomness=rng)


def _server_key(config, mechanism, rng) -> jax.Array:
    if mechanism == "none" and not rng.secure:
        return jax.random.fold_in(jax.random.PRNGKey(config.seed), randomness.SERVER)
    return jax.random.fold_in(rng.key(randomness.NOISE), randomness.SERVER)


def build_plan(config: ml_collections.ConfigDict) -> FederatedPlan:
    """Data, federation, algorithm, sampler, ledger and keys of a federated run."""
    splits, normalizer, model = setup.build_data_and_model(config)
    if scatternet.data_norm_of(model.module) is not None:
        raise ValueError(
            "config field 'model.kwargs.norm'='data' (private DataNorm statistics of one "
            "training set) is for the central trainer; federated runs use model.kwargs.norm="
            "'group' (per-example GroupNorm, no privacy spent)"
        )
    f = config.federated
    federation = build_federation(config, splits)
    cohort = f.clients_per_round or federation.num_clients
    threat = poisoning_lib.build(config, splits, federation, cohort=cohort, server_lr=server_lr(f))
    federation = threat.federation
    data = client_lib.from_federated_dataset(federation, normalizer)
    parts = build_round_parts(
        config,
        model,
        splits.info.task,
        federation,
        data,
        aggregator=threat.aggregator,
        tamper=threat.tamper,
    )
    return FederatedPlan(
        config=config,
        splits=splits,
        normalizer=normalizer,
        model=model,
        federation=federation,
        client_data=data,
        threat=threat,
        **{field.name: getattr(parts, field.name) for field in dataclasses.fields(parts)},
    )


def build_round_parts(
    config: ml_collections.ConfigDict,
    model: registry.Model,
    task: str,
    federation: partition.FederatedDataset,
    data: client_lib.ClientData,
    *,
    aggregator: robust_aggregation.Aggregator = robust_aggregation.MEAN,
    tamper: Callable | None = None,
) -> RoundParts:
    """The algorithm, sampler, ledger and keys of ``config`` for a federation of clients.

    ``federation`` is read for ``num_clients``, ``counts`` and ``client_names`` only, and
    ``data`` for its shapes and ``unit_ids`` (server-side uses pass the clients' metadata).
    ``aggregator`` replaces the weighted mean of the updates and ``tamper`` rewrites malicious
    clients' updates (a simulated :class:`~fedjax_med.trainers.poisoning.Threat`).
    """
    f = config.federated
    mechanism = schema.mechanism(config)
    rng = randomness.Randomness(config.privacy.noise_seed, config.seed)
    sampler = _cohort_sampler(config, mechanism, federation.num_clients, rng)
    rate = (f.clients_per_round or federation.num_clients) / federation.num_clients
    sigma = _noise_multiplier(config, mechanism, rate)
    options = algorithms.RoundOptions(
        max_update_norm=f.max_update_norm or None,
        dropout_rate=f.dropout_prob,
        backend=f.backend,
        chunk_size=f.chunk_size or None,
        aggregator=aggregator,
        tamper=tamper,
    )
    local_update = make_local_update(config, model, task, f.local_steps)
    inputs = AlgorithmInputs(config, local_update, data, options, sampler, sigma)
    algorithm = ALGORITHMS[f.algorithm](inputs)
    trained = algorithm.for_each.local_update  # the update the algorithm runs (FedBN, Ditto)
    ddp = _distributed_dp(config, model, sampler, rng, trained.split)
    if config.secure_aggregation.method != "none":
        algorithm = _secure(config, algorithm, rng, ddp)
    ledger = LEDGERS[mechanism](config, federation, data, sigma, ddp, trained.steps_per_round)
    return RoundParts(
        algorithm=algorithm,
        sampler=sampler,
        ledger=ledger,
        randomness=rng,
        server_key=_server_key(config, mechanism, rng),
        mechanism=mechanism,
    )


def init_server_state(plan: FederatedPlan) -> algorithms.ServerState:
    """The round-0 server state: parameters from ``fold_in(PRNGKey(seed), PARAMS)``.

    Its key is ``plan.server_key``; restores use it as the template of the checkpoint.
    """
    params = plan.model.init(
        jax.random.fold_in(jax.random.PRNGKey(plan.config.seed), randomness.PARAMS)
    )
    return plan.algorithm.init(params, plan.server_key)


def secret_free(state: algorithms.ServerState, plan: FederatedPlan) -> algorithms.ServerState:
    """``state`` as it may be written to disk: a secure run's server key replaced by zeros.

    The server key is the root of every round's client, dropout and noise keys, so from a
    checkpoint holding it and the public initial model every round's DP noise could be
    regenerated and the clipped client sums recovered.
    """
    if plan.randomness.persistable:
        return state
    key = state.rng
    data = jnp.zeros_like(jax.random.key_data(key))
    return state.replace(rng=jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)))


def with_fresh_secrets(
    state: algorithms.ServerState, plan: FederatedPlan
) -> algorithms.ServerState:
    """A resumed secure run's state with a new secret server key (reproducible: unchanged)."""
    if plan.randomness.persistable:
        return state
    return state.replace(
        rng=jax.random.fold_in(plan.randomness.key(randomness.NOISE), randomness.SERVER)
    )


def describe(plan: FederatedPlan, params: Any) -> None:
    """Logs the federation (clients, sizes, cohort, rounds, mechanism), the model and backend."""
    f = plan.config.federated
    counts = plan.federation.counts
    logger.info(
        "federation: %d clients (%s), %d-%d training images each; %s, %s clients per round, "
        "%d local steps, %d rounds; privacy: %s (%s randomness)",
        plan.federation.num_clients,
        f.partition.method,
        int(counts.min()),
        int(counts.max()),
        f.algorithm,
        f.clients_per_round or plan.federation.num_clients,
        f.local_steps,
        f.rounds,
        plan.mechanism,
        plan.randomness.mode,
    )
    logger.info(
        "model %s, %s parameters; devices %d x %s; backend %s",
        plan.model.name,
        f"{plan.model.num_params(params):,}",
        jax.device_count(),
        jax.devices()[0].platform,
        plan.algorithm.for_each.backend,
    )


# ---- the round loop --------------------------------------------------------------------------
@dataclasses.dataclass
class RoundLog:
    """The run's ``metrics.jsonl``, timings and throughput, for the loop to append to."""

    path: str
    elapsed: dict[str, float]

    def append(self, record: dict[str, Any]) -> None:
        """Appends ``record`` to ``metrics.jsonl`` as one JSON line (NaN and inf as ``null``)."""
        workdir_lib.append_metrics(self.path, record)


def _evaluate(plan, params, split: str, round_num: int, log: RoundLog) -> dict[str, Any]:
    predict_fn = evaluate.make_predict_fn(plan.model.apply, plan.splits.info.task)
    result = evaluate.evaluate(
        predict_fn,
        params,
        plan.splits.split(split),
        plan.splits.info,
        plan.normalizer,
        plan.config.train.eval_batch_size,
    )
    record = {"step": round_num, "split": split, **evaluate.prefixed(result["metrics"], split)}
    batch_size = plan.config.train.eval_batch_size
    record.update(plan.threat.evaluate(predict_fn, params, plan.normalizer, batch_size, split))
    record.update(result["site_summary"])
    if len(result["per_site"]) > 1:
        record["site_accuracy"] = {s: m["accuracy"] for s, m in result["per_site"].items()}
    log.append(record)
    return result


def _start(plan, workdir, resume, checkpointer, log):
    """The initial (or resumed) server state and round; restores the ledger on resume."""
    state = init_server_state(plan)
    describe(plan, state.params)
    if not resume:
        workdir_lib.rewrite_metrics(log.path, [])
        return state
    latest, state, metadata = checkpointer.restore_latest(
        secret_free(state, plan), discard_damaged=True
    )
    state = with_fresh_secrets(state, plan)
    log.elapsed.update(metadata["elapsed"])
    plan.ledger.load_state_dict(metadata.get("privacy", {}))
    kept = [r for r in workdir_lib.read_metrics(log.path) if r["step"] <= latest]
    workdir_lib.rewrite_metrics(log.path, kept)
    logger.info("resumed from round %d", latest)
    return state


def _round_record(done, metrics, ledger_entries) -> dict[str, Any]:
    record = {"step": done, "split": "round"}
    # A NaN loss is one no client released (local DP-SGD, secure aggregation): not logged.
    record.update({k: v for k, v in metrics.items() if not (k == "loss" and math.isnan(v))})
    record.update(ledger_entries)
    return record


def run_rounds(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_at_round: int | None = None,
) -> dict[str, Any]:
    """Runs the federated training of ``config`` in ``workdir``; returns the report.

    Writes ``config.json``, one ``metrics.jsonl`` record per round and per evaluation,
    ``checkpoints/`` and, at the end, ``report.json``. ``stop_at_round`` ends the run early after
    checkpointing that round (returning ``{"stopped_at_step": round}``); calling again with
    ``resume=True`` finishes it.

    Raises:
      WorkdirError: if ``workdir`` holds a run and ``resume`` is False, has none to resume, or
        the resumed config changes a field the run fixed.
    """
    scope.check(config)  # a field this trainer would ignore is refused, not dropped
    checkpointer = workdir_lib.prepare_workdir(workdir, resume, config)
    plan = build_plan(config)
    f = config.federated
    log = RoundLog(
        os.path.join(workdir, "metrics.jsonl"),
        {"wall_time_s": 0.0, "train_time_s": 0.0, "examples_seen": 0},
    )
    state = _start(plan, workdir, resume, checkpointer, log)
    checkpoint.write_json_atomic(os.path.join(workdir, "config.json"), loading.to_json_dict(config))
    start = int(state.round)
    planned = (f.rounds if stop_at_round is None else min(stop_at_round, f.rounds)) - start
    end = start + plan.ledger.allowed(start, planned)
    bar = progress.progress_bar(f.rounds, start, "round", quiet)
    run_start = time.perf_counter()
    for round_num in range(start, end):
        cohort = plan.ledger.admit(plan.sampler.sample(round_num), round_num)
        t0 = time.perf_counter()
        state, metrics = plan.algorithm.apply_round(state, cohort)
        metrics = {k: float(v) for k, v in metrics.items()}  # blocks: honest timing
        log.elapsed["train_time_s"] += time.perf_counter() - t0
        per_step = np.minimum(
            np.asarray(plan.federation.counts)[cohort.sampled()], f.client_batch_size
        )
        log.elapsed["examples_seen"] += int(per_step.sum()) * f.local_steps
        released = bool(metrics.get("secure_sum_released", 1))
        done = round_num + 1
        log.append(_round_record(done, metrics, plan.ledger.record(cohort, released)))
        bar.update(1)
        if done % f.eval_every == 0 and done != end:
            _evaluate(plan, state.params, "val", done, log)
        if done % f.checkpoint_every == 0 or done == end:
            log.elapsed["wall_time_s"] += time.perf_counter() - run_start
            run_start = time.perf_counter()
            meta = {"step": done, "elapsed": dict(log.elapsed), "privacy": plan.ledger.state_dict()}
            checkpointer.save(done, secret_free(state, plan), meta)
    bar.close()
    log.elapsed["wall_time_s"] += time.perf_counter() - run_start
    checkpointer.close()
    if end < f.rounds and not plan.ledger.stopped_by_budget:
        logger.info("stopped at round %d of %d; resume with --resume", end, f.rounds)
        return {"stopped_at_step": end}
    if plan.ledger.stopped_by_budget:
        logger.warning("the privacy budget allows %d rounds: stopped at round %d", end, end)
    return finish(plan, state, workdir, end, log)


# ---- the report ------------------------------------------------------------------------------
def _federation_summary(plan: FederatedPlan, end: int) -> dict[str, Any]:
    f = plan.config.federated
    return {
        "algorithm": f.algorithm,
        "rounds": end,
        "num_clients": plan.federation.num_clients,
        "clients_per_round": f.clients_per_round or plan.federation.num_clients,
        "client_names": list(plan.federation.client_names),
        "client_sizes": np.asarray(plan.federation.counts).tolist(),
        "partition": f.partition.method,
        "local_steps": f.local_steps,
        "server_lr": server_lr(f),
        "backend": plan.algorithm.for_each.backend,
        "secure_aggregation": plan.config.secure_aggregation.method,
        "mechanism": plan.mechanism,
        # Secure aggregation hides single updates only if its keys are secret: say which mode ran.
        "randomness": plan.randomness.mode,
        "randomness_meaning": plan.randomness.describe(),
    }


def _aggregation_cost(method: str, metrics_path: str) -> dict[str, Any]:
    rounds = [r for r in workdir_lib.read_metrics(metrics_path) if r.get("split") == "round"]

    def mean(key):
        return float(np.mean([r.get(key, 0.0) for r in rounds]))

    return {
        "method": method,
        "bytes_per_client_per_round": mean("secure_bytes_per_client"),
        "plaintext_bytes_per_client_per_round": float(rounds[-1]["plaintext_bytes_per_client"]),
        "seconds_per_round": mean("secure_aggregation_seconds"),
        "bytes_received_per_client_per_round": mean("secure_bytes_received_per_client"),
        "plaintext_seconds_per_round": mean("plaintext_aggregation_seconds"),
        # he_ckks: ciphertext bytes, encrypt / aggregate / decrypt seconds (secure.he_ckks)
        **{key: mean(key) for key in rounds[-1] if key.startswith("he_")},
    } | ({"trusted": he_ckks.TRUST} if method == "he_ckks" else {})


def _claim_context(plan: FederatedPlan, state, released) -> ledgers.ClaimContext:
    f = plan.config.federated
    return ledgers.ClaimContext(
        randomness_mode=plan.randomness.mode,
        clip_norm=float(plan.config.privacy.clip_norm),
        client_names=tuple(plan.federation.client_names),
        final_clip_norm=float(state.clip_norm) if state.clip_norm is not None else None,
        adaptive_clipping=bool(f.adaptive_clipping),
        secure_aggregation=plan.config.secure_aggregation.method,
        released_outside=released,
    )


def finish(plan, state, workdir: str, end: int, log: RoundLog) -> dict[str, Any]:
    """Evaluates, personalises, builds and writes report.json."""
    config, f = plan.config, plan.config.federated
    val = _evaluate(plan, state.params, "val", end, log)
    test = _evaluate(plan, state.params, "test", end, log)
    extra: dict[str, Any] = {"federated": _federation_summary(plan, end)}
    extra.update(plan.threat.report(log.path))
    if config.secure_aggregation.method != "none":
        extra["aggregation_cost"] = _aggregation_cost(config.secure_aggregation.method, log.path)
    released = ()
    if f.personalization_steps > 0:
        extra["per_site_personalized"], released = personalize(plan, state.params)
    personal, personal_released = site_model_metrics(plan, state)
    released += personal_released
    if len(personal) > 1:
        primary = f"personal_test_{metrics.primary_metric(plan.splits.info.task)}"
        extra["personal_site_summary"] = metrics.summarize_groups(personal, primary)
    claim = plan.ledger.claim(_claim_context(plan, state, released))
    if claim is not None:
        extra["privacy"] = claim.to_report()
    result = report.build_report(
        config=config,
        info=plan.splits.info,
        test=test,
        val=val,
        steps=end,
        num_params=plan.model.num_params(state.params),
        elapsed=log.elapsed,
        extra=extra,
    )
    for site, entries in report.json_safe(personal).items():
        result["per_site"].setdefault(site, {}).update(entries)
    checkpoint.write_json_atomic(os.path.join(workdir, "report.json"), result)
    curves.write_curves(workdir, log.path, unit="round")
    m = result["metrics"]
    primary = metrics.primary_metric(plan.splits.info.task)
    logger.info(
        "test %s (worst site %s %.4f) after %d rounds (%.1f s)%s",
        metrics.headline(m, plan.splits.info.task, "test_"),
        primary,
        result["site_summary"].get(f"worst_{primary}", float("nan")),
        end,
        result["wall_time_s"],
        f"; {claim.guarantee}" if claim is not None else "",
    )
    if "personal_site_summary" in extra:
        logger.info("each site's own %s model: %s", f.algorithm, extra["personal_site_summary"])
    return result


def site_model_metrics(
    plan: FederatedPlan, state: algorithms.ServerState
) -> tuple[dict[str, dict[str, float]], tuple]:
    """Each site's own model (FedBN, Ditto) on its own test images, as ``personal_test_*``.

    The keys go into ``report.json``'s ``per_site[site]`` beside the global model's ``test_*``.
    Nothing is trained here: the models are the ones the rounds left at the sites. Under local
    DP-SGD their training was counted in each site's ledger (post-processing); under any other
    mechanism the metrics are named as released outside the claim. Clients are sites
    (``by_site`` partition); an algorithm without per-site models gives ``{}``.

    Returns:
      ``(site -> {"personal_test_accuracy": ..., ...}, what the claim must name as released)``.
    """
    site_model = plan.algorithm.site_model
    if site_model is None:
        return {}, ()
    if plan.config.federated.partition.method != "by_site":
        logger.warning("per-site model metrics need federated.partition.method='by_site'")
        return {}, ()
    info = plan.splits.info
    predict_fn = evaluate.make_predict_fn(plan.model.apply, info.task)
    results = {}
    for k, name in enumerate(plan.federation.client_names):
        site = info.site_names.index(name)
        test = plan.splits.test.take(np.flatnonzero(plan.splits.test.sites == site))
        if len(test) == 0:
            continue
        result = evaluate.evaluate(
            predict_fn,
            site_model(state, k),
            test,
            info,
            plan.normalizer,
            plan.config.train.eval_batch_size,
        )
        results[name] = evaluate.prefixed(result["metrics"], "personal_test")
    released = ()
    if plan.mechanism not in ("none", "local_dp_sgd"):
        released = (
            f"per-site test metrics of each site's own {plan.config.federated.algorithm} model "
            "(report.json per_site personal_test_*), whose site-kept parameters are trained "
            "outside the claim's mechanism",
        )
    return results, released


def personalize(plan: FederatedPlan, params: Any) -> tuple[dict[str, dict[str, float]], tuple]:
    """Per-site test metrics after each site fine-tunes ``params`` on its own training images.

    Fine-tuning is ``federated.personalization_steps`` steps of the same local training the
    clients ran. Under local DP-SGD those steps are releases of the site's data like any other
    (their metrics are published): they are added to the site's ledger, and a site whose budget
    cannot afford them is not fine-tuned. Clients are sites (``by_site`` partition).

    Returns:
      ``(site -> test metrics, what the claim must name as released outside it)``.
    """
    f = plan.config.federated
    info = plan.splits.info
    if f.partition.method != "by_site":
        logger.warning("personalisation needs federated.partition.method='by_site'; skipped")
        return {}, ()
    local = make_local_update(plan.config, plan.model, info.task, f.personalization_steps)
    data = plan.client_data
    fine_tune = jax.jit(local)
    predict_fn = evaluate.make_predict_fn(plan.model.apply, info.task)
    key = jax.random.fold_in(plan.server_key, randomness.PERSONALIZATION)
    results = {}
    for k, name in enumerate(plan.federation.client_names):
        site = info.site_names.index(name)
        test = plan.splits.test.take(np.flatnonzero(plan.splits.test.sites == site))
        if len(test) == 0 or not plan.ledger.record_personalization(k, f.personalization_steps):
            continue
        out = fine_tune(
            params,
            data.images[k],
            data.labels[k],
            data.mask[k],
            data.counts[k],
            jax.random.fold_in(key, k),
        )
        tuned = jax.tree.map(lambda p, d: p + d, params, out.delta)
        result = evaluate.evaluate(
            predict_fn, tuned, test, info, plan.normalizer, plan.config.train.eval_batch_size
        )
        results[name] = evaluate.prefixed(result["metrics"], "test")
    released = ()
    if plan.mechanism != "local_dp_sgd":
        released = (
            "per-site test metrics of models fine-tuned on each site's images, outside any ledger",
        )
    return results, released


def restore_for_eval(workdir: str) -> tuple[FederatedPlan, algorithms.ServerState]:
    """Rebuilds the federated run of ``workdir`` and restores its newest intact server state."""
    config = workdir_lib.load_workdir_config(workdir)

    def build():
        plan = build_plan(config)
        return plan, secret_free(init_server_state(plan), plan)

    return workdir_lib.restore_checkpoint(workdir, build)


def restore(workdir: str) -> run_lib.Run:
    """The federated run of ``workdir`` as a :class:`~fedjax_med.trainers.run.Run`."""
    plan, state = restore_for_eval(workdir)
    return run_lib.Run(
        trainer="federated",
        config=plan.config,
        splits=plan.splits,
        normalizer=plan.normalizer,
        model=plan.model,
        params=state.params,
        initial_params=init_server_state(plan).params,
        step=int(state.round),
        federation=plan.federation,
    )


def _train(config, workdir, *, resume=False, quiet=False, stop_at=None):
    return run_rounds(config, workdir, resume=resume, quiet=quiet, stop_at_round=stop_at)


TRAINER = run_lib.Trainer(name="federated", train=_train, restore=restore)
