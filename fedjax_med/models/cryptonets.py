"""CryptoNets: a CNN made of additions and multiplications only, so it runs on CKKS ciphertexts.

Gilad-Bachrach, Dowlin, Laine, Lauter, Naehrig, Wernsing, "CryptoNets: Applying neural networks to
encrypted data with high throughput and accuracy", ICML 2016
(https://proceedings.mlr.press/v48/gilad-bachrach16.html). After merging its linear layers the
network is (section 4.1, MNIST: 5 maps of 5x5 with stride 2, 100 hidden units)::

  conv(maps, kernel x kernel, stride, VALID) -> x^2 -> flatten (channel-major)
  -> dense(hidden) -> x^2 -> dense(num_outputs)

The square is the lowest-degree polynomial activation; every layer is a polynomial, of total
degree 4, i.e. multiplicative depth 5 counting the plaintext weights, which fixes the CKKS
modulus chain of encrypted inference (:mod:`fedjax_med.secure.he_inference`). The flatten is
channel-major ``(maps, H', W')`` so that each conv map is one ciphertext block of the encrypted
evaluator with no permutation. No normalisation layer: examples never interact, so DP-SGD's
per-example gradients and every trainer apply unchanged.

Encrypted cost grows with the rows of the first dense layer (``maps * H' * W'``, one ciphertext
rotation each) plus ``hidden``; a smaller ``maps``, a larger ``stride`` or a smaller ``hidden``
is faster to serve encrypted.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.models import registry


class CryptoNets(nn.Module):
    """conv -> square -> dense -> square -> dense (see module docstring).

    Attributes:
      num_outputs: logits per example.
      maps: output channels of the convolution.
      kernel: side of the square convolution window.
      stride: stride of the convolution in both directions.
      hidden: units of the hidden dense layer.
    """

    num_outputs: int
    maps: int = 5
    kernel: int = 5
    stride: int = 2
    hidden: int = 100

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if min(images.shape[1:3]) < self.kernel:
            raise ValueError(f"images.shape={images.shape}: cryptonets needs H, W >= {self.kernel}")
        x = nn.Conv(
            self.maps,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding="VALID",
            name="conv",
        )(images)
        x = jnp.square(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))  # channel-major
        x = jnp.square(nn.Dense(self.hidden, name="dense1")(x))
        return nn.Dense(self.num_outputs, name="dense2")(x)


@registry.register("cryptonets", min_size=5)
def cryptonets(
    num_outputs: int, maps: int = 5, kernel: int = 5, stride: int = 2, hidden: int = 100
) -> CryptoNets:
    """The CryptoNets network of Gilad-Bachrach et al. 2016 (see module docstring).

    Args:
      num_outputs: logits per example.
      maps, kernel, stride: the convolution (the paper: 5 maps of 5x5, stride 2).
      hidden: the hidden dense width (the paper: 100).
    """
    for name, value in (("maps", maps), ("kernel", kernel), ("stride", stride), ("hidden", hidden)):
        if not value >= 1:
            raise ValueError(f"config field 'model.kwargs.{name}'={value} must be >= 1")
    return CryptoNets(num_outputs, maps=maps, kernel=kernel, stride=stride, hidden=hidden)
