"""A run's folder: checks before training, the metrics log, the saved config.

``workdir`` holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object per
evaluation or round), ``checkpoints/`` and ``report.json``. Every trainer prepares it, writes its
metrics and reloads its config through this module, so the layout has one definition.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from fedjax_med.config import loading
from fedjax_med.training import checkpoint, report


class WorkdirError(ValueError):
    """The workdir holds a run that this command would overwrite, or none to resume."""


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rewrite_metrics(path: str, records: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(report.json_safe(record)) + "\n")
    os.replace(tmp, path)


def append_metrics(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(report.json_safe(record)) + "\n")
        f.flush()


def prepare_workdir(workdir: str, resume: bool) -> checkpoint.Checkpointer:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    has_checkpoint = os.path.isdir(ckpt_dir) and any(
        name.isdigit() for name in os.listdir(ckpt_dir)
    )
    if has_checkpoint and not resume:
        raise WorkdirError(
            f"workdir '{workdir}' already holds a run; pass --resume to continue it or choose "
            "a new --workdir"
        )
    if resume and not has_checkpoint:
        raise WorkdirError(f"--resume: workdir '{workdir}' has no checkpoint to resume from")
    os.makedirs(workdir, exist_ok=True)
    return checkpoint.Checkpointer(ckpt_dir)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The validated config a run saved in ``workdir/config.json``."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise WorkdirError(f"workdir '{workdir}' has no config.json (was it trained here?)")
    with open(config_path) as f:
        return loading.from_json_dict(json.load(f))
