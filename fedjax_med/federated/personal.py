"""Per-site models: which parameters stay at a site, and the per-site store of a simulation.

Two ways for a site to keep a model of its own beside the federation's global one:

* FedBN (Li, Jiang, Zhang, Kamp, Dou, ICLR 2021, "FedBN: Federated Learning on Non-IID Features
  via Local Batch Normalization", https://arxiv.org/abs/2102.07623): the parameters ``theta``
  split into shared ones ``theta_s`` and the normalisation layers' ``theta_l``. Site ``k``
  trains ``(theta_s, theta_l^k)`` from the global ``theta_s`` and its own ``theta_l^k``, and
  submits only ``Delta theta_s``; the server averages the shared deltas, and ``theta_l^k``
  never leaves site ``k``. Our models normalise with GroupNorm (no running statistics), so
  ``theta_l`` is every GroupNorm's ``scale`` and ``bias`` (:func:`is_norm_param`).
* Ditto (Li, Hu, Beirami, Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning Through
  Personalization", https://arxiv.org/abs/2012.04989, Algorithm 1): the global model ``w`` is
  trained by FedAvg; site ``k`` also keeps a personal model ``v_k``, updated by local steps
  ``v_k <- v_k - eta (grad f_k(v_k) + lambda (v_k - w^t))`` on
  ``f_k(v) + (lambda / 2) ||v - w^t||^2``; only the global model's delta is sent.

A :class:`ParamSplit` names the local leaves by a predicate over the flax parameter path (the
tuple of dict keys, e.g. ``("stage0_block0", "GroupNorm_0", "scale")``). In the simulation the
sites' own parameters are stacked ``(N, ...)`` in ``ServerState.site_params``, as SCAFFOLD's
client control variates are: the round writes each site's row from what the site kept
(:func:`scatter_rows`) and never reads them into an aggregate. In a deployment they stay on the
site's disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

Params = Any
# is_local(path) -> bool for the tuple of keys leading to a parameter leaf.
LocalPredicate = Callable[[tuple[str, ...]], bool]

NORM_PARAM_NAMES = ("scale", "bias")


def is_norm_param(path: tuple[str, ...]) -> bool:
    """Whether ``path`` is a normalisation layer's ``scale`` or ``bias`` (FedBN's local leaves).

    True when the leaf is named ``scale`` or ``bias`` and some module on its path has ``norm``
    in its name, case-insensitive: flax's ``GroupNorm_0`` / ``LayerNorm_1`` and named layers
    such as ``final_norm``. A convolution's or dense layer's ``bias`` is shared.

    Examples:
      >>> is_norm_param(("stage0_block0", "GroupNorm_1", "scale"))
      True
      >>> is_norm_param(("final_norm", "bias")), is_norm_param(("Dense_0", "bias"))
      (True, False)
    """
    *modules, leaf = path
    return leaf in NORM_PARAM_NAMES and any("norm" in str(m).lower() for m in modules)


@dataclasses.dataclass(frozen=True)
class ParamSplit:
    """The shared and the site-local leaves of a nested-dict parameter tree.

    ``shared(params)`` and ``local(params)`` are the sub-dicts of the leaves whose path
    ``is_local`` rejects and accepts; ``merge(shared, local)`` puts them back together. With
    ``is_local=None`` every leaf is shared and ``shared`` is the identity (any pytree).

    Examples:
      >>> split = ParamSplit(is_norm_param)
      >>> params = {"Conv_0": {"kernel": 1.0}, "GroupNorm_0": {"scale": 2.0, "bias": 3.0}}
      >>> split.shared(params), split.local(params)
      ({'Conv_0': {'kernel': 1.0}}, {'GroupNorm_0': {'bias': 3.0, 'scale': 2.0}})
      >>> split.merge(split.shared(params), split.local(params)) == params
      True
    """

    is_local: LocalPredicate | None = None

    @property
    def keeps_local(self) -> bool:
        """Whether some leaves stay at the site (a predicate is set)."""
        return self.is_local is not None

    def _part(self, params: Params, local: bool) -> Params:
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {k: v for k, v in sorted(flat.items()) if bool(self.is_local(k)) == local}
        )

    def shared(self, params: Params) -> Params:
        """The shared leaves (all of ``params`` without a predicate)."""
        return params if self.is_local is None else self._part(params, False)

    def local(self, params: Params) -> Params:
        """The site-local leaves (``{}`` without a predicate)."""
        return {} if self.is_local is None else self._part(params, True)

    def merge(self, shared: Params, local: Params) -> Params:
        """The full tree from its shared and local parts."""
        if self.is_local is None:
            return shared
        flat = {**traverse_util.flatten_dict(shared), **traverse_util.flatten_dict(local)}
        return traverse_util.unflatten_dict(dict(sorted(flat.items())))


ALL_SHARED = ParamSplit()
NORM_LOCAL = ParamSplit(is_norm_param)


def stack(tree: Params, num_sites: int) -> Params:
    """``num_sites`` copies of every leaf along a new leading axis: the ``(N, ...)`` store."""
    return jax.tree.map(lambda p: jnp.repeat(jnp.asarray(p)[None], num_sites, axis=0), tree)


def row(stacked: Params, k: Any) -> Params:
    """Site ``k``'s entry of a stacked ``(N, ...)`` store (``k`` an int or an index array)."""
    return jax.tree.map(lambda s: s[k], stacked)


def scatter_rows(stored: Params, indices: jax.Array, new: Params, kept: jax.Array) -> Params:
    """``stored`` with row ``indices[i]`` replaced by ``new``'s row ``i`` where ``kept[i]``.

    Slots that are not kept (padding, dropped or excluded clients) write nothing, even when a
    padding slot repeats a real client's index.

    Examples:
      >>> stored = jnp.zeros((3, 1))
      >>> scatter_rows(stored, jnp.array([2, 0]), jnp.ones((2, 1)), jnp.array([True, False]))[:, 0]
      Array([0., 0., 1.], dtype=float32)
    """

    def scatter(s, n):
        target = jnp.where(kept, indices, s.shape[0])  # out of range: dropped
        return s.at[target].set(n.astype(s.dtype), mode="drop")

    return jax.tree.map(scatter, stored, new)
