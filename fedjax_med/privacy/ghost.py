"""Sum of clipped per-example gradients without materialising them ("ghost" clipping).

For a weight ``W`` used in one linear operation ``z = op(a, W)`` (a dense ``dot_general`` or a
convolution), example ``i``'s gradient is ``G_i = a_i^T D_i`` with ``a_i`` the layer input and
``D_i = dL_i / dz_i`` the output gradient (for a convolution, ``a_i`` are the unfolded input
patches). Hence

* the per-example norm ``||G_i||_F^2`` is ``||a_i^T D_i||^2`` or, cheaper when the layer has few
  output positions, ``sum((a_i a_i^T) * (D_i D_i^T))`` (Goodfellow 2015,
  https://arxiv.org/abs/1510.01799; Li et al. 2022, https://arxiv.org/abs/2110.05679), and
* the clipped sum ``sum_i w_i G_i`` with ``w_i = min(1, C / ||g_i||)`` is the gradient of ``op``
  with respect to ``W`` at the batch of inputs, for the reweighted output gradients ``w_i D_i``
  -- one ordinary batched weight-gradient per layer (Bu et al. 2022,
  https://arxiv.org/abs/2210.00038).

The layers are found without any help from the model: the single-example loss is traced to a
jaxpr, every ``dot_general`` / ``conv_general_dilated`` (groups of 1) one of whose operands is a
parameter leaf used nowhere else is *tapped* (a zero is added to its output so that the gradient
with respect to that zero is ``D_i``, and its other operand ``a_i`` is recorded), and the jaxpr is
re-evaluated with the taps. One vmapped backward pass then yields all ``D_i`` plus ordinary
per-example gradients of the remaining ("other") parameters such as biases and normalisation
scales; a weight that goes through any other operation first (a cast, a reshape, a second use)
is an "other" parameter too, correct but without the speed-up. The weighted sum for the other
parameters is formed directly from their per-example gradients.

Speed: on the small tanh CNN (two convs, two dense layers, 28x28 images, batch 256) on a 2-core
CPU, a DP-SGD step with this method ran at 0.56-0.69x the speed of a non-private step, against
0.33x with ``"vmap"`` (``benchmarks/RESULTS.md``, 2026-12-04). Its 1-channel stem runs in
space-to-depth form (:class:`fedjax_med.models.layers.Conv`), whose re-laid-out kernel makes it
an "other" parameter here: its small per-example gradients are cheaper than unfolding 64 input
patches per output position.

Norms are computed at ``Precision.HIGHEST`` because they, not the summed gradients, bound each
example's contribution. The result equals ``clipped_grad_sum(..., method="vmap")`` up to float
rounding (tested).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

PyTree = Any

_NORM_EPS = 1e-12
_HIGHEST = lax.Precision.HIGHEST
# Call primitives whose bodies are evaluated inline when they contain a tapped layer.
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "checkpoint": "jaxpr"}


class _Tap(NamedTuple):
    path: tuple[int, ...]  # eqn indices from the top-level jaxpr through inlined calls
    leaf: int  # index of the weight among the flattened params
    weight_operand: int  # 0 or 1: which operand of the eqn is the weight
    primitive: Any
    params: dict[str, Any]
    out_aval: Any


def _sub_jaxpr(eqn):
    name = _INLINE.get(eqn.primitive.name)
    if name is None or name not in eqn.params:
        return None
    sub = eqn.params[name]
    if isinstance(sub, jex_core.ClosedJaxpr):
        return sub.jaxpr, sub.consts
    return sub, ()


def _tappable(eqn, operand: int) -> bool:
    name = eqn.primitive.name
    if name == "dot_general":
        return True
    if name == "conv_general_dilated":
        return (
            operand == 1
            and eqn.params["feature_group_count"] == 1
            and eqn.params["batch_group_count"] == 1
        )
    return False


def _find_taps(jaxpr, num_leaves: int) -> list[_Tap]:
    """Weight leaves used exactly once, as an operand of a tappable eqn."""
    uses: dict[int, list[_Tap | None]] = {leaf: [] for leaf in range(num_leaves)}

    def walk(jaxpr, origin, path):
        for index, eqn in enumerate(jaxpr.eqns):
            leaves = [origin.get(v) if isinstance(v, jex_core.Var) else None for v in eqn.invars]
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                inner = {
                    v: leaf
                    for v, leaf in zip(sub[0].invars, leaves, strict=True)
                    if leaf is not None
                }
                walk(sub[0], inner, path + (index,))
                continue
            used = [(pos, leaf) for pos, leaf in enumerate(leaves) if leaf is not None]
            for pos, leaf in used:
                tap = None
                if len(used) == 1 and len(eqn.invars) == 2 and _tappable(eqn, pos):
                    out_aval = eqn.outvars[0].aval
                    tap = _Tap(path + (index,), leaf, pos, eqn.primitive, eqn.params, out_aval)
                uses[leaf].append(tap)
        for v in jaxpr.outvars:
            if isinstance(v, jex_core.Var) and origin.get(v) is not None:
                uses[origin[v]].append(None)

    walk(jaxpr, {v: leaf for leaf, v in enumerate(jaxpr.invars[:num_leaves])}, ())
    return [found[0] for found in uses.values() if len(found) == 1 and found[0] is not None]


def _evaluate(jaxpr, consts, args, taps_by_path, tap_values, activations, path=()):
    """Evaluates ``jaxpr``, adding ``tap_values[k]`` to tapped outputs and recording inputs."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, value in zip(jaxpr.constvars, consts, strict=True):
        env[v] = value
    for v, value in zip(jaxpr.invars, args, strict=True):
        env[v] = value
    for index, eqn in enumerate(jaxpr.eqns):
        here = path + (index,)
        invals = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None and any(p[: len(here)] == here for p in taps_by_path):
            outs = _evaluate(sub[0], sub[1], invals, taps_by_path, tap_values, activations, here)
        else:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
            if here in taps_by_path:
                k, tap = taps_by_path[here]
                activations[k] = invals[1 - tap.weight_operand]
                outs = [outs[0] + tap_values[k]]
        for v, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jex_core.DropVar):
                env[v] = value
    return [read(v) for v in jaxpr.outvars]


def _apply(tap: _Tap, activation, weight):
    operands = (activation, weight) if tap.weight_operand == 1 else (weight, activation)
    return tap.primitive.bind(*operands, **tap.primitive.get_bind_params(tap.params))


def _frobenius_sq(a: jax.Array, d: jax.Array) -> jax.Array:
    """``||a^T d||_F^2`` for ``a`` ``(T, K)`` and ``d`` ``(T, O)``, by the cheaper formula."""
    positions, k = a.shape
    o = d.shape[1]
    if positions * positions * (k + o) < positions * k * o:
        gram_a = jnp.matmul(a, a.T, precision=_HIGHEST)
        gram_d = jnp.matmul(d, d.T, precision=_HIGHEST)
        return jnp.sum(gram_a * gram_d)
    return jnp.sum(jnp.square(jnp.matmul(a.T, d, precision=_HIGHEST)))


def _patches(tap: _Tap, weight, a) -> jax.Array:
    """The conv's input patches, laid out as its output with the feature axis last.

    ``patches[n, s..., :]`` holds every input value that output position ``s`` of image ``n``
    sees (in some fixed order). Built from strided slices, one per filter offset, which is much
    cheaper than ``lax.conv_general_dilated_patches`` (a convolution with an identity kernel);
    that function is used only for transposed convolutions (``lhs_dilation != 1``).
    """
    params = tap.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    filter_shape = [weight.shape[dim] for dim in rhs_spec[2:]]
    if any(dilation != 1 for dilation in params["lhs_dilation"]):
        patches = lax.conv_general_dilated_patches(
            a,
            filter_shape=filter_shape,
            window_strides=params["window_strides"],
            padding=params["padding"],
            lhs_dilation=params["lhs_dilation"],
            rhs_dilation=params["rhs_dilation"],
            dimension_numbers=params["dimension_numbers"],
            precision=_HIGHEST,
        )
        patches = jnp.transpose(patches, (out_spec[0], *out_spec[2:], out_spec[1]))
        return patches
    # Canonical layout (N, spatial..., C), then the conv's padding.
    a = jnp.transpose(a, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in params["padding"]] + [(0, 0, 0)]
    a = lax.pad(a, jnp.zeros((), a.dtype), config)
    out_shape = [tap.out_aval.shape[dim] for dim in out_spec[2:]]
    slices = []
    for offset in itertools.product(*(range(k) for k in filter_shape)):
        start = [o * r for o, r in zip(offset, params["rhs_dilation"], strict=True)]
        limit = [
            s + (n - 1) * stride + 1
            for s, n, stride in zip(start, out_shape, params["window_strides"], strict=True)
        ]
        slices.append(
            lax.slice(
                a,
                [0, *start, 0],
                [a.shape[0], *limit, a.shape[-1]],
                [1, *params["window_strides"], 1],
            )
        )
    return jnp.concatenate(slices, axis=-1)


def _per_example_sq_norm(tap: _Tap, weight, a, d) -> jax.Array:
    """``||dL_i / dW||^2`` of one example from its layer input ``a`` and output gradient ``d``."""
    a = a.astype(jnp.float32)
    d = d.astype(jnp.float32)
    if tap.primitive.name == "conv_general_dilated":
        _, _, out_spec = tap.params["dimension_numbers"]
        patches = _patches(tap, weight, a)
        d = jnp.moveaxis(d, out_spec[1], -1)
        return _frobenius_sq(patches.reshape(-1, patches.shape[-1]), d.reshape(-1, d.shape[-1]))
    (a_contract, w_contract), (a_batch, w_batch) = tap.params["dimension_numbers"]
    if tap.weight_operand == 0:
        (w_contract, a_contract), (w_batch, a_batch) = (a_contract, w_contract), (a_batch, w_batch)
    if not a_batch:
        # dot_general output: (lhs free dims..., rhs free dims...). Rows of both matrices below
        # run over the activation's free dims (its positions), columns over K resp. O.
        a_free = [dim for dim in range(a.ndim) if dim not in a_contract]
        num_free = math.prod(a.shape[dim] for dim in a_free)
        a_mat = jnp.transpose(a, a_free + list(a_contract)).reshape(num_free, -1)
        if tap.weight_operand == 1:
            d_mat = d.reshape(num_free, -1)
        else:
            d_mat = jnp.moveaxis(d.reshape(-1, num_free), 1, 0)
        return _frobenius_sq(a_mat, d_mat)
    # Batched dot_general with a weight operand: take the per-example weight gradient directly.
    _, vjp = jax.vjp(lambda w: _apply(tap, a, w), weight.astype(jnp.float32))
    return jnp.sum(jnp.square(vjp(d)[0]))


def _weighted_weight_grad(tap: _Tap, activations, out_grads, weight):
    """``sum_i dL_i/dW`` for the batch, with ``out_grads`` already scaled by the clip weights."""

    def batched(w):
        return jax.vmap(lambda a: _apply(tap, a, w))(activations)

    _, vjp = jax.vjp(batched, weight)
    return vjp(out_grads)[0]


def ghost_clipped_sum(loss_fn: Callable[[PyTree, Any, Any], jax.Array]) -> Callable:
    """Returns ``fn(params, inputs, labels, mask, thresholds) -> (total, norms, clipped)``.

    ``thresholds`` is the clipping norm ``C`` (a number) or a pytree of per-leaf ``C_l`` like
    ``params`` (per-layer clipping). ``total`` is the sum over examples with ``mask`` True of the
    clipped per-example gradients, ``norms`` the ``(B,)`` unclipped per-example gradient norms
    and ``clipped`` the ``(B,)`` bool "was scaled down". Used through
    :func:`fedjax_med.privacy.clipping.clipped_grad_sum` with ``method="ghost"``.
    """

    def fn(params, inputs, labels, mask, thresholds):
        leaves, treedef = jax.tree.flatten(params)
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), (inputs, labels))

        def flat_loss(leaves, x, y):
            return loss_fn(jax.tree.unflatten(treedef, leaves), x, y)

        specs = [jax.ShapeDtypeStruct(jnp.shape(w), jnp.result_type(w)) for w in leaves]
        closed = jax.make_jaxpr(flat_loss)(specs, *one)
        taps = _find_taps(closed.jaxpr, len(leaves))
        taps_by_path = {tap.path: (k, tap) for k, tap in enumerate(taps)}
        tapped = {tap.leaf: k for k, tap in enumerate(taps)}
        other = [i for i in range(len(leaves)) if i not in tapped]

        def tapped_loss(other_values, tap_values, x, y):
            values = list(leaves)
            for i, value in zip(other, other_values, strict=True):
                values[i] = value
            args = values + jax.tree.leaves((x, y))
            activations = [None] * len(taps)
            (loss,) = _evaluate(
                closed.jaxpr, closed.consts, args, taps_by_path, tap_values, activations
            )
            return loss, activations

        zeros = [jnp.zeros(tap.out_aval.shape, tap.out_aval.dtype) for tap in taps]

        def one_example(x, y):
            grad = jax.grad(tapped_loss, argnums=(0, 1), has_aux=True)
            (other_grads, out_grads), activations = grad([leaves[i] for i in other], zeros, x, y)
            sq = [
                _per_example_sq_norm(tap, leaves[tap.leaf], a, d)
                for tap, a, d in zip(taps, activations, out_grads, strict=True)
            ]
            return other_grads, out_grads, activations, sq

        other_grads, out_grads, activations, tap_sq = jax.vmap(one_example)(inputs, labels)

        def masked(x):
            return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)

        # where(), not a multiplication by 0: padded examples may have non-finite values.
        other_grads = [masked(g) for g in other_grads]
        sq = [None] * len(leaves)
        for tap, value in zip(taps, tap_sq, strict=True):
            sq[tap.leaf] = masked(value)
        for i, g in zip(other, other_grads, strict=True):
            g32 = g.astype(jnp.float32)
            sq[i] = jnp.sum(jnp.square(g32).reshape(g.shape[0], -1), axis=1)
        norms = jnp.sqrt(sum(sq))

        if jax.tree_util.treedef_is_leaf(jax.tree.structure(thresholds)):
            factor = jnp.minimum(1.0, thresholds / (norms + _NORM_EPS))
            weights = [jnp.where(mask, factor, 0.0)] * len(leaves)
            clipped = norms > thresholds
        else:
            limits = jax.tree.leaves(thresholds)
            layer_norms = [jnp.sqrt(s) for s in sq]
            weights = [
                jnp.where(mask, jnp.minimum(1.0, c / (n + _NORM_EPS)), 0.0)
                for n, c in zip(layer_norms, limits, strict=True)
            ]
            clipped = jnp.any(
                jnp.stack([n > c for n, c in zip(layer_norms, limits, strict=True)]), axis=0
            )

        total = [None] * len(leaves)
        for i, g in zip(other, other_grads, strict=True):
            total[i] = jnp.tensordot(weights[i], g, axes=1).astype(g.dtype)
        for tap, a, d in zip(taps, activations, out_grads, strict=True):
            w = weights[tap.leaf]
            d = masked(d) * w.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype)
            total[tap.leaf] = _weighted_weight_grad(tap, masked(a), d, leaves[tap.leaf])
        return jax.tree.unflatten(treedef, total), norms, clipped

    return fn
