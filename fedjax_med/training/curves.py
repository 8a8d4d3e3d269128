"""``curves.png``: a run's loss, accuracy and epsilon against step (or round), from its log.

Every trainer writes ``metrics.jsonl``; :func:`write_curves` reads it back and draws three
panels next to ``report.json`` when matplotlib is installed (``pip install
'fedjax_med[report]'``; without it the run only logs that the figure was skipped):

* **loss**: the training loss (``train_loss``, the mean over the steps since the previous
  evaluation; or the round's ``loss`` of a federated run, when its clients released one), the
  validation loss, and the final test loss as a single marker;
* **accuracy**: validation accuracy, final test accuracy and, for a federated run, each site's
  validation accuracy (``site_accuracy``) as thin lines;
* **epsilon**: the privacy loss spent so far (``epsilon``), and each site's own epsilon
  (``site_epsilon``) under local DP; a non-private run says so in the panel.

The figure shows only what the run already released to its log: no metric is computed here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from fedjax_med.training import figures
from fedjax_med.training import workdir as workdir_lib

logger = logging.getLogger("fedjax_med")

FILENAME = "curves.png"
Series = tuple[list[float], list[float]]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def scalar_series(
    records: Iterable[Mapping[str, Any]], key: str, split: str | None = None
) -> Series:
    """``(steps, values)`` of ``key`` over the records (of ``split`` if given) that hold it.

    Examples:
      >>> log = [{"step": 1, "split": "round", "loss": 2.0}, {"step": 2, "split": "round"},
      ...        {"step": 2, "split": "val", "loss": 1.5}]
      >>> scalar_series(log, "loss", "round")
      ([1.0], [2.0])
    """
    steps, values = [], []
    for r in records:
        if (split is None or r.get("split") == split) and _finite(r.get(key)):
            steps.append(float(r["step"]))
            values.append(float(r[key]))
    return steps, values


def grouped_series(
    records: Iterable[Mapping[str, Any]], key: str, split: str | None = None
) -> dict[str, Series]:
    """One series per group of the dict-valued ``key`` (e.g. ``site_epsilon``: one per site).

    Examples:
      >>> log = [{"step": 1, "site_epsilon": {"a": 1.0, "b": 0.5}},
      ...        {"step": 2, "site_epsilon": {"a": 2.0, "b": None}}]
      >>> grouped_series(log, "site_epsilon")
      {'a': ([1.0, 2.0], [1.0, 2.0]), 'b': ([1.0], [0.5])}
    """
    out: dict[str, Series] = {}
    for r in records:
        groups = r.get(key)
        if (split is not None and r.get("split") != split) or not isinstance(groups, Mapping):
            continue
        for name, value in groups.items():
            if _finite(value):
                steps, values = out.setdefault(str(name), ([], []))
                steps.append(float(r["step"]))
                values.append(float(value))
    return out


def _panel(ax, lines: Mapping[str, Series], groups: Mapping[str, Series], title: str, x: str):
    drawn = False
    for label, (steps, values) in lines.items():
        if steps:
            style = "o" if len(steps) == 1 else "-o"
            ax.plot(steps, values, style, label=label, markersize=4, linewidth=1.8)
            drawn = True
    for name, (steps, values) in groups.items():
        ax.plot(steps, values, "--", label=name, linewidth=0.9, alpha=0.8, marker=".")
        drawn = True
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(x)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="x-small", ncol=2 if len(groups) > 4 else 1)
    return drawn


def training_curves(
    path: str | os.PathLike, records: list[Mapping[str, Any]], *, unit: str = "step"
) -> str:
    """Draws the three panels of the module docstring from ``metrics.jsonl`` records.

    Args:
      path: where to write the PNG.
      records: the run's ``metrics.jsonl`` records, in order.
      unit: what ``step`` counts (``"step"`` or ``"round"``), the x-axis label.

    Returns:
      ``path`` as a string.

    Examples:
      >>> import os, tempfile
      >>> log = [{"step": 5, "split": "val", "train_loss": 1.2, "val_loss": 1.3,
      ...         "val_accuracy": 0.5, "epsilon": 1.0}]
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     out = training_curves(os.path.join(tmp, "curves.png"), log)
      ...     os.path.getsize(out) > 0
      True
    """
    records = list(records)
    mpl = figures.load_matplotlib()
    fig = figures.new_figure(mpl, (13.0, 3.8))
    loss_ax, acc_ax, eps_ax = fig.subplots(1, 3)
    train_loss = scalar_series(records, "train_loss")
    if not train_loss[0]:
        train_loss = scalar_series(records, "loss", "round")
    _panel(
        loss_ax,
        {
            "train": train_loss,
            "validation": scalar_series(records, "val_loss", "val"),
            "test (final)": scalar_series(records, "test_loss", "test"),
        },
        {},
        "loss",
        unit,
    )
    _panel(
        acc_ax,
        {
            "train": scalar_series(records, "train_accuracy"),
            "validation": scalar_series(records, "val_accuracy", "val"),
            "test (final)": scalar_series(records, "test_accuracy", "test"),
        },
        {f"val {site}": s for site, s in grouped_series(records, "site_accuracy", "val").items()},
        "accuracy",
        unit,
    )
    acc_ax.set_ylim(-0.02, 1.02)
    private = _panel(
        eps_ax,
        {"epsilon": scalar_series(records, "epsilon")},
        grouped_series(records, "site_epsilon"),
        "privacy loss (epsilon spent)",
        unit,
    )
    if not private:
        eps_ax.text(
            0.5,
            0.5,
            "non-private run:\nno privacy loss accounted",
            ha="center",
            va="center",
            transform=eps_ax.transAxes,
            color="grey",
        )
    return figures.save(fig, path)


def write_curves(workdir: str, metrics_path: str, *, unit: str) -> str | None:
    """Draws ``metrics_path`` into ``workdir/curves.png`` if matplotlib is installed.

    Returns the figure's path, or ``None`` (matplotlib missing: logged, the run goes on).
    """
    if not figures.matplotlib_available():
        logger.info("curves.png skipped: %s", figures.INSTALL_HINT)
        return None
    records = workdir_lib.read_metrics(metrics_path)
    return training_curves(os.path.join(workdir, FILENAME), records, unit=unit)
