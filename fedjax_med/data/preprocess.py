"""Image normalisation that never pools raw statistics across sites.

Images are scaled to ``[0, 1]`` (uint8 / 255; float32 images are taken as already in that range)
and then standardised, ``x' = (x - mu) / sigma``, with either fixed public constants
(``"fixed"``) or each site's own per-channel training statistics (``"per_site"``): a hospital can
compute its own mean and standard deviation without seeing anyone else's images. Sites with no
training images fall back to the fixed constants.

Note for private training: per-site statistics are computed from the site's training images and
are not covered by a DP guarantee; use ``"fixed"`` when every released quantity must be private.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_med.data import dataset as dataset_lib


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Per-site, per-channel affine standardisation: ``(x / scale - mean[site]) / std[site]``."""

    mean: np.ndarray  # (num_sites, C)
    std: np.ndarray  # (num_sites, C)
    method: str

    def __call__(self, images: np.ndarray, sites: np.ndarray) -> np.ndarray:
        """Returns float32 images of the same shape, standardised with each example's site."""
        x = to_unit_range(images)
        # (B, C) -> (B, 1, ..., 1, C): images (B, H, W, C) and volumes (B, D, H, W, C) alike.
        shape = (len(sites),) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        mean, std = self.mean[sites].reshape(shape), self.std[sites].reshape(shape)
        return ((x - mean) / std).astype(np.float32)


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]; float32 is returned as is."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32, copy=False)


def fit_normalizer(
    train: dataset_lib.ImageDataset,
    num_sites: int,
    *,
    method: str,
    mean: float = 0.5,
    std: float = 0.25,
) -> Normalizer:
    """Builds a :class:`Normalizer` from fixed constants or each site's own training images.

    Examples:
        >>> import numpy as np
        >>> from fedjax_med.data import dataset
        >>> imgs = np.stack([np.full((2, 2, 1), 10, np.uint8), np.full((2, 2, 1), 200, np.uint8)])
        >>> d = dataset.ImageDataset(imgs, np.array([0, 1]), np.array([0, 1]), np.array([0, 1]))
        >>> norm = fit_normalizer(d, 2, method="per_site")
        >>> [round(float(v), 3) for v in norm.mean[:, 0]]
        [0.039, 0.784]
    """
    if std <= 0:
        raise ValueError(f"data.std={std} must be > 0")
    channels = train.images.shape[-1]
    means = np.full((num_sites, channels), mean, np.float32)
    stds = np.full((num_sites, channels), std, np.float32)
    if method == "per_site":
        for site in range(num_sites):
            idx = np.flatnonzero(train.sites == site)
            if idx.size == 0:
                continue
            x = to_unit_range(train.images[idx])
            axes = tuple(range(x.ndim - 1))  # every axis but the channel
            means[site] = x.mean(axis=axes)
            # A constant site (e.g. blank images) would divide by zero: floor the deviation.
            stds[site] = np.maximum(x.std(axis=axes), 1e-3)
    elif method != "fixed":
        raise ValueError(f"data.normalization={method!r} must be 'per_site' or 'fixed'")
    return Normalizer(mean=means, std=stds, method=method)
