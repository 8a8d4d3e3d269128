"""Atomic checkpoints of the train state plus JSON metadata (sampler position, privacy ledger).

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; :func:`write_json_atomic` does the same for
single files (write a temporary file in the same folder, then ``os.replace``).

A checkpoint damaged after it was written (truncated or deleted array data, an emptied folder) is
detected on restore: :meth:`Checkpointer.restore_latest` logs it and falls back to the newest
intact checkpoint, whose metadata (the privacy ledger) comes with it, so nothing is accounted
twice or lost.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger("fedjax_med")

# The entries every complete checkpoint folder holds (orbax's commit marker, the two items).
_REQUIRED = ("_CHECKPOINT_METADATA", "metadata/metadata", "state/_METADATA")


class CheckpointError(ValueError):
    """No checkpoint of a run can be restored: each is damaged (the paths are named)."""


def damage(step_dir: str) -> str | None:
    """Why the checkpoint folder ``step_dir`` cannot be restored, or ``None`` if it looks whole.

    A cheap look at the files (no array is read): the items orbax writes, and array data under
    ``state/``. Damage inside the data (a truncated file) shows when it is read.
    """
    missing = [name for name in _REQUIRED if not os.path.isfile(os.path.join(step_dir, name))]
    if missing:
        return f"missing {', '.join(missing)}"
    data = [
        path
        for pattern in ("state/d/*", "state/ocdbt.process_*/d/*")
        for path in glob.glob(os.path.join(step_dir, pattern))
    ]
    if not data:
        return "no array data under state/"
    if any(os.path.getsize(path) == 0 for path in data):
        return "an empty array data file under state/"
    return None


class Checkpointer:
    """Saves and restores ``(state, metadata)`` pairs under ``directory``, keeping the newest."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest step saved under ``directory``, or ``None`` if there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        """Saves ``state`` and the JSON ``metadata`` as checkpoint ``step``; returns once written.

        Saves whatever the manager's save interval; beyond ``max_to_keep`` the oldest are deleted.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the state into the structure, shapes and dtypes of ``template``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.metadata)

    def step_dir(self, step: int) -> str:
        """The folder of checkpoint ``step``."""
        return os.path.join(self.directory, str(step))

    def restore_latest(
        self, template: Any, *, discard_damaged: bool = False
    ) -> tuple[int, Any, dict[str, Any]]:
        """The newest checkpoint that restores, as ``(step, state, metadata)``.

        Each damaged checkpoint newer than it is logged (a warning naming its folder) and
        skipped; with ``discard_damaged`` (a resume, which will write those steps again) it is
        renamed ``damaged-<step>`` so the run can save that step anew.

        Raises:
          CheckpointError: if there is no checkpoint, or every one is damaged (naming each).
        """
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            path = self.step_dir(step)
            problem = damage(path)
            if problem is None:
                try:
                    state, metadata = self.restore(step, template)
                except Exception as err:  # orbax/tensorstore raise many types for bad data
                    problem = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
            if problem is None:
                if damaged and discard_damaged:
                    for bad_path, bad_step in damaged:
                        os.replace(bad_path, _free_name(self.directory, f"damaged-{bad_step}"))
                    self._manager.reload()
                return step, state, metadata
            logger.warning("checkpoint '%s' is damaged (%s); trying the one before", path, problem)
            damaged.append((path, step))
        if not damaged:
            raise CheckpointError(f"'{self.directory}' holds no checkpoint")
        raise CheckpointError(
            f"no intact checkpoint in '{self.directory}': "
            + "; ".join(f"'{path}' is damaged" for path, _ in damaged)
            + " (see the warnings above for each); train again in a new --workdir"
        )

    def close(self) -> None:
        """Closes orbax's checkpoint manager; the checkpointer cannot be used afterwards."""
        self._manager.close()


def _free_name(directory: str, name: str) -> str:
    path, n = os.path.join(directory, name), 1
    while os.path.exists(path):
        path, n = os.path.join(directory, f"{name}.{n}"), n + 1
    return path


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` so readers never see a half-written file."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")
