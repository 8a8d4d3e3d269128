"""cnn3d: volumes in, per-example gradients exact (vmap = loop, ghost = vmap), 3-D augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med import models
from fedjax_med.data import augment
from fedjax_med.models import losses
from fedjax_med.privacy import clipping, per_example

SHAPE = (8, 8, 8, 1)


@pytest.fixture(scope="module")
def case():
    model = models.get_model("cnn3d", input_shape=SHAPE, num_outputs=3, width=4, stages=2)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, *SHAPE))
    y = jnp.array([0, 1, 2, 1])

    def loss(p, volume, label):
        return losses.per_example_loss(model.apply(p, volume[None]), label[None], "multiclass")[0]

    return model, params, x, y, loss


def test_shapes_and_batch_independence(case):
    model, params, x, _, _ = case
    logits = model.apply(params, x)
    assert logits.shape == (4, 3)
    # GroupNorm normalises each volume alone: an example's logits ignore the rest of the batch.
    np.testing.assert_allclose(model.apply(params, x[:1]), logits[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \(batch, \*\(8, 8, 8, 1\)\)"):
        model.apply(params, x[:, 0])


def test_image_models_refuse_volumes_and_cnn3d_refuses_images():
    with pytest.raises(ValueError, match=r"'model.name'.*volumes need a volume model \(cnn3d"):
        models.get_model("small_cnn", input_shape=SHAPE, num_outputs=2)
    with pytest.raises(ValueError, match=r"takes examples \(D, H, W, C\)"):
        models.get_model("cnn3d", input_shape=(8, 8, 1), num_outputs=2)
    with pytest.raises(ValueError, match="model.kwargs.width'=0"):
        models.get_model("cnn3d", input_shape=SHAPE, num_outputs=2, width=0)


def test_per_example_grads_equal_a_loop(case):
    _, params, x, y, loss = case
    batched = jax.jit(per_example.per_example_grads(loss))(params, x, y)
    grad = jax.jit(jax.grad(loss))
    for i in range(len(x)):
        row = jax.tree.map(lambda b, i=i: b[i], batched)
        jax.tree.map(
            lambda b, g: np.testing.assert_allclose(b, g, rtol=2e-4, atol=1e-6),
            row,
            grad(params, x[i], y[i]),
        )


def test_ghost_clipping_of_3d_convolutions_equals_vmap(case):
    _, params, x, y, loss = case
    mask = jnp.array([True, True, True, False])
    outs = {
        method: jax.jit(clipping.clipped_grad_sum(loss, clip_norm=0.05, method=method).fn)(
            params, x, y, mask
        )
        for method in ("vmap", "ghost")
    }
    (vmap_sum, vmap_aux), (ghost_sum, ghost_aux) = outs["vmap"], outs["ghost"]
    assert int(ghost_aux["num_clipped"]) == int(vmap_aux["num_clipped"]) == 3
    np.testing.assert_allclose(ghost_aux["mean_grad_norm"], vmap_aux["mean_grad_norm"], rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7), ghost_sum, vmap_sum
    )


def test_augmentation_of_volumes_flips_in_plane_and_shifts_in_3d():
    volume = jnp.arange(4 * 5 * 6, dtype=jnp.float32).reshape(4, 5, 6, 1)
    views = [augment.augment(jax.random.key(k), volume, ("flip", "vflip")) for k in range(16)]
    allowed = [volume, volume[:, :, ::-1], volume[:, ::-1], volume[:, ::-1, ::-1]]
    for view in views:  # never mirrored along the slice axis D
        assert any(bool(jnp.array_equal(view, a)) for a in allowed)
    assert len({np.asarray(v).tobytes() for v in views}) == 4
    shifted = [augment.augment(jax.random.key(k), volume, ("shift",), 1) for k in range(16)]
    assert all(v.shape == volume.shape for v in shifted)
    # The centre voxel of a view shifted by (dz, dy, dx) in {-1, 0, 1}^3 holds the value
    # 30 dz + 6 dy + dx away (the strides of the arange); some views move along z too.
    moves = {
        (dz, dy, dx): 30 * dz + 6 * dy + dx
        for dz in (-1, 0, 1)
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    }
    found = {float(v[2, 2, 3, 0] - volume[2, 2, 3, 0]) for v in shifted}
    assert found <= set(moves.values())
    assert any(moves[m] in found for m in moves if m[0] != 0)
