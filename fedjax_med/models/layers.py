"""Layers written for speed on every backend, equal to their textbook form to float rounding.

* :func:`max_pool`: max pooling as an elementwise maximum of shifted strided slices. The usual
  ``lax.reduce_window`` form differentiates through XLA's select-and-scatter, which XLA:CPU runs
  as a slow generic loop (``benchmarks/RESULTS.md``); here the backward pass is one padded
  select per window offset. Ties go to the first window element in row-major order, as
  select-and-scatter's ``>=`` selection does, so gradients match too.
* :class:`Conv`: a 2D convolution with a bias that, for a strided convolution with few input
  channels, runs the equivalent space-to-depth form (a stride-``s`` convolution with ``k x k``
  filters on ``C`` channels equals a stride-1 convolution with ``ceil(k/s) x ceil(k/s)`` filters on
  ``s^2 C`` channels of the ``s x s``-blocked image; the filter is re-laid out and zero-padded,
  not changed), which fills the vector units that a 1-channel input leaves idle. Its parameters
  are exactly those of ``flax.linen.Conv`` (``kernel`` ``(kh, kw, C, F)`` and ``bias`` ``(F,)``),
  so checkpoints load either way.

Space-to-depth is the "pixel unshuffle" of Shi et al., "Real-time single image and video
super-resolution using an efficient sub-pixel convolutional neural network", CVPR 2016
(https://arxiv.org/abs/1609.05158), used for the strided stem of e.g. Ridnik et al., "TResNet",
WACV 2021 (https://arxiv.org/abs/2003.13630).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Space-to-depth pays while the blocked input still has few channels: s^2 C <= this.
SPACE_TO_DEPTH_MAX_CHANNELS = 16


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int]) -> jax.Array:
    """VALID max pooling of ``x`` (NHWC): ``out[n, i, j, c] = max x[n, s i + a, s j + b, c]``.

    The maximum over ``0 <= a < window[0]``, ``0 <= b < window[1]``, as one strided slice per
    window offset. The gradient goes to the first maximal element in row-major window order (the
    choice of ``lax.reduce_window``'s gradient), through a custom VJP that records that element's
    window offset and scatters the output gradient back with one padded select per offset:
    linear work, where autodiff of the slice maximum left XLA a fusion that re-reads every
    window's comparisons.

    Examples:
      >>> import jax.numpy as jnp
      >>> max_pool(jnp.arange(9.0).reshape(1, 3, 3, 1), (2, 2), (1, 1))[0, :, :, 0]
      Array([[4., 5.],
             [7., 8.]], dtype=float32)
    """
    (wh, ww), (sh, sw) = tuple(window), tuple(strides)
    if min(wh, ww, sh, sw) < 1:
        raise ValueError(f"window={tuple(window)} and strides={tuple(strides)} must be >= 1")
    _, height, width, _ = x.shape
    if height < wh or width < ww:
        raise ValueError(f"x.shape={x.shape}: smaller than the pooling window {(wh, ww)}")
    return _max_pool((wh, ww, sh, sw, height, width), x)


def _pool_views(geometry, x):
    wh, ww, sh, sw, height, width = geometry
    out_h, out_w = (height - wh) // sh + 1, (width - ww) // sw + 1
    for a, b in itertools.product(range(wh), range(ww)):
        yield a, b, x[:, a : a + (out_h - 1) * sh + 1 : sh, b : b + (out_w - 1) * sw + 1 : sw]


def _max_pool_fwd(geometry, x):
    out = index = None
    for k, (_, _, view) in enumerate(_pool_views(geometry, x)):
        if out is None:
            out, index = view, jnp.zeros(view.shape, jnp.int32)
        else:
            greater = view > out  # strict: ties keep the earlier offset
            out = jnp.where(greater, view, out)
            index = jnp.where(greater, k, index)
    return out, index


def _max_pool_bwd(geometry, index, grad):
    wh, ww, sh, sw, height, width = geometry
    out_h, out_w = grad.shape[1:3]
    zero = jnp.zeros((), grad.dtype)
    total = None
    for k, (a, b) in enumerate(itertools.product(range(wh), range(ww))):
        part = lax.pad(
            jnp.where(index == k, grad, zero),
            zero,
            [
                (0, 0, 0),
                (a, height - a - (out_h - 1) * sh - 1, sh - 1),
                (b, width - b - (out_w - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ],
        )
        total = part if total is None else total + part
    return (total,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_pool(geometry, x):
    return _max_pool_fwd(geometry, x)[0]


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def space_to_depth_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding)`` (NHWC, HWIO) in blocked form.

    With strides ``(sh, sw)``, the padded input is cut into ``sh x sw`` blocks stacked on the
    channel axis (``(N, H/sh, W/sw, sh sw C)``) and the filter, zero-padded to multiples of the
    strides, is laid out the same way; a stride-1 VALID convolution of the two is the original
    convolution, term by term (only zeros are added).
    """
    sh, sw = tuple(strides)
    kh, kw, channels, features = kernel.shape
    _, height, width, _ = x.shape
    pads = (
        lax.padtype_to_pads((height, width), (kh, kw), (sh, sw), padding)
        if isinstance(padding, str)
        else [tuple(p) for p in padding]
    )
    out_h = (height + sum(pads[0]) - kh) // sh + 1
    out_w = (width + sum(pads[1]) - kw) // sw + 1
    # Filter taps per block, and the padded extent that gives exactly out_h x out_w outputs.
    th, tw = -(-kh // sh), -(-kw // sw)
    rows, cols = (out_h + th - 1) * sh, (out_w + tw - 1) * sw
    (top, _), (left, _) = pads
    x = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        [(0, 0, 0), (top, rows - height - top, 0), (left, cols - width - left, 0), (0, 0, 0)],
    )  # a negative high padding crops rows no output reads
    n = x.shape[0]
    x = x.reshape(n, rows // sh, sh, cols // sw, sw, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows // sh, cols // sw, sh * sw * channels)
    kernel = jnp.pad(kernel, [(0, th * sh - kh), (0, tw * sw - kw), (0, 0), (0, 0)])
    kernel = kernel.reshape(th, sh, tw, sw, channels, features)
    kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(th, tw, sh * sw * channels, features)
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), "VALID", dimension_numbers=_DIMENSIONS
    )


def use_space_to_depth(channels: int, strides: Sequence[int]) -> bool:
    """Whether :class:`Conv` takes the blocked form: strided, with ``s^2 C`` channels at most
    :data:`SPACE_TO_DEPTH_MAX_CHANNELS`."""
    sh, sw = tuple(strides)
    return (sh, sw) != (1, 1) and sh * sw * channels <= SPACE_TO_DEPTH_MAX_CHANNELS


class Conv(nn.Module):
    """``flax.linen.Conv`` (2D, NHWC, with bias), in space-to-depth form when that is faster.

    Same parameters, initialisers and outputs as ``nn.Conv(features, kernel_size, strides,
    padding, kernel_init=kernel_init)``; see the module docstring for when the blocked form runs.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
      kernel_init: initialiser of the ``(kh, kw, C, features)`` kernel.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str | tuple[tuple[int, int], tuple[int, int]] = "SAME"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if use_space_to_depth(x.shape[-1], self.strides):
            y = space_to_depth_conv(x, kernel, self.strides, self.padding)
        else:
            y = lax.conv_general_dilated(
                x,
                kernel.astype(x.dtype),
                self.strides,
                self.padding,
                dimension_numbers=_DIMENSIONS,
            )
        return y + bias.astype(y.dtype)
