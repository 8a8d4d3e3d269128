"""Per-example gradients equal a Python loop of single-example ``jax.grad``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_med.privacy import per_example


class _TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3, 3), strides=2)(x))
        x = nn.GroupNorm(num_groups=1)(x)
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _cnn_case():
    model = _TinyCNN()
    inputs = jax.random.normal(jax.random.key(0), (5, 6, 6, 2))
    labels = jnp.array([0, 1, 2, 3, 0])
    params = model.init(jax.random.key(1), inputs[:1])

    def loss_fn(params, image, label):
        logits = model.apply(params, image[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    return loss_fn, params, inputs, labels


def _pytree_input_case():
    """Inputs and labels that are themselves pytrees."""
    params = {"w": jnp.arange(6.0).reshape(3, 2) / 6, "b": jnp.ones(2)}
    inputs = {"x": jax.random.normal(jax.random.key(2), (4, 3)), "scale": jnp.arange(1.0, 5.0)}
    labels = (jnp.ones((4, 2)), jnp.arange(4.0))

    def loss_fn(params, example, label):
        pred = example["scale"] * jnp.tanh(example["x"] @ params["w"] + params["b"])
        return jnp.sum((pred - label[0]) ** 2) + label[1] * jnp.sum(params["b"] ** 2)

    return loss_fn, params, inputs, labels


@pytest.mark.parametrize("case", [_cnn_case, _pytree_input_case])
def test_equals_loop_of_single_grads(case):
    loss_fn, params, inputs, labels = case()
    grads = jax.jit(per_example.per_example_grads(loss_fn))(params, inputs, labels)
    single = jax.jit(jax.grad(loss_fn))
    batch = len(jax.tree.leaves(labels)[0])
    for i in range(batch):
        take = lambda tree, i=i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        expected = single(params, take(inputs), take(labels))
        jax.tree.map(
            lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6),
            take(grads),
            expected,
        )


def test_leading_batch_dimension():
    loss_fn, params, inputs, labels = _cnn_case()
    grads = jax.eval_shape(per_example.per_example_grads(loss_fn), params, inputs, labels)
    expected = jax.tree.map(lambda p: (5,) + p.shape, params)
    assert jax.tree.map(lambda g: g.shape, grads) == expected
