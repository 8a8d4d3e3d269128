"""Federated training: config -> sites -> clients -> rounds -> global and per-site evaluation.

``run_rounds(config, workdir)`` is the loop behind ``fedjax-med train`` for
``config.trainer = "federated"``. The training split is partitioned into clients by
``config.federated.partition`` (by default one client per hospital); each round samples a cohort
(uniformly without replacement, or Poisson with rate ``q`` for client-level DP), trains every
sampled client locally for ``federated.local_steps`` steps (vectorised or looped, see
:mod:`fedjax_med.federated.for_each_client`) and applies the algorithm's server update.

Outputs in ``workdir`` are those of the centralized trainer (``config.json``, ``metrics.jsonl``,
``checkpoints/``, ``report.json``); ``metrics.jsonl`` gets one ``split = "round"`` record per round
(client loss, cohort size, dropped / excluded clients and, with DP-FedAvg, ``epsilon``) and the
report gets ``federated`` (algorithm, clients, rounds) and, with DP-FedAvg, ``privacy`` with
``level = "client"``. Resume is exact: cohorts are a pure function of ``(seed, round)`` and the
server state (parameters, server optimizer, control variates, clipping norm, PRNG key) and the
privacy ledger are checkpointed together.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from fedjax_med.config import loading
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import partition, preprocess
from fedjax_med.federated import algorithms, dp_fedavg, sampling, server_optimizers
from fedjax_med.federated import client as client_lib
from fedjax_med.models import registry
from fedjax_med.privacy import accounting, budget, noise
from fedjax_med.trainers import run as run_lib
from fedjax_med.training import checkpoint, evaluate, report, setup
from fedjax_med.training import workdir as workdir_lib

logger = logging.getLogger("fedjax_med")

STREAM_PARAMS = 0
STREAM_SERVER = 2


@dataclasses.dataclass(frozen=True)
class FederatedPlan:
    """Everything built from a config before the first round."""

    config: ml_collections.ConfigDict
    splits: dataset_lib.DatasetSplits
    normalizer: preprocess.Normalizer
    model: registry.Model
    federation: partition.FederatedDataset
    algorithm: algorithms.FederatedAlgorithm
    sampler: Any
    ledger: budget.PrivacyLedger | None
    noise_multiplier: float
    noise_seed_mode: str
    server_key: jax.Array
    site_budgets: SiteBudgets | None = None  # local DP-SGD: per-site accounting
    client_data: client_lib.ClientData | None = None
    secure_round: Any = None  # federated.secure_aggregation != "none"


@dataclasses.dataclass
class SiteBudgets:
    """Local DP-SGD accounting, one ledger per client (site): steps taken and epsilon.

    Each local step of client ``k`` is the Poisson-subsampled Gaussian mechanism on its ``n_k``
    examples (rate ``min(B, n_k) / n_k``, add/remove-one neighbours, sensitivity ``C``; see
    :func:`~fedjax_med.federated.client.local_dp_epsilon`); a client whose next round would pass
    its target epsilon is left out of every later cohort, and the round is recorded.
    """

    names: tuple[str, ...]
    num_examples: np.ndarray
    targets: np.ndarray
    steps: np.ndarray
    exhausted_at_round: dict[str, int]
    noise_multiplier: float
    batch_size: int
    local_steps: int
    delta: float
    accountant: str

    def epsilon(self, k: int, steps: int | None = None) -> float:
        return client_lib.local_dp_epsilon(
            self.noise_multiplier,
            self.batch_size,
            int(self.num_examples[k]),
            int(self.steps[k] if steps is None else steps),
            self.delta,
            accountant=self.accountant,
        )

    def admit(self, sampled: np.ndarray, round_num: int) -> np.ndarray:
        """The sampled clients whose budget allows one more round; records the others."""
        allowed = []
        for k in sampled:
            if self.epsilon(k, self.steps[k] + self.local_steps) <= self.targets[k]:
                allowed.append(k)
            else:
                self.exhausted_at_round.setdefault(self.names[k], round_num)
        return np.asarray(allowed, dtype=np.int64)

    def record(self, clients: np.ndarray) -> None:
        self.steps[clients] += self.local_steps

    def per_site_epsilon(self) -> dict[str, float]:
        return {name: self.epsilon(k) for k, name in enumerate(self.names)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps.tolist(),
            "exhausted_at_round": dict(self.exhausted_at_round),
        }

    def load(self, data: dict[str, Any]) -> None:
        self.steps = np.asarray(data["steps"], np.int64)
        self.exhausted_at_round = dict(data["exhausted_at_round"])


def parse_site_targets(text: str, names: tuple[str, ...], default: float) -> np.ndarray:
    """``"hospital_0=2,hospital_3=4"`` -> per-client targets (``default`` elsewhere)."""
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
    """Partitions the training split into clients per ``config.federated.partition``."""
    p = config.federated.partition
    info = splits.info
    num_clients = p.num_clients or len(info.site_names)
    rng = np.random.default_rng([config.seed, 7])
    if p.method == "by_site":
        present = np.unique(splits.train.sites)
        if len(present) != len(info.site_names):
            missing = sorted(set(range(len(info.site_names))) - set(present.tolist()))
            raise ValueError(
                f"federated.partition.method='by_site' needs training images at every site; "
                f"site {info.site_names[missing[0]]!r} has none"
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


def server_optimizer(f: ml_collections.ConfigDict):
    name = f.algorithm
    if name in ("fedavg", "fedprox", "dp_fedavg", "scaffold"):
        return server_optimizers.fedavg(f.server_lr)
    if name == "fedavgm":
        return server_optimizers.fedavgm(f.server_lr, f.server_momentum)
    if name == "fedadam":
        return server_optimizers.fedadam(f.server_lr, tau=f.server_tau)
    if name == "fedyogi":
        return server_optimizers.fedyogi(f.server_lr, tau=f.server_tau)
    if name == "fedadagrad":
        return server_optimizers.fedadagrad(f.server_lr, tau=f.server_tau)
    raise ValueError(f"federated.algorithm={name!r} is not known")


def build_plan(config: ml_collections.ConfigDict) -> FederatedPlan:
    splits, normalizer, model = setup.build_data_and_model(config)
    info = splits.info
    federation = build_federation(config, splits)
    data = client_lib.from_federated_dataset(federation, normalizer)
    f = config.federated
    num_clients = federation.num_clients
    per_round = f.clients_per_round or num_clients
    if per_round > num_clients:
        raise ValueError(
            f"federated.clients_per_round={per_round} must be <= the {num_clients} clients"
        )
    local_update = client_lib.make_local_update(
        model.apply,
        info.task,
        local_steps=f.local_steps,
        batch_size=f.client_batch_size,
        client_lr=f.client_lr,
        prox_mu=f.prox_mu if f.algorithm == "fedprox" else 0.0,
        scaffold=f.algorithm == "scaffold",
        dp_clip_norm=config.privacy.clip_norm if config.privacy.enabled else None,
        dp_noise_multiplier=config.privacy.noise_multiplier if config.privacy.enabled else 0.0,
    )
    options = algorithms.RoundOptions(
        max_update_norm=f.max_update_norm or None,
        dropout_rate=f.dropout_prob,
        backend=f.backend,
        chunk_size=f.chunk_size or None,
    )
    ledger, sigma, mode = None, 0.0, "reproducible"
    if f.algorithm == "dp_fedavg":
        p = config.privacy
        q = per_round / num_clients
        sampler = sampling.PoissonSampler(num_clients, q, seed=config.seed)
        if p.noise_multiplier > 0:
            sigma = float(p.noise_multiplier)
        else:
            sigma = accounting.calibrate_noise_multiplier(
                p.target_epsilon, q, f.rounds, p.delta, accountant=p.accountant
            )
        target = p.target_epsilon
        if target <= 0:
            event = accounting.dpsgd_event(sigma, q, f.rounds)
            target = max(accounting.epsilon(event, p.delta, p.accountant), 1e-12)
        ledger = budget.PrivacyLedger(
            noise_multiplier=sigma,
            sampling_rate=q,
            delta=p.delta,
            target_epsilon=target,
            accountant=p.accountant,
            unit="client",
            num_examples=num_clients,
        )
        algorithm = dp_fedavg.dp_fedavg(
            local_update,
            data,
            sampler,
            noise_multiplier=sigma,
            clip_norm=p.clip_norm,
            server_optimizer=server_optimizer(f),
            adaptive=f.adaptive_clipping,
            target_quantile=f.target_quantile,
            options=options,
        )
        key, mode = noise.make_noise_key(config.seed, p.noise_seed)
        server_key = jax.random.fold_in(key, STREAM_SERVER)
    else:
        sampler = sampling.UniformSampler(num_clients, per_round, config.seed)
        builders = {
            "fedavg": lambda: algorithms.fedavg(
                local_update, data, server_lr=f.server_lr, options=options
            ),
            "fedprox": lambda: algorithms.fedprox(
                local_update, data, mu=f.prox_mu, server_lr=f.server_lr, options=options
            ),
            "scaffold": lambda: algorithms.scaffold(
                local_update, data, server_lr=f.server_lr, options=options
            ),
        }
        build = builders.get(f.algorithm)
        if build is None:
            algorithm = algorithms.fedopt(
                local_update, data, server_optimizer(f), options=options, name=f.algorithm
            )
        else:
            algorithm = build()
        server_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), STREAM_SERVER)
    site_budgets = None
    if config.privacy.enabled:
        p = config.privacy
        names = tuple(federation.client_names)
        counts = np.asarray(federation.counts, np.int64)
        accounting.check_delta(p.delta, int(counts.min()))
        site_budgets = SiteBudgets(
            names=names,
            num_examples=counts,
            targets=parse_site_targets(f.site_target_epsilons, names, p.target_epsilon),
            steps=np.zeros(len(names), np.int64),
            exhausted_at_round={},
            noise_multiplier=float(p.noise_multiplier),
            batch_size=f.client_batch_size,
            local_steps=f.local_steps,
            delta=p.delta,
            accountant=p.accountant,
        )
        sigma = float(p.noise_multiplier)
        key, mode = noise.make_noise_key(config.seed, p.noise_seed)
        server_key = jax.random.fold_in(key, STREAM_SERVER)
    secure_round = None
    if f.secure_aggregation != "none":
        if f.algorithm == "dp_fedavg" and f.distributed_dp != "none":
            raise ValueError(
                "federated.distributed_dp replaces DP-FedAvg's server noise: use "
                "federated.algorithm='fedavg' with it"
            )
        from fedjax_med.training import secure_rounds

        secure_round = "pending"
    plan = FederatedPlan(
        client_data=data,
        site_budgets=site_budgets,
        config=config,
        splits=splits,
        normalizer=normalizer,
        model=model,
        federation=federation,
        algorithm=algorithm,
        sampler=sampler,
        ledger=ledger,
        noise_multiplier=sigma,
        noise_seed_mode=mode,
        server_key=server_key,
    )
    if secure_round is not None:
        plan = dataclasses.replace(
            plan, secure_round=secure_rounds.make_secure_round(plan, server_optimizer(f))
        )
    return plan


def init_server_state(plan: FederatedPlan):
    params = plan.model.init(
        jax.random.fold_in(jax.random.PRNGKey(plan.config.seed), STREAM_PARAMS)
    )
    return plan.algorithm.init(params, plan.server_key)


def describe(plan: FederatedPlan, params: Any) -> None:
    f = plan.config.federated
    counts = plan.federation.counts
    logger.info(
        "federation: %d clients (%s), %d-%d training images each; %s, %s clients per round, "
        "%d local steps, %d rounds",
        plan.federation.num_clients,
        plan.config.federated.partition.method,
        int(counts.min()),
        int(counts.max()),
        f.algorithm,
        f.clients_per_round or plan.federation.num_clients,
        f.local_steps,
        f.rounds,
    )
    logger.info(
        "model %s, %s parameters; devices %d x %s; backend %s",
        plan.model.name,
        f"{plan.model.num_params(params):,}",
        jax.device_count(),
        jax.devices()[0].platform,
        plan.algorithm.for_each.backend,
    )


def run_rounds(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_at_round: int | None = None,
) -> dict[str, Any]:
    """Runs the federated training of ``config`` in ``workdir``; returns the report."""
    checkpointer = workdir_lib.prepare_workdir(workdir, resume, config)
    plan = build_plan(config)
    info = plan.splits.info
    f = config.federated
    state = init_server_state(plan)
    describe(plan, state.params)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    elapsed = {"wall_time_s": 0.0, "train_time_s": 0.0, "examples_seen": 0}
    ledger = plan.ledger
    if resume:
        latest = checkpointer.latest_step()
        state, metadata = checkpointer.restore(latest, state)
        elapsed.update(metadata["elapsed"])
        if ledger is not None:
            ledger = budget.PrivacyLedger.from_dict(metadata["privacy_ledger"])
        if plan.site_budgets is not None:
            plan.site_budgets.load(metadata["site_budgets"])
        kept = [r for r in workdir_lib.read_metrics(metrics_path) if r["step"] <= latest]
        workdir_lib.rewrite_metrics(metrics_path, kept)
        logger.info("resumed from round %d", latest)
    else:
        workdir_lib.rewrite_metrics(metrics_path, [])
    checkpoint.write_json_atomic(os.path.join(workdir, "config.json"), loading.to_json_dict(config))

    predict_fn = evaluate.make_predict_fn(plan.model.apply, info.task)

    def run_eval(round_num: int, split: str, extra: dict[str, Any]) -> dict[str, Any]:
        result = evaluate.evaluate(
            predict_fn,
            state.params,
            plan.splits.split(split),
            info,
            plan.normalizer,
            config.train.eval_batch_size,
        )
        record = {"step": round_num, "split": split, **evaluate.prefixed(result["metrics"], split)}
        record.update(extra)
        record.update(result["site_summary"])
        workdir_lib.append_metrics(metrics_path, record)
        return result

    start = int(state.round)
    end = f.rounds if stop_at_round is None else min(stop_at_round, f.rounds)
    stopped_by_budget = False
    if ledger is not None:
        allowed = private_allowed(ledger, end - start)
        stopped_by_budget = allowed < end - start
        if stopped_by_budget:
            logger.warning(
                "client-level budget epsilon=%.4g allows %d more rounds: stopping at round %d",
                ledger.target_epsilon,
                allowed,
                start + allowed,
            )
        end = start + allowed
    bar = tqdm.tqdm(total=f.rounds, initial=start, disable=quiet, file=sys.stderr, unit="round")
    run_start = time.perf_counter()
    for round_num in range(start, end):
        cohort = plan.sampler.sample(round_num)
        if plan.site_budgets is not None:
            admitted = plan.site_budgets.admit(cohort.sampled(), round_num)
            cohort = sampling.padded_cohort(admitted, cohort.capacity)
        t0 = time.perf_counter()
        if plan.secure_round is not None:
            state, metrics = plan.secure_round(state, cohort)
        else:
            state, metrics = plan.algorithm.apply_round(state, cohort)
        metrics = {k: float(v) for k, v in metrics.items()}  # blocks: honest timing
        elapsed["train_time_s"] += time.perf_counter() - t0
        sampled = cohort.sampled()
        per_step = np.minimum(np.asarray(plan.federation.counts)[sampled], f.client_batch_size)
        elapsed["examples_seen"] += int(per_step.sum()) * f.local_steps
        done = round_num + 1
        record = {"step": done, "split": "round", **metrics}
        ddp = getattr(plan.secure_round, "ddp", None)
        if ddp is not None:
            record["epsilon"] = ddp.epsilon(done)
            record["delta"] = ddp.delta
        if plan.site_budgets is not None:
            plan.site_budgets.record(sampled)
            eps = plan.site_budgets.per_site_epsilon()
            record["max_site_epsilon"] = max(eps.values())
            record["site_epsilon"] = eps
        if ledger is not None:
            ledger = ledger.record(1)
            record["epsilon"] = ledger.epsilon()
            record["delta"] = ledger.delta
        workdir_lib.append_metrics(metrics_path, record)
        bar.update(1)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            clients=int(metrics["num_clients"]),
            **({"eps": f"{record['epsilon']:.3g}"} if ledger is not None else {}),
        )
        if done % f.eval_every == 0 and done != end:
            run_eval(done, "val", {})
        if done % f.checkpoint_every == 0 or done == end:
            elapsed["wall_time_s"] += time.perf_counter() - run_start
            run_start = time.perf_counter()
            meta = {"step": done, "elapsed": dict(elapsed)}
            if ledger is not None:
                meta["privacy_ledger"] = ledger.to_dict()
            if plan.site_budgets is not None:
                meta["site_budgets"] = plan.site_budgets.to_dict()
            checkpointer.save(done, state, meta)
    bar.close()
    elapsed["wall_time_s"] += time.perf_counter() - run_start
    checkpointer.close()
    if end < f.rounds and not stopped_by_budget:
        logger.info("stopped at round %d of %d; resume with --resume", end, f.rounds)
        return {"stopped_at_step": end}

    val = run_eval(end, "val", {})
    test = run_eval(end, "test", {})
    extra: dict[str, Any] = {
        "federated": {
            "algorithm": f.algorithm,
            "rounds": end,
            "num_clients": plan.federation.num_clients,
            "clients_per_round": f.clients_per_round or plan.federation.num_clients,
            "client_names": list(plan.federation.client_names),
            "client_sizes": np.asarray(plan.federation.counts).tolist(),
            "partition": config.federated.partition.method,
            "local_steps": f.local_steps,
            "backend": plan.algorithm.for_each.backend,
            "secure_aggregation": f.secure_aggregation,
        }
    }
    if f.secure_aggregation != "none":
        rounds_log = [
            r for r in workdir_lib.read_metrics(metrics_path) if r.get("split") == "round"
        ]
        extra["aggregation_cost"] = {
            "method": f.secure_aggregation,
            "bytes_per_client_per_round": float(
                np.mean([r["secure_bytes_per_client"] for r in rounds_log])
            ),
            "plaintext_bytes_per_client_per_round": float(
                rounds_log[-1]["plaintext_bytes_per_client"]
            ),
            "seconds_per_round": float(
                np.mean([r["secure_aggregation_seconds"] for r in rounds_log])
            ),
            "bytes_received_per_client_per_round": float(
                np.mean([r.get("secure_bytes_received_per_client", 0.0) for r in rounds_log])
            ),
            "plaintext_seconds_per_round": float(
                np.mean([r.get("plaintext_aggregation_seconds", 0.0) for r in rounds_log])
            ),
        }
    if ledger is not None:
        eps = ledger.epsilon()
        extra["privacy"] = {
            "epsilon": eps,
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "noise_multiplier": plan.noise_multiplier,
            "sampling_rate": ledger.sampling_rate,
            "steps": ledger.steps_taken,
            "clip_norm": float(config.privacy.clip_norm),
            "final_clip_norm": float(state.clip_norm) if state.clip_norm is not None else None,
            "adaptive_clipping": bool(f.adaptive_clipping),
            "unit": "client",
            "level": "client",
            "noise_seed_mode": plan.noise_seed_mode,
            "target_epsilon": ledger.target_epsilon,
            "stopped_by_budget": stopped_by_budget,
            "guarantee": (
                f"({eps:.4g}, {ledger.delta:.3g})-DP for each client (hospital) of the federation "
                "(add/remove-one client)"
            ),
        }
    if f.personalization_steps > 0:
        if config.federated.partition.method != "by_site":
            logger.warning("personalisation needs federated.partition.method='by_site'; skipped")
        else:
            extra["per_site_personalized"] = personalize(plan, state.params)
    ddp = getattr(plan.secure_round, "ddp", None)
    if ddp is not None:
        eps = ddp.epsilon(end)
        extra["privacy"] = {
            "epsilon": eps,
            "delta": ddp.delta,
            "accountant": f"rdp ({ddp.kind} sum bound)",
            "noise_multiplier": ddp.z,
            "sampling_rate": (f.clients_per_round or plan.federation.num_clients)
            / plan.federation.num_clients,
            "steps": end,
            "clip_norm": ddp.clip,
            "unit": "client",
            "level": "client",
            "mechanism": f"distributed {ddp.kind} via {f.secure_aggregation}",
            "min_clients_per_round": ddp.threshold,
            "noise_seed_mode": "secure" if ddp.secure_noise else "reproducible",
            "guarantee": (
                f"({eps:.4g}, {ddp.delta:.3g})-DP for each client's update (replace-one client), "
                f"noise added by clients and summed by secure aggregation; no amplification by "
                "client sampling is claimed"
            ),
        }
    if plan.site_budgets is not None:
        b = plan.site_budgets
        per_site_eps = b.per_site_epsilon()
        worst = max(per_site_eps.values())
        extra["privacy"] = {
            "epsilon": worst,
            "delta": b.delta,
            "accountant": b.accountant,
            "noise_multiplier": b.noise_multiplier,
            "sampling_rate": {
                n: min(b.batch_size, int(c)) / int(c)
                for n, c in zip(b.names, b.num_examples, strict=True)
            },
            "steps": {n: int(s) for n, s in zip(b.names, b.steps, strict=True)},
            "clip_norm": float(config.privacy.clip_norm),
            "unit": "example",
            "level": "example",
            "sampling": "poisson",
            "noise_seed_mode": plan.noise_seed_mode,
            "per_site_epsilon": per_site_eps,
            "per_site_target_epsilon": {
                n: (float(t) if np.isfinite(t) else None)
                for n, t in zip(b.names, b.targets, strict=True)
            },
            "site_budget_exhausted_at_round": dict(b.exhausted_at_round),
            "guarantee": (
                f"each site's training examples are ({worst:.4g}, {b.delta:.3g})-DP or better "
                "against everyone outside the site (local DP-SGD with Poisson sampling, "
                "add/remove-one example); "
                "per_site_epsilon gives each site's own value"
            ),
        }
    result = report.build_report(
        config=config,
        info=info,
        test=test,
        val=val,
        steps=end,
        num_params=plan.model.num_params(state.params),
        elapsed=elapsed,
        extra=extra,
    )
    checkpoint.write_json_atomic(os.path.join(workdir, "report.json"), result)
    m = result["metrics"]
    logger.info(
        "test accuracy %.4f (worst site %.4f), AUROC %.4f after %d rounds (%.1f s)",
        m["test_accuracy"],
        result["site_summary"].get("worst_accuracy", float("nan")),
        m["test_auroc"],
        end,
        result["wall_time_s"],
    )
    if ledger is not None:
        logger.info(
            "client-level privacy: epsilon %.4g at delta %.3g",
            result["privacy"]["epsilon"],
            ledger.delta,
        )
    return result


def private_allowed(ledger: budget.PrivacyLedger, planned: int) -> int:
    if planned <= 0:
        return 0
    if ledger.can_take(planned):
        return planned
    return min(planned, ledger.steps_remaining())


def personalize(plan: FederatedPlan, params: Any) -> dict[str, dict[str, float]]:
    """Per-site test metrics after each site fine-tunes ``params`` on its own training images.

    Fine-tuning is ``federated.personalization_steps`` steps of the same local training the
    clients ran (local DP-SGD included when enabled: the personalised model stays private to the
    site either way, it is never sent). Clients are sites (``by_site`` partition).
    """
    f = plan.config.federated
    info = plan.splits.info
    local = client_lib.make_local_update(
        plan.model.apply,
        info.task,
        local_steps=f.personalization_steps,
        batch_size=f.client_batch_size,
        client_lr=f.client_lr,
        dp_clip_norm=plan.config.privacy.clip_norm if plan.config.privacy.enabled else None,
        dp_noise_multiplier=(
            plan.config.privacy.noise_multiplier if plan.config.privacy.enabled else 0.0
        ),
    )
    data = client_lib.from_federated_dataset(plan.federation, plan.normalizer)
    fine_tune = jax.jit(local)
    predict_fn = evaluate.make_predict_fn(plan.model.apply, info.task)
    key = jax.random.fold_in(plan.server_key, 10_000_019)
    results = {}
    for k, name in enumerate(plan.federation.client_names):
        site = info.site_names.index(name)
        test = plan.splits.test.take(np.flatnonzero(plan.splits.test.sites == site))
        if len(test) == 0:
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
    return results


def restore_for_eval(workdir: str) -> tuple[FederatedPlan, algorithms.ServerState]:
    """Rebuilds the federated run of ``workdir`` and restores its latest server state."""
    config = workdir_lib.load_workdir_config(workdir)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    latest = checkpointer.latest_step()
    if latest is None:
        raise workdir_lib.WorkdirError(f"workdir '{workdir}' has no checkpoint")
    plan = build_plan(config)
    state, _ = checkpointer.restore(latest, init_server_state(plan))
    checkpointer.close()
    return plan, state


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
