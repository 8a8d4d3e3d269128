"""Fully connected baselines on flattened pixels: logistic regression and an MLP.

Registered as ``linear`` and ``mlp``. Both act on each example's flattened pixels only, so they
need no normalisation layer at all and are the cheapest models for DP-SGD baselines.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from fedjax_med.models import registry


class Linear(nn.Module):
    """Logistic regression: one dense layer from the flattened image to the logits.

    Attributes:
      num_outputs: logits per example.
    """

    num_outputs: int

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.reshape((images.shape[0], -1))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.lecun_normal())(x)


class MLP(nn.Module):
    """Multilayer perceptron: flatten -> [dense -> activation] per hidden size -> dense.

    Attributes:
      num_outputs: logits per example.
      hidden: widths of the hidden layers, input side first.
      activation: ``"relu"`` (He normal init) or ``"tanh"`` (LeCun normal init).
    """

    num_outputs: int
    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        act = registry.get_activation(self.activation)
        x = images.reshape((images.shape[0], -1))
        for width in self.hidden:
            x = act(nn.Dense(width, kernel_init=registry.kernel_init(self.activation))(x))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.lecun_normal())(x)


@registry.register("linear")
def linear(num_outputs: int) -> nn.Module:
    """Logistic regression on flattened pixels (see :class:`Linear`)."""
    return Linear(num_outputs=num_outputs)


@registry.register("mlp")
def mlp(num_outputs: int, hidden: Sequence[int] = (256, 128), activation: str = "relu") -> MLP:
    """An MLP on flattened pixels (see :class:`MLP`).

    Args:
      num_outputs: logits per example.
      hidden: widths of the hidden layers; empty gives logistic regression.
      activation: ``"relu"`` or ``"tanh"``.
    """
    hidden = tuple(int(h) for h in hidden)
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden={hidden} must hold positive widths")
    registry.get_activation(activation)
    return MLP(num_outputs=num_outputs, hidden=hidden, activation=activation)
