"""t-of-n Shamir secret sharing over GF(p), p = 2^127 - 1, with a hash commitment.

The secret bytes are cut into 15-byte chunks (each < 2^120 < p); every chunk gets its own random
polynomial of degree t - 1 with the chunk as constant term, and share i holds the evaluations at
x = i. Any t shares give the chunks back by Lagrange interpolation at 0; fewer reveal nothing about
them (Shamir, CACM 1979).

Each share also carries SHA-256(secret) so ``reconstruct`` can tell a wrong secret (a corrupted or
substituted share) from a right one. The commitment reveals a hash of the secret, so share only
high-entropy secrets (keys, seeds), as secure aggregation does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets

import numpy as np

PRIME = (1 << 127) - 1
CHUNK_BYTES = 15
_WORD = 16  # serialised bytes per field element


class ShareError(ValueError):
    """Shares that cannot give back the committed secret."""


@dataclasses.dataclass(frozen=True)
class Share:
    """One holder's share: evaluation point ``index`` (1..n) and one value per chunk."""

    index: int
    threshold: int
    length: int
    commitment: bytes
    values: tuple[int, ...]

    def to_bytes(self) -> bytes:
        head = b"".join(v.to_bytes(2, "big") for v in (self.index, self.threshold, self.length))
        return head + self.commitment + b"".join(v.to_bytes(_WORD, "big") for v in self.values)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Share:
        if len(blob) < 38 or (len(blob) - 38) % _WORD:
            raise ShareError(f"share blob of {len(blob)} bytes is malformed")
        index, threshold, length = (int.from_bytes(blob[i : i + 2], "big") for i in (0, 2, 4))
        values = tuple(
            int.from_bytes(blob[i : i + _WORD], "big") for i in range(38, len(blob), _WORD)
        )
        return cls(index, threshold, length, blob[6:38], values)


def _random_element(rng: np.random.Generator | None) -> int:
    if rng is None:
        return secrets.randbelow(PRIME)
    return int.from_bytes(rng.bytes(_WORD), "big") % PRIME


def share(secret: bytes, t: int, n: int, rng: np.random.Generator | None = None) -> list[Share]:
    """Split ``secret`` into n shares, any t of which reconstruct it.

    Args:
        secret: bytes to share (at most 65535).
        t: threshold, 1 <= t <= n.
        n: number of shares, <= 65535; share i (1-based) has ``index`` i.
        rng: coefficient source for reproducible simulations; None uses ``secrets``.

    Examples:
        >>> shares = share(b"seed", t=2, n=3)
        >>> reconstruct(shares[1:])
        b'seed'
    """
    if not 1 <= t <= n < 1 << 16:
        raise ValueError(f"need 1 <= {t=} <= {n=} < 65536")
    if len(secret) >= 1 << 16:
        raise ValueError(f"secret of {len(secret)} bytes is too long")
    chunks = [
        int.from_bytes(secret[i : i + CHUNK_BYTES], "big")
        for i in range(0, len(secret), CHUNK_BYTES)
    ]
    polys = [[c] + [_random_element(rng) for _ in range(t - 1)] for c in chunks]
    commitment = hashlib.sha256(secret).digest()
    out = []
    for x in range(1, n + 1):
        values = []
        for coeffs in polys:
            acc = 0
            for c in reversed(coeffs):  # Horner
                acc = (acc * x + c) % PRIME
            values.append(acc)
        out.append(Share(x, t, len(secret), commitment, tuple(values)))
    return out


def reconstruct(shares: list[Share]) -> bytes:
    """The secret from at least t shares; ShareError (a ValueError) if too few or inconsistent.

    Uses the first t shares by index and checks the result against the commitment, so a corrupted
    share among them is detected, not silently turned into a wrong secret.
    """
    if not shares:
        raise ShareError("no shares")
    first = shares[0]
    meta = (first.threshold, first.length, first.commitment, len(first.values))
    for s in shares:
        if (s.threshold, s.length, s.commitment, len(s.values)) != meta:
            raise ShareError(f"share {s.index} disagrees with share {first.index} on its metadata")
    by_index = {s.index: s for s in shares}
    if len(by_index) != len(shares):
        raise ShareError("duplicate share indices")
    t = first.threshold
    if len(by_index) < t:
        raise ShareError(f"{len(by_index)} shares, threshold is {t}")
    used = [by_index[i] for i in sorted(by_index)[:t]]
    xs = [s.index for s in used]
    # Lagrange basis at 0: l_j(0) = prod_{m != j} x_m / (x_m - x_j).
    basis = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        basis.append(num * pow(den, -1, PRIME) % PRIME)
    out = bytearray()
    n_chunks = len(first.values)
    for k in range(n_chunks):
        c = sum(b * s.values[k] for b, s in zip(basis, used, strict=True)) % PRIME
        size = min(CHUNK_BYTES, first.length - k * CHUNK_BYTES)
        if c >= 1 << (8 * size):
            raise ShareError("reconstructed value out of range: corrupted share")
        out += c.to_bytes(size, "big")
    secret = bytes(out)
    if hashlib.sha256(secret).digest() != first.commitment:
        raise ShareError("reconstructed secret does not match its commitment: corrupted share")
    return secret
