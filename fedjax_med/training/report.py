"""The ``report.json`` of a run: a stable, documented schema that later stages extend.

Top-level keys (see the README for the full schema):

* ``metrics``: final test metrics with plain keys (``test_accuracy``, ``test_auroc``,
  ``test_balanced_accuracy``, ``test_ece``, ``test_loss``, ``test_num_examples``, ...);
* ``val_metrics``: the same on the validation split (``val_*``);
* ``per_site``: site name -> the ``test_*`` keys, for every site in the test split;
* ``per_subgroup``: attribute -> value -> the ``test_*`` keys (e.g. ``sex`` -> ``female``);
* ``site_summary``: ``worst_accuracy``, ``mean_accuracy``, ``spread_accuracy`` over sites;
* ``wall_time_s``, ``train_time_s``, ``examples_per_second``, ``steps``, ``num_params``;
* ``dataset``: name, task, classes, image shape, sites and split sizes;
* ``devices``: platform and count; ``config``: the resolved config; ``versions``: packages.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
from typing import Any

import jax
import ml_collections

from fedjax_med.config import loading
from fedjax_med.data import dataset as dataset_lib
from fedjax_med.training import evaluate

SCHEMA_VERSION = 1
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "dp-accounting", "fedjax_med")


def versions() -> dict[str, str]:
    """Python and package versions of this run."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name.replace("-", "_")] = "not installed"
    return found


def json_safe(value: Any) -> Any:
    """NaN/inf (e.g. AUROC of a one-class site) become None so the file is strict JSON.

    Dicts, lists and tuples are converted recursively (tuples become lists).

    Examples:
      >>> json_safe({"auroc": float("nan"), "accuracy": [0.5, float("inf")]})
      {'auroc': None, 'accuracy': [0.5, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def build_report(
    *,
    config: ml_collections.ConfigDict,
    info: dataset_lib.DatasetInfo,
    test: dict[str, Any],
    val: dict[str, Any],
    steps: int,
    num_params: int,
    elapsed: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` dict of a run (keys in the module docstring), NaN/inf as ``None``.

    Args:
      config: the run's resolved config (stored under ``config``).
      info: the dataset's description (``dataset``).
      test: :func:`~fedjax_med.training.evaluate.evaluate` on the test split.
      val: the same on the validation split.
      steps: steps (central) or rounds (federated) trained.
      num_params: the model's parameter count.
      elapsed: ``wall_time_s``, ``train_time_s`` and ``examples_seen``.
      extra: top-level entries added last (e.g. ``privacy``, ``federated``).

    Returns:
      The report, ready for :func:`~fedjax_med.training.checkpoint.write_json_atomic`.
    """
    train_time = elapsed["train_time_s"]
    report = {
        "schema_version": SCHEMA_VERSION,
        "metrics": evaluate.prefixed(test["metrics"], "test"),
        "val_metrics": evaluate.prefixed(val["metrics"], "val"),
        "per_site": {k: evaluate.prefixed(v, "test") for k, v in test["per_site"].items()},
        "per_subgroup": {
            attr: {k: evaluate.prefixed(v, "test") for k, v in groups.items()}
            for attr, groups in test["per_subgroup"].items()
        },
        "site_summary": test["site_summary"],
        "wall_time_s": elapsed["wall_time_s"],
        "train_time_s": train_time,
        "examples_per_second": elapsed["examples_seen"] / train_time if train_time else None,
        "steps": steps,
        "num_params": num_params,
        "dataset": {
            "name": info.name,
            "task": info.task,
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            "image_shape": list(info.image_shape),
            "site_names": list(info.site_names),
        },
        "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count()},
        "config": loading.to_json_dict(config),
        "versions": versions(),
    }
    report.update(extra or {})
    return json_safe(report)
