"""Fixed-point encoding of float vectors into the ring Z_R, R = 2^bits.

A client clips each coordinate to [-clip, clip], multiplies by ``scale`` and rounds to an integer q
with |q| <= clip * scale + 1; the ring element is q mod R. The scale is chosen so that the sum of
``num_clients`` encodings satisfies |sum q| <= num_clients * (clip * scale + 1) <= R/2 - 1, so the
centred residue of the modular sum is the integer sum itself (no wraparound).

Quantisation error of a decoded sum of n encodings (per coordinate, after clipping):
deterministic rounding <= n / (2 scale); stochastic rounding (unbiased) < n / scale.

Ring elements are uint64 arrays holding values in [0, R); numpy uint64 arithmetic wraps mod 2^64,
which is a multiple of R, so reducing with ``& (R - 1)`` after each add/sub is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_BITS = 8
MAX_BITS = 64


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{bits=} must be in [{MIN_BITS}, {MAX_BITS}]")


def mask_of(bits: int) -> np.uint64:
    """R - 1 for R = 2^bits, as a uint64 bit mask."""
    _check_bits(bits)
    return np.uint64((1 << bits) - 1)


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a + b) mod 2^bits on uint64 arrays."""
    return (np.asarray(a, np.uint64) + np.asarray(b, np.uint64)) & mask_of(bits)


def sub(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a - b) mod 2^bits on uint64 arrays."""
    return (np.asarray(a, np.uint64) - np.asarray(b, np.uint64)) & mask_of(bits)


def to_ring(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers -> their residues mod 2^bits (uint64).

    Examples:
        >>> to_ring(np.array([-1, 2]), 8).tolist()
        [255, 2]
    """
    return np.asarray(q, np.int64).astype(np.uint64) & mask_of(bits)


def from_ring(y: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^bits -> centred signed integers in [-R/2, R/2) (int64; exact for bits < 64).

    Examples:
        >>> from_ring(np.array([255, 2], np.uint64), 8).tolist()
        [-1, 2]
    """
    y = np.asarray(y, np.uint64) & mask_of(bits)
    if bits == MAX_BITS:
        return y.astype(np.int64)  # two's complement reinterpretation is the centred residue
    half = np.uint64(1 << (bits - 1))
    signed = y.astype(np.int64)
    return np.where(y >= half, signed - np.int64(1 << bits), signed)


@dataclasses.dataclass(frozen=True)
class FieldEncoder:
    """Clip, scale and round float vectors into Z_(2^bits); decode sums of up to n of them.

    Args:
        clip: per-coordinate clipping bound, > 0.
        num_clients: the largest number of encodings that will be summed.
        bits: ring size R = 2^bits, 8 <= bits <= 62 (float64 must represent R/2 exactly enough).
        stochastic: unbiased stochastic rounding instead of round-to-nearest.

    Guarantees:
        |sum of n <= num_clients encodings| <= R/2 - 1, so ``decode_sum`` never sees a wrap; the
        decoded sum differs from the sum of the clipped inputs by at most ``error_bound(n)``
        per coordinate.

    Examples:
        >>> enc = FieldEncoder(clip=1.0, num_clients=3)
        >>> rng = np.random.default_rng(0)
        >>> ys = [enc.encode(np.array([0.5, -0.25]), rng) for _ in range(3)]
        >>> total = add(add(ys[0], ys[1], 32), ys[2], 32)
        >>> np.allclose(enc.decode_sum(total, 3), [1.5, -0.75], atol=enc.error_bound(3))
        True
    """

    clip: float
    num_clients: int
    bits: int = 32
    stochastic: bool = False

    def __post_init__(self):
        if not self.clip > 0:
            raise ValueError(f"clip={self.clip} must be > 0")
        if self.num_clients < 1:
            raise ValueError(f"num_clients={self.num_clients} must be >= 1")
        if not MIN_BITS <= self.bits <= 62:
            raise ValueError(f"bits={self.bits} must be in [{MIN_BITS}, 62]")
        if self.scale <= 0:
            raise ValueError(
                f"bits={self.bits} too small for num_clients={self.num_clients}: "
                "need 2^(bits-1) - 1 > num_clients"
            )

    @property
    def scale(self) -> float:
        """Largest scale with num_clients * (clip * scale + 1) <= R/2 - 1."""
        half = float(1 << (self.bits - 1))
        return (half - 1 - self.num_clients) / (self.num_clients * self.clip)

    def error_bound(self, n: int) -> float:
        """Per-coordinate bound on |decode_sum(sum of n encodings) - sum of clipped inputs|."""
        return n / self.scale if self.stochastic else n / (2 * self.scale)

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Float vector -> uint64 ring vector; ``rng`` is needed only for stochastic rounding."""
        v = np.clip(np.asarray(x, np.float64), -self.clip, self.clip) * self.scale
        if self.stochastic:
            if rng is None:
                raise ValueError("stochastic rounding needs rng")
            floor = np.floor(v)
            q = floor + (rng.random(v.shape) < (v - floor))
        else:
            q = np.rint(v)
        return to_ring(q.astype(np.int64), self.bits)

    def decode_sum(self, y: np.ndarray, n: int) -> np.ndarray:
        """Ring sum of n encodings -> float sum."""
        if not 1 <= n <= self.num_clients:
            raise ValueError(f"{n=} must be in [1, num_clients={self.num_clients}]")
        return from_ring(y, self.bits).astype(np.float64) / self.scale
