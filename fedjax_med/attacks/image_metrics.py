"""Image similarity for judging reconstructions: PSNR and SSIM, batched over leading axes.

Both take images of shape ``(..., H, W, C)`` and return one value per image (shape ``...``).
SSIM follows Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to
structural similarity", IEEE TIP 2004: local statistics under an 11x11 Gaussian window with
sigma 1.5, constants ``(0.01 L)^2`` and ``(0.03 L)^2``, averaged over the valid positions and
the channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def psnr(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
    """Peak signal-to-noise ratio ``10 log10(L^2 / MSE)`` in dB, per image.

    Args:
      x, y: images of the same shape ``(..., H, W, C)``.
      data_range: ``L``, the span of valid pixel values (1.0 for images in ``[0, 1]``).

    Returns:
      PSNR per image, shape ``...``; ``inf`` for identical images.

    Examples:
      >>> import jax.numpy as jnp
      >>> round(float(psnr(jnp.zeros((4, 4, 1)), jnp.full((4, 4, 1), 0.1), 1.0)), 4)
      20.0
    """
    x, y = _check(x, y, data_range)
    mse = jnp.mean((x - y) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(data_range**2 / mse)


def ssim(
    x: jax.Array,
    y: jax.Array,
    data_range: float,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
) -> jax.Array:
    """Mean structural similarity (Gaussian window, Wang et al. 2004), per image, in ``[-1, 1]``.

    Args:
      x, y: images of the same shape ``(..., H, W, C)`` with ``H, W >= window_size``.
      data_range: span of valid pixel values.
      window_size: side of the Gaussian window.
      sigma: standard deviation of the Gaussian window in pixels.

    Returns:
      SSIM per image, shape ``...``; 1 for identical images.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.linspace(0.0, 1.0, 256).reshape(16, 16, 1)
      >>> round(float(ssim(x, x, 1.0)), 4)
      1.0
    """
    x, y = _check(x, y, data_range)
    *batch, h, w, c = x.shape
    if min(h, w) < window_size:
        raise ValueError(f"image size {(h, w)} must be >= window_size={window_size}")
    x = x.reshape((-1, h, w, c))
    y = y.reshape((-1, h, w, c))
    coords = jnp.arange(window_size, dtype=x.dtype) - (window_size - 1) / 2
    g = jnp.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = jnp.tile(jnp.outer(g, g)[:, :, None, None], (1, 1, 1, c))  # HWIO, depthwise

    def blur(z):
        return lax.conv_general_dilated(
            z,
            kernel,
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
        )

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return jnp.mean(num / den, axis=(-3, -2, -1)).reshape(batch)


def _check(x, y, data_range):
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim < 3:
        raise ValueError(f"x.shape={x.shape} and y.shape={y.shape} must match as (..., H, W, C)")
    if not data_range > 0:
        raise ValueError(f"data_range={data_range} must be > 0")
    return x, y
