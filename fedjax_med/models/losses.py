"""Per-example losses and predicted probabilities for the four label conventions.

* multiclass: softmax cross-entropy, ``-log softmax(z)_y``.
* binary: sigmoid cross-entropy on one logit, ``-[y log s(z) + (1 - y) log(1 - s(z))]``.
* multilabel: the sum over labels of the binary loss (each label an independent Bernoulli).
* segmentation: per-pixel logits ``(B, H, W, K)`` and masks ``(B, H, W)``; soft Dice plus the
  pixel-mean cross-entropy (:func:`dice_ce_loss`).

Losses are per example (no mean over the batch), so private training can vmap and clip them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

TASKS = ("multiclass", "binary", "multilabel", "segmentation")
DICE_SMOOTH = 1.0


def soft_dice(probs: jax.Array, masks: jax.Array, smooth: float = DICE_SMOOTH) -> jax.Array:
    """Soft Dice of each example and foreground class: ``(B, H, W, K)``, ``(B, H, W)`` -> ``(B,
    K - 1)``.

    ``D_c = (2 sum_x p_c(x) g_c(x) + s) / (sum_x p_c(x) + sum_x g_c(x) + s)`` with ``g_c`` the
    one-hot mask and ``s = smooth`` (Milletari, Navab, Ahmadi, "V-Net", 3DV 2016,
    https://arxiv.org/abs/1606.04797, with the additive smoothing of nnU-Net). Class 0
    (background) is left out. Empty-mask convention: a class absent from the mask scores
    ``D_c = s / (sum_x p_c(x) + s)``, 1 when it is absent from the prediction too (the smoothing
    makes the empty-empty case perfect, as the hard Dice's convention) and falling as the model
    predicts it anywhere, so it penalises false positives, on normal images included.
    """
    onehot = jax.nn.one_hot(masks, probs.shape[-1], dtype=probs.dtype)[..., 1:]
    p = probs[..., 1:]
    inter = jnp.sum(p * onehot, axis=(1, 2))
    total = jnp.sum(p, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
    return (2 * inter + smooth) / (total + smooth)


def dice_loss(probs: jax.Array, masks: jax.Array) -> jax.Array:
    """``1 - mean_{c >= 1} D_c`` of each example, :func:`soft_dice` averaged over every foreground
    class (those absent from the mask included, with their convention); ``(B,)``.

    Optimisation note: near an all-background prediction an absent class's term has gradient
    ``-s / (P_c + s)^2 ~ -1`` per pixel of predicted mass ``P_c``, about ``|G_c|`` times the gain
    per pixel of finding a present class, so predicting a lesion class the model cannot yet tell
    apart costs more than it earns. Adam escapes that all-background solution; plain SGD (and
    FedAvg with SGD clients) at the same budget does not (test Dice of predicting background,
    ``configs/segmentation.py``), hence ``federated.client_optimizer = "adam"`` there.

    Examples:
        >>> import jax.numpy as jnp
        >>> probs = jnp.full((1, 1, 2, 3), 1 / 3)  # 3 classes, p = 1/3 on both pixels
        >>> masks = jnp.array([[[0, 1]]])
        >>> # D_1 = (2/3 + 1) / (2/3 + 1 + 1) = .625; class 2 absent: D_2 = 1 / (2/3 + 1) = .6
        >>> round(float(dice_loss(probs, masks)[0]), 4)
        0.3875
    """
    return 1.0 - soft_dice(probs, masks).mean(axis=-1)


def dice_ce_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Per-example segmentation loss, ``(B, H, W, K)`` logits and ``(B, H, W)`` masks -> ``(B,)``.

    ``L = mean_x CE(z(x), y(x)) + 1 - mean_{c >= 1} D_c``: the pixel-mean softmax cross-entropy
    plus the soft Dice loss :func:`dice_loss` (:func:`soft_dice` averaged over the foreground
    classes, with its empty-mask convention), the
    combination of nnU-Net (Isensee et al., Nature Methods 2021,
    https://arxiv.org/abs/1809.10486). Per example (no batch statistics), so DP-SGD clips it.

    Examples:
        >>> import jax.numpy as jnp
        >>> logits = jnp.zeros((1, 2, 2, 2))  # p = 1/2 everywhere
        >>> masks = jnp.array([[[0, 1], [0, 0]]])
        >>> # CE = log 2; D_1 = (2 * .5 + 1) / (2 + 1 + 1) = .5
        >>> round(float(dice_ce_loss(logits, masks)[0]), 4)
        1.1931
    """
    masks = masks.astype(jnp.int32)
    ce = optax.softmax_cross_entropy(
        logits, jax.nn.one_hot(masks, logits.shape[-1], dtype=logits.dtype)
    ).mean(axis=(1, 2))
    if logits.shape[-1] == 1:
        return ce
    return ce + dice_loss(jax.nn.softmax(logits, axis=-1), masks)


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
    if task == "segmentation":
        return dice_ce_loss(logits, labels)
    raise ValueError(f"task={task!r} must be one of {TASKS}")


def probabilities(logits: jax.Array, task: str) -> jax.Array:
    """Predicted probabilities: softmax (multiclass), P(y=1) ``(B,)`` (binary), sigmoids."""
    if task == "multiclass":
        return jax.nn.softmax(logits, axis=-1)
    if task == "binary":
        return jax.nn.sigmoid(logits[:, 0])
    if task == "multilabel":
        return jax.nn.sigmoid(logits)
    if task == "segmentation":
        return jax.nn.softmax(logits, axis=-1)
    raise ValueError(f"task={task!r} must be one of {TASKS}")


def example_loss_fn(apply_fn, task: str):
    """``loss(params, image, label)`` for ONE example, the form private training vmaps."""

    def loss(params, image, label):
        logits = apply_fn(params, image[None])
        return per_example_loss(logits, jnp.asarray(label)[None], task)[0]

    return loss
