"""ScatterNet features with a linear model or a small CNN on top (Tramer & Boneh 2021).

Tramer and Boneh, "Differentially private learning needs better features (or much more data)",
ICLR 2021 (https://arxiv.org/abs/2011.11660): a *fixed, data-independent* feature extractor,
the wavelet scattering transform (Bruna & Mallat, TPAMI 2013; Oyallon & Mallat, CVPR 2015) with
``J = 2`` scales, ``L = 8`` angles and order 2, turns each ``H x W`` channel into
``K = 1 + J L + L^2 J (J - 1) / 2 = 81`` channels of size ``H / 2^J x W / 2^J``; DP-SGD then trains
only a linear model or a small CNN on those features. Their published accuracies at
``(epsilon, delta) = (3, 1e-5)``: Fashion-MNIST 89.7% (ScatterNet + linear), 89.0% (ScatterNet +
CNN) against 86.0% end to end; MNIST 98.7% / 98.1% (the CNN on ScatterNet features) ; CIFAR-10
67.0% / 69.3% against 59.2%.

The scattering is kymatio's JAX frontend (Andreux et al., JMLR 2020), imported from
``kymatio.scattering2d`` directly (the top-level ``kymatio.jax`` also imports the 3D transform,
which does not import with recent SciPy). It has no parameters, so privacy is unaffected: a
per-example function of one example. Features are normalised by one of the paper's two choices
(``norm``): ``"group"`` (default), a GroupNorm without affine parameters, *per example*, which
spends no privacy; or ``"data"``, their DataNorm: per-channel ``(x - mean) / sqrt(var + eps)``
with a mean and variance of the training set's features estimated with DP before step 0
(:mod:`fedjax_med.privacy.data_norm`: clipped sums of per-example channel moments, Gaussian noise
of multiplier ``norm_noise``, composed into the run's epsilon by the trainer). The statistics sit
in the parameter module :data:`~fedjax_med.models.registry.DATA_STATS` (``mean`` and ``var``,
``K C`` each, initialised to 0 and 1), which the central trainer sets and never trains. The
features are computed inside
``apply`` (each step, from the images), so any trainer, sampler and clipping method works
unchanged; the scattering is the same at every call (deterministic, tested against kymatio's
NumPy frontend).

Install: ``pip install 'fedjax_med[scatter]'``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.models import registry
from fedjax_med.models.resnet import group_count
from fedjax_med.privacy import data_norm

INSTALL_HINT = "ScatterNet models need kymatio: pip install 'fedjax_med[scatter]'"
# 2^J with J = 2: smaller images give an empty feature map.
MIN_SIZE = 4
NORMS = ("group", "data")
# DataNorm's variance floor, as in the batch norm Tramer and Boneh load the statistics into.
DATA_NORM_EPS = 1e-5


def num_channels(scales: int, angles: int) -> int:
    """Scattering channels per input channel at order 2: ``1 + J L + L^2 J (J - 1) / 2``.

    Examples:
      >>> num_channels(2, 8)
      81
    """
    return 1 + scales * angles + angles**2 * scales * (scales - 1) // 2


@functools.lru_cache(maxsize=16)
def scattering_fn(height: int, width: int, scales: int = 2, angles: int = 8) -> Callable:
    """kymatio's order-2 scattering ``(..., H, W) -> (..., K, H / 2^J, W / 2^J)`` in JAX.

    Raises:
      ImportError: without kymatio, naming the install command.
    """
    try:
        from kymatio.scattering2d.frontend.jax_frontend import ScatteringJax2D
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    return ScatteringJax2D(J=scales, shape=(height, width), L=angles, max_order=2).scattering


def scatter_features(images: jax.Array, scales: int = 2, angles: int = 8) -> jax.Array:
    """ScatterNet features of ``images`` ``(B, H, W, C)``: ``(B, H / 2^J, W / 2^J, C K)``.

    Channel ``c K + k`` is scattering coefficient ``k`` of input channel ``c``.
    """
    b, h, w, c = images.shape
    fn = scattering_fn(h, w, scales, angles)
    out = fn(jnp.moveaxis(images, -1, 1))  # (B, C, K, H', W')
    out = out.reshape((b, c * out.shape[2], *out.shape[3:]))
    return jnp.moveaxis(out, 1, -1)


def channel_moments(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each example's per-channel spatial means of its ScatterNet features and of their squares
    (``(B, C K)`` twice): the inputs of DataNorm's private statistics."""
    return data_norm.channel_moments(scatter_features(images))


class DataStats(nn.Module):
    """DataNorm with statistics set from the data: ``(x - mean) / sqrt(var + eps)`` per channel.

    ``mean`` and ``var`` are parameters only so that checkpoints hold them; their gradient is
    stopped (the trainer also keeps noise and updates off them).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = x.shape[-1]
        mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (k,)))
        var = jax.lax.stop_gradient(self.param("var", nn.initializers.ones, (k,)))
        return data_norm.normalize(x, mean, var, DATA_NORM_EPS)


class ScatterNet(nn.Module):
    """Scattering, GroupNorm (no affine) or DataNorm, then a linear layer or a small tanh CNN.

    The CNN is the one Tramer and Boneh train on MNIST-size scattering features
    (``github.com/ftramer/Handcrafted-DP``, ``models.MNIST_CNN`` with ``in_channels = 81``):
    conv(16, 3x3, stride 2) -> tanh -> conv(32, 3x3, stride 1) -> tanh -> dense(32) -> tanh ->
    dense(num_outputs).

    Attributes:
      num_outputs: logits per example.
      head: ``"linear"`` or ``"cnn"``.
      num_groups: GroupNorm groups over the ``C K`` feature channels (27 of 81: three each).
      channels: the CNN's 3x3 convolution widths (the first with stride 2), tanh after each.
      hidden: the CNN's dense width before the output layer.
      norm: ``"group"`` (GroupNorm, no privacy spent) or ``"data"`` (private DataNorm).
      norm_clip: DataNorm's clip norms ``(C_a, C_b)`` of each example's channel means and channel
        mean squares (:mod:`fedjax_med.privacy.data_norm`).
      norm_noise: DataNorm's noise multiplier ``sigma`` of both releases.
    """

    num_outputs: int
    head: str = "linear"
    num_groups: int = 27
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 32
    norm: str = "group"
    norm_clip: tuple[float, float] = (1.0, 1.0)
    norm_noise: float = 8.0

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = scatter_features(images)
        if self.norm == "data":
            x = DataStats(name=registry.DATA_STATS)(x)
        else:
            groups = group_count(x.shape[-1], self.num_groups)
            x = nn.GroupNorm(groups, use_bias=False, use_scale=False, name="feature_norm")(x)
        if self.head == "cnn":
            # Their MNIST_CNN on scattering features: 3x3 convs, stride 2 then 1, padding 1.
            for i, width in enumerate(self.channels):
                stride = 2 if i == 0 else 1
                x = jnp.tanh(nn.Conv(width, (3, 3), strides=(stride, stride), padding=1)(x))
            x = jnp.tanh(nn.Dense(self.hidden)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_outputs, name="head")(x.reshape((x.shape[0], -1)))


def data_norm_of(module: nn.Module) -> ScatterNet | None:
    """``module`` if it is a ScatterNet with DataNorm (whose statistics the trainer must set)."""
    if isinstance(module, ScatterNet) and module.norm == "data":
        return module
    return None


def _norm_options(norm: str, norm_clip, norm_noise: float) -> dict:
    if norm not in NORMS:
        raise ValueError(f"config field 'model.kwargs.norm'={norm!r} must be one of {NORMS}")
    clip = tuple(float(c) for c in norm_clip)
    if len(clip) != 2 or not all(c > 0 for c in clip):
        raise ValueError(
            f"config field 'model.kwargs.norm_clip'={norm_clip!r} must be two clip norms > 0 "
            "(of the channel means and of the channel mean squares)"
        )
    if not norm_noise > 0:
        raise ValueError(f"config field 'model.kwargs.norm_noise'={norm_noise!r} must be > 0")
    return {"norm": norm, "norm_clip": clip, "norm_noise": float(norm_noise)}


def _check(num_groups: int) -> None:
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be >= 1")
    try:
        import kymatio  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None


@registry.register("scatter_linear", min_size=MIN_SIZE)
def scatter_linear(
    num_outputs: int,
    num_groups: int = 27,
    norm: str = "group",
    norm_clip: tuple = (1.0, 1.0),
    norm_noise: float = 8.0,
) -> ScatterNet:
    """ScatterNet + GroupNorm or DataNorm + linear classifier (Tramer & Boneh 2021; see module
    docstring and :class:`ScatterNet` for the arguments)."""
    _check(num_groups)
    return ScatterNet(
        num_outputs=num_outputs,
        head="linear",
        num_groups=num_groups,
        **_norm_options(norm, norm_clip, norm_noise),
    )


@registry.register("scatter_cnn", min_size=MIN_SIZE)
def scatter_cnn(
    num_outputs: int,
    num_groups: int = 27,
    channels: tuple = (16, 32),
    hidden: int = 32,
    norm: str = "group",
    norm_clip: tuple = (1.0, 1.0),
    norm_noise: float = 8.0,
) -> ScatterNet:
    """ScatterNet + GroupNorm or DataNorm + a small tanh CNN (Tramer & Boneh 2021; see module
    docstring).

    Args:
      num_outputs: logits per example.
      num_groups: GroupNorm groups over the feature channels.
      channels: the 3x3 convolutions' widths (the first with stride 2), each followed by tanh.
      hidden: the dense width before the output layer.
      norm: ``"group"`` or ``"data"`` (see :class:`ScatterNet`).
      norm_clip: DataNorm's two clip norms.
      norm_noise: DataNorm's noise multiplier.
    """
    _check(num_groups)
    if not channels or min(channels) < 1 or hidden < 1:
        raise ValueError(f"channels={channels} and hidden={hidden} must be positive")
    return ScatterNet(
        num_outputs=num_outputs,
        head="cnn",
        num_groups=num_groups,
        channels=tuple(int(c) for c in channels),
        hidden=int(hidden),
        **_norm_options(norm, norm_clip, norm_noise),
    )
