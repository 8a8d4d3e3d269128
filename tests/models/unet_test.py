"""The U-Net: shapes, per-example independence, per-example gradients, and the Dice + CE loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med import models
from fedjax_med.models import losses, unet
from fedjax_med.privacy import clipping, per_example

SHAPE = (12, 12, 1)


@pytest.fixture(scope="module")
def model_and_params():
    model = models.get_model("unet", input_shape=SHAPE, num_outputs=3, width=4, depth=2, groups=2)
    return model, model.init(jax.random.key(0))


def test_logits_per_pixel_and_no_batch_statistics(model_and_params):
    model, params = model_and_params
    x = jax.random.normal(jax.random.key(1), (3, *SHAPE))
    logits = model.apply(params, x)
    assert logits.shape == (3, 12, 12, 3)
    # Per-example: one image's logits do not depend on the others in the batch.
    alone = model.apply(params, x[:1])
    np.testing.assert_allclose(np.asarray(logits[:1]), np.asarray(alone), atol=1e-5)
    names = {k for block in params.values() for k in block}
    assert any(k.startswith("GroupNorm") for k in names)
    assert not any("BatchNorm" in k for k in names)


def test_odd_sizes_and_depth_bounds():
    model = models.get_model("unet", input_shape=(13, 11, 1), num_outputs=2, width=2, depth=2)
    params = model.init(jax.random.key(0))
    assert model.apply(params, jnp.zeros((1, 13, 11, 1))).shape == (1, 13, 11, 2)
    with pytest.raises(ValueError, match="model.kwargs.depth"):
        models.get_model("unet", input_shape=SHAPE, num_outputs=2, depth=0)
    with pytest.raises(ValueError, match="model.kwargs.width"):
        models.get_model("unet", input_shape=SHAPE, num_outputs=2, width=0)
    tiny = models.get_model("unet", input_shape=(4, 4, 1), num_outputs=2, depth=3)
    with pytest.raises(ValueError, match="needs H, W >= 8"):
        tiny.init(jax.random.key(0))


def test_weight_standardisation_makes_kernel_scale_irrelevant(model_and_params):
    model, params = model_and_params
    x = jax.random.normal(jax.random.key(2), (2, *SHAPE))
    path = ("ConvBlock_0", "WSConv_0", "kernel")
    scaled = jax.tree_util.tree_map(lambda v: v, params)
    scaled[path[0]][path[1]][path[2]] = params[path[0]][path[1]][path[2]] * 7.0 + 0.5
    np.testing.assert_allclose(
        np.asarray(model.apply(params, x)), np.asarray(model.apply(scaled, x)), atol=1e-4
    )
    w = unet.standardize_weight(jax.random.normal(jax.random.key(3), (3, 3, 2, 4)) * 5 + 1)
    np.testing.assert_allclose(np.asarray(w.mean((0, 1, 2))), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w.std((0, 1, 2))), 1, atol=1e-3)


def test_per_example_gradients_equal_a_loop():
    model = models.get_model("unet", input_shape=(8, 8, 1), num_outputs=3, width=2, depth=1)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(4), (3, 8, 8, 1))
    y = jax.random.randint(jax.random.key(5), (3, 8, 8), 0, 3)
    loss = losses.example_loss_fn(model.apply, "segmentation")
    batched = jax.jit(per_example.per_example_grads(loss))(params, x, y)
    grad = jax.jit(jax.grad(loss))
    looped = [grad(params, x[i], y[i]) for i in range(3)]

    def close(a, b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

    for i in range(3):
        jax.tree.map(lambda b, s, i=i: close(b[i], s), batched, looped[i])
    # The clipped sum of the microbatched vmap path equals clipping the looped gradients.
    fn = clipping.clipped_grad_sum(loss, clip_norm=0.1, microbatch_size=2, method="vmap")
    total, _ = jax.jit(fn)(params, x, y, jnp.ones(3, bool))
    norms = [float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))) for g in looped]
    assert min(norms) > 0.1  # every example is clipped, so the factors matter
    expected = jax.tree.map(
        lambda *gs: sum(g * min(1.0, 0.1 / n) for g, n in zip(gs, norms, strict=True)), *looped
    )
    jax.tree.map(close, total, expected)


def test_dice_ce_loss_by_hand():
    # Two pixels, two classes; logits give p(class 1) = s = sigmoid(1) on both pixels.
    logits = jnp.array([[[[0.0, 1.0], [0.0, 1.0]]]])  # (1, 1, 2, 2)
    masks = jnp.array([[[1, 0]]])
    s = float(jax.nn.sigmoid(1.0))
    ce = (-np.log(s) - np.log(1 - s)) / 2
    dice = (2 * s + 1) / (2 * s + 1 + 1)
    value = float(losses.per_example_loss(logits, masks, "segmentation")[0])
    assert value == pytest.approx(ce + 1 - dice, rel=1e-5)
    # A confident perfect prediction has a loss near 0; the loss is per example.
    perfect = jnp.stack([masks == 0, masks == 1], -1).astype(jnp.float32) * 30
    two = losses.per_example_loss(
        jnp.concatenate([perfect, logits]), jnp.concatenate([masks, masks]), "segmentation"
    )
    assert (
        two.shape == (2,)
        and float(two[0]) < 1e-3
        and float(two[1]) == pytest.approx(value, rel=1e-5)
    )
    probs = losses.probabilities(logits, "segmentation")
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-6)


def test_dice_term_scores_absent_classes_by_their_predicted_mass():
    logits = jax.random.normal(jax.random.key(3), (2, 3, 3, 3))
    masks = jnp.zeros((2, 3, 3), jnp.int32).at[0, :2, :2].set(1)  # image 1 is empty
    p = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    onehot = np.eye(3)[np.asarray(masks)]
    ce = -(onehot * np.log(p)).sum(-1).mean(axis=(1, 2))
    g1 = onehot[0, ..., 1]
    dice_1 = (2 * (p[0, ..., 1] * g1).sum() + 1) / (p[0, ..., 1].sum() + g1.sum() + 1)
    # A class absent from the mask scores s / (P_c + s), P_c its predicted mass (s = 1).
    absent = 1 / (p[..., 2].sum(axis=(1, 2)) + 1)
    empty_1 = 1 / (p[1, ..., 1].sum() + 1)
    want = [ce[0] + 1 - (dice_1 + absent[0]) / 2, ce[1] + 1 - (empty_1 + absent[1]) / 2]
    loss = np.asarray(losses.per_example_loss(logits, masks, "segmentation"))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
