"""Tests for fedjax_med.models: shapes, per-example independence, purity and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med import models
from fedjax_med.models import resnet
from fedjax_med.training import evaluate

# Options that keep each registered model cheap to compile on CPU; the default sizes are checked
# abstractly (eval_shape) below. wrn_16_4 takes no size options: its numerics are covered by the
# identical wide_resnet module at small depth (see test_wrn_16_4_is_wide_resnet_16_4).
SMALL = {
    "cryptonets": {"maps": 2, "kernel": 4, "stride": 3, "hidden": 8},
    "linear": {},
    "mlp": {"hidden": (16, 8), "activation": "tanh"},
    "small_cnn": {"width": 0.5},
    "resnet_gn": {"stage_sizes": (1, 1), "width": 8, "num_groups": 4},
    "wide_resnet": {"depth": 10, "width_factor": 1, "num_groups": 4},
}
# Their scattering is slow to compile; tests/models/scatternet_test.py covers these properties.
SCATTER = ("scatter_cnn", "scatter_linear")
# Per-pixel logits (B, H, W, K); tests/models/unet_test.py covers these.
SEGMENTERS = ("unet",)
# Models of volumes (D, H, W, C); tests/models/cnn3d_test.py covers them.
VOLUME = ("cnn3d",)
SHAPE = (16, 16, 3)
BATCH = 3


def _images(shape=SHAPE, batch=BATCH, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32)


@functools.cache
def _small(name, num_outputs=4, shape=SHAPE):
    model = models.get_model(name, input_shape=shape, num_outputs=num_outputs, **SMALL[name])
    return model, model.init(jax.random.key(0))


def test_available_models():
    assert models.available_models() == (
        "cnn3d",
        "cryptonets",
        "linear",
        "mlp",
        "resnet_gn",
        "scatter_cnn",
        "scatter_linear",
        "small_cnn",
        "unet",
        "wide_resnet",
        "wrn_16_4",
    )
    assert set(SMALL) | {"wrn_16_4", *SCATTER, *SEGMENTERS, *VOLUME} == set(
        models.available_models()
    )


@pytest.mark.parametrize(
    "name", sorted(set(models.available_models()) - {*SCATTER, *SEGMENTERS, *VOLUME})
)
@pytest.mark.parametrize("shape", [(16, 16, 1), (32, 32, 3), (20, 24, 2)])
@pytest.mark.parametrize("num_outputs", [1, 10])
def test_default_output_shapes_and_collections(name, shape, num_outputs):
    model = models.get_model(name, input_shape=shape, num_outputs=num_outputs)
    images = jax.ShapeDtypeStruct((BATCH, *shape), jnp.float32)
    variables = jax.eval_shape(model.module.init, jax.random.key(0), images)
    # Only trainable parameters: no batch_stats (BatchNorm) or any other mutable collection.
    assert set(variables) == {"params"}
    assert not any("batchnorm" in jax.tree_util.keystr(p).lower() for p, _ in _leaves(variables))
    logits = jax.eval_shape(model.apply, variables["params"], images)
    assert logits.shape == (BATCH, num_outputs)
    assert logits.dtype == jnp.float32


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_vmap_of_single_examples_equals_batched(name):
    model, params = _small(name)
    apply = jax.jit(model.apply)
    images = _images()
    batched = apply(params, images)
    single = jax.jit(jax.vmap(lambda x: model.apply(params, x[None])[0]))(images)
    assert batched.shape == (BATCH, 4)
    np.testing.assert_allclose(single, batched, rtol=1e-5, atol=1e-6)
    # One example's logits do not depend on the rest of the batch.
    other = images.at[1:].set(_images(seed=1)[1:])
    np.testing.assert_allclose(apply(params, other)[0], batched[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_finite_and_nonzero_for_every_leaf(name):
    model, params = _small(name)
    labels = jnp.arange(BATCH) % 4

    def loss(p):
        logits = model.apply(p, _images())
        return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(BATCH), labels])

    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for path, g in _leaves(grads):
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.any(g != 0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_init_is_plain_dict_and_deterministic(name):
    model, params = _small(name)
    assert type(params) is dict
    again = model.init(jax.random.key(0))
    other = model.init(jax.random.key(1))
    for a, b in zip(*map(jax.tree_util.tree_leaves, (params, again)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, c)
        for a, c in zip(*map(jax.tree_util.tree_leaves, (params, other)), strict=True)
    )


def test_init_under_vmap_matches_single():
    model, _ = _small("mlp")
    keys = jax.random.split(jax.random.key(3), 2)
    stacked = jax.jit(jax.vmap(model.init))(keys)
    first = model.init(keys[0])
    for a, b in zip(*map(jax.tree_util.tree_leaves, (stacked, first)), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_num_params_is_sum_of_leaf_sizes(name):
    model, params = _small(name)
    assert model.num_params(params) == sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_known_param_counts():
    def count(name, shape, **kwargs):
        model = models.get_model(name, input_shape=shape, num_outputs=10, **kwargs)
        images = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
        return model.num_params(jax.eval_shape(model.module.init, jax.random.key(0), images))

    # The published MNIST network of Papernot et al. / Tramer & Boneh has 26,010 parameters.
    assert count("small_cnn", (28, 28, 1)) == 26_010
    assert count("linear", (32, 32, 1)) == 32 * 32 * 10 + 10
    assert count("mlp", (8, 8, 2), hidden=(5,)) == (128 * 5 + 5) + (5 * 10 + 10)


def test_wrn_16_4_is_wide_resnet_16_4():
    wrn = models.get_model("wrn_16_4", input_shape=(32, 32, 3), num_outputs=10)
    wide = models.get_model(
        "wide_resnet", input_shape=(32, 32, 3), num_outputs=10, depth=16, width_factor=4
    )
    assert wrn.module == wide.module
    assert wrn.module.stage_sizes == (2, 2, 2)
    assert wrn.module.stage_channels == (64, 128, 256)
    assert wrn.module.num_groups == 16


def test_resnet_gn_default_is_resnet18_layout():
    module = models.get_model("resnet_gn", input_shape=(32, 32, 3), num_outputs=2).module
    assert module.stage_sizes == (2, 2, 2, 2)
    assert module.stage_channels == (16, 32, 64, 128)


def test_group_count_divides_channels():
    assert resnet.group_count(64, 8) == 8
    assert resnet.group_count(24, 16) == 12
    assert resnet.group_count(4, 8) == 4
    assert resnet.group_count(7, 4) == 1


def test_unknown_model_name():
    with pytest.raises(ValueError, match="'resnet_bn'.*small_cnn"):
        models.get_model("resnet_bn", input_shape=SHAPE, num_outputs=2)


def test_unknown_kwarg_names_argument_and_model():
    with pytest.raises(ValueError, match="'depth'.*'small_cnn'"):
        models.get_model("small_cnn", input_shape=SHAPE, num_outputs=2, depth=3)


@pytest.mark.parametrize(
    "name, kwargs, shape, match",
    [
        ("mlp", {"activation": "gelu"}, SHAPE, "activation"),
        ("mlp", {"hidden": (4, 0)}, SHAPE, "hidden"),
        ("small_cnn", {"width": 0}, SHAPE, "width"),
        ("small_cnn", {}, (12, 12, 1), "13"),
        ("wide_resnet", {"depth": 12}, SHAPE, "depth"),
        ("resnet_gn", {"stage_sizes": ()}, SHAPE, "stage_sizes"),
        ("resnet_gn", {"num_groups": 0}, SHAPE, "num_groups"),
        ("linear", {}, (16, 16), "input_shape"),
    ],
)
def test_invalid_options(name, kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        models.get_model(name, input_shape=shape, num_outputs=2, **kwargs)


def test_invalid_num_outputs():
    with pytest.raises(ValueError, match="num_outputs"):
        models.get_model("linear", input_shape=SHAPE, num_outputs=0)


def test_apply_rejects_wrong_images():
    model, params = _small("linear")
    with pytest.raises(ValueError, match="images.shape"):
        model.apply(params, jnp.zeros(SHAPE))
    with pytest.raises(ValueError, match="images.shape"):
        model.apply(params, jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="dtype"):
        model.apply(params, jnp.zeros((1, *SHAPE), jnp.uint8))


def test_register_rejects_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        models.register("linear")(lambda num_outputs: None)


def test_one_spec_builds_one_model_whose_programs_are_shared():
    spec = dict(input_shape=(16, 16, 1), num_outputs=4)
    first = models.get_model("small_cnn", **spec)
    assert models.get_model("small_cnn", **spec) is first
    assert models.get_model("small_cnn", **spec, width=0.5) is not first
    assert models.get_model("small_cnn", input_shape=(16, 16, 1), num_outputs=3) is not first
    # Runs of one model then share the jitted prediction program.
    predict = evaluate.make_predict_fn(first.apply, "multiclass")
    again = models.get_model("small_cnn", **spec)
    assert evaluate.make_predict_fn(again.apply, "multiclass") is predict
