"""Pre-activation residual networks with GroupNorm: a small-image ResNet and WideResNets.

Both registered families share one body, the pre-activation ResNet of He, Zhang, Ren, Sun,
"Identity mappings in deep residual networks", ECCV 2016 (https://arxiv.org/abs/1603.05027),
itself a variant of "Deep residual learning for image recognition", CVPR 2016
(https://arxiv.org/abs/1512.03385). Each basic block computes::

  y = act(GN(x));  shortcut = x, or conv1x1(y, stride) when the shape changes
  out = shortcut + conv3x3(act(GN(conv3x3(y, stride))))

and the network is ``conv3x3 stem -> stages of blocks -> act(GN) -> global mean pool -> dense``.

BatchNorm is replaced by GroupNorm (Wu & He, "Group normalization", ECCV 2018,
https://arxiv.org/abs/1803.08494), which normalises each example on its own, so per-example
gradients and DP-SGD clipping stay exact. Convolutions may use weight standardisation (Qiao et al.,
https://arxiv.org/abs/1903.10520), as De, Berrada, Hayes, Smith, Balle do for DP-SGD in "Unlocking
high-accuracy differentially private image classification through scale", 2022
(https://arxiv.org/abs/2204.13650).

Registered models:

* ``resnet_gn``: ResNet-18 layout (``stage_sizes=(2, 2, 2, 2)``) with ``width`` base channels
  doubling per stage, and a 3x3 stride-1 stem without max pooling, for small medical images.
* ``wide_resnet`` / ``wrn_16_4``: WRN-d-k of Zagoruyko & Komodakis, "Wide residual networks",
  BMVC 2016 (https://arxiv.org/abs/1605.07146): a 16-channel stem and three stages of
  ``(d - 4) / 6`` blocks with ``16k, 32k, 64k`` channels; WRN-16-4 with 16 GroupNorm groups and
  weight standardisation is the CIFAR-10 model of De et al. 2022.

All convolutions are bias-free (a GroupNorm shift or the residual sum follows each) and use
He normal init; no scale is zero-initialised, so every parameter gets a non-zero gradient at init.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.models import registry


def group_count(channels: int, num_groups: int) -> int:
    """The largest number of groups <= ``num_groups`` that divides ``channels``."""
    groups = max(1, min(num_groups, channels))
    while channels % groups:
        groups -= 1
    return groups


class StandardizedConv(nn.Module):
    """Bias-free 2D convolution whose filters are standardised before use.

    With ``standardize``, each output filter ``w`` becomes ``(w - mean(w)) / ||w - mean(w)||``
    (mean and norm over its ``kh * kw * c_in`` fan-in): weight standardisation scaled so that the
    filter has unit L2 norm and the output keeps roughly the input's variance. Without it this is
    a plain convolution.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      standardize: whether to apply weight standardisation.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    standardize: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.he_normal(), (kh, kw, x.shape[-1], self.features)
        )
        if self.standardize:
            centred = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
            kernel = centred * jax.lax.rsqrt(
                jnp.sum(jnp.square(centred), axis=(0, 1, 2), keepdims=True) + 1e-8
            )
        # Symmetric padding (k // 2) as in the papers; "SAME" pads stride-2 convs asymmetrically.
        padding = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
        return jax.lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            window_strides=self.strides,
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``x + conv(act(GN(conv(act(GN(x))))))`` (see module docstring).

    Attributes:
      channels: output channels.
      strides: spatial stride of the first convolution (and of the projection shortcut).
      num_groups: GroupNorm groups, reduced to a divisor of the channel count.
      activation: ``"relu"`` or ``"tanh"``.
      weight_standardization: standardise convolution filters.
    """

    channels: int
    strides: int = 1
    num_groups: int = 8
    activation: str = "relu"
    weight_standardization: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = registry.get_activation(self.activation)
        ws = self.weight_standardization
        stride = (self.strides, self.strides)
        y = act(nn.GroupNorm(group_count(x.shape[-1], self.num_groups))(x))
        if self.strides != 1 or x.shape[-1] != self.channels:
            shortcut = StandardizedConv(self.channels, (1, 1), stride, ws, name="shortcut")(y)
        else:
            shortcut = x
        y = StandardizedConv(self.channels, (3, 3), stride, ws)(y)
        y = act(nn.GroupNorm(group_count(self.channels, self.num_groups))(y))
        y = StandardizedConv(self.channels, (3, 3), (1, 1), ws)(y)
        return shortcut + y


class PreActResNet(nn.Module):
    """Pre-activation ResNet with GroupNorm for small images (see module docstring).

    Attributes:
      num_outputs: logits per example.
      stem_channels: channels of the 3x3 stride-1 stem convolution.
      stage_channels: channels of each stage; every stage after the first halves H and W.
      stage_sizes: blocks per stage.
      num_groups: GroupNorm groups (reduced per layer to a divisor of its channel count).
      activation: ``"relu"`` or ``"tanh"``.
      weight_standardization: standardise convolution filters.
    """

    num_outputs: int
    stem_channels: int
    stage_channels: tuple[int, ...]
    stage_sizes: tuple[int, ...]
    num_groups: int = 8
    activation: str = "relu"
    weight_standardization: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        act = registry.get_activation(self.activation)
        x = StandardizedConv(
            self.stem_channels, (3, 3), (1, 1), self.weight_standardization, name="stem"
        )(images)
        for stage, (channels, size) in enumerate(
            zip(self.stage_channels, self.stage_sizes, strict=True)
        ):
            for block in range(size):
                x = PreActBlock(
                    channels=channels,
                    strides=2 if stage > 0 and block == 0 else 1,
                    num_groups=self.num_groups,
                    activation=self.activation,
                    weight_standardization=self.weight_standardization,
                    name=f"stage{stage}_block{block}",
                )(x)
        x = act(nn.GroupNorm(group_count(x.shape[-1], self.num_groups), name="final_norm")(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.lecun_normal(), name="head")(
            x
        )


def _check_common(num_groups: int, activation: str) -> None:
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be >= 1")
    registry.get_activation(activation)


@registry.register("resnet_gn")
def resnet_gn(
    num_outputs: int,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    width: int = 16,
    num_groups: int = 8,
    activation: str = "relu",
    weight_standardization: bool = False,
) -> PreActResNet:
    """Pre-activation ResNet with GroupNorm and a 3x3 stem (ResNet-18 layout by default).

    Args:
      num_outputs: logits per example.
      stage_sizes: blocks per stage; ``(2, 2, 2, 2)`` is ResNet-18, ``(3, 4, 6, 3)`` ResNet-34.
      width: channels of the stem and the first stage; stage ``i`` has ``width * 2**i``.
      num_groups: GroupNorm groups, reduced per layer to a divisor of its channel count.
      activation: ``"relu"`` or ``"tanh"``.
      weight_standardization: standardise convolution filters (off by default).
    """
    stage_sizes = tuple(int(s) for s in stage_sizes)
    if not stage_sizes or min(stage_sizes) < 1:
        raise ValueError(f"stage_sizes={stage_sizes} must be a non-empty tuple of positive ints")
    if width < 1:
        raise ValueError(f"width={width} must be >= 1")
    _check_common(num_groups, activation)
    return PreActResNet(
        num_outputs=num_outputs,
        stem_channels=int(width),
        stage_channels=tuple(int(width) * 2**i for i in range(len(stage_sizes))),
        stage_sizes=stage_sizes,
        num_groups=int(num_groups),
        activation=activation,
        weight_standardization=bool(weight_standardization),
    )


@registry.register("wide_resnet")
def wide_resnet(
    num_outputs: int,
    depth: int = 16,
    width_factor: int = 4,
    num_groups: int = 16,
    activation: str = "relu",
    weight_standardization: bool = True,
) -> PreActResNet:
    """WideResNet-``depth``-``width_factor`` with GroupNorm, as used for DP-SGD by De et al. 2022.

    Args:
      num_outputs: logits per example.
      depth: total depth d; ``(d - 4)`` must be divisible by 6 (blocks per stage ``(d - 4) / 6``).
      width_factor: k; stages have ``16k, 32k, 64k`` channels.
      num_groups: GroupNorm groups, reduced per layer to a divisor of its channel count.
      activation: ``"relu"`` or ``"tanh"``.
      weight_standardization: standardise convolution filters (on, as in De et al. 2022).
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth={depth} must be >= 10 with (depth - 4) divisible by 6")
    if width_factor < 1:
        raise ValueError(f"width_factor={width_factor} must be >= 1")
    _check_common(num_groups, activation)
    blocks = (depth - 4) // 6
    return PreActResNet(
        num_outputs=num_outputs,
        stem_channels=16,
        stage_channels=(16 * width_factor, 32 * width_factor, 64 * width_factor),
        stage_sizes=(blocks, blocks, blocks),
        num_groups=int(num_groups),
        activation=activation,
        weight_standardization=bool(weight_standardization),
    )


@registry.register("wrn_16_4")
def wrn_16_4(
    num_outputs: int,
    num_groups: int = 16,
    activation: str = "relu",
    weight_standardization: bool = True,
) -> PreActResNet:
    """WRN-16-4 with 16 GroupNorm groups and weight standardisation (De et al. 2022, CIFAR-10).

    Args:
      num_outputs: logits per example.
      num_groups: GroupNorm groups.
      activation: ``"relu"`` or ``"tanh"``.
      weight_standardization: standardise convolution filters.
    """
    return wide_resnet(
        num_outputs,
        depth=16,
        width_factor=4,
        num_groups=num_groups,
        activation=activation,
        weight_standardization=weight_standardization,
    )
