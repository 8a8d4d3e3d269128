"""The fast layer forms equal the textbook ones (outputs and gradients), and models keep their
parameter trees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_med import models
from fedjax_med.models import layers, losses
from fedjax_med.privacy import clipping

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _normal(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _reference_pool(x, window, strides):
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding="VALID")


@pytest.mark.parametrize(
    "shape, window, strides",
    [
        ((2, 7, 7, 3), (2, 2), (1, 1)),
        ((1, 9, 8, 2), (3, 2), (2, 3)),
        ((2, 6, 6, 1), (2, 2), (2, 2)),
    ],
)
def test_max_pool_equals_reduce_window_with_gradients(shape, window, strides):
    x = _normal(shape, 0)
    cotangent = _normal(_reference_pool(x, window, strides).shape, 1)
    want, want_vjp = jax.vjp(lambda v: _reference_pool(v, window, strides), x)
    got, got_vjp = jax.vjp(lambda v: layers.max_pool(v, window, strides), x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0], **TOL)


def test_max_pool_ties_send_the_gradient_where_reduce_window_does():
    x = jnp.ones((1, 4, 4, 1)).at[0, 2, 1, 0].set(3.0).at[0, 2, 2, 0].set(3.0)
    ones = jnp.ones((1, 3, 3, 1))
    want = jax.vjp(lambda v: _reference_pool(v, (2, 2), (1, 1)), x)[1](ones)[0]
    got = jax.vjp(lambda v: layers.max_pool(v, (2, 2), (1, 1)), x)[1](ones)[0]
    np.testing.assert_array_equal(got, want)
    assert float(got.sum()) == 9.0  # every window's gradient lands on exactly one element


def test_max_pool_rejects_bad_windows():
    with pytest.raises(ValueError, match="window"):
        layers.max_pool(jnp.ones((1, 4, 4, 1)), (0, 2), (1, 1))
    with pytest.raises(ValueError, match="smaller than the pooling window"):
        layers.max_pool(jnp.ones((1, 2, 2, 1)), (3, 3), (1, 1))


@pytest.mark.parametrize(
    "shape, kernel, strides, padding",
    [
        ((2, 28, 28, 1), (8, 8), (2, 2), "SAME"),
        ((2, 27, 25, 2), (8, 8), (2, 2), "SAME"),
        ((1, 13, 13, 3), (4, 4), (2, 2), "VALID"),
        ((1, 14, 11, 1), (3, 5), (2, 3), ((1, 1), (2, 0))),
        ((1, 16, 16, 2), (3, 3), (3, 3), "VALID"),
    ],
)
def test_space_to_depth_conv_equals_strided_conv_with_gradients(shape, kernel, strides, padding):
    x = _normal(shape, 0)
    w = _normal((*kernel, shape[-1], 5), 1) * 0.3

    def reference(x, w):
        return lax.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    want, want_vjp = jax.vjp(reference, x, w)
    got, got_vjp = jax.vjp(lambda x, w: layers.space_to_depth_conv(x, w, strides, padding), x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)
    cotangent = _normal(want.shape, 2)
    for g, r in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels, strides", [(1, (2, 2)), (3, (1, 1)), (8, (2, 2))])
def test_conv_module_has_nn_conv_parameters_and_outputs(channels, strides):
    x = _normal((2, 12, 12, channels), 0)
    kwargs = {"kernel_init": nn.initializers.lecun_normal()}
    ours = layers.Conv(6, (4, 4), strides, "SAME", **kwargs)
    theirs = nn.Conv(6, (4, 4), strides=strides, padding="SAME", **kwargs)
    params = ours.init(jax.random.key(3), x)
    want = theirs.init(jax.random.key(3), x)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, params, want)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), **TOL)
    assert layers.use_space_to_depth(channels, strides) == (channels == 1)


class _ReferenceSmallCNN(nn.Module):
    """``small_cnn`` as first written, with flax's own conv and pooling layers."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Conv(16, (8, 8), strides=(2, 2), padding="SAME", kernel_init=init)(x)
        x = nn.max_pool(jnp.tanh(x), (2, 2), strides=(1, 1), padding="VALID")
        x = nn.Conv(32, (4, 4), strides=(2, 2), padding="VALID", kernel_init=init)(x)
        x = nn.max_pool(jnp.tanh(x), (2, 2), strides=(1, 1), padding="VALID")
        x = jnp.tanh(nn.Dense(32, kernel_init=init)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


def test_small_cnn_equals_its_first_formulation_with_per_example_gradients():
    shape = (17, 16, 1)  # odd and even sizes through the SAME stem
    model = models.get_model("small_cnn", input_shape=shape, num_outputs=10)
    params = model.init(jax.random.key(0))
    reference = _ReferenceSmallCNN()
    # The parameter tree (checkpoints) is unchanged.
    ref_params = reference.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
    assert jax.tree.structure(ref_params) == jax.tree.structure(params)

    def reference_apply(p, x):
        return reference.apply({"params": p}, x)

    images = _normal((4, *shape), 1)
    labels = jnp.arange(4)
    np.testing.assert_allclose(
        model.apply(params, images), reference_apply(params, images), rtol=1e-4, atol=1e-5
    )

    def per_example(apply):
        def loss(p, x, y):
            return losses.per_example_loss(apply(p, x[None]), y[None], "multiclass")[0]

        return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, images, labels)

    got, want = per_example(model.apply), per_example(reference_apply)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)
    # Ghost clipping finds the same clipped sum on the new form.
    loss = losses.example_loss_fn(model.apply, "multiclass")
    mask = jnp.ones((4,), bool)
    sums = [
        clipping.clipped_grad_sum(loss, clip_norm=0.1, method=m)(params, images, labels, mask)[0]
        for m in ("vmap", "ghost")
    ]
    jax.tree.map(lambda g, v: np.testing.assert_allclose(g, v, rtol=1e-4, atol=1e-5), *sums)
