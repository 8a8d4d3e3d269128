"""Reconstruct training images from a shared FedSGD gradient or FedAvg model update.

In FedSGD a client sends ``g = grad_theta mean_i loss(theta, x_i, y_i)``. The attacks here start
from dummy images ``x'`` and optimise them until ``grad_theta loss(theta, x', y)`` matches ``g``:

* DLG, Zhu, Liu, Han, "Deep leakage from gradients", NeurIPS 2019
  (https://arxiv.org/abs/1906.08935): squared L2 distance between the gradients.
* iDLG, Zhao, Mopuri, Bilen, "iDLG: Improved deep leakage from gradients", 2020
  (https://arxiv.org/abs/2001.02610): reads the label of a single example exactly off the last
  dense layer's weight gradient, so only the image has to be optimised.
* Inverting Gradients, Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020
  (https://arxiv.org/abs/2003.14053): ``1 - cos(g', g) + alpha TV(x')``, Adam driven by the sign
  of the image gradient, images kept in the valid range, several random restarts.

In FedAvg a client instead sends the model delta ``theta_S - theta_0`` of ``S`` local SGD steps.
Following Section 6 of Geiping et al., the attacker knows ``S`` and the local learning rate,
simulates the same local steps on the dummy images (:func:`fedavg_update`) and matches the
simulated delta to the shared one with the same distance, differentiating through the unrolled
steps. The local steps here are full-batch (the client's batch is one local minibatch). The
label of a single image is still read exactly, off the output bias of the delta
(:func:`fedavg_label`).

Segmentation (``task="segmentation"``): the client's loss is the Dice + cross-entropy of
per-pixel logits (:func:`fedjax_med.models.losses.dice_ce_loss`); the attacker is given the
victims' masks and optimises only the images, with the same cosine objective (Geiping et al.
2020). The GroupNorm U-Net's update is nearly invariant to an image's brightness and contrast
(GroupNorm after the first convolution removes them), so expect a reconstruction up to that.

Restarts run together under ``jax.vmap`` and the steps under ``lax.scan``, in one compiled call.
DP-SGD's clipping and noise are what these attacks are meant to be defeated by; the tests check
that a noisy gradient leaves the reconstruction no closer than a random image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_med.models import losses

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

DISTANCES = ("cosine", "l2")
# Tasks whose training loss the attacks simulate: a class per image, or a mask per image.
INVERTIBLE_TASKS = ("multiclass", "segmentation")


class InversionResult(NamedTuple):
    """Outcome of :func:`invert_gradients`.

    Attributes:
      images: the reconstruction of the restart with the lowest final loss, ``(B, H, W, C)``.
      losses: final attack loss of every restart, ``(restarts,)``.
      all_images: the reconstruction of every restart, ``(restarts, B, H, W, C)``.
      best: index of the chosen restart.
    """

    images: jax.Array
    losses: jax.Array
    all_images: jax.Array
    best: jax.Array


def shared_gradient(
    apply_fn: ApplyFn,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    task: str = "multiclass",
) -> Params:
    """The FedSGD update a client shares: the gradient of the batch's mean training loss.

    The loss is :func:`fedjax_med.models.losses.per_example_loss` of ``task``: the softmax
    cross-entropy (``"multiclass"``), or for ``"segmentation"`` the Dice + cross-entropy of
    per-pixel logits against the masks.

    Args:
      apply_fn: ``apply(params, images) -> logits``, ``(B, K)`` (or ``(B, H, W, K)`` per pixel).
      params: model parameters.
      images: ``(B, H, W, C)`` float images.
      labels: ``(B,)`` integer class labels (``(B, H, W)`` masks for segmentation).
      task: one of :data:`fedjax_med.models.losses.TASKS`.

    Returns:
      A pytree like ``params``.
    """

    def loss(p):
        return jnp.mean(losses.per_example_loss(apply_fn(p, images), labels, task))

    return jax.grad(loss)(params)


def fedavg_update(
    apply_fn: ApplyFn,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    *,
    local_steps: int,
    local_lr: float | jax.Array,
    task: str = "multiclass",
) -> Params:
    """The FedAvg update a client shares: the model delta of ``local_steps`` full-batch SGD steps.

    With ``theta_0 = params`` and ``g(theta)`` the gradient of the batch's mean softmax
    cross-entropy (:func:`shared_gradient`), the client runs
    ``theta_{s+1} = theta_s - local_lr * g(theta_s)`` for ``s < S = local_steps`` and sends
    ``theta_S - theta_0 = -local_lr * sum_s g(theta_s)``. For ``S = 1`` that is ``-local_lr``
    times the FedSGD gradient. The function is differentiable in ``images``, which is what the
    FedAvg attack of Geiping et al., NeurIPS 2020, Section 6 (https://arxiv.org/abs/2003.14053)
    uses: it simulates the client's local steps on dummy images and matches the deltas.

    Args:
      apply_fn: ``apply(params, images) -> logits`` of shape ``(B, K)``.
      params: the global model ``theta_0`` the client starts from.
      images: ``(B, H, W, C)`` float images, the client's whole local batch.
      labels: ``(B,)`` integer class labels.
      local_steps: number of local SGD steps ``S``, a positive integer (static).
      local_lr: local learning rate, ``>= 0``; may be a traced scalar.
      task: the training loss's task (:func:`shared_gradient`).

    Returns:
      ``theta_S - theta_0``, a pytree like ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> apply = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"]
      >>> params = {"w": jnp.zeros((2, 2))}
      >>> images = jnp.ones((1, 1, 2, 1))
      >>> delta = fedavg_update(apply, params, images, jnp.array([1]), local_steps=1, local_lr=0.5)
      >>> delta["w"]  # -0.5 * outer(x, softmax(0) - e_1)
      Array([[-0.25,  0.25],
             [-0.25,  0.25]], dtype=float32)
    """
    _check_local_steps(local_steps)
    if isinstance(local_lr, (int, float)) and not local_lr >= 0:
        raise ValueError(f"local_lr={local_lr} must be >= 0")

    def step(theta, _):
        grad = shared_gradient(apply_fn, theta, images, labels, task)
        return jax.tree_util.tree_map(lambda t, g: t - local_lr * g, theta, grad), None

    final, _ = lax.scan(step, params, None, length=int(local_steps))
    return jax.tree_util.tree_map(lambda t, t0: t - t0, final, params)


def _check_local_steps(local_steps: Any) -> None:
    if isinstance(local_steps, bool) or int(local_steps) != local_steps or local_steps < 1:
        raise ValueError(f"local_steps={local_steps!r} must be an integer >= 1")


def last_kernel_path(params: Params) -> tuple[Any, ...]:
    """Key path of the last 2-D leaf named ``kernel`` in flatten order: the final Dense layer.

    Flatten order sorts dict keys, so the result is the output layer for models whose layer
    names sort in call order (``Dense_0`` ... ``Dense_9``); pass the path yourself otherwise.
    """
    found = None
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        if name == "kernel" and jnp.ndim(leaf) == 2:
            found = path
    if found is None:
        raise ValueError("params hold no 2-D leaf named 'kernel' (no Dense layer)")
    return tuple(found)


def get_at_path(tree: Params, path: Sequence[Any]) -> Any:
    """The leaf of ``tree`` at a key path from :func:`last_kernel_path`."""
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        tree = tree[key]
    return tree


def idlg_label(grad_last_layer_weights: jax.Array) -> jax.Array:
    """The label of a single example from the gradient of the last Dense kernel (iDLG).

    For one example with softmax cross-entropy the kernel gradient is the outer product
    ``h (p - e_y)^T`` of the penultimate activations ``h`` and the softmax error, so column ``k``
    sums to ``S (p_k - [k = y])`` with ``S = sum(h)``: the true label's column is the only one of
    its sign. With ``S > 0`` (non-negative activations, as in the paper) that is the single
    negative column; a negative ``S`` (e.g. tanh) flips all signs, so the odd one out is taken.

    Args:
      grad_last_layer_weights: ``(features, K)`` gradient of the output layer's kernel for a
        batch of one example. With ``K = 2`` both signs occur once, and ``S > 0`` is assumed.

    Returns:
      The label as an int32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([0.5, 2.0])
      >>> p = jnp.array([0.2, 0.3, 0.5])
      >>> int(idlg_label(jnp.outer(h, p - jnp.array([0.0, 1.0, 0.0]))))
      1
      >>> int(idlg_label(jnp.outer(-h, p - jnp.array([0.0, 0.0, 1.0]))))
      2
    """
    g = jnp.asarray(grad_last_layer_weights)
    if g.ndim != 2:
        raise ValueError(f"grad_last_layer_weights.shape={g.shape} must be (features, classes)")
    col = g.sum(axis=0)
    single_negative = jnp.sum(col < 0) == 1
    return jnp.where(single_negative, jnp.argmin(col), jnp.argmax(col)).astype(jnp.int32)


def fedavg_label(delta: Params) -> jax.Array:
    """The label of a single example from its FedAvg delta: the one output bias that grew.

    The output layer's bias ``b`` (next to the kernel of :func:`last_kernel_path`) gets the
    gradient ``p_s - e_y`` at local step ``s``, so the delta of ``S`` steps at rate ``lr > 0`` is
    ``b_S - b_0 = -lr sum_s (p_s - e_y)``: positive at the label ``y`` (``p_sy < 1``) and
    negative elsewhere (``p_sk > 0``), whatever the other layers do. The kernel is less reliable
    here: its column sums ``-lr sum_s S_s (p_sk - [k = y])`` weight each step by the sum ``S_s``
    of the penultimate activations, and when those change sign during the local steps (tanh
    features, a large ``lr``) the true label no longer stands out.

    Args:
      delta: ``theta_S - theta_0`` of one example, a pytree like the params; its output layer
        must have a ``bias`` next to the ``kernel``.

    Returns:
      The label as an int32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = jnp.array([0.2, 0.3, 0.5])  # softmax, label 1, one step at lr 0.1
      >>> delta = {"Dense_0": {"bias": -0.1 * (p - jnp.array([0.0, 1.0, 0.0])),
      ...                      "kernel": jnp.zeros((2, 3))}}
      >>> int(fedavg_label(delta))
      1
    """
    path = last_kernel_path(delta)
    layer = get_at_path(delta, path[:-1])
    if "bias" not in layer:
        raise ValueError(
            "the output layer has no 'bias' to read the label of a FedAvg delta from; pass labels"
        )
    bias = jnp.asarray(layer["bias"])
    if bias.ndim != 1:
        raise ValueError(f"output bias shape={bias.shape} must be (classes,)")
    return jnp.argmax(bias).astype(jnp.int32)


def total_variation(images: jax.Array) -> jax.Array:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels, per image."""
    dh = jnp.abs(images[..., 1:, :, :] - images[..., :-1, :, :]).mean(axis=(-3, -2, -1))
    dw = jnp.abs(images[..., :, 1:, :] - images[..., :, :-1, :]).mean(axis=(-3, -2, -1))
    return dh + dw


def gradient_distance(grad: Params, target: Params, distance: str) -> jax.Array:
    """``1 - cos`` over all parameters at once (``"cosine"``) or the squared L2 distance."""
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} must be one of {DISTANCES}")
    a = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(grad)])
    b = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(target)])
    if distance == "l2":
        return jnp.sum((a - b) ** 2)
    # A zero gradient (a saturated dummy image) must give a finite value *and* a finite
    # derivative: jnp.linalg.norm's derivative at 0 is NaN, so the norms are smoothed.
    norm_a = jnp.sqrt(jnp.sum(a * a) + 1e-30)
    norm_b = jnp.sqrt(jnp.sum(b * b) + 1e-30)
    return 1.0 - jnp.dot(a, b) / (norm_a * norm_b)


def invert_gradients(
    apply_fn: ApplyFn,
    params: Params,
    target_grad: Params,
    *,
    image_shape: tuple[int, int, int],
    batch_size: int = 1,
    labels: jax.Array | None = None,
    steps: int = 1000,
    lr: float = 0.1,
    tv_weight: float = 1e-2,
    restarts: int = 1,
    key: jax.Array,
    distance: str = "cosine",
    bounds: tuple[float, float] = (0.0, 1.0),
    local_steps: int = 1,
    local_lr: float = 0.0,
    task: str = "multiclass",
) -> InversionResult:
    """Reconstruct the images behind ``target_grad`` (Inverting Gradients, or DLG with ``l2``).

    Minimises ``D(u(x'), target_grad) + tv_weight * TV(x')`` over dummy images ``x'`` drawn
    uniformly in ``bounds``, where ``u`` is the update the client would share for ``x'``: the
    FedSGD gradient ``grad_theta loss(theta, x', y)`` (:func:`shared_gradient`) by default, or
    the FedAvg delta of ``local_steps`` local SGD steps at ``local_lr`` (:func:`fedavg_update`,
    Geiping et al. 2020, Section 6) when ``local_steps > 1`` or ``local_lr > 0``. Each step feeds
    the *sign* of the image gradient to Adam, as Geiping et al. do, with the learning rate cut
    10x at 3/8, 5/8 and 7/8 of the steps; images are clipped to ``bounds`` after every step.
    ``restarts`` independent starts run in parallel and the one with the lowest final loss is
    returned.

    The label of a single image (``labels=None``) is read exactly: from a gradient by
    :func:`idlg_label` on the last Dense kernel, from a FedAvg delta by :func:`fedavg_label` on
    the output bias.

    Segmentation (``task="segmentation"``): the update is that of the Dice + cross-entropy loss of
    per-pixel logits, and ``labels`` are the victims' masks ``(batch_size, H, W)``, given to the
    attacker (the threat where the annotation is known, e.g. a public atlas or a mask the server
    segmented itself; only the image is optimised, with the same cosine objective of Geiping et
    al. 2020).

    Args:
      apply_fn: ``apply(params, images) -> logits`` of shape ``(B, K)``, pure.
      params: the parameters the update was computed from (known to the server).
      target_grad: the shared update, a pytree like ``params``: the FedSGD gradient of the mean
        loss over the batch, or the FedAvg delta ``theta_S - theta_0`` when ``local_steps > 1``
        or ``local_lr > 0``.
      image_shape: ``(H, W, C)`` of one image.
      batch_size: number of images behind the update.
      labels: ``(batch_size,)`` labels (``(batch_size, H, W)`` masks for segmentation); ``None``
        reads them with :func:`idlg_label` (FedSGD) or :func:`fedavg_label` (FedAvg), which
        needs ``batch_size == 1`` and a multiclass task.
      steps: optimisation steps.
      lr: initial Adam learning rate.
      tv_weight: weight ``alpha`` of the total variation prior.
      restarts: number of random starts, run together under ``jax.vmap``.
      key: PRNG key for the starting images.
      distance: ``"cosine"`` (Inverting Gradients) or ``"l2"`` (DLG).
      bounds: ``(low, high)`` range of valid pixel values.
      local_steps: the client's local SGD steps ``S >= 1``; ``1`` with ``local_lr == 0`` is
        FedSGD (the target is a gradient).
      local_lr: the client's local learning rate, ``>= 0`` and ``> 0`` when ``local_steps > 1``.
      task: ``"multiclass"`` or ``"segmentation"``, the loss behind the update.

    Returns:
      An :class:`InversionResult`.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} must be one of {DISTANCES}")
    for name, value in (("batch_size", batch_size), ("steps", steps), ("restarts", restarts)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}={value} must be a positive integer")
    if not bounds[0] < bounds[1]:
        raise ValueError(f"bounds={bounds} must satisfy low < high")
    _check_local_steps(local_steps)
    local_lr = float(local_lr)
    if not local_lr >= 0:
        raise ValueError(f"local_lr={local_lr} must be >= 0")
    if local_steps > 1 and local_lr == 0:
        raise ValueError(f"local_lr={local_lr} must be > 0 when local_steps={local_steps} > 1")
    fedavg = not (local_steps == 1 and local_lr == 0)
    if task not in INVERTIBLE_TASKS:
        raise ValueError(f"task={task!r} must be one of {INVERTIBLE_TASKS}")
    if labels is None:
        if task != "multiclass":
            raise ValueError(f"labels=None reads a class label; task={task!r} needs the labels")
        if batch_size != 1:
            raise ValueError(f"labels=None needs batch_size=1 (iDLG), got {batch_size=}")
        if fedavg:
            labels = fedavg_label(target_grad)[None]
        else:
            labels = idlg_label(get_at_path(target_grad, last_kernel_path(target_grad)))[None]
    labels = jnp.asarray(labels, jnp.int32)
    label_shape = (batch_size,) if task == "multiclass" else (batch_size, *image_shape[:2])
    labels = labels.reshape(label_shape)
    run = _compiled_attack(
        apply_fn,
        tuple(int(d) for d in image_shape),
        int(batch_size),
        int(steps),
        int(restarts),
        distance,
        (float(bounds[0]), float(bounds[1])),
        int(local_steps) if fedavg else None,
        task,
    )
    all_images, final = run(
        params, target_grad, labels, key, jnp.float32(lr), tv_weight, jnp.float32(local_lr)
    )
    best = jnp.argmin(final)
    return InversionResult(images=all_images[best], losses=final, all_images=all_images, best=best)


@functools.lru_cache(maxsize=16)
def _compiled_attack(
    apply_fn, image_shape, batch_size, steps, restarts, distance, bounds, local_steps, task
):
    """One jitted program per static configuration, reused across calls.

    ``local_steps`` is ``None`` for FedSGD gradient matching and the (static) number of local
    steps for FedAvg; ``lr``, ``tv_weight`` and ``local_lr`` are traced.
    """
    low, high = bounds
    boundaries = {int(steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8) if int(steps * f) > 0}

    def client_update(x, params, labels, local_lr):
        if local_steps is None:
            return shared_gradient(apply_fn, params, x, labels, task)
        return fedavg_update(
            apply_fn, params, x, labels, local_steps=local_steps, local_lr=local_lr, task=task
        )

    def attack_loss(x, params, target, labels, tv_weight, local_lr):
        u = client_update(x, params, labels, local_lr)
        return gradient_distance(u, target, distance) + tv_weight * total_variation(x).mean()

    def one_restart(key, params, target, labels, lr, tv_weight, local_lr):
        schedule = optax.piecewise_constant_schedule(1.0, boundaries)
        opt = optax.chain(
            optax.scale_by_adam(), optax.scale_by_schedule(schedule), optax.scale(-lr)
        )
        x0 = jax.random.uniform(key, (batch_size, *image_shape), jnp.float32, low, high)
        loss_and_grad = jax.value_and_grad(attack_loss)

        def step(carry, _):
            x, state = carry
            loss, dx = loss_and_grad(x, params, target, labels, tv_weight, local_lr)
            updates, state = opt.update(jnp.sign(dx), state)
            x = jnp.clip(optax.apply_updates(x, updates), low, high)
            return (x, state), loss

        (x, _), _ = lax.scan(step, (x0, opt.init(x0)), None, length=steps)
        return x, attack_loss(x, params, target, labels, tv_weight, local_lr)

    @jax.jit
    def run(params, target, labels, key, lr, tv_weight, local_lr):
        keys = jax.random.split(key, restarts)
        return jax.vmap(one_restart, in_axes=(0, None, None, None, None, None, None))(
            keys, params, target, labels, lr, tv_weight, local_lr
        )

    return run
