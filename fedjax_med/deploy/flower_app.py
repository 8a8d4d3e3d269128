"""The Flower app of a deployed run: ``client_app`` (a hospital) and ``server_app``.

``client_app`` reads its hospital from the SuperNode's ``--node-config``: ``config`` (the study's
config, as for ``fedjax-med train --config``), ``overrides`` (space-separated ``FIELD=VALUE``),
``site`` (its name on the study's list), ``data`` (its images, see
:func:`fedjax_med.deploy.site.load_site_splits`) and ``target-epsilon`` (its own budget, 0 = the
config's) and ``state-dir`` (a folder of its own disk). Its local DP-SGD ledger lives in the
run's ``Context.state`` on the SuperNode and in ``state-dir`` (so that a restarted server, a new
Flower run, does not reset it), never sent anywhere.

``server_app`` reads the run config (``flwr run --run-config``): ``config``, ``overrides``,
``workdir``, ``sites`` (comma-separated, client order), ``resume``, ``join-timeout`` and
``round-timeout``, and runs :func:`fedjax_med.deploy.server.serve`.

Both are built from :mod:`fedjax_med.deploy.site` and :mod:`fedjax_med.deploy.server`;
``fedjax-med deploy`` starts Flower's SuperLink and SuperNodes with this app.
"""

from __future__ import annotations

import functools
import json
import logging
import os

from fedjax_med.config import loading
from fedjax_med.deploy import arrays, flower, protocol, secure, server
from fedjax_med.deploy import site as site_lib
from fedjax_med.training import checkpoint

logger = logging.getLogger("fedjax_med")
fl = flower.require()
_STATE = "fedjax_med_site"


def load_config(spec: str, overrides: str = ""):
    """The config of ``spec`` with ``FIELD=VALUE`` overrides (space-separated)."""
    items = [f"--config.{o}" if not o.startswith("--") else o for o in overrides.split()]
    return loading.load_config(spec, items)


@functools.lru_cache(maxsize=4)
def _site(spec: str, overrides: str, name: str, data: str, target: float) -> site_lib.Site:
    return site_lib.Site(load_config(spec, overrides), name, data, target)


def site_of(node_config) -> site_lib.Site:
    """The :class:`~fedjax_med.deploy.site.Site` a SuperNode's node config describes."""
    missing = [k for k in ("config", "site", "data") if k not in node_config]
    if missing:
        raise ValueError(f"the SuperNode's --node-config lacks {missing}")
    return _site(
        str(node_config["config"]),
        str(node_config.get("overrides", "")),
        str(node_config["site"]),
        str(node_config["data"]),
        float(node_config.get("target-epsilon", 0.0)),
    )


def _ledger_file(context, site: site_lib.Site) -> str | None:
    """The site's own ledger on its disk (``state-dir`` of the node config), if it has one."""
    folder = str(context.node_config.get("state-dir", ""))
    if not folder:
        return None
    digest = site_lib.config_digest(site.config)[:16]
    return os.path.join(folder, f"ledger-{site.name}-{digest}.json")


def _steps(context, site: site_lib.Site) -> int:
    """Local DP-SGD steps the site has spent on this study: its run state or, across runs (a
    restarted server starts a new Flower run with a fresh ``Context``), its ledger file."""
    steps = int(context.state[_STATE]["steps"]) if _STATE in context.state else 0
    path = _ledger_file(context, site)
    if path is not None and os.path.exists(path):
        with open(path) as f:
            steps = max(steps, int(json.load(f)["steps"]))
    return steps


def _record_steps(context, site: site_lib.Site, steps: int, epsilon: float) -> None:
    context.state[_STATE] = fl.app.ConfigRecord({"steps": steps})
    path = _ledger_file(context, site)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = {"site": site.name, "steps": steps, "epsilon": epsilon}
        checkpoint.write_json_atomic(path, record)


def _reply(message, content):
    return fl.app.Message(content, reply_to=message)


client_app = fl.clientapp.ClientApp()


@client_app.query()
def query(message, context):
    """Answers the roster query with the site's public metadata."""
    return _reply(message, protocol.metadata_reply(site_of(context.node_config).metadata()))


@client_app.train()
def train(message, context):
    """One local update: the simulation's client function on this site's images."""
    site = site_of(context.node_config)
    try:
        request = protocol.read_train(message.content, site.template)
    except (arrays.MalformedUpdate, KeyError) as e:
        logger.warning("site %s: refused a malformed train message (%s)", site.name, e)
        return _reply(message, protocol.refusal(f"malformed train message: {e}"))
    local_steps = site.config.federated.local_steps
    epsilon = None
    steps = _steps(context, site)
    if site.private:
        ledger = site.ledger(steps)
        if not ledger.can_take(0, local_steps):
            reason = (
                f"budget: epsilon {ledger.epsilon(0):.4g} spent of {site.target_epsilon:g}; "
                f"{local_steps} more steps would pass it"
            )
            logger.warning("site %s: %s", site.name, reason)
            return _reply(message, protocol.refusal(reason))
    output = site.train(
        request["params"],
        request["padded_size"],
        request["key"],
        request["server_control"],
        request["client_control"],
    )
    if site.private:
        steps += local_steps
        epsilon = site.ledger(steps).epsilon(0)
        _record_steps(context, site, steps, epsilon)
    if "secure" in message.content:  # only the protocol's public keys leave the site
        session = (context.run_id, context.node_id, message.metadata.group_id)
        record = message.content["secure"]
        try:
            ddp = site.distributed_dp(int(record.get("ddp_clients", 0)))
            keys = secure.begin(
                output, request["padded_size"], record, session, ddp, request["round"]
            )
        except ValueError as e:
            return _reply(message, protocol.refusal(str(e)))
        return _reply(message, fl.app.RecordDict({"secagg": secure.to_record(keys)}))
    return _reply(message, protocol.train_reply(output, epsilon))


def _secagg_step(message, context):
    """Steps 2-4 of secure aggregation (:mod:`fedjax_med.deploy.secure`) at this site."""
    stage = message.metadata.message_type.partition(".")[2]
    session = (context.run_id, context.node_id, message.metadata.group_id)
    return _reply(
        message, fl.app.RecordDict({"secagg": secure.site_step(stage, message.content, session)})
    )


@client_app.evaluate()
def evaluate(message, context):
    """The site's metrics of the received model on its own validation / test images."""
    site = site_of(context.node_config)
    params = arrays.from_record(message.content["params"], site.template, what="params")
    values: dict[str, float] = {}
    for split in message.content["splits"]["splits"]:
        values.update(site.evaluate(params, str(split)))
    return _reply(message, protocol.metrics_reply(values))


for _stage in secure.STAGES:
    client_app.query(_stage)(_secagg_step)

server_app = fl.serverapp.ServerApp()


@server_app.main()
def main(grid, context) -> None:
    """Runs :func:`fedjax_med.deploy.server.serve` with the run config of ``flwr run``."""
    flower.quick_object_pulls("flwr.superlink.grid.http_grid", "pull_objects")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedjax_med").setLevel(logging.INFO)
    rc = context.run_config
    config = load_config(str(rc["config"]), str(rc.get("overrides", "")))
    sites = tuple(s for s in str(rc.get("sites", "")).split(",") if s)
    server.serve(
        grid,
        config,
        str(rc["workdir"]),
        sites=sites,
        resume=bool(rc.get("resume", False)),
        join_timeout=float(rc.get("join-timeout", 600.0)),
        round_timeout=float(rc.get("round-timeout", 600.0)),
    )
