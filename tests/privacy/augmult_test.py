"""Augmentation multiplicity: the mean of K augmented gradients, clipped once (De et al. 2022)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.data import augment
from fedjax_med.models import losses, registry
from fedjax_med.privacy import augmult, clipping

CLIP = 0.1  # small: every example is clipped, so "clipped once" is what is tested


@pytest.fixture(scope="module")
def case():
    model = registry.get_model("mlp", input_shape=(6, 6, 1), num_outputs=3, hidden=(4,))
    params = model.init(jax.random.key(0))
    loss_fn = losses.example_loss_fn(model.apply, "multiclass")
    images = jax.random.normal(jax.random.key(1), (5, 6, 6, 1))
    labels = jnp.arange(5) % 3
    keys = augmult.example_keys(jax.random.key(2), 7, jnp.arange(5))
    return loss_fn, params, images, labels, keys


def _flip_shift(key, image):
    return augment.augment(key, image, ("flip", "vflip", "shift"), 2)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)


def test_identical_views_equal_one_view(case):
    loss_fn, params, images, labels, keys = case
    same = lambda key, image: _flip_shift(jax.random.key(5), image)  # noqa: E731 (ignores key)
    sums = [
        jax.jit(
            clipping.clipped_grad_sum(
                augmult.augmult_loss_fn(loss_fn, same, k), clip_norm=CLIP, method="vmap"
            )
        )(params, (images, keys), labels)[0]
        for k in (1, 4)
    ]
    _close(sums[0], sums[1])


def test_mean_of_k_augmented_gradients_clipped_once(case):
    loss_fn, params, images, labels, keys = case
    k = 3
    # Reference: every (example, view) gradient, the mean over the K views, then one clip.
    view_keys = jax.vmap(lambda key: jax.random.split(key, k))(keys)
    views = jax.vmap(jax.vmap(_flip_shift, in_axes=(0, None)))(view_keys, images)
    assert not np.array_equal(views[:, 0], views[:, 1])  # the views differ
    grad = jax.vmap(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, None)), in_axes=(None, 0, 0))
    means = jax.tree.map(lambda g: g.mean(axis=1), jax.jit(grad)(params, views, labels))
    assert bool(jnp.all(clipping.global_norms(means) > CLIP))
    clipped, _ = clipping.clip_per_example(means, CLIP)
    expected = jax.tree.map(lambda g: g.sum(axis=0), clipped)
    for method in ("vmap", "ghost"):
        fn = clipping.clipped_grad_sum(
            augmult.augmult_loss_fn(loss_fn, _flip_shift, k), clip_norm=CLIP, method=method
        )
        total, aux = jax.jit(fn)(params, (images, keys), labels)
        _close(total, expected)
        assert int(aux["num_clipped"]) == images.shape[0]


def test_augment_is_a_pure_function_of_key_and_image():
    image = jnp.arange(36.0).reshape(6, 6, 1)
    fn = jax.jit(lambda key, x: augment.augment(key, x, ("flip", "shift"), 2))
    a, b = fn(jax.random.key(3), image), fn(jax.random.key(3), image)
    np.testing.assert_array_equal(a, b)
    assert a.shape == image.shape
    np.testing.assert_array_equal(augment.augment(jax.random.key(3), image, (), 2), image)
    # Over keys, every shift offset in [-2, 2]^2 (with a flip or not) is drawn.
    views = jax.jit(jax.vmap(lambda k: augment.augment(k, image, ("shift",), 2)))(
        jax.random.split(jax.random.key(0), 400)
    )
    assert len({np.asarray(v).tobytes() for v in views}) == 25


def test_bad_multiplicity_and_operations_are_refused():
    with pytest.raises(ValueError, match=r"privacy.augmult=0 must be an integer >= 1"):
        augmult.augmult_loss_fn(lambda p, x, y: 0.0, _flip_shift, 0)
    with pytest.raises(ValueError, match=r"privacy.augmentations='rotate'"):
        augment.parse_operations("rotate")
