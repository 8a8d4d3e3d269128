"""The small tanh CNN used as the standard DP-SGD baseline on MNIST-sized images.

Architecture of Papernot, Thakurta, Song, Chien, Erlingsson, "Tempered sigmoid activations for
deep learning with differential privacy", AAAI 2021 (https://arxiv.org/abs/2007.14191), also the
end-to-end CNN baseline of Tramer & Boneh, "Differentially private learning needs better features
(or much more data)", ICLR 2021 (https://arxiv.org/abs/2011.11660)::

  conv(16, 8x8, stride 2, SAME) -> tanh -> max_pool(2x2, stride 1)
  -> conv(32, 4x4, stride 2, VALID) -> tanh -> max_pool(2x2, stride 1)
  -> flatten -> dense(32) -> tanh -> dense(num_outputs)

Bounded (tempered sigmoid) activations keep activations, and so per-example gradient norms, from
growing during training, which loses less signal to clipping. At 28x28x1 with 10 outputs it has
26,010 parameters. It has no normalisation layer, so examples never interact.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fedjax_med.models import layers, registry

# 13 -> conv SAME/2 -> 7 -> pool -> 6 -> conv VALID/2 -> 2 -> pool -> 1; anything smaller is empty.
MIN_SIZE = 13


class SmallCNN(nn.Module):
    """Two strided convolutions with max pooling, then two dense layers (see module docstring).

    Attributes:
      num_outputs: logits per example.
      width: multiplier of the channel counts (16, 32) and of the hidden dense width (32).
      activation: ``"tanh"`` as in the papers, or ``"relu"``.
    """

    num_outputs: int
    width: float = 1.0
    activation: str = "tanh"

    def _scaled(self, channels: int) -> int:
        return max(1, round(channels * self.width))

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if min(images.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"images.shape={images.shape}: small_cnn needs H, W >= {MIN_SIZE}")
        act = registry.get_activation(self.activation)
        init = registry.kernel_init(self.activation)
        # layers.Conv / layers.max_pool: nn.Conv / nn.max_pool's parameters and outputs, in forms
        # that run faster (space-to-depth for the 1-channel stem; no select-and-scatter).
        x = layers.Conv(
            self._scaled(16), (8, 8), (2, 2), "SAME", kernel_init=init, name="Conv_0"
        )(images)
        x = layers.max_pool(act(x), (2, 2), (1, 1))
        x = layers.Conv(
            self._scaled(32), (4, 4), (2, 2), "VALID", kernel_init=init, name="Conv_1"
        )(x)
        x = layers.max_pool(act(x), (2, 2), (1, 1))
        x = x.reshape((x.shape[0], -1))
        x = act(nn.Dense(self._scaled(32), kernel_init=init)(x))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.lecun_normal())(x)


@registry.register("small_cnn", min_size=MIN_SIZE)
def small_cnn(num_outputs: int, width: float = 1.0, activation: str = "tanh") -> SmallCNN:
    """The DP-SGD baseline CNN of Papernot et al. 2021 / Tramer & Boneh 2021 (see module docstring).

    Args:
      num_outputs: logits per example.
      width: multiplier of every hidden width (1.0 is the published network).
      activation: ``"tanh"`` or ``"relu"``.
    """
    if not width > 0:
        raise ValueError(f"width={width} must be > 0")
    registry.get_activation(activation)
    return SmallCNN(num_outputs=num_outputs, width=float(width), activation=activation)
