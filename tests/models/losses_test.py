"""Per-example losses: the closed forms of each task, one loss per example, the single-example
form private training vmaps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.models import losses, registry


def test_multiclass_is_minus_log_softmax_of_the_label():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 2])
    expected = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
    got = losses.per_example_loss(logits, labels, "multiclass")
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_binary_and_multilabel_are_bernoulli_cross_entropies():
    z = jnp.array([[1.5], [-0.5]])
    y = jnp.array([1, 0])
    s = jax.nn.sigmoid(z[:, 0])
    binary = losses.per_example_loss(z, y, "binary")
    np.testing.assert_allclose(binary, [-np.log(s[0]), -np.log(1 - s[1])], rtol=1e-6)
    # Multilabel: the sum over labels of the binary loss of each column.
    z2 = jnp.array([[1.5, -2.0, 0.3]])
    y2 = jnp.array([[1, 0, 1]])
    columns = [losses.per_example_loss(z2[:, j : j + 1], y2[:, j], "binary") for j in range(3)]
    np.testing.assert_allclose(
        losses.per_example_loss(z2, y2, "multilabel"), sum(columns), rtol=1e-6
    )


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_losses_are_per_example_not_batch_means(task):
    # Changing one example's logits changes only that example's loss.
    logits = jax.random.normal(jax.random.key(0), (4, 3))
    labels = {
        "multiclass": jnp.array([0, 1, 2, 0]),
        "binary": jnp.array([0, 1, 1, 0]),
        "multilabel": jnp.array([[0, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]]),
    }[task]
    base = losses.per_example_loss(logits, labels, task)
    moved = losses.per_example_loss(logits.at[2].add(5.0), labels, task)
    assert base.shape == (4,)
    np.testing.assert_array_equal(np.delete(base, 2), np.delete(moved, 2))
    assert moved[2] != base[2]


def test_example_loss_fn_equals_the_batched_loss_row_by_row():
    model = registry.get_model("linear", input_shape=(4, 4, 1), num_outputs=3)
    params = model.init(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (5, 4, 4, 1))
    labels = jnp.array([0, 1, 2, 1, 0])
    one = losses.example_loss_fn(model.apply, "multiclass")
    batched = losses.per_example_loss(model.apply(params, images), labels, "multiclass")
    per_row = jax.vmap(one, in_axes=(None, 0, 0))(params, images, labels)
    np.testing.assert_allclose(per_row, batched, rtol=1e-6)


def test_probabilities_sum_to_one_or_lie_in_unit_interval():
    logits = jax.random.normal(jax.random.key(2), (3, 4))
    np.testing.assert_allclose(losses.probabilities(logits, "multiclass").sum(-1), 1.0, rtol=1e-6)
    p = losses.probabilities(logits, "binary")
    assert p.shape == (3,) and bool(jnp.all((p > 0) & (p < 1)))


def test_unknown_task_names_the_field_and_allowed_values():
    with pytest.raises(ValueError, match="task='regression' must be one of"):
        losses.per_example_loss(jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32), "regression")
    with pytest.raises(ValueError, match="task="):
        losses.probabilities(jnp.zeros((1, 2)), "regression")
