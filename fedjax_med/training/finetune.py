"""Private fine-tuning: start from pretrained parameters and choose which of them train.

The medical setting of Berrada et al. 2023 ("Unlocking accuracy and fairness in differentially
private image classification", https://arxiv.org/abs/2308.10888): a model pretrained on public
data is fine-tuned with DP-SGD on each hospital's private images. ``model.init_from`` names the
pretrained parameters (a flax msgpack file, or a workdir of this library, read by the trainer);
:func:`merge_pretrained` copies every leaf whose path and shape match the new model and keeps the
fresh initialisation elsewhere (a head sized for another number of classes).

``train.trainable`` chooses what trains: ``all``; ``head`` (the last layer: the last top-level
module of the parameter tree, which flax orders by creation); ``head+norm`` (the head and every
normalisation layer, whose module name contains ``Norm``). Statistics set from the data before
training (the top-level module :data:`~fedjax_med.models.registry.DATA_STATS`) never train, under
any choice. :func:`frozen_loss_fn` stops the
gradient of the frozen leaves, so their per-example gradients are exactly zero: each example's
gradient norm, hence its clipping, covers only the trained parameters, and :func:`freeze`
routes the frozen leaves to ``optax.set_to_zero`` so neither noise nor updates reach them
(their values stay bit-identical).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import optax

from fedjax_med.models import registry

logger = logging.getLogger("fedjax_med")

PyTree = Any
TRAINABLE = ("all", "head", "head+norm")


def read_msgpack(path: str) -> PyTree:
    """The parameter tree stored in a flax msgpack file (``flax.serialization.msgpack_serialize``).

    Raises:
      ValueError: ``model.init_from=...`` naming a file that is missing or not flax msgpack.
    """
    try:
        with open(path, "rb") as f:
            tree = flax.serialization.msgpack_restore(f.read())
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"config field 'model.init_from'={path!r} must be a flax msgpack file of parameters "
            f"or a fedjax_med workdir ({type(err).__name__}: {err})"
        ) from None
    return tree.get("params", tree) if isinstance(tree, dict) else tree


def merge_pretrained(fresh: PyTree, pretrained: PyTree) -> PyTree:
    """``fresh`` with every leaf whose path and shape ``pretrained`` shares replaced by its value.

    Raises:
      ValueError: if no leaf matches (the file is for another architecture).
    """
    flat_fresh = flax.traverse_util.flatten_dict(fresh)
    flat_pre = flax.traverse_util.flatten_dict(pretrained)
    out, kept = {}, []
    for path, leaf in flat_fresh.items():
        source = flat_pre.get(path)
        if source is not None and np.shape(source) == np.shape(leaf):
            out[path] = jax.numpy.asarray(source, dtype=leaf.dtype)
        else:
            out[path], kept = leaf, [*kept, "/".join(path)]
    if len(kept) == len(flat_fresh):
        raise ValueError(
            "config field 'model.init_from': no parameter of the checkpoint matches the model "
            f"(model has {sorted('/'.join(p) for p in flat_fresh)[:4]}...)"
        )
    if kept:
        logger.info("fine-tuning: freshly initialised (not in the checkpoint): %s", kept)
    return flax.traverse_util.unflatten_dict(out)


def trainable_mask(params: PyTree, trainable: str) -> PyTree:
    """A bool per leaf of ``params``: whether it trains under ``train.trainable``.

    Raises:
      ValueError: ``train.trainable=... must be one of ('all', 'head', 'head+norm')``.

    Examples:
      >>> p = {"Conv_0": {"kernel": 0}, "GroupNorm_0": {"scale": 0}, "Dense_0": {"kernel": 0}}
      >>> trainable_mask(p, "head")
      {'Conv_0': {'kernel': False}, 'GroupNorm_0': {'scale': False}, 'Dense_0': {'kernel': True}}
      >>> trainable_mask(p, "head+norm")["GroupNorm_0"]
      {'scale': True}
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"train.trainable={trainable!r} must be one of {TRAINABLE}")
    head = list(params)[-1]
    flat = flax.traverse_util.flatten_dict(params)
    mask = {}
    for path in flat:
        trains = trainable == "all" or path[0] == head
        if trainable == "head+norm":
            trains = trains or any("Norm" in str(name) for name in path[:-1])
        mask[path] = trains and path[0] != registry.DATA_STATS
    return flax.traverse_util.unflatten_dict(mask)


def frozen_loss_fn(loss_fn: Callable, mask: PyTree) -> Callable:
    """``loss_fn`` with ``stop_gradient`` on every leaf whose ``mask`` is False."""

    def loss(params, inputs, labels):
        params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
        return loss_fn(params, inputs, labels)

    return loss


def freeze(optimizer: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
    """``optimizer`` on the trained leaves; ``set_to_zero`` on the frozen ones."""
    labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
