"""Fine-tuning: the per-example clipping of a frozen model covers only the trained leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.models import losses, registry
from fedjax_med.privacy import clipping
from fedjax_med.training import finetune


def test_clipping_covers_only_the_trained_parameters():
    model = registry.get_model("mlp", input_shape=(4, 4, 1), num_outputs=3, hidden=(5,))
    params = model.init(jax.random.key(0))
    loss_fn = losses.example_loss_fn(model.apply, "multiclass")
    images = jax.random.normal(jax.random.key(1), (6, 4, 4, 1))
    labels = jnp.arange(6) % 3
    mask = finetune.trainable_mask(params, "head")
    frozen = clipping.clipped_grad_sum(
        finetune.frozen_loss_fn(loss_fn, mask), clip_norm=0.05, method="vmap"
    )
    total, aux = jax.jit(frozen)(params, images, labels)
    # Reference: DP-SGD on a loss of the head alone, the body a constant.
    head_only = clipping.clipped_grad_sum(
        lambda head, x, y: loss_fn({**params, "Dense_1": head}, x, y), clip_norm=0.05
    )
    expected, expected_aux = jax.jit(head_only)(params["Dense_1"], images, labels)
    for leaf in jax.tree.leaves(total["Dense_0"]):
        np.testing.assert_array_equal(leaf, 0.0)
    for a, b in zip(jax.tree.leaves(total["Dense_1"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(aux["mean_grad_norm"], expected_aux["mean_grad_norm"], rtol=1e-5)
    assert int(aux["num_clipped"]) == 6


def test_merge_keeps_fresh_leaves_whose_shape_differs_and_refuses_no_match(tmp_path):
    fresh = {"body": {"w": jnp.zeros((2, 2))}, "head": {"w": jnp.zeros((2, 4))}}
    pre = {"body": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2, 3))}}
    merged = finetune.merge_pretrained(fresh, pre)
    np.testing.assert_array_equal(merged["body"]["w"], 1.0)
    np.testing.assert_array_equal(merged["head"]["w"], 0.0)
    with pytest.raises(ValueError, match="no parameter of the checkpoint matches"):
        finetune.merge_pretrained(fresh, {"other": {"w": jnp.ones(1)}})
    with pytest.raises(ValueError, match="'model.init_from'=.* must be a flax msgpack"):
        finetune.read_msgpack(str(tmp_path / "missing.msgpack"))
    with pytest.raises(ValueError, match="train.trainable='body' must be one of"):
        finetune.trainable_mask(fresh, "body")
