"""PNG figures of a privacy report (utility against epsilon, attack ROCs, audits, reconstructions)
and of a dataset (sample images per site and class).

Each function draws one figure with :mod:`fedjax_med.training.figures` (a fresh Agg canvas,
no ``pyplot`` state, no display needed), writes it to ``path`` at 150 dpi and returns the path.
matplotlib is imported only when a figure is drawn; install it with
``pip install 'fedjax_med[report]'``.

The membership ROC is drawn on log-log axes as recommended by Carlini, Chien, Nasr, Song, Terzis,
Tramer, "Membership Inference Attacks From First Principles", IEEE S&P 2022
(https://arxiv.org/abs/2112.03570): an attack is only worrying if it has a high true positive
rate at a low false positive rate, which linear axes hide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_med.training import figures

# Dash patterns for non-private reference lines of one group, so several stay distinguishable.
_DASHES = ("--", "-.", (0, (8, 3)), (0, (5, 2, 1, 2, 1, 2)))


def utility_vs_epsilon(
    path: str | os.PathLike,
    points: Sequence[Mapping[str, Any]],
    *,
    metric: str = "test accuracy",
    chance: float | None = None,
) -> str:
    """Plots a utility metric against the privacy budget epsilon, one line per group.

    Points with a finite epsilon are drawn on a log x-axis, joined in order of epsilon within
    their group and annotated with their name. Points with ``epsilon`` ``None`` (or ``inf``) are
    non-private baselines and become horizontal dashed lines in the colour of their group.

    Args:
      path: where to write the PNG; missing parent folders are created.
      points: dicts ``{"name": str, "epsilon": float | None, "value": float, "group": str}``.
      metric: what ``value`` measures; the y-axis label.
      chance: the metric of a trivial predictor, drawn as a dotted grey line; ``None`` omits it.

    Returns:
      ``path`` as a string.

    Examples:
      >>> import os, tempfile
      >>> points = [
      ...     {"name": "eps=1", "epsilon": 1.0, "value": 0.71, "group": "DP-SGD"},
      ...     {"name": "eps=8", "epsilon": 8.0, "value": 0.80, "group": "DP-SGD"},
      ...     {"name": "SGD", "epsilon": None, "value": 0.86, "group": "DP-SGD"},
      ... ]
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     out = os.path.join(tmp, "utility.png")
      ...     utility_vs_epsilon(out, points, chance=0.5) == out
      True
    """
    path = os.fspath(path)
    points = _check_points(points)
    if chance is not None:
        chance = _finite(chance, "chance")
    mpl = figures.load_matplotlib()
    fig = figures.new_figure(mpl, (7.0, 4.5))
    ax = fig.add_subplot()

    groups = list(dict.fromkeys(p["group"] for p in points))
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    private = [p for p in points if p["epsilon"] is not None]
    for group in groups:
        line = sorted((p for p in private if p["group"] == group), key=lambda p: p["epsilon"])
        if not line:
            continue
        eps = [p["epsilon"] for p in line]
        ax.plot(eps, [p["value"] for p in line], marker="o", color=colors[group], label=group)
        for p in line:
            ax.annotate(
                p["name"],
                (p["epsilon"], p["value"]),
                textcoords="offset points",
                # Below and to the right: the empty side of a curve rising with epsilon.
                xytext=(6, -6),
                va="top",
                fontsize=8,
                color=colors[group],
            )
    dashes_used = dict.fromkeys(groups, 0)
    for p in points:
        if p["epsilon"] is not None:
            continue
        group = p["group"]
        ax.axhline(
            p["value"],
            color=colors[group],
            linestyle=_DASHES[dashes_used[group] % len(_DASHES)],
            linewidth=1.5,
            label=f"{p['name']} (non-private): {p['value']:.3g}",
        )
        dashes_used[group] += 1
    if chance is not None:
        ax.axhline(
            chance,
            color="grey",
            linestyle=":",
            linewidth=1.5,
            label=f"trivial predictor: {chance:.3g}",
        )

    ax.set_xscale("log")
    if private:
        eps = [p["epsilon"] for p in private]
        # Room on the right for the name annotations.
        ax.set_xlim(min(eps) / 2, max(eps) * 3)
    else:
        ax.set_xlim(0.1, 100.0)
        ax.text(
            0.5,
            0.03,
            "no private runs: non-private baselines only",
            transform=ax.transAxes,
            ha="center",
            va="bottom",
            fontsize=8,
            color="grey",
        )
    ax.set_xlabel("epsilon (lower = more private)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs privacy budget")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return figures.save(fig, path)


def roc_curves(path: str | os.PathLike, curves: Sequence[Mapping[str, Any]]) -> str:
    """Plots membership-inference ROC curves on log-log (left) and linear (right) axes.

    The log-log panel spans from ``1e-3``, or the smallest positive false positive rate if that is
    smaller, to 1; zero rates, which a log axis cannot show, are clipped to that floor. Both panels
    show the diagonal of an attack at chance.

    Args:
      path: where to write the PNG; missing parent folders are created.
      curves: dicts ``{"name": str, "fpr": array, "tpr": array, "auc": float}``; ``fpr`` and
        ``tpr`` are 1-D with the same length and values in ``[0, 1]``; ``auc`` may be ``None``.

    Returns:
      ``path`` as a string.

    Examples:
      >>> import os, tempfile
      >>> curve = {"name": "LiRA", "fpr": [0, 0.01, 1], "tpr": [0, 0.2, 1], "auc": 0.6}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     out = os.path.join(tmp, "roc.png")
      ...     roc_curves(out, [curve]) == out
      True
    """
    path = os.fspath(path)
    curves = _check_curves(curves)
    positive = [c["fpr"][c["fpr"] > 0].min() for c in curves if np.any(c["fpr"] > 0)]
    floor = min([1e-3, *positive])
    floor = 10.0 ** math.floor(math.log10(floor))  # start on a decade so the ticks read well
    mpl = figures.load_matplotlib()
    fig = figures.new_figure(mpl, (8.0, 4.4))
    log_ax, lin_ax = fig.subplots(1, 2)
    for i, c in enumerate(curves):
        label = c["name"] if c["auc"] is None else f"{c['name']} (AUC {c['auc']:.2f})"
        color = f"C{i % 10}"
        order = np.lexsort((c["tpr"], c["fpr"]))
        fpr, tpr = c["fpr"][order], c["tpr"][order]
        log_ax.plot(np.clip(fpr, floor, 1), np.clip(tpr, floor, 1), color=color, label=label)
        lin_ax.plot(fpr, tpr, color=color)
    log_ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", label="chance")
    lin_ax.plot([0, 1], [0, 1], color="grey", linestyle="--")

    log_ax.set_xscale("log")
    log_ax.set_yscale("log")
    log_ax.set_xlim(floor, 1)
    log_ax.set_ylim(floor, 1)
    log_ax.set_title("log-log (low false positive rates)")
    lin_ax.set_xlim(0, 1)
    lin_ax.set_ylim(0, 1)
    lin_ax.set_title("linear")
    for ax in (log_ax, lin_ax):
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle("Membership inference ROC")
    # Below the diagonal of the linear panel is where no useful attack's curve goes.
    lin_ax.legend(*log_ax.get_legend_handles_labels(), loc="lower right", fontsize="small")
    return figures.save(fig, path)


def audit_vs_accountant(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """Plots each audit's empirical epsilon lower bound next to the accountant's epsilon.

    A sound implementation keeps every lower bound at or below its accountant's epsilon; bounds
    above it are drawn in red. An infinite accountant epsilon (a mechanism without noise) is a
    hatched bar reaching the axis limit, labelled ``inf``.

    Args:
      path: where to write the PNG; missing parent folders are created.
      rows: dicts ``{"name": str, "accountant_epsilon": float, "audit_epsilon": float}``, with
        ``accountant_epsilon >= 0`` (``inf`` allowed) and finite ``audit_epsilon >= 0``.

    Returns:
      ``path`` as a string.

    Examples:
      >>> import os, tempfile
      >>> rows = [{"name": "sigma=1", "accountant_epsilon": 4.2, "audit_epsilon": 1.3}]
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     out = os.path.join(tmp, "audit.png")
      ...     audit_vs_accountant(out, rows) == out
      True
    """
    path = os.fspath(path)
    rows = _check_audit_rows(rows)
    finite = [r["audit_epsilon"] for r in rows]
    finite += [r["accountant_epsilon"] for r in rows if math.isfinite(r["accountant_epsilon"])]
    xmax = 1.3 * max(finite) if max(finite) > 0 else 1.0
    pad = 0.01 * xmax

    mpl = figures.load_matplotlib()
    fig = figures.new_figure(mpl, (7.0, max(3.0, 0.75 * len(rows) + 2.0)))
    ax = fig.add_subplot()
    height = 0.38
    broken = False
    for i, r in enumerate(rows):
        acc, audit = r["accountant_epsilon"], r["audit_epsilon"]
        y_acc, y_audit = i - height / 2, i + height / 2
        if math.isinf(acc):
            ax.barh(y_acc, xmax, height, color="C0", alpha=0.35, hatch="//", edgecolor="C0")
            ax.text(xmax - pad, y_acc, "inf", ha="right", va="center", fontsize=8, weight="bold")
        else:
            ax.barh(y_acc, acc, height, color="C0")
            ax.text(acc + pad, y_acc, f"{acc:.2f}", va="center", fontsize=8)
        above = audit > acc
        broken |= above
        ax.barh(y_audit, audit, height, color="C3" if above else "C1")
        ax.text(audit + pad, y_audit, f"{audit:.2f}", va="center", fontsize=8)

    handles = [
        mpl.patches.Patch(color="C0", label="accountant epsilon (upper bound)"),
        mpl.patches.Patch(color="C1", label="empirical lower bound (audit)"),
    ]
    if broken:
        handles.append(mpl.patches.Patch(color="C3", label="lower bound above accountant: broken"))
    ax.legend(handles=handles, fontsize="small", loc="lower right")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, xmax)
    ax.set_xlabel("epsilon")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("Empirical epsilon lower bound vs accountant")
    fig.supxlabel(
        "A lower bound above the accountant's epsilon means the implementation is broken.",
        fontsize="small",
        style="italic",
    )
    return figures.save(fig, path)


def reconstruction_gallery(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> str:
    """Shows original images above their reconstructions by an attack, one block per row.

    Blocks sit side by side when there are at most 12 images in all, else one above the other.

    Each row's block is labelled with its name and PSNR; a row whose ``reconstructions`` is
    ``None`` (an attack that does not apply) gets one blank "not applicable" panel instead.
    Single-channel images use a grey colour map over ``value_range``; RGB images are clipped to it.

    Args:
      path: where to write the PNG; missing parent folders are created.
      rows: dicts ``{"name": str, "originals": array (B, H, W, C), "reconstructions": array of
        the same shape or None, "psnr": float | None}`` with ``C`` 1 or 3; ``B`` may differ
        between rows.
      value_range: ``(low, high)`` pixel values shown as black and white.

    Returns:
      ``path`` as a string.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> x = np.random.default_rng(0).uniform(size=(2, 8, 8, 1))
      >>> row = {"name": "FedAvg", "originals": x, "reconstructions": x, "psnr": 30.0}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     out = os.path.join(tmp, "gallery.png")
      ...     reconstruction_gallery(out, [row]) == out
      True
    """
    path = os.fspath(path)
    low, high = _check_value_range(value_range)
    rows = _check_gallery_rows(rows)
    widths = [len(r["originals"]) for r in rows]
    # Few images in all: blocks side by side (one column block per row); else stacked.
    side_by_side = sum(widths) <= 12
    mpl = figures.load_matplotlib()
    if side_by_side:
        panel = 1.3
        size = (max(5.0, panel * sum(widths) + 0.4 * len(rows)), 2 * panel + 1.0)
        fig = figures.new_figure(mpl, size)
        subfigs = fig.subfigures(1, len(rows), squeeze=False, width_ratios=widths)[0]
    else:
        ncols = max(widths)
        panel = min(1.3, 6.5 / ncols)
        width = max(5.0, panel * ncols + 1.0)
        fig = figures.new_figure(mpl, (width, len(rows) * (2 * panel + 0.5) + 0.2))
        subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sub, r in zip(subfigs, rows, strict=True):
        psnr = "" if r["psnr"] is None else f"PSNR {r['psnr']:.1f} dB"
        sep = "\n" if side_by_side else ": "
        sub.suptitle(r["name"] + (sep + psnr if psnr else ""), fontsize="medium", weight="bold")
        grid = sub.add_gridspec(2, len(r["originals"]) if side_by_side else ncols)
        batch = len(r["originals"])
        for j in range(batch):
            ax = sub.add_subplot(grid[0, j])
            figures.show_image(ax, r["originals"][j], low, high)
            if j == 0:
                ax.set_ylabel("original", fontsize="small")
        if r["reconstructions"] is None:
            ax = sub.add_subplot(grid[1, :batch])
            ax.text(0.5, 0.5, "not applicable", ha="center", va="center", color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("lightgrey")
            ax.set_ylabel("reconstructed", fontsize="small")
        else:
            for j in range(batch):
                ax = sub.add_subplot(grid[1, j])
                figures.show_image(ax, r["reconstructions"][j], low, high)
                if j == 0:
                    ax.set_ylabel("reconstructed", fontsize="small")
    return figures.save(fig, path)


def sample_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    sites: np.ndarray,
    *,
    site_names: Sequence[str],
    class_names: Sequence[str],
    per_cell: int = 2,
    value_range: tuple[float, float] | None = None,
) -> str:
    """A grid of sample images: one row per site, one block of ``per_cell`` columns per class.

    The first ``per_cell`` images of each (site, class) pair in the given order are shown, so a
    reader sees each scanner's look (contrast, noise, blur) before any model is trained. A class
    a site does not have leaves its cells blank and says so. Multilabel ``labels`` (one column per
    class) place an image under every class it carries.

    Args:
      path: where to write the PNG; missing parent folders are created.
      images: ``(N, H, W, C)`` with ``C`` 1 or 3, in ``value_range``.
      labels: ``(N,)`` class ids, or ``(N, K)`` multi-hot for a multilabel task.
      sites: ``(N,)`` site ids indexing ``site_names``.
      site_names, class_names: the row and column labels.
      per_cell: images per (site, class) pair, at least 1.
      value_range: ``(low, high)`` pixel values shown as black and white; ``None``: ``(0, 255)``
        for integer images (the sources' ``uint8``), else ``(0, 1)``.

    Returns:
      ``path`` as a string.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> x = np.random.default_rng(0).uniform(size=(8, 8, 8, 1))
      >>> y, s = np.array([0, 1] * 4), np.array([0] * 4 + [1] * 4)
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     out = os.path.join(tmp, "samples.png")
      ...     sample_grid(out, x, y, s, site_names=["a", "b"], class_names=["no", "yes"]) == out
      True
    """
    path = os.fspath(path)
    images, labels, sites = np.asarray(images), np.asarray(labels), np.asarray(sites)
    if value_range is None:
        value_range = (0.0, 255.0) if np.issubdtype(images.dtype, np.integer) else (0.0, 1.0)
    low, high = _check_value_range(value_range)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, C) with C 1 or 3, got shape {images.shape}")
    if len(labels) != len(images) or len(sites) != len(images):
        raise ValueError(
            f"images, labels and sites must have one row per image, got {len(images)}, "
            f"{len(labels)} and {len(sites)}"
        )
    if not isinstance(per_cell, int) or per_cell < 1:
        raise ValueError(f"per_cell must be an integer >= 1, got {per_cell!r}")
    num_sites, num_classes = len(site_names), len(class_names)
    if num_sites == 0 or num_classes == 0:
        raise ValueError("site_names and class_names must not be empty")
    has_class = (
        labels.astype(bool)
        if labels.ndim == 2
        else labels[:, None] == np.arange(num_classes)[None, :]
    )
    mpl = figures.load_matplotlib()
    panel = min(1.0, 9.0 / (num_classes * per_cell))
    fig = figures.new_figure(
        mpl, (panel * num_classes * per_cell + 1.6, panel * num_sites + 0.9)
    )
    grid = fig.add_gridspec(num_sites, num_classes * per_cell)
    for s, site in enumerate(site_names):
        for k, name in enumerate(class_names):
            chosen = np.flatnonzero((sites == s) & has_class[:, k])[:per_cell]
            for j in range(per_cell):
                ax = fig.add_subplot(grid[s, k * per_cell + j])
                if j < len(chosen):
                    figures.show_image(ax, images[chosen[j]], low, high)
                else:
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.text(0.5, 0.5, "none", ha="center", va="center", color="grey",
                            fontsize="x-small", transform=ax.transAxes)
                    for spine in ax.spines.values():
                        spine.set_color("lightgrey")
                if s == 0 and j == 0:
                    ax.set_title(name, fontsize="small", loc="left")
                if k == 0 and j == 0:
                    ax.set_ylabel(site, fontsize="small")
    fig.suptitle("Sample images per site (rows) and class (columns)", fontsize="medium")
    return figures.save(fig, path)


def attack_success_vs_rounds(path: str | os.PathLike, curves: Sequence[Mapping[str, Any]]) -> str:
    """Plots a poisoning attack's success rate against the training round, one line per setting.

    Args:
      path: where to write the PNG; missing parent folders are created.
      curves: dicts ``{"name": str, "rounds": [int], "values": [float in [0, 1]]}`` (the
        validation attack success after each evaluated round).

    Returns:
      ``path`` as a string.

    Examples:
      >>> import os, tempfile
      >>> curve = {"name": "backdoor (mean)", "rounds": [1, 2, 3], "values": [0.2, 0.7, 0.9]}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     out = os.path.join(tmp, "poisoning.png")
      ...     attack_success_vs_rounds(out, [curve]) == out
      True
    """
    path = os.fspath(path)
    checked = []
    for i, c in enumerate(_check_items(curves, "curves", ("name", "rounds", "values"))):
        rounds = np.asarray(c["rounds"], np.float64)
        values = np.asarray([math.nan if v is None else v for v in c["values"]], np.float64)
        if rounds.ndim != 1 or rounds.shape != values.shape:
            raise ValueError(f"curves[{i}]: 'rounds' and 'values' must be 1-D of one length")
        if np.any((values < 0) | (values > 1)):
            raise ValueError(f"curves[{i}]['values'] must lie in [0, 1]")
        checked.append((str(c["name"]), rounds, values))
    mpl = figures.load_matplotlib()
    fig = figures.new_figure(mpl, (6.4, 4.0))
    ax = fig.add_subplot()
    for i, (name, rounds, values) in enumerate(checked):
        ax.plot(rounds, values, marker="o", markersize=3, color=f"C{i % 10}", label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("round")
    ax.set_ylabel("attack success (validation)")
    ax.set_title("Poisoning: attack success against rounds")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return figures.save(fig, path)


def require_matplotlib() -> None:
    """Raises the install hint now, before hours of work that end in a plot."""
    figures.load_matplotlib()


def message_figure(path: str | os.PathLike, message: str) -> str:
    """A small PNG that only says ``message`` (a plot with nothing to show)."""
    mpl = figures.load_matplotlib()
    fig = figures.new_figure(mpl, (6.0, 1.5))
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize="large")
    return figures.save(fig, path)


def _check_items(items: Any, arg: str, keys: tuple[str, ...]) -> list[Mapping[str, Any]]:
    if isinstance(items, Mapping) or not isinstance(items, Sequence) or not items:
        raise ValueError(f"{arg} must be a non-empty list of dicts, got {items!r}")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"{arg}[{i}] must be a dict, got {type(item).__name__}")
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"{arg}[{i}] is missing {missing}; expected keys {list(keys)}")
    return list(items)


def _finite(value: Any, where: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return out


def _check_points(points: Any) -> list[dict[str, Any]]:
    out = []
    for i, p in enumerate(_check_items(points, "points", ("name", "epsilon", "value", "group"))):
        eps = p["epsilon"]
        if eps is not None:
            try:
                eps = float(eps)
            except (TypeError, ValueError):
                raise ValueError(
                    f"points[{i}]['epsilon']={eps!r} must be a number or None"
                ) from None
            if not eps > 0:  # also rejects NaN
                raise ValueError(f"points[{i}]['epsilon']={eps!r} must be > 0 (or None)")
            if math.isinf(eps):
                eps = None
        value = _finite(p["value"], f"points[{i}]['value']")
        out.append(
            {"name": str(p["name"]), "epsilon": eps, "value": value, "group": str(p["group"])}
        )
    return out


def _check_curves(curves: Any) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(_check_items(curves, "curves", ("name", "fpr", "tpr", "auc"))):
        fpr = np.asarray(c["fpr"], dtype=np.float64)
        tpr = np.asarray(c["tpr"], dtype=np.float64)
        if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size == 0:
            raise ValueError(
                f"curves[{i}]: 'fpr' and 'tpr' must be non-empty 1-D arrays of the same length, "
                f"got shapes {fpr.shape} and {tpr.shape}"
            )
        for key, rate in (("fpr", fpr), ("tpr", tpr)):
            if not np.all((rate >= 0) & (rate <= 1)):
                raise ValueError(f"curves[{i}]['{key}'] must lie in [0, 1]")
        auc = c["auc"]
        if auc is not None:
            auc = _finite(auc, f"curves[{i}]['auc']")
        out.append({"name": str(c["name"]), "fpr": fpr, "tpr": tpr, "auc": auc})
    return out


def _check_audit_rows(rows: Any) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(
        _check_items(rows, "rows", ("name", "accountant_epsilon", "audit_epsilon"))
    ):
        try:
            acc = float(r["accountant_epsilon"])
        except (TypeError, ValueError):
            acc = math.nan
        if not acc >= 0:
            raise ValueError(
                f"rows[{i}]['accountant_epsilon']={r['accountant_epsilon']!r} must be >= 0 or inf"
            )
        audit = _finite(r["audit_epsilon"], f"rows[{i}]['audit_epsilon']")
        if audit < 0:
            raise ValueError(f"rows[{i}]['audit_epsilon']={audit!r} must be >= 0")
        out.append({"name": str(r["name"]), "accountant_epsilon": acc, "audit_epsilon": audit})
    return out


def _check_value_range(value_range: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"{value_range=} must be a pair (low, high)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{value_range=} must be finite with low < high")
    return low, high


def _check_gallery_rows(rows: Any) -> list[dict[str, Any]]:
    keys = ("name", "originals", "reconstructions", "psnr")
    out = []
    for i, r in enumerate(_check_items(rows, "rows", keys)):
        originals = np.asarray(r["originals"], dtype=np.float64)
        if originals.ndim != 4 or originals.shape[0] == 0 or originals.shape[-1] not in (1, 3):
            raise ValueError(
                f"rows[{i}]['originals'] must have shape (B, H, W, C) with B >= 1 and C in (1, 3), "
                f"got {originals.shape}"
            )
        recon = r["reconstructions"]
        if recon is not None:
            recon = np.asarray(recon, dtype=np.float64)
            if recon.shape != originals.shape:
                raise ValueError(
                    f"rows[{i}]['reconstructions'] has shape {recon.shape}, expected the shape "
                    f"of 'originals' {originals.shape} (or None)"
                )
        psnr = r["psnr"]
        if psnr is not None:
            try:
                psnr = float(psnr)
            except (TypeError, ValueError):
                raise ValueError(f"rows[{i}]['psnr']={psnr!r} must be a number or None") from None
        out.append(
            {"name": str(r["name"]), "originals": originals, "reconstructions": recon, "psnr": psnr}
        )
    return out
