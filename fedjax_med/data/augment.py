"""Data-independent image augmentations for augmentation multiplicity, from an explicit key.

The augmentations of De et al. 2022 ("Unlocking high-accuracy differentially private image
classification through scale", https://arxiv.org/abs/2204.13650, Section 3.1): a random
horizontal flip and a random crop of the image padded by reflection (a random shift of at most
``max_shift`` pixels in each direction). For medical images a vertical flip is offered as well
(``"vflip"``): histology patches and dermoscopy have no preferred orientation, whereas chest
X-rays do (the heart's side), so no flip is applied unless asked for. Every operation keeps the
image's shape and dtype and is a pure function of ``(key, image)``.

Volumes ``(D, H, W, C)`` take the same operations: the flips mirror W and H (never the slice
axis D, along which a scan's anatomy has a direction), and the shift moves the volume in all three
axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OPERATIONS = ("flip", "vflip", "shift")


def parse_operations(spec: str) -> tuple[str, ...]:
    """The operations of a comma-separated ``spec`` (``""``: none).

    Raises:
      ValueError: ``privacy.augmentations=...`` naming an unknown operation and the allowed ones.

    Examples:
      >>> parse_operations("flip, shift")
      ('flip', 'shift')
    """
    ops = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown or len(set(ops)) != len(ops):
        raise ValueError(
            f"privacy.augmentations={spec!r} must be distinct comma-separated names from "
            f"{OPERATIONS}"
        )
    return ops


def augment(
    key: jax.Array, image: jax.Array, operations: tuple[str, ...], max_shift: int = 0
) -> jax.Array:
    """One random view of ``image`` (``(H, W, C)``, or a volume ``(D, H, W, C)``): the
    ``operations`` in the order flip (W), vertical flip (H), shift, each drawn from its own split
    of ``key``.

    ``"shift"`` pads every spatial axis by ``max_shift`` pixels with reflection and crops a window
    of the original size at a uniformly random offset in ``[0, 2 max_shift]`` per axis
    (``max_shift = 0``: identity).
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"image.shape={image.shape} must be (H, W, C) or (D, H, W, C)")
    k_flip, k_vflip, k_shift = jax.random.split(key, 3)
    if "flip" in operations:
        image = jnp.where(jax.random.bernoulli(k_flip), jnp.flip(image, axis=-2), image)
    if "vflip" in operations:
        image = jnp.where(jax.random.bernoulli(k_vflip), jnp.flip(image, axis=-3), image)
    if "shift" in operations and max_shift > 0:
        spatial = image.ndim - 1
        padding = ((max_shift, max_shift),) * spatial + ((0, 0),)
        padded = jnp.pad(image, padding, "reflect")
        offsets = jax.random.randint(k_shift, (spatial,), 0, 2 * max_shift + 1)
        image = jax.lax.dynamic_slice(padded, (*offsets, 0), image.shape)
    return image
