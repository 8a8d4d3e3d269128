"""A run's folder: checks before training, the metrics log, the saved config.

``workdir`` holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object per
evaluation or round), ``checkpoints/`` and ``report.json``. Every trainer prepares it, writes its
metrics and reloads its config through this module, so the layout has one definition.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from fedjax_med.config import loading
from fedjax_med.training import checkpoint, report


class WorkdirError(ValueError):
    """The workdir holds a run that this command would overwrite, or none to resume."""


def check_writable(
    path: str, what: str = "--workdir", inside: tuple[str, ...] = ("checkpoints", "metrics.jsonl")
) -> None:
    """Refuses, before any work, a folder ``path`` that cannot be created or written.

    Walks up to the nearest existing ancestor: a file on the way, or a folder without write
    permission (``os.access``), is named in the error. Inside an existing ``path``, its
    entries named by ``inside`` (default: ``checkpoints/`` and ``metrics.jsonl``) must be
    writable too where they exist.

    Raises:
      WorkdirError: naming ``what`` and the path at fault.
    """
    path = os.path.abspath(path)
    node = path
    while not os.path.exists(node):
        node = os.path.dirname(node)
    if not os.path.isdir(node):
        raise WorkdirError(f"{what} '{path}': '{node}' is a file, not a folder")
    entries = [os.path.join(path, name) for name in inside]
    for target in [node, *(e for e in entries if node == path and os.path.exists(e))]:
        mode = os.W_OK | (os.X_OK if os.path.isdir(target) else 0)
        if not os.access(target, mode):
            raise WorkdirError(f"{what} '{path}': cannot write in '{target}' (read-only)")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of the ``metrics.jsonl`` at ``path``, in order (``[]`` if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rewrite_metrics(path: str, records: list[dict[str, Any]]) -> None:
    """Replaces the ``metrics.jsonl`` at ``path`` by ``records`` (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(report.json_safe(record)) + "\n")
    os.replace(tmp, path)


def append_metrics(path: str, record: dict[str, Any]) -> None:
    """Appends ``record`` to ``path`` as one JSON line (NaN and inf as ``null``) and flushes."""
    with open(path, "a") as f:
        f.write(json.dumps(report.json_safe(record)) + "\n")
        f.flush()


# Fields whose change would alter what a resumed run's privacy ledger accounted, or the data it
# trains on; a resume may change anything else (more steps or rounds, intervals, logging).
RESUME_FIXED_FIELDS = (
    "seed",
    "trainer",
    "data",
    "model",
    "privacy.mechanism",
    "privacy.enabled",
    "privacy.unit",
    "privacy.max_images_per_patient",
    "privacy.clip_norm",
    "privacy.noise_multiplier",
    "privacy.target_epsilon",
    "privacy.delta",
    "privacy.accountant",
    "privacy.sampling",
    "privacy.per_layer_clipping",
    "privacy.noise_seed",
    "train.batch_size",
    "federated.algorithm",
    "federated.partition",
    "federated.clients_per_round",
    "federated.local_steps",
    "federated.client_batch_size",
    "federated.site_target_epsilons",
    "federated.personalization_steps",
    "secure_aggregation.method",
    "secure_aggregation.clip",
    "secure_aggregation.dropout_rate",
    "secure_aggregation.corrupted_fraction",
    "secure_aggregation.distributed_dp",
    "federated.adaptive_clipping",
    "federated.target_quantile",
)


def _field(config: Any, path: str) -> Any:
    node = config
    for name in path.split("."):
        if name not in node:
            return None
        node = node[name]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume the run of ``workdir`` with a config that changes a fixed field.

    Raises:
      WorkdirError: naming each changed field of :data:`RESUME_FIXED_FIELDS` (old -> new).
    """
    saved = load_workdir_config(workdir)
    changed = [
        f"{path} ({_field(saved, path)!r} -> {_field(config, path)!r})"
        for path in RESUME_FIXED_FIELDS
        if _field(saved, path) != _field(config, path)
    ]
    if changed:
        raise WorkdirError(
            f"--resume: the config differs from the run in '{workdir}' in "
            + ", ".join(changed)
            + " (a resume may change only steps, rounds and intervals); resume with the run's "
            "own config or choose a new --workdir"
        )


def prepare_workdir(
    workdir: str, resume: bool, config: ml_collections.ConfigDict | None = None
) -> checkpoint.Checkpointer:
    """Checks ``workdir`` for a new run or a resume (with ``config`` compared to the run's).

    Creates ``workdir`` if needed.

    Returns:
      A :class:`~fedjax_med.training.checkpoint.Checkpointer` on ``workdir/checkpoints``.

    Raises:
      WorkdirError: if ``workdir`` cannot be written (:func:`check_writable`), already holds a
        checkpoint and ``resume`` is False, has none to resume, or (resume) the config changes
        a field of :data:`RESUME_FIXED_FIELDS`.
    """
    check_writable(workdir)
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
    if resume and config is not None:
        check_resume_config(workdir, config)
    os.makedirs(workdir, exist_ok=True)
    return checkpoint.Checkpointer(ckpt_dir)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The validated config a run saved in ``workdir/config.json``.

    Raises:
      WorkdirError: if ``workdir`` has no ``config.json``, or it is not a valid config.
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise WorkdirError(f"workdir '{workdir}' has no config.json (was it trained here?)")
    try:
        with open(config_path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WorkdirError(f"'{config_path}' cannot be read as JSON ({err})") from err
    if not isinstance(data, dict):
        raise WorkdirError(f"'{config_path}' must hold a JSON object, not {type(data).__name__}")
    try:
        return loading.from_json_dict(data)
    except ValueError as err:
        raise WorkdirError(f"'{config_path}' is not a valid config: {err}") from err


def restore_checkpoint(workdir: str, build: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """``(run, state)``: ``build() -> (run, template)``, then the newest intact checkpoint of
    ``workdir`` restored into ``template``; ``build`` runs only once a checkpoint is known to exist.

    Raises:
      WorkdirError: the workdir has no checkpoint (a damaged one raises
        :class:`~fedjax_med.training.checkpoint.CheckpointError` naming every path).
    """
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        if checkpointer.latest_step() is None:
            raise WorkdirError(f"workdir '{workdir}' has no checkpoint")
        run, template = build()
        _, state, _ = checkpointer.restore_latest(template)
    finally:
        checkpointer.close()
    return run, state
