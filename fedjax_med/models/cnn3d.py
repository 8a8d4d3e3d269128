"""A small 3-D convolutional network with GroupNorm for volumes (CT, MRI, MedMNIST-3D).

The layout follows the 3-D CNN baselines of MedMNIST v2 (Yang et al., Scientific Data 2023,
https://arxiv.org/abs/2110.14795), shrunk so that it trains on CPU::

  [conv3d(w 2^s, 3x3x3, stride 2, no bias) -> GroupNorm -> act]  for s = 0 .. stages - 1
  -> global pool over (D, H, W) (max by default, or mean) -> dense(num_outputs)

BatchNorm is replaced by GroupNorm (Wu & He, ECCV 2018, https://arxiv.org/abs/1803.08494), which
normalises each example on its own, so per-example gradients (DP-SGD) stay exact; the convolutions
carry no bias because the GroupNorm shift follows each. Global max pooling ("is the finding
anywhere in the volume", as in multiple-instance learning) suits small focal lesions in a large
volume, where a mean over positions dilutes them. At 28x28x28x1 with ``width=8`` and three
stages the network has about 18k parameters and ~3M multiply-adds per volume. Every weight enters
one ``conv_general_dilated`` or ``dot_general``, so ghost clipping
(:mod:`fedjax_med.privacy.ghost`) taps all of them, 3-D convolutions included.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fedjax_med.models import registry, resnet


class CNN3D(nn.Module):
    """Strided 3-D convolutions with GroupNorm, mean pooling and a dense head (module docstring).

    Attributes:
      num_outputs: logits per example.
      width: channels of the first stage; each further stage doubles them.
      stages: number of stride-2 convolution stages.
      num_groups: GroupNorm groups (the largest divisor of the channels up to it).
      activation: ``"relu"`` or ``"tanh"``.
      pooling: ``"max"`` or ``"mean"`` over positions before the head.
    """

    num_outputs: int
    width: int = 8
    stages: int = 3
    num_groups: int = 4
    activation: str = "relu"
    pooling: str = "max"

    @nn.compact
    def __call__(self, volumes: jax.Array) -> jax.Array:
        if volumes.ndim != 5:
            raise ValueError(f"volumes.shape={volumes.shape} must be (B, D, H, W, C) for cnn3d")
        act = registry.get_activation(self.activation)
        init = registry.kernel_init(self.activation)
        x = volumes
        for stage in range(self.stages):
            features = self.width * 2**stage
            x = nn.Conv(
                features,
                (3, 3, 3),
                strides=(2, 2, 2),
                padding="SAME",
                use_bias=False,
                kernel_init=init,
            )(x)
            x = nn.GroupNorm(num_groups=resnet.group_count(features, self.num_groups))(x)
            x = act(x)
        x = x.max(axis=(1, 2, 3)) if self.pooling == "max" else x.mean(axis=(1, 2, 3))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.lecun_normal())(x)


@registry.register("cnn3d", min_size=2, spatial_dims=3)
def cnn3d(
    num_outputs: int,
    width: int = 8,
    stages: int = 3,
    num_groups: int = 4,
    activation: str = "relu",
    pooling: str = "max",
) -> CNN3D:
    """The GroupNorm 3-D CNN for volumes ``(D, H, W, C)`` (see module docstring).

    Args:
      num_outputs: logits per example.
      width: channels of the first stage (>= 1); stage ``s`` has ``width * 2**s``.
      stages: stride-2 stages (>= 1); each halves D, H and W (rounding up).
      num_groups: GroupNorm groups (>= 1).
      activation: ``"relu"`` or ``"tanh"``.
      pooling: ``"max"`` or ``"mean"``.
    """
    for name, value in (("width", width), ("stages", stages), ("num_groups", num_groups)):
        if value < 1:
            raise ValueError(f"config field 'model.kwargs.{name}'={value} must be >= 1")
    registry.get_activation(activation)
    if pooling not in ("max", "mean"):
        raise ValueError(f"config field 'model.kwargs.pooling'={pooling!r} must be 'max' or 'mean'")
    return CNN3D(num_outputs, width, stages, num_groups, activation, pooling)
