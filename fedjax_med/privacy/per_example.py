"""Per-example gradients of a per-example loss, the first step of DP-SGD.

DP-SGD (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133) bounds each example's influence
by clipping *its own* gradient, so the gradient of every example in a batch is needed separately.
Users write the loss of a single example, ``loss_fn(params, example_input, example_label) ->
scalar`` (no batch dimension and no mean over a batch); this module maps it over the batch with
``jax.vmap(jax.grad(loss_fn))``, the reference implementation every faster path in
:mod:`fedjax_med.privacy.clipping` is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
LossFn = Callable[[PyTree, Any, Any], jax.Array]


def per_example_grads(loss_fn: LossFn) -> Callable[[PyTree, Any, Any], PyTree]:
    """Returns ``fn(params, inputs, labels)`` giving the gradient of every example separately.

    ``fn`` computes ``g_i = grad_params loss_fn(params, inputs[i], labels[i])`` for every ``i``
    by vmapping ``jax.grad(loss_fn)`` over the leading axis of ``inputs`` and ``labels``
    (``params`` is shared). ``inputs`` and ``labels`` may be arrays or pytrees of arrays.

    Args:
      loss_fn: loss of one example, ``loss_fn(params, example_input, example_label) -> scalar``.

    Returns:
      ``fn(params, inputs, labels) -> grads``, a pytree shaped like ``params`` in which every leaf
      has an extra leading batch dimension of size ``B``.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss = lambda w, x, y: 0.5 * (jnp.dot(w, x) - y) ** 2
      >>> per_example_grads(loss)(jnp.ones(2), jnp.eye(2), jnp.zeros(2))
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
    """
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))
