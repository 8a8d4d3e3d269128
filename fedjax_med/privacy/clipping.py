"""Clipping of per-example (or per-patient) gradients, and the sensitivity of their clipped sum.

DP-SGD (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133) replaces every per-example
gradient ``g_i`` by ``g_i * min(1, C / ||g_i||)`` and sums them; adding or removing one example then
moves the sum by at most ``C`` in L2 norm, the *sensitivity* that scales the Gaussian noise
(:mod:`fedjax_med.privacy.noise`). Variants implemented here:

* per-layer clipping (McMahan et al., ICLR 2018, https://arxiv.org/abs/1710.06963): each leaf
  ``l`` of the gradient is clipped to its own ``C_l`` with ``sqrt(sum_l C_l^2) = C``, so the
  whole gradient still has norm at most ``C``;
* unit-level (patient-level) clipping (McMahan et al. 2018; Levy et al., NeurIPS 2021,
  https://arxiv.org/abs/2102.11845): the gradients of all examples of one patient are summed and
  that sum is clipped, so adding or removing a whole patient moves the sum by at most ``C``;
* two ways of computing the clipped sum (``method``): ``"vmap"`` materialises every per-example
  gradient (:func:`fedjax_med.privacy.per_example.per_example_grads`, the reference), and
  ``"ghost"`` (:mod:`fedjax_med.privacy.ghost`) computes per-example gradient *norms* from layer
  inputs and output gradients (Goodfellow 2015, https://arxiv.org/abs/1510.01799) and forms the
  clipped sum as one reweighted gradient per layer, which equals the reference.

Everything returns *sums*: nothing here divides by a batch size, because the normalisation must
use the public expected batch size after noise has been added (see
:func:`fedjax_med.privacy.noise.dp_aggregate`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_med.privacy import ghost, per_example

PyTree = Any
LossFn = per_example.LossFn

# Added to norms before dividing, so that a zero gradient gets factor min(1, C / tiny) = 1
# instead of 0 / 0 = NaN. It can only shrink the factor, so clipped norms stay <= C.
_NORM_EPS = 1e-12

NEIGHBOURING_RELATIONS = ("add_or_remove_one", "replace_one")
LAYER_MODES = ("equal", "size")
METHODS = ("vmap", "ghost")


def _check_clip_norm(clip_norm: Any) -> None:
    if isinstance(clip_norm, (int, float)) and not clip_norm > 0:
        raise ValueError(f"{clip_norm=} must be > 0 (math.inf disables clipping)")


def global_norms(per_example_grads: PyTree) -> jax.Array:
    """L2 norm of every example's whole gradient.

    Args:
      per_example_grads: pytree whose leaves all have a leading batch dimension ``B``.

    Returns:
      ``(B,)`` float32 array, ``norms[i] = sqrt(sum_leaves sum(leaf[i] ** 2))``.

    Examples:
      >>> import jax.numpy as jnp
      >>> global_norms({"w": jnp.array([[3.0], [0.0]]), "b": jnp.array([4.0, 1.0])})
      Array([5., 1.], dtype=float32)
    """
    leaves = jax.tree.leaves(per_example_grads)
    if not leaves:
        raise ValueError("per_example_grads has no leaves")
    return jnp.sqrt(sum(_squared_norms(leaf) for leaf in leaves))


def _squared_norms(leaf: jax.Array) -> jax.Array:
    leaf = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
    return jnp.sum(jnp.square(leaf).reshape(leaf.shape[0], -1), axis=1)


def clip_factors(norms: jax.Array, clip_norm: float | jax.Array) -> jax.Array:
    """``min(1, C / (norm + tiny))``: the factor that brings a vector of norm ``norm`` to ``<= C``.

    Finite for ``norm == 0`` (factor 1) and for ``clip_norm == inf`` (factor 1, no clipping).
    """
    return jnp.minimum(1.0, clip_norm / (norms + _NORM_EPS))


def clip_per_example(grads: PyTree, clip_norm: float) -> tuple[PyTree, jax.Array]:
    """Scales every example's gradient to L2 norm at most ``clip_norm`` (Abadi et al. 2016).

    Args:
      grads: per-example gradients, leaves with a leading batch dimension ``B``.
      clip_norm: ``C > 0``; ``math.inf`` leaves the gradients unchanged.

    Returns:
      ``(clipped, norms)``: ``clipped[i] = grads[i] * min(1, C / ||grads[i]||)`` and the
      unclipped norms ``(B,)``.

    Guarantees:
      ``global_norms(clipped) <= C`` for every example (up to float rounding).

    Examples:
      >>> import jax.numpy as jnp
      >>> clipped, norms = clip_per_example(jnp.array([[3.0, 4.0], [0.0, 0.0]]), 1.0)
      >>> clipped.round(3), norms
      (Array([[0.6, 0.8],
             [0. , 0. ]], dtype=float32), Array([5., 0.], dtype=float32))
    """
    _check_clip_norm(clip_norm)
    norms = global_norms(grads)
    factors = clip_factors(norms, clip_norm)
    return jax.tree.map(lambda g: _scale_rows(g, factors), grads), norms


def _scale_rows(leaf: jax.Array, factors: jax.Array) -> jax.Array:
    return leaf * factors.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def per_layer_thresholds(params: PyTree, clip_norm: float, mode: str = "equal") -> PyTree:
    """Per-leaf clipping norms ``C_l`` with ``sqrt(sum_l C_l^2) = C`` (McMahan et al. 2018).

    Every leaf of ``params`` (a weight matrix, a bias, ...) is one "layer".

    Args:
      params: the parameters (only the tree structure and leaf sizes are used).
      clip_norm: the total clipping norm ``C``.
      mode: ``"equal"``: ``C_l = C / sqrt(L)`` for ``L`` leaves, the choice of McMahan et al.;
        ``"size"``: ``C_l = C * sqrt(d_l / d)`` with ``d_l`` the size of leaf ``l`` and ``d`` the
        total, so that larger layers get a larger share.

    Returns:
      A pytree of Python floats with the structure of ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> per_layer_thresholds({"a": jnp.zeros(3), "b": jnp.zeros(1)}, 2.0, mode="size")
      {'a': 1.7320508075688772, 'b': 1.0}
    """
    _check_clip_norm(clip_norm)
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
        raise ValueError("params has no leaves")
    if mode == "equal":
        thresholds = [clip_norm / math.sqrt(len(leaves))] * len(leaves)
    elif mode == "size":
        sizes = [math.prod(jnp.shape(leaf)) for leaf in leaves]
        thresholds = [clip_norm * math.sqrt(s / sum(sizes)) for s in sizes]
    else:
        raise ValueError(f"{mode=} must be one of {LAYER_MODES}")
    return jax.tree.unflatten(treedef, thresholds)


def clip_per_layer(grads: PyTree, thresholds: PyTree) -> tuple[PyTree, PyTree]:
    """Clips every leaf of every example's gradient to its own norm ``C_l``.

    Args:
      grads: per-example gradients, leaves with a leading batch dimension ``B``.
      thresholds: pytree of ``C_l`` with the structure of one example's gradient, e.g. from
        :func:`per_layer_thresholds`.

    Returns:
      ``(clipped, layer_norms)``: clipped gradients and, per leaf, the ``(B,)`` unclipped norms.

    Guarantees:
      Each clipped leaf has norm ``<= C_l``, so each example's whole clipped gradient has norm
      ``<= sqrt(sum_l C_l^2)``.
    """
    layer_norms = jax.tree.map(lambda g: jnp.sqrt(_squared_norms(g)), grads)
    clipped = jax.tree.map(
        lambda g, n, c: _scale_rows(g, clip_factors(n, c)), grads, layer_norms, thresholds
    )
    return clipped, layer_norms


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """L2 sensitivity of a sum of contributions each clipped to norm ``clip_norm``.

    Under add-or-remove-one neighbouring (one unit, an example or a patient, is present in one
    dataset and absent from the other) the clipped sum moves by at most ``C``; under replace-one
    neighbouring (one unit's data is swapped for another's) by at most ``2 C``. The noise standard
    deviation is ``noise_multiplier * sensitivity``, and the accountant must be told the same
    relation (:func:`fedjax_med.privacy.accounting.dpsgd_event`).
    """

    clip_norm: float
    unit: str = "example"

    def __post_init__(self):
        _check_clip_norm(self.clip_norm)

    def l2(self, relation: str = "add_or_remove_one") -> float:
        """The L2 sensitivity under ``relation`` (``"add_or_remove_one"`` or ``"replace_one"``)."""
        if relation == "add_or_remove_one":
            return float(self.clip_norm)
        if relation == "replace_one":
            return 2.0 * float(self.clip_norm)
        raise ValueError(f"{relation=} must be one of {NEIGHBOURING_RELATIONS}")


def sensitivity(
    clip_norm: float, unit: str = "example", relation: str = "add_or_remove_one"
) -> float:
    """L2 sensitivity of a clipped sum: ``C`` (add/remove one unit) or ``2 C`` (replace one).

    Examples:
      >>> sensitivity(1.5), sensitivity(1.5, relation="replace_one")
      (1.5, 3.0)
    """
    return Sensitivity(clip_norm, unit).l2(relation)


@dataclasses.dataclass(frozen=True)
class ClippedGradSum:
    """A function returning a sum of clipped contributions, together with its sensitivity.

    Call it as documented by the builder that made it (:func:`clipped_grad_sum` or
    :func:`clipped_unit_grad_sum`); it is a pure function of its arguments and can be jitted.
    """

    fn: Callable[..., tuple[PyTree, dict[str, jax.Array]]]
    clip_norm: float
    unit: str

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def sensitivity(self, relation: str = "add_or_remove_one") -> float:
        """L2 sensitivity of the returned sum under ``relation`` (see :class:`Sensitivity`)."""
        return Sensitivity(self.clip_norm, self.unit).l2(relation)


def clipped_grad_sum(
    loss_fn: LossFn,
    *,
    clip_norm: float,
    per_layer: bool = False,
    layer_mode: str = "equal",
    microbatch_size: int | None = None,
    method: str = "vmap",
) -> ClippedGradSum:
    """Builds ``fn(params, inputs, labels, mask)``: the sum of clipped per-example gradients.

    ``fn`` returns ``(sum_i mask_i * clip(grad loss_fn(params, inputs[i], labels[i])), aux)``
    where ``clip`` scales to norm at most ``C`` (Abadi et al. 2016), or each leaf to ``C_l`` when
    ``per_layer`` (McMahan et al. 2018). Padded examples (``mask`` False) contribute exactly zero,
    even if their loss is not finite. ``aux`` holds int32 ``"count"`` (number of real examples),
    int32 ``"num_clipped"`` (real examples whose gradient was scaled down: norm ``> C``, or any
    leaf norm ``> C_l``) and float32 ``"mean_grad_norm"`` (mean unclipped norm over real
    examples, 0 when there are none). ``mask=None`` means every example is real.

    Args:
      loss_fn: loss of one example, ``loss_fn(params, example_input, example_label) -> scalar``.
      clip_norm: ``C > 0``; ``math.inf`` disables clipping (then the result is the plain gradient
        sum, and the sum has no bounded sensitivity).
      per_layer: clip every leaf to its own threshold from :func:`per_layer_thresholds`.
      layer_mode: ``mode`` for :func:`per_layer_thresholds`.
      microbatch_size: if set, the batch is processed in chunks of this many examples with
        ``lax.scan`` (the batch is padded with masked examples to a multiple), bounding the
        memory for per-example quantities; the result equals the one-shot computation up to
        float summation order.
      method: ``"vmap"`` (reference: materialise every per-example gradient) or ``"ghost"``
        (per-example norms from layer activations, then one reweighted gradient per layer; see
        :mod:`fedjax_med.privacy.ghost` for what it supports; it falls back to per-example
        gradients for parameters it cannot handle).

    Returns:
      A :class:`ClippedGradSum`; its ``sensitivity()`` is ``C`` (add or remove one example).

    Guarantees:
      Each real example's contribution to the sum has L2 norm ``<= C`` (up to float rounding),
      so adding or removing one example changes the sum by at most ``C``.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss = lambda w, x, y: 0.5 * (jnp.dot(w, x) - y) ** 2
      >>> fn = clipped_grad_sum(loss, clip_norm=1.0)
      >>> total, aux = fn(jnp.zeros(2), jnp.array([[3.0, 0.0], [0.0, 1.0]]),
      ...                 jnp.array([1.0, 0.5]), jnp.array([True, True]))
      >>> total, int(aux["num_clipped"]), int(aux["count"])
      (Array([-1. , -0.5], dtype=float32), 1, 2)
    """
    _check_clip_norm(clip_norm)
    _check_microbatch_size(microbatch_size)
    if layer_mode not in LAYER_MODES:
        raise ValueError(f"{layer_mode=} must be one of {LAYER_MODES}")
    if method == "vmap":
        grad_fn = per_example.per_example_grads(loss_fn)

        def chunk_fn(params, inputs, labels, mask):
            grads = grad_fn(params, inputs, labels)
            return _clip_and_sum(grads, params, mask, clip_norm, per_layer, layer_mode)

    elif method == "ghost":
        ghost_fn = ghost.ghost_clipped_sum(loss_fn)

        def chunk_fn(params, inputs, labels, mask):
            thresholds = (
                per_layer_thresholds(params, clip_norm, layer_mode) if per_layer else clip_norm
            )
            total, norms, clipped = ghost_fn(params, inputs, labels, mask, thresholds)
            return total, _stats(norms, clipped, mask)

    else:
        raise ValueError(f"{method=} must be one of {METHODS}")

    def fn(params, inputs, labels, mask=None):
        mask = _default_mask(inputs, mask)
        total, stats = _microbatched(chunk_fn, params, inputs, labels, mask, microbatch_size)
        return total, _finish_stats(stats)

    return ClippedGradSum(fn=fn, clip_norm=clip_norm, unit="example")


def _check_microbatch_size(microbatch_size: int | None) -> None:
    if microbatch_size is not None and not (
        isinstance(microbatch_size, int) and microbatch_size >= 1
    ):
        raise ValueError(f"{microbatch_size=} must be None or an integer >= 1")


def _default_mask(inputs: PyTree, mask: jax.Array | None) -> jax.Array:
    batch = jax.tree.leaves(inputs)[0].shape[0]
    if mask is None:
        return jnp.ones((batch,), bool)
    mask = jnp.asarray(mask)
    if mask.shape != (batch,):
        raise ValueError(f"mask.shape={mask.shape} must be (batch,) = ({batch},)")
    return mask.astype(bool)


def _zero_masked(leaf: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, 0)


def _weighted_sum(leaf: jax.Array, weights: jax.Array) -> jax.Array:
    # float32 weights (not rounded to a low-precision leaf dtype, which could exceed C).
    return jnp.tensordot(weights.astype(jnp.float32), leaf, axes=1).astype(leaf.dtype)


def _clip_and_sum(grads, params, mask, clip_norm, per_layer, layer_mode):
    """Clips materialised per-example gradients and sums the real ones."""
    # where(), not a multiplication by 0: a padded example's gradient may be NaN.
    grads = jax.tree.map(lambda g: _zero_masked(g, mask), grads)
    if per_layer:
        thresholds = per_layer_thresholds(params, clip_norm, layer_mode)
        layer_norms = jax.tree.map(lambda g: jnp.sqrt(_squared_norms(g)), grads)
        total = jax.tree.map(
            lambda g, n, c: _weighted_sum(g, clip_factors(n, c)), grads, layer_norms, thresholds
        )
        flags = jax.tree.leaves(jax.tree.map(lambda n, c: n > c, layer_norms, thresholds))
        clipped = jnp.any(jnp.stack(flags), axis=0)
        norms = jnp.sqrt(sum(jnp.square(n) for n in jax.tree.leaves(layer_norms)))
    else:
        norms = global_norms(grads)
        factors = clip_factors(norms, clip_norm)
        total = jax.tree.map(lambda g: _weighted_sum(g, factors), grads)
        clipped = norms > clip_norm
    return total, _stats(norms, clipped, mask)


def _stats(norms, clipped, mask):
    return {
        "count": jnp.sum(mask, dtype=jnp.int32),
        "num_clipped": jnp.sum(clipped & mask, dtype=jnp.int32),
        "norm_sum": jnp.sum(jnp.where(mask, norms, 0.0), dtype=jnp.float32),
    }


def _finish_stats(stats):
    count = stats["count"]
    return {
        "count": count,
        "num_clipped": stats["num_clipped"],
        "mean_grad_norm": stats["norm_sum"] / jnp.maximum(count, 1).astype(jnp.float32),
    }


def _microbatched(chunk_fn, params, inputs, labels, mask, microbatch_size):
    """Applies ``chunk_fn`` to chunks of the batch with ``lax.scan`` and adds up its outputs."""
    batch = mask.shape[0]
    if microbatch_size is None or microbatch_size >= batch:
        return chunk_fn(params, inputs, labels, mask)
    num_chunks = -(-batch // microbatch_size)
    pad = num_chunks * microbatch_size - batch

    def chunked(x):
        # Padding slots copy example 0 so that the loss stays finite; the mask hides them.
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
        return x.reshape((num_chunks, microbatch_size) + x.shape[1:])

    xs = jax.tree.map(chunked, (inputs, labels))
    masks = chunked(mask)
    if pad:
        masks = masks.at[-1, microbatch_size - pad :].set(False)
    init = jax.eval_shape(chunk_fn, params, *jax.tree.map(lambda x: x[0], xs), masks[0])
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init)

    def body(carry, chunk):
        (x, y), m = chunk
        out = chunk_fn(params, x, y, m)
        return jax.tree.map(jnp.add, carry, out), None

    total, _ = jax.lax.scan(body, init, (xs, masks))
    return total


def clipped_unit_grad_sum(
    loss_fn: LossFn,
    *,
    clip_norm: float,
    unit: str = "patient",
    microbatch_size: int | None = None,
) -> ClippedGradSum:
    """Builds ``fn(params, inputs, labels, mask, unit_slot, num_unit_slots)`` for unit-level DP.

    Unit-level (e.g. patient-level) DP-SGD (McMahan et al. 2018; Levy et al. 2021): the gradients
    of the real examples of each unit are summed, ``G_u = sum_{i: unit_slot[i] = u} g_i``, each
    ``G_u`` is clipped to norm ``C``, and the clipped ``G_u`` are summed. ``aux`` holds int32
    ``"count"`` (units with at least one real example), ``"num_examples"``, ``"num_clipped"``
    (units with ``||G_u|| > C``) and float32 ``"mean_grad_norm"`` (mean ``||G_u||`` over units).

    Args:
      loss_fn: loss of one example, ``loss_fn(params, example_input, example_label) -> scalar``.
      clip_norm: ``C > 0`` for every unit's summed gradient.
      unit: name of the unit of privacy, reported by ``sensitivity`` users.
      microbatch_size: process examples in chunks of this size (the ``(num_unit_slots, ...)``
        unit sums are accumulated across chunks, then clipped once).

    Per-example gradients are materialised (the ``"vmap"`` method of :func:`clipped_grad_sum`).

    Returns:
      A :class:`ClippedGradSum`, called with ``mask`` ``(B,)`` bool, ``unit_slot`` ``(B,)`` int in
      ``[0, num_unit_slots)`` (the slot of each example's unit within this batch, from
      :class:`fedjax_med.privacy.sampling.PoissonUnitSampler`) and ``num_unit_slots`` a Python
      int (static under ``jax.jit``: pass it with ``static_argnums=5``).

    Guarantees:
      Each unit's contribution has L2 norm ``<= C``, however many examples it has, so adding or
      removing one unit changes the sum by at most ``C`` -- provided every unit's examples are in
      one call (a unit split across two calls would be clipped twice).
    """
    _check_clip_norm(clip_norm)
    _check_microbatch_size(microbatch_size)
    grad_fn = per_example.per_example_grads(loss_fn)

    def fn(params, inputs, labels, mask, unit_slot, num_unit_slots):
        if not isinstance(num_unit_slots, int) or num_unit_slots < 1:
            raise ValueError(f"{num_unit_slots=} must be a Python int >= 1 (static under jit)")
        mask = _default_mask(inputs, mask)
        unit_slot = jnp.asarray(unit_slot, jnp.int32)

        def chunk_fn(params, chunk_inputs, chunk_labels, chunk):
            chunk_mask, slots = chunk[0], chunk[1]
            grads = grad_fn(params, chunk_inputs, chunk_labels)
            grads = jax.tree.map(lambda g: _zero_masked(g, chunk_mask), grads)
            unit_sums = jax.tree.map(
                lambda g: jax.ops.segment_sum(g, slots, num_segments=num_unit_slots), grads
            )
            present = jax.ops.segment_max(
                chunk_mask.astype(jnp.int32), slots, num_segments=num_unit_slots
            )
            return unit_sums, jnp.maximum(present, 0)

        # The scan carries (sum, present) per slot, so the mask and slots travel as one array.
        packed = jnp.stack([mask.astype(jnp.int32), unit_slot], axis=1)
        unit_sums, present = _microbatched(
            lambda p, x, y, c: chunk_fn(p, x, y, (c[:, 0].astype(bool), c[:, 1])),
            params,
            inputs,
            labels,
            packed,
            microbatch_size,
        )
        present = present > 0
        norms = global_norms(unit_sums)
        factors = jnp.where(present, clip_factors(norms, clip_norm), 0.0)
        total = jax.tree.map(lambda g: _weighted_sum(g, factors), unit_sums)
        stats = _finish_stats(_stats(norms, norms > clip_norm, present))
        stats["num_examples"] = jnp.sum(mask, dtype=jnp.int32)
        return total, stats

    return ClippedGradSum(fn=fn, clip_norm=clip_norm, unit=unit)
