"""Human-readable summaries of a dataset: split sizes, sites, patients, class prevalence."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_med.data import dataset as dataset_lib


def class_counts(labels: np.ndarray, task: str, num_classes: int) -> list[int]:
    if task == "multilabel":
        return labels.sum(axis=0).astype(int).tolist()
    return np.bincount(labels, minlength=2 if task == "binary" else num_classes).tolist()


def summarize(splits: dataset_lib.DatasetSplits) -> dict[str, Any]:
    """A JSON-friendly summary of every split, overall and per site."""
    info = splits.info
    summary: dict[str, Any] = {
        "name": info.name,
        "task": info.task,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "image_shape": list(info.image_shape),
        "subgroups": {k: list(v) for k, v in info.subgroup_names.items()},
        "splits": {},
    }
    for name in ("train", "val", "test"):
        data = splits.split(name)
        sites = {}
        for s, site in enumerate(info.site_names):
            idx = np.flatnonzero(data.sites == s)
            sites[site] = {
                "examples": int(idx.size),
                "patients": int(np.unique(data.patient_ids[idx]).size),
                "class_counts": class_counts(data.labels[idx], info.task, info.num_classes),
            }
        summary["splits"][name] = {
            "examples": len(data),
            "patients": int(np.unique(data.patient_ids).size),
            "class_counts": class_counts(data.labels, info.task, info.num_classes),
            "sites": sites,
        }
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as an aligned text table (one row per split and site)."""
    shape = "x".join(map(str, summary["image_shape"]))
    lines = [
        f"dataset {summary['name']}: task {summary['task']}, {summary['num_classes']} classes "
        f"({', '.join(summary['class_names'])}), images {shape}",
    ]
    if summary["subgroups"]:
        groups = "; ".join(f"{k}: {', '.join(v)}" for k, v in summary["subgroups"].items())
        lines.append(f"subgroups: {groups}")
    header = f"{'split':<6} {'site':<20} {'examples':>9} {'patients':>9}  class counts"
    lines += [header, "-" * len(header)]
    for split, s in summary["splits"].items():
        lines.append(
            f"{split:<6} {'(all)':<20} {s['examples']:>9} {s['patients']:>9}  {s['class_counts']}"
        )
        for site, row in s["sites"].items():
            lines.append(
                f"{'':<6} {site:<20} {row['examples']:>9} {row['patients']:>9}  "
                f"{row['class_counts']}"
            )
    return "\n".join(lines)
