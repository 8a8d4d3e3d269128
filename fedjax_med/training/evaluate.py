"""Evaluation over padded fixed-size batches: overall, per-site and per-subgroup metrics."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fedjax_med.data import dataset as dataset_lib
from fedjax_med.data import pipeline, preprocess
from fedjax_med.models import losses
from fedjax_med.training import metrics


@functools.lru_cache(maxsize=32)
def make_predict_fn(apply_fn: Callable, task: str, out_sharding: Any = None) -> Callable:
    """Jitted ``(params, images, labels) -> (probabilities, per-example losses)``.

    ``out_sharding`` (e.g. replicated over a mesh) makes outputs readable on every host. One
    function per ``(apply_fn, task, out_sharding)``, so runs of the same model share its programs.
    """

    @functools.partial(jax.jit, out_shardings=out_sharding)
    def predict(params, images, labels):
        logits = apply_fn(params, images)
        return losses.probabilities(logits, task), losses.per_example_loss(logits, labels, task)

    return predict


def predict_dataset(
    predict_fn: Callable,
    params: Any,
    data: dataset_lib.ImageDataset,
    normalizer: preprocess.Normalizer,
    batch_size: int,
    place: Callable = lambda x: x,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and losses for every example, in order (padding dropped).

    ``place`` puts a host batch on devices (e.g. sharded over a mesh); the batch size must then
    suit it.
    """
    probs, example_losses = [], []
    for idx, mask in pipeline.padded_batches(len(data), batch_size):
        images, labels = pipeline.gather(data, idx, normalizer)
        p, loss = predict_fn(params, place(images), place(labels))
        probs.append(np.asarray(p)[mask])
        example_losses.append(np.asarray(loss)[mask])
    return np.concatenate(probs), np.concatenate(example_losses)


def evaluate(
    predict_fn: Callable,
    params: Any,
    data: dataset_lib.ImageDataset,
    info: dataset_lib.DatasetInfo,
    normalizer: preprocess.Normalizer,
    batch_size: int,
    place: Callable = lambda x: x,
) -> dict[str, Any]:
    """Metrics of ``params`` on ``data``.

    Returns ``{"metrics": {...}, "per_site": {site: {...}}, "per_subgroup": {attr: {value: {...}}},
    "site_summary": {...}}``; ``per_site`` holds only sites present in ``data``.
    """
    probs, example_losses = predict_dataset(predict_fn, params, data, normalizer, batch_size, place)
    overall = metrics.classification_metrics(probs, data.labels, info.task, losses=example_losses)
    per_site = metrics.grouped_metrics(
        probs, data.labels, info.task, data.sites, info.site_names, losses=example_losses
    )
    per_subgroup = {
        name: metrics.grouped_metrics(
            probs,
            data.labels,
            info.task,
            codes,
            info.subgroup_names[name],
            losses=example_losses,
        )
        for name, codes in data.subgroups.items()
    }
    primary = metrics.primary_metric(info.task)
    summary = metrics.summarize_groups(per_site, primary) if len(per_site) > 1 else {}
    return {
        "metrics": overall,
        "per_site": per_site,
        "per_subgroup": per_subgroup,
        "site_summary": summary,
    }


def prefixed(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``{"accuracy": .9}`` -> ``{"test_accuracy": .9}``.

    Examples:
      >>> prefixed({"accuracy": 0.9}, "test")
      {'test_accuracy': 0.9}
    """
    return {f"{prefix}_{k}": v for k, v in values.items()}
