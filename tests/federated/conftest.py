"""Small shared pieces of the federated tests: a quadratic loss, a tiny MLP, random clients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.federated import client
from fedjax_med.models import registry

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3


def quadratic_loss(params, x, y):
    """0.5 ||w - x||^2 per example: the full-batch gradient is w - mean(x), known in closed form."""
    del y
    return 0.5 * jnp.sum((params["w"] - x) ** 2, axis=-1)


def random_clients(counts, max_examples=None, seed=0, shape=IMAGE_SHAPE, classes=NUM_CLASSES):
    """Padded client arrays with the given sizes: normal images, uniform labels, zero padding."""
    counts = np.asarray(counts)
    m = int(counts.max()) if max_examples is None else max_examples
    rng = np.random.default_rng(seed)
    mask = np.arange(m)[None, :] < counts[:, None]
    images = rng.normal(size=(len(counts), m, *shape)).astype(np.float32) * mask.reshape(
        mask.shape + (1,) * len(shape)
    )
    labels = rng.integers(0, classes, size=(len(counts), m)).astype(np.int32) * mask
    return client.client_data(images, labels, mask, counts)


@pytest.fixture(scope="session")
def mlp():
    """A tiny MLP on 8x8x1 images with 3 classes and its initial parameters."""
    model = registry.get_model(
        "mlp", input_shape=IMAGE_SHAPE, num_outputs=NUM_CLASSES, hidden=(8,), activation="tanh"
    )
    return model, model.init(jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def quadratic():
    return quadratic_loss


@pytest.fixture(scope="session")
def make_clients():
    return random_clients


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    """Compile without XLA's optimisation passes: the programs here are tiny, compiling dominates.

    Restored after each module so tests elsewhere keep the default.
    """
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
