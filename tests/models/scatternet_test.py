"""ScatterNet features: kymatio's scattering, deterministic, channel layout as documented."""

import jax
import numpy as np
import pytest

from fedjax_med.models import scatternet

kymatio_numpy = pytest.importorskip("kymatio.scattering2d.frontend.numpy_frontend")


def test_features_match_kymatio_numpy_and_are_deterministic():
    images = np.random.default_rng(0).normal(size=(2, 12, 16, 2)).astype(np.float32)
    features = jax.jit(scatternet.scatter_features)(images)
    assert features.shape == (2, 3, 4, 2 * 81) and scatternet.num_channels(2, 8) == 81
    reference = kymatio_numpy.ScatteringNumPy2D(J=2, shape=(12, 16), L=8, max_order=2)
    for c in range(2):
        expected = np.moveaxis(reference(images[..., c]), 1, -1)  # (B, H', W', 81)
        np.testing.assert_allclose(
            features[..., c * 81 : (c + 1) * 81], expected, rtol=1e-4, atol=1e-5
        )
    np.testing.assert_array_equal(jax.jit(scatternet.scatter_features)(images), features)


def test_models_have_only_head_parameters_and_independent_per_example_gradients():
    from fedjax_med import models
    from fedjax_med.models import losses

    cnn = models.get_model("scatter_cnn", input_shape=(28, 28, 1), num_outputs=10)
    shapes = jax.eval_shape(cnn.init, jax.random.key(0))
    assert list(shapes) == ["Conv_0", "Conv_1", "Dense_0", "head"]  # no scattering parameters
    assert shapes["Conv_0"]["kernel"].shape == (3, 3, 81, 16)
    assert shapes["Dense_0"]["kernel"].shape == (4 * 4 * 32, 32)  # 7x7 -> stride 2 -> 4x4
    model = models.get_model("scatter_linear", input_shape=(8, 8, 1), num_outputs=3)
    params = model.init(jax.random.key(0))
    assert list(params) == ["head"] and params["head"]["kernel"].shape == (2 * 2 * 81, 3)
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    labels = np.arange(3)
    grad = jax.grad(losses.example_loss_fn(model.apply, "multiclass"))
    per_example = jax.jit(jax.vmap(grad, in_axes=(None, 0, 0)))
    grads = per_example(params, images, labels)
    other = per_example(params, images.at[0].set(-images[0]), labels)  # example 0 replaced
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other), strict=True):
        assert np.all(np.isfinite(a)) and np.all(np.any(a != 0, axis=tuple(range(1, a.ndim))))
        assert not np.allclose(a[0], b[0])
        np.testing.assert_array_equal(a[1:], b[1:])
