"""Per-example losses and predicted probabilities for the three label conventions.

* multiclass: softmax cross-entropy, ``-log softmax(z)_y``.
* binary: sigmoid cross-entropy on one logit, ``-[y log s(z) + (1 - y) log(1 - s(z))]``.
* multilabel: the sum over labels of the binary loss (each label an independent Bernoulli).

Losses are per example (no mean over the batch), so private training can vmap and clip them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def per_example_loss(logits: jax.Array, labels: jax.Array, task: str) -> jax.Array:
    """Loss of each example: logits ``(B, num_outputs)``, labels per the task -> ``(B,)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> loss = per_example_loss(jnp.zeros((2, 4)), jnp.array([0, 3]), "multiclass")
        >>> [round(float(v), 4) for v in loss]  # log(4) each
        [1.3863, 1.3863]
    """
    if task == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if task == "binary":
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
    if task == "multilabel":
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).sum(-1)
    raise ValueError(f"task={task!r} must be one of 'multiclass', 'binary', 'multilabel'")


def probabilities(logits: jax.Array, task: str) -> jax.Array:
    """Predicted probabilities: softmax (multiclass), P(y=1) ``(B,)`` (binary), sigmoids."""
    if task == "multiclass":
        return jax.nn.softmax(logits, axis=-1)
    if task == "binary":
        return jax.nn.sigmoid(logits[:, 0])
    if task == "multilabel":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"task={task!r} must be one of 'multiclass', 'binary', 'multilabel'")


def example_loss_fn(apply_fn, task: str):
    """``loss(params, image, label)`` for ONE example, the form private training vmaps."""

    def loss(params, image, label):
        logits = apply_fn(params, image[None])
        return per_example_loss(logits, jnp.asarray(label)[None], task)[0]

    return loss
