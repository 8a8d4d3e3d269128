"""The messages between the server and the sites, as Flower ``RecordDict`` s.

=========== ===================================================== ===============================
type        server -> site                                        site -> server
=========== ===================================================== ===============================
``query``   ``config_digest``                                     ``meta``: public site facts
``train``   ``params``, ``key``, ``round`` (round, padded size M,  ``delta`` (+ ``control_delta``),
            key kind), SCAFFOLD's ``server_control`` and          ``stats``: num_examples, loss
            ``client_control``                                    (not under local DP), epsilon;
                                                                  or ``refused``: reason
``evaluate`` ``params``, ``splits``                               ``stats``: ``{split}_*`` metrics
=========== ===================================================== ===============================

Arrays travel as :mod:`fedjax_med.deploy.arrays` records of NumPy arrays.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from fedjax_med.deploy import arrays, flower


def _config(values: dict[str, Any]) -> Any:
    return flower.require().app.ConfigRecord(values)


def _records(**records: Any) -> Any:
    return flower.require().app.RecordDict(records)


def _message(content: Any, node: int, message_type: str, group: str) -> Any:
    return flower.require().app.Message(content, node, message_type, group_id=group)


def query_message(node: int) -> Any:
    """The ``query`` asking a node for its site's public metadata."""
    return _message(_records(), node, "query", "roster")


def metadata_reply(meta: dict[str, Any]) -> Any:
    """The content of a site's answer to ``query``."""
    return _records(meta=_config({"json": json.dumps(meta)}))


def read_metadata(content: Any) -> dict[str, Any]:
    """The site metadata of a ``query`` reply."""
    return json.loads(content["meta"]["json"])


def train_message(node: int, state: Any, inputs: Any, slot: int, padded: int) -> Any:
    """The ``train`` message of cohort slot ``slot`` (its key and SCAFFOLD control)."""
    key, typed = arrays.key_to_array(inputs.keys[slot])
    records = {
        "params": arrays.to_record(state.params),
        "key": arrays.to_record({"key": key}),
        "round": _config(
            {"round": int(state.round), "padded_size": int(padded), "key_typed": typed}
        ),
    }
    if state.server_control is not None:
        records["server_control"] = arrays.to_record(state.server_control)
        control = jax.tree.map(lambda c: c[slot], inputs.client_controls)
        records["client_control"] = arrays.to_record(control)
    return _message(_records(**records), node, "train", f"round-{int(state.round)}")


def read_train(content: Any, template: Any) -> dict[str, Any]:
    """A ``train`` message's parameters, key, padded size and controls, checked."""
    r = content["round"]
    key = content["key"]["['key']"].numpy()
    out = {
        "params": arrays.from_record(content["params"], template, what="params"),
        "key": arrays.array_to_key(key, bool(r["key_typed"])),
        "padded_size": int(r["padded_size"]),
        "round": int(r["round"]),
        "server_control": None,
        "client_control": None,
    }
    if "server_control" in content:
        for name in ("server_control", "client_control"):
            out[name] = arrays.from_record(content[name], template, what=name)
    return out


def train_reply(output: Any, epsilon: float | None) -> Any:
    """The content of a site's ``train`` reply: its delta (and control delta) and statistics."""
    stats = {"num_examples": float(output.num_examples)}
    loss = float(output.loss)
    if np.isfinite(loss):
        stats["loss"] = loss
    if epsilon is not None:
        stats["epsilon"] = float(epsilon)
    records = {"delta": arrays.to_record(output.delta), "stats": _metrics(stats)}
    if output.control_delta is not None:
        records["control_delta"] = arrays.to_record(output.control_delta)
    return _records(**records)


def refusal(reason: str) -> Any:
    """The content of a site that declines a round (its budget, a bad message)."""
    return _records(refused=_config({"reason": reason}))


def evaluate_message(node: int, params: Any, splits: tuple[str, ...]) -> Any:
    """The ``evaluate`` message: the model and which of the site's splits to measure."""
    content = _records(
        params=arrays.to_record(params), splits=_config({"splits": list(splits)})
    )
    return _message(content, node, "evaluate", "evaluate")


def _metrics(values: dict[str, float]) -> Any:
    return flower.require().app.MetricRecord(values)


def metrics_reply(values: dict[str, float]) -> Any:
    """The content of a site's ``evaluate`` reply (finite values only)."""
    return _records(stats=_metrics({k: v for k, v in values.items() if np.isfinite(v)}))


def read_stats(content: Any) -> dict[str, float]:
    """The ``stats`` of a reply as floats."""
    return {k: float(v) for k, v in content["stats"].items()}


def reply_problem(reply: Any) -> str | None:
    """Why a reply brings no update (none, a Flower error, a refusal), or ``None``."""
    if reply is None:
        return "no reply within the round's timeout"
    if reply.has_error():
        return f"error {reply.error.code}: {reply.error.reason}"
    if "refused" in reply.content:
        return f"refused: {reply.content['refused']['reason']}"
    return None


def exchange(grid: Any, messages: Iterable[Any], *, timeout: float, poll: float = 0.1) -> list:
    """Pushes ``messages`` and pulls their replies until all came or ``timeout`` seconds passed.

    Flower's ``Grid.send_and_receive``, polling every ``poll`` seconds instead of every 3 s (a
    round of a small model takes well under a second at the sites).
    """
    pending = set(grid.push_messages(list(messages)))
    replies: list = []
    deadline = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(poll)
    return replies
