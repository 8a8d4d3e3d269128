"""Gradient inversion: exact iDLG labels, a clean gradient leaks the image, DP noise stops it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.attacks import gradient_inversion, image_metrics
from fedjax_med.models import registry

SHAPE = (16, 16, 1)
NUM_CLASSES = 10
# One static configuration for the clean and the DP attack, so the program compiles once.
ATTACK = dict(image_shape=SHAPE, steps=150, lr=0.1, tv_weight=1e-3, restarts=2)


@pytest.fixture(scope="module")
def model_and_params():
    model = registry.get_model("mlp", input_shape=SHAPE, num_outputs=NUM_CLASSES, hidden=(64,))
    return model, model.init(jax.random.key(0))


@pytest.fixture(scope="module")
def truth():
    """A smooth synthetic image in [0.15, 0.85], the kind of image a TV prior suits."""
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    image = 0.5 + 0.35 * np.sin(2 * np.pi * 0.8 * xx) * np.cos(2 * np.pi * 0.6 * yy)
    return jnp.asarray(image[None, :, :, None], jnp.float32)


@pytest.fixture(scope="module")
def baseline(truth):
    """Mean PSNR of uniformly random images against the truth: what guessing achieves."""
    guesses = jax.random.uniform(jax.random.key(9), (16, *SHAPE))
    return float(image_metrics.psnr(guesses, jnp.broadcast_to(truth, guesses.shape), 1.0).mean())


def _dp_gradient(grad, key, clip_norm=1.0, noise_multiplier=1.0):
    """One example's gradient clipped to ``clip_norm`` plus N(0, (sigma C)^2) on the sum."""
    leaves, treedef = jax.tree_util.tree_flatten(grad)
    norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in leaves))
    scale = jnp.minimum(1.0, clip_norm / norm)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        leaf * scale + noise_multiplier * clip_norm * jax.random.normal(k, leaf.shape)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def test_idlg_reads_the_label_of_one_example_exactly(model_and_params, truth):
    model, params = model_and_params
    path = gradient_inversion.last_kernel_path(params)
    assert gradient_inversion.get_at_path(params, path).shape == (64, NUM_CLASSES)
    for label in (0, 3, 7, 9):
        grad = gradient_inversion.shared_gradient(model.apply, params, truth, jnp.array([label]))
        kernel_grad = gradient_inversion.get_at_path(grad, path)
        assert int(gradient_inversion.idlg_label(kernel_grad)) == label


def test_idlg_with_tanh_cnn_negative_activations():
    model = registry.get_model("small_cnn", input_shape=SHAPE, num_outputs=4)
    params = model.init(jax.random.key(1))
    images = jax.random.uniform(jax.random.key(2), (4, *SHAPE))
    path = gradient_inversion.last_kernel_path(params)
    grad_fn = jax.jit(lambda x, y: gradient_inversion.shared_gradient(model.apply, params, x, y))
    for i in range(4):
        grad = grad_fn(images[i : i + 1], jnp.array([i]))
        assert int(gradient_inversion.idlg_label(gradient_inversion.get_at_path(grad, path))) == i


def test_clean_gradient_leaks_the_image_and_dp_noise_hides_it(model_and_params, truth, baseline):
    model, params = model_and_params
    label = jnp.array([3])
    grad = gradient_inversion.shared_gradient(model.apply, params, truth, label)
    # labels=None: the label comes from iDLG, as a real attacker would get it.
    clean = gradient_inversion.invert_gradients(
        model.apply, params, grad, labels=None, key=jax.random.key(1), **ATTACK
    )
    noisy = _dp_gradient(grad, jax.random.key(5))
    private = gradient_inversion.invert_gradients(
        model.apply, params, noisy, labels=label, key=jax.random.key(1), **ATTACK
    )
    psnr_clean = float(image_metrics.psnr(clean.images, truth, 1.0)[0])
    psnr_dp = float(image_metrics.psnr(private.images, truth, 1.0)[0])
    print(f"PSNR clean={psnr_clean:.2f} dp={psnr_dp:.2f} baseline={baseline:.2f}")
    assert clean.losses.shape == (2,) and clean.all_images.shape == (2, 1, *SHAPE)
    assert float(clean.losses[clean.best]) == float(clean.losses.min())
    assert float(clean.images.min()) >= 0.0 and float(clean.images.max()) <= 1.0
    assert psnr_clean > baseline + 10.0
    assert float(image_metrics.ssim(clean.images, truth, 1.0)[0]) > 0.9
    assert psnr_dp < baseline + 2.0


def test_dlg_l2_distance_also_reconstructs(model_and_params, truth, baseline):
    model, params = model_and_params
    label = jnp.array([5])
    grad = gradient_inversion.shared_gradient(model.apply, params, truth, label)
    result = gradient_inversion.invert_gradients(
        model.apply,
        params,
        grad,
        image_shape=SHAPE,
        labels=label,
        steps=150,
        lr=0.1,
        tv_weight=0.0,
        restarts=1,
        key=jax.random.key(2),
        distance="l2",
    )
    assert float(image_metrics.psnr(result.images, truth, 1.0)[0]) > baseline + 10.0


def test_invalid_arguments_are_rejected(model_and_params, truth):
    model, params = model_and_params
    grad = gradient_inversion.shared_gradient(model.apply, params, truth, jnp.array([0]))
    kw = dict(image_shape=SHAPE, key=jax.random.key(0))
    with pytest.raises(ValueError, match="distance"):
        gradient_inversion.invert_gradients(model.apply, params, grad, distance="l1", **kw)
    with pytest.raises(ValueError, match="labels=None"):
        gradient_inversion.invert_gradients(model.apply, params, grad, batch_size=2, **kw)
    with pytest.raises(ValueError, match="features, classes"):
        gradient_inversion.idlg_label(jnp.zeros(3))


def test_psnr_and_ssim_sanity(truth):
    x = jax.random.uniform(jax.random.key(0), (3, *SHAPE))
    y = jax.random.uniform(jax.random.key(1), (3, *SHAPE))
    assert np.all(np.isinf(np.asarray(image_metrics.psnr(x, x, 1.0))))
    np.testing.assert_allclose(image_metrics.ssim(x, x, 1.0), 1.0, atol=1e-5)
    s = np.asarray(image_metrics.ssim(x, y, 1.0))
    assert s.shape == (3,) and np.all(s >= -1.0) and np.all(s <= 1.0) and np.all(s < 0.5)
    np.testing.assert_allclose(image_metrics.ssim(x, y, 1.0), image_metrics.ssim(y, x, 1.0))
    # A global offset of d gives MSE d^2: PSNR = -20 log10(d).
    np.testing.assert_allclose(image_metrics.psnr(truth, truth + 0.01, 1.0), 40.0, rtol=1e-4)
    # A smaller perturbation is more similar under both metrics.
    noise = jax.random.normal(jax.random.key(2), truth.shape)
    near, far = truth + 0.02 * noise, truth + 0.2 * noise
    assert float(image_metrics.ssim(near, truth, 1.0)[0]) > float(
        image_metrics.ssim(far, truth, 1.0)[0]
    )
    with pytest.raises(ValueError, match="window_size"):
        image_metrics.ssim(jnp.zeros((8, 8, 1)), jnp.zeros((8, 8, 1)), 1.0)
