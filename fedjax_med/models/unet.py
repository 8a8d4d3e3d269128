"""U-Net for per-pixel classification, with GroupNorm and weight standardisation (no BatchNorm).

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015 (https://arxiv.org/abs/1505.04597): an encoder of ``depth`` levels, each two 3x3
convolutions then a 2x2 max-pool, a bottleneck, and a decoder that upsamples (nearest neighbour,
then a 3x3 convolution), concatenates the encoder's features of the same resolution (the skip
connection) and applies two 3x3 convolutions; a final 1x1 convolution gives ``num_outputs``
logits per pixel. Level ``l`` has ``width * 2**l`` channels::

  x -> [conv-GN-ReLU x2] --------------------------------------> concat -> [conv-GN-ReLU x2] -> 1x1
         | pool                                                   ^ up
         [conv-GN-ReLU x2] -> ... -> bottleneck [conv-GN-ReLU x2] -

Every 3x3 convolution is weight-standardised (Qiao et al. 2019, https://arxiv.org/abs/1903.10520:
``W_hat = (W - mean(W)) / sqrt(var(W) + eps)`` over each output channel's fan-in) and followed by
GroupNorm (Wu & He, ECCV 2018, https://arxiv.org/abs/1803.08494), so every statistic is computed
within one example and ``apply`` is per-example, as DP-SGD and the federated code need. Because the
standardised weight passes through operations before the convolution, the ghost-clipping path
treats these kernels as "other" parameters (per-example gradients, correct but without its
speed-up); ``privacy.method = "vmap"`` with ``privacy.microbatch_size`` bounds the memory.

Output: logits of shape ``(B, H, W, num_outputs)`` for images ``(B, H, W, C)``; any ``H, W >=
2**depth`` (odd sizes are pooled with SAME padding and upsampled back to the skip's size).
Parameters at ``width=8, depth=3`` with one input channel and 4 outputs: 118,932.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.models import registry

_WS_EPS = 1e-5


def standardize_weight(kernel: jax.Array, eps: float = _WS_EPS) -> jax.Array:
    """``(W - mean) / sqrt(var + eps)`` over all axes but the last (each output channel's fan-in).

    Examples:
      >>> import jax.numpy as jnp
      >>> w = standardize_weight(jnp.arange(8.0).reshape(2, 2, 2, 1))
      >>> round(float(w.mean()), 6), round(float(w.std()), 4)
      (0.0, 1.0)
    """
    axes = tuple(range(kernel.ndim - 1))
    mean = kernel.mean(axis=axes, keepdims=True)
    var = kernel.var(axis=axes, keepdims=True)
    return (kernel - mean) * jax.lax.rsqrt(var + eps)


def upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of ``(B, H, W, C)`` by repetition (its gradient is a
    reshape and a sum, cheaper to compile than a gather's scatter)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class WSConv(nn.Module):
    """A SAME-padded convolution whose kernel is weight-standardised before use (no bias: the
    GroupNorm after it has one)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.he_normal(), shape)
        return jax.lax.conv_general_dilated(
            x,
            standardize_weight(kernel).astype(x.dtype),
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def num_groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``.

    Examples:
      >>> num_groups(16, 8), num_groups(12, 8), num_groups(4, 8)
      (8, 6, 4)
    """
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


class ConvBlock(nn.Module):
    """``convs`` times: weight-standardised 3x3 conv -> GroupNorm -> ReLU."""

    features: int
    groups: int
    convs: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.convs):
            x = WSConv(self.features)(x)
            x = nn.GroupNorm(num_groups=num_groups(self.features, self.groups))(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """The U-Net of the module docstring.

    Attributes:
      num_outputs: logits per pixel (the number of classes, background included).
      width: channels of the first level; level ``l`` has ``width * 2**l``.
      depth: number of poolings (the bottleneck is at ``1 / 2**depth`` of the input size).
      groups: GroupNorm groups (at most; reduced to a divisor of the channel count).
    """

    num_outputs: int
    width: int = 8
    depth: int = 3
    groups: int = 8

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if min(images.shape[1:3]) < 2**self.depth:
            raise ValueError(
                f"images.shape={images.shape}: unet with depth={self.depth} needs H, W >= "
                f"{2**self.depth}"
            )
        x, skips = images, []
        for level in range(self.depth):
            x = ConvBlock(self.width * 2**level, self.groups)(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = ConvBlock(self.width * 2**self.depth, self.groups)(x)
        for level in reversed(range(self.depth)):
            skip = skips[level]
            x = upsample2(x)[:, : skip.shape[1], : skip.shape[2]]
            x = WSConv(self.width * 2**level)(x)
            x = jnp.concatenate([x, skip], axis=-1)
            x = ConvBlock(self.width * 2**level, self.groups)(x)
        return nn.Conv(self.num_outputs, (1, 1), kernel_init=nn.initializers.lecun_normal())(x)


@registry.register("unet", min_size=2)
def unet(num_outputs: int, width: int = 8, depth: int = 3, groups: int = 8) -> UNet:
    """The GroupNorm + weight-standardised U-Net of Ronneberger et al. 2015 (module docstring).

    Args:
      num_outputs: logits per pixel.
      width: channels of the first level (>= 1); 8 trains on 2 CPU cores at 32x32 and 64x64.
      depth: poolings, in [1, 6]; inputs need ``H, W >= 2**depth``.
      groups: GroupNorm groups (>= 1), at most.
    """
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"config field 'model.kwargs.width'={width!r} must be an integer >= 1")
    if not (isinstance(depth, int) and 1 <= depth <= 6):
        raise ValueError(f"config field 'model.kwargs.depth'={depth!r} must be in [1, 6]")
    if not (isinstance(groups, int) and groups >= 1):
        raise ValueError(f"config field 'model.kwargs.groups'={groups!r} must be >= 1")
    return UNet(num_outputs=num_outputs, width=width, depth=depth, groups=groups)
