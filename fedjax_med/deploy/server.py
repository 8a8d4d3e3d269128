"""The server of a deployed run: the simulation's algorithm, sampler and ledger over Flower.

:func:`serve` is the round loop of :func:`fedjax_med.trainers.federated.run_rounds` with the
clients' local updates run by the hospitals instead of in-process:

1. *roster*: every site on the study's list answers a ``query`` with its public metadata (name,
   number of images and patients, image shape, task, config digest); a node whose name is not
   on the list, or whose config differs, is refused and logged;
2. the plan is :func:`fedjax_med.trainers.federated.build_round_parts` for that roster: the same
   algorithm, cohort sampler, privacy ledger and keys as the simulation of the config;
3. each round the sampler draws a cohort, the ledger admits it, and every admitted site gets a
   ``train`` message with the global model, its key (``fold_in(fold_in(fold_in(rng, t),
   STREAM_CLIENTS), k)``, :func:`fedjax_med.federated.algorithms.gather_cohort`) and the padded
   size ``M`` of the simulation's client arrays;
4. the replies are checked (:mod:`fedjax_med.deploy.arrays`: structure, shapes, dtypes, finite
   values, the site's size): a malformed one is excluded from the round, counted in
   ``num_excluded`` / ``num_malformed`` and logged by site; a site that does not answer in time
   or refuses (its own budget) is counted in ``num_dropped``;
5. :attr:`fedjax_med.federated.algorithms.FederatedAlgorithm.finish` screens and combines the
   rest and takes the server step, exactly as in the simulation; the ledger, ``metrics.jsonl``
   and checkpoints are written as there.

Evaluation is federated: every site evaluates the final model on its own validation and test
images; ``report.json`` holds the per-site metrics and, as ``metrics``, their example-weighted
means (exact for accuracy and loss; for AUROC and ECE a mean of the sites' values, not the pooled
metric the simulation reports).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_med.config import loading, scope
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.deploy import arrays, flower, protocol, secure
from fedjax_med.deploy import site as site_lib
from fedjax_med.federated import algorithms, sampling
from fedjax_med.federated import client as client_lib
from fedjax_med.models import registry
from fedjax_med.secure import distributed_dp
from fedjax_med.trainers import federated
from fedjax_med.training import checkpoint, metrics, report
from fedjax_med.training import workdir as workdir_lib

logger = logging.getLogger("fedjax_med")


@dataclasses.dataclass(frozen=True)
class Roster:
    """The sites of the study in client order, with the facts they published.

    Read like a ``FederatedDataset`` by the trainer (``num_clients``, ``counts``,
    ``client_names``).
    """

    client_names: tuple[str, ...]
    node_ids: tuple[int, ...]
    counts: np.ndarray
    num_units: np.ndarray
    info: dataset_lib.DatasetInfo

    @property
    def num_clients(self) -> int:
        return len(self.client_names)

    def placeholder_data(self) -> client_lib.ClientData:
        """The clients' array shapes without their images (the server never holds any).

        ``mask``, ``counts`` and ``unit_ids`` (``U_k`` patients) are what the algorithms and
        ledgers read; images and labels have no pixels.
        """
        m = int(self.counts.max())
        rows = np.arange(m)
        mask = rows[None, :] < self.counts[:, None]
        units = np.where(mask, rows[None, :] % np.maximum(self.num_units, 1)[:, None], -1)
        k = self.num_clients
        return client_lib.ClientData(
            images=jnp.zeros((k, m, 0), jnp.float32),
            labels=jnp.zeros((k, m), jnp.int32),
            mask=jnp.asarray(mask),
            counts=jnp.asarray(self.counts, jnp.int32),
            unit_ids=jnp.asarray(units, jnp.int32),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeployPlan(federated.RoundParts):
    """The server's plan: :class:`~fedjax_med.trainers.federated.FederatedPlan` without data.

    ``federation`` is the :class:`Roster` and ``client_data`` its placeholder arrays.
    """

    config: ml_collections.ConfigDict
    model: registry.Model
    federation: Roster
    client_data: client_lib.ClientData
    ddp: distributed_dp.DistributedDP | None = None


def check_deployable(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the field for a config the deployment does not run."""
    if config.trainer != "federated":
        raise ValueError(f"deployment runs trainer='federated' configs, not {config.trainer!r}")
    if config.federated.partition.method != "by_site":
        raise ValueError(
            "deployment needs federated.partition.method='by_site' (each hospital is one client), "
            f"not {config.federated.partition.method!r}"
        )
    sa = config.secure_aggregation
    if sa.method not in ("none", *secure.METHODS):
        raise ValueError(
            f"deployment runs secure_aggregation.method in {('none', *secure.METHODS)}, not "
            f"{sa.method!r}"
        )
    if sa.method != "none" and config.federated.algorithm in ("dp_fedavg", "scaffold"):
        raise ValueError(
            "deployed secure aggregation runs the FedAvg family (federated.algorithm not "
            "dp_fedavg or scaffold; distributed DP is secure_aggregation.distributed_dp)"
        )
    if sa.distributed_dp != "none" and sa.method not in secure.METHODS:
        raise ValueError(
            f"secure_aggregation.distributed_dp={sa.distributed_dp!r} is deployed over "
            f"secure_aggregation.method in {secure.METHODS}, not {sa.method!r}"
        )
    if config.federated.personalization_steps:
        raise ValueError("deployment does not run federated.personalization_steps (set it to 0)")
    if config.federated.algorithm in ("fedbn", "ditto"):
        raise ValueError(
            f"deployment does not run federated.algorithm={config.federated.algorithm!r}: its "
            "per-site parameters are simulated (stored beside the server state), and a deployed "
            "site would have to keep them on its own disk"
        )
    if config.robust_aggregation.method != "mean":
        raise ValueError(
            "deployment runs robust_aggregation.method='mean' only (the robust rules are wired "
            f"into the simulation), not {config.robust_aggregation.method!r}"
        )
    scope.check(config)
    if config.poisoning.kind != "none":
        raise ValueError(
            "config field 'poisoning.kind' simulates malicious clients and has no meaning in a "
            "deployment; set it to 'none'"
        )


def default_sites(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The synthetic study's site names (other sources need an explicit site list)."""
    if config.data.name != "synthetic":
        raise ValueError(
            "--sites NAME,NAME,... is needed: the hospitals of the study, in client order"
        )
    return tuple(f"hospital_{s}" for s in range(config.data.synthetic.num_sites))


# ---- roster ----------------------------------------------------------------------------------
def _check_site(meta: dict[str, Any], digest: str, sites: Sequence[str]) -> str | None:
    if meta.get("site") not in sites:
        return f"site {meta.get('site')!r} is not on the study's list {list(sites)}"
    if meta.get("config_digest") != digest:
        return f"site {meta['site']!r} runs a different config (digest mismatch)"
    return None


def discover(
    grid: Any,
    config: ml_collections.ConfigDict,
    sites: Sequence[str],
    *,
    timeout: float,
    poll: float = 0.5,
) -> Roster:
    """Queries the connected nodes until every site of ``sites`` has answered.

    Raises:
      TimeoutError: naming the sites that did not join within ``timeout`` seconds.
      ValueError: if the sites disagree on the image shape or task.
    """
    digest = site_lib.config_digest(config)
    found: dict[str, tuple[int, dict[str, Any]]] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(found) < len(sites):
        new = [n for n in grid.get_node_ids() if n not in asked]
        messages = [protocol.query_message(n) for n in new]
        asked.update(new)
        for reply in protocol.exchange(grid, messages, timeout=timeout) if messages else ():
            node = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("node %d refused: query failed (%s)", node, reply.error.reason)
                continue
            meta = protocol.read_metadata(reply.content)
            problem = _check_site(meta, digest, sites)
            if problem is None and meta["site"] in found:
                problem = f"site {meta['site']!r} joined twice"
            if problem:
                logger.warning("node %d refused: %s", node, problem)
                continue
            logger.info(
                "site %s joined (node %d, %d images)", meta["site"], node, meta["num_examples"]
            )
            found[meta["site"]] = (node, meta)
        if len(found) < len(sites):
            if time.monotonic() > deadline:
                missing = sorted(set(sites) - set(found))
                raise TimeoutError(f"sites {missing} did not join within {timeout:g} s")
            time.sleep(poll)
    return _roster(config, sites, found)


def _roster(config, sites, found) -> Roster:
    metas = [found[s][1] for s in sites]
    first = metas[0]
    for m in metas[1:]:
        for field in ("image_shape", "task", "num_classes"):
            if m[field] != first[field]:
                raise ValueError(
                    f"sites disagree on {field}: {m['site']!r} has {m[field]!r}, "
                    f"{first['site']!r} has {first[field]!r}"
                )
    info = dataset_lib.DatasetInfo(
        name=config.data.name,
        task=first["task"],
        num_classes=int(first["num_classes"]),
        class_names=tuple(first["class_names"]),
        site_names=tuple(sites),
        image_shape=tuple(int(v) for v in first["image_shape"]),
    )
    return Roster(
        client_names=tuple(sites),
        node_ids=tuple(found[s][0] for s in sites),
        counts=np.array([m["num_examples"] for m in metas], np.int32),
        num_units=np.array([m["num_units"] for m in metas], np.int64),
        info=info,
    )


def build_deploy_plan(config: ml_collections.ConfigDict, roster: Roster) -> DeployPlan:
    """The simulation's algorithm, sampler, ledger and keys for the sites of ``roster``."""
    info = roster.info
    model = registry.get_model(
        config.model.name,
        input_shape=info.image_shape,
        num_outputs=info.num_outputs,
        **config.model.kwargs.to_dict(),
    )
    data = roster.placeholder_data()
    # Over secure aggregation the server runs the base algorithm's steps around the protocol
    # (fedjax_med.deploy.secure), not the simulation's in-process wrapper.
    base = ml_collections.ConfigDict(config.to_dict())
    base.secure_aggregation.method = "none"
    parts = federated.build_round_parts(base, model, info.task, roster, data)
    fields = {field.name: getattr(parts, field.name) for field in dataclasses.fields(parts)}
    ddp = None
    if config.secure_aggregation.distributed_dp != "none":
        # The simulation's noise calibration and ledger, for the configured protocol.
        ddp = federated._distributed_dp(config, model, parts.sampler, parts.randomness)
        fields["ledger"] = federated.LEDGERS["distributed_dp"](
            config, roster, data, None, ddp, config.federated.local_steps
        )
    return DeployPlan(
        config=config, model=model, federation=roster, client_data=data, ddp=ddp, **fields
    )


# ---- one round -------------------------------------------------------------------------------
_gather = jax.jit(algorithms.gather_cohort, static_argnums=(4,))


def _read_output(plan: DeployPlan, state, reply, k: int) -> client_lib.ClientOutput:
    content = reply.content
    delta = arrays.from_record(content["delta"], state.params, what="delta")
    stats = protocol.read_stats(content)
    if int(stats["num_examples"]) != int(plan.federation.counts[k]):
        raise arrays.MalformedUpdate(
            f"num_examples {stats['num_examples']:g}, the site published "
            f"{int(plan.federation.counts[k])}"
        )
    control = None
    if state.server_control is not None:
        control = arrays.from_record(content["control_delta"], state.params, what="control_delta")
    return client_lib.ClientOutput(
        delta=delta,
        num_examples=jnp.float32(stats["num_examples"]),
        loss=jnp.float32(stats.get("loss", float("nan"))),
        control_delta=control,
    )


def deployed_round(
    grid: Any, plan: DeployPlan, state: algorithms.ServerState, cohort: sampling.Cohort, *,
    timeout: float,
) -> tuple[algorithms.ServerState, dict[str, float]]:
    """One round with the cohort's local updates run by the sites (steps 3-5 of the module doc).

    Returns the new state and the round's metrics (those of the simulation, plus
    ``num_malformed``).
    """
    indices = np.asarray(cohort.indices, np.int32)
    mask = np.asarray(cohort.mask, bool)
    inputs = _gather(state, plan.client_data, indices, mask, 0.0)
    names, nodes = plan.federation.client_names, plan.federation.node_ids
    padded = int(plan.client_data.mask.shape[1])
    slots = {nodes[int(indices[i])]: i for i in np.flatnonzero(mask)}
    messages = [
        protocol.train_message(node, state, inputs, i, padded) for node, i in slots.items()
    ]
    zeros = client_lib.ClientOutput(
        delta=jax.tree.map(jnp.zeros_like, state.params),
        num_examples=jnp.float32(0),
        loss=jnp.float32(jnp.nan),
        control_delta=(
            None if state.server_control is None else jax.tree.map(jnp.zeros_like, state.params)
        ),
    )
    outputs = [zeros] * len(indices)
    reporting = np.zeros(len(indices), bool)
    malformed = dropped = 0
    received = protocol.exchange(grid, messages, timeout=timeout)
    replies = {r.metadata.src_node_id: r for r in received}
    for node, i in slots.items():
        k = int(indices[i])
        reply = replies.get(node)
        problem = protocol.reply_problem(reply)
        if problem is not None:
            logger.warning("round %d: site %s dropped: %s", int(state.round) + 1, names[k], problem)
            dropped += 1
            continue
        try:
            outputs[i] = _read_output(plan, state, reply, k)
        except (arrays.MalformedUpdate, KeyError) as e:
            logger.warning(
                "round %d: site %s excluded: malformed update (%s)",
                int(state.round) + 1,
                names[k],
                e,
            )
            malformed += 1
            continue
        reporting[i] = True
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    inputs = inputs.replace(reporting=jnp.asarray(reporting), num_dropped=jnp.int32(dropped))
    state, round_metrics = plan.algorithm.finish(state, indices, mask, inputs, stacked)
    values = {k: float(v) for k, v in round_metrics.items()}
    values["num_excluded"] += malformed
    values["num_malformed"] = float(malformed)
    return state, values


# ---- evaluation ------------------------------------------------------------------------------
def federated_evaluate(
    grid: Any, plan: DeployPlan, params: Any, splits: Sequence[str], *, timeout: float
) -> dict[str, dict[str, Any]]:
    """Every site's metrics of ``params`` on its own ``splits``, combined per split.

    Returns ``split -> {"metrics", "per_site", "per_subgroup", "site_summary"}`` (the shape of
    :func:`fedjax_med.training.evaluate.evaluate`), ``metrics`` the example-weighted means.
    """
    names = dict(zip(plan.federation.node_ids, plan.federation.client_names, strict=True))
    messages = [protocol.evaluate_message(n, params, splits) for n in names]
    per_site: dict[str, dict[str, float]] = {}
    for reply in protocol.exchange(grid, messages, timeout=timeout):
        node = reply.metadata.src_node_id
        problem = protocol.reply_problem(reply)
        if problem is not None:
            logger.warning("evaluation: site %s gave no metrics: %s", names.get(node), problem)
            continue
        per_site[names[node]] = protocol.read_stats(reply.content)
    return {split: _combine(per_site, split) for split in splits}


def _combine(per_site: dict[str, dict[str, float]], split: str) -> dict[str, Any]:
    prefix = f"{split}_"
    sites = {
        name: {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
        for name, values in per_site.items()
    }
    sites = {n: v for n, v in sites.items() if v.get("num_examples", 0) > 0}
    total = sum(v["num_examples"] for v in sites.values())
    keys = sorted({k for v in sites.values() for k in v} - {"num_examples"})
    overall = {
        k: sum(v.get(k, np.nan) * v["num_examples"] for v in sites.values()) / total
        for k in keys
    } if total else {}
    overall["num_examples"] = float(total)
    summary = metrics.summarize_groups(sites, "accuracy") if len(sites) > 1 else {}
    return {"metrics": overall, "per_site": sites, "per_subgroup": {}, "site_summary": summary}


# ---- the run ---------------------------------------------------------------------------------
def serve(
    grid: Any,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    sites: Sequence[str] = (),
    resume: bool = False,
    join_timeout: float = 600.0,
    round_timeout: float = 600.0,
) -> dict[str, Any]:
    """Runs the deployed training of ``config`` over ``grid`` in ``workdir``; returns the report.

    Writes what :func:`fedjax_med.trainers.federated.run_rounds` writes (``config.json``,
    ``metrics.jsonl``, ``checkpoints/``, ``report.json``); ``resume`` continues from the newest
    intact checkpoint with the ledger it saved.
    """
    flower.require()
    check_deployable(config)
    sites = tuple(sites) or default_sites(config)
    checkpointer = workdir_lib.prepare_workdir(workdir, resume, config)
    roster = discover(grid, config, sites, timeout=join_timeout)
    plan = build_deploy_plan(config, roster)
    f = config.federated
    log = federated.RoundLog(
        os.path.join(workdir, "metrics.jsonl"),
        {"wall_time_s": 0.0, "train_time_s": 0.0, "examples_seen": 0},
    )
    state = federated._start(plan, workdir, resume, checkpointer, log)
    checkpoint.write_json_atomic(os.path.join(workdir, "config.json"), loading.to_json_dict(config))
    start = int(state.round)
    end = start + plan.ledger.allowed(start, f.rounds - start)
    run_start = time.perf_counter()
    for round_num in range(start, end):
        cohort = plan.ledger.admit(plan.sampler.sample(round_num), round_num)
        t0 = time.perf_counter()
        if config.secure_aggregation.method in secure.METHODS:
            state, values = secure.secure_round(
                grid, plan, state, cohort, timeout=round_timeout, gather=_gather
            )
        else:
            state, values = deployed_round(grid, plan, state, cohort, timeout=round_timeout)
        seconds = time.perf_counter() - t0
        log.elapsed["train_time_s"] += seconds
        per_step = np.minimum(roster.counts[cohort.sampled()], f.client_batch_size)
        log.elapsed["examples_seen"] += int(per_step.sum()) * f.local_steps
        done = round_num + 1
        # A secure round that aborted released nothing (distributed DP counts releases).
        entries = plan.ledger.record(cohort, bool(values.get("secure_sum_released", 1)))
        log.append(federated._round_record(done, values, entries))
        logger.info(
            "round %d (%.2f s): %s", done, seconds, {k: round(v, 4) for k, v in values.items()}
        )
        if done % f.eval_every == 0 and done != end:
            val = federated_evaluate(grid, plan, state.params, ("val",), timeout=round_timeout)
            log.append({"step": done, "split": "val", **_prefixed(val["val"], "val")})
        if done % f.checkpoint_every == 0 or done == end:
            log.elapsed["wall_time_s"] += time.perf_counter() - run_start
            run_start = time.perf_counter()
            meta = {"step": done, "elapsed": dict(log.elapsed), "privacy": plan.ledger.state_dict()}
            checkpointer.save(done, federated.secret_free(state, plan), meta)
    log.elapsed["wall_time_s"] += time.perf_counter() - run_start
    checkpointer.close()
    if plan.ledger.stopped_by_budget:
        logger.warning("the privacy budget allows %d rounds: stopped at round %d", end, end)
    return finish(grid, plan, state, workdir, end, log, timeout=round_timeout)


def _prefixed(result: dict[str, Any], split: str) -> dict[str, Any]:
    return {f"{split}_{k}": v for k, v in result["metrics"].items()}


def finish(grid, plan: DeployPlan, state, workdir: str, end: int, log, *, timeout: float):
    """Federated evaluation of the final model and ``report.json`` (the simulation's keys)."""
    results = federated_evaluate(grid, plan, state.params, ("val", "test"), timeout=timeout)
    for split in ("val", "test"):
        log.append({"step": end, "split": split, **_prefixed(results[split], split)})
    extra: dict[str, Any] = {
        "federated": federated._federation_summary(plan, end),
        "deployment": {
            "runtime": "flower",
            "sites": list(plan.federation.client_names),
            "evaluation": "per-site metrics; metrics are their example-weighted means",
            "secure_aggregation": plan.config.secure_aggregation.method,
        },
    }
    claim = plan.ledger.claim(federated._claim_context(plan, state, ()))
    if claim is not None:
        extra["privacy"] = claim.to_report()
    result = report.build_report(
        config=plan.config,
        info=plan.federation.info,
        test=results["test"],
        val=results["val"],
        steps=end,
        num_params=plan.model.num_params(state.params),
        elapsed=log.elapsed,
        extra=extra,
    )
    checkpoint.write_json_atomic(os.path.join(workdir, "report.json"), result)
    logger.info(
        "deployed run done: %d rounds, test accuracy %.4f over %d sites",
        end,
        result["metrics"].get("test_accuracy") or float("nan"),
        len(results["test"]["per_site"]),
    )
    return result
