"""Additive secret sharing among S non-colluding aggregation servers (SMPC backend).

Client u splits its encoded vector x_u in Z_(2^bits) into S shares: S - 1 uniform vectors (from the
AES-CTR PRG under a fresh seed) and one correcting share x_u - sum of the others mod R. Server j
receives share j of every client and publishes only its sum; the sum of the S server sums is
sum_u x_u mod R. Any S - 1 servers together see only uniform vectors (SPDZ-style sharing, as in the
SMPC setting of secure medical FL). Unlike SecAgg there is no dropout recovery: a client's shares
are counted only if all S servers received them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from fedjax_med.secure import crypto, field
from fedjax_med.secure.secagg import (
    DuplicateMessageError,
    MalformedMessageError,
    ProtocolError,
    UnknownClientError,
)


def share_vector(
    x: np.ndarray, num_servers: int, bits: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Split ring vector x into ``num_servers`` additive shares mod 2^bits.

    Examples:
        >>> x = field.to_ring(np.array([5, -3]), 16)
        >>> shares = share_vector(x, 3, 16)
        >>> total = field.add(field.add(shares[0], shares[1], 16), shares[2], 16)
        >>> field.from_ring(total, 16).tolist()
        [5, -3]
    """
    if num_servers < 2:
        raise ValueError(f"{num_servers=} must be >= 2")
    x = np.asarray(x, np.uint64)
    shares = [
        crypto.prg(crypto.random_bytes(crypto.SEED_BYTES, rng), x.size, bits)
        for _ in range(num_servers - 1)
    ]
    last = x
    for s in shares:
        last = field.sub(last, s, bits)
    return shares + [last]


class AggregationServer:
    """One of the S servers: sums the shares it receives, logs every message."""

    def __init__(self, client_ids: Iterable[int], *, dim: int, bits: int):
        self.ids = frozenset(int(i) for i in client_ids)
        self.dim, self.bits = dim, bits
        self.log: list[tuple[int, np.ndarray]] = []
        self._shares: dict[int, np.ndarray] = {}

    def receive(self, sender: int, share: np.ndarray) -> None:
        self.log.append((sender, share))
        if sender not in self.ids:
            raise UnknownClientError(f"share from unknown client {sender}")
        if sender in self._shares:
            raise DuplicateMessageError(f"second share from client {sender}")
        if share.dtype != np.uint64 or share.shape != (self.dim,):
            raise MalformedMessageError(f"client {sender}: share must be uint64 ({self.dim},)")
        self._shares[sender] = share

    def partial_sum(self, clients: Iterable[int]) -> np.ndarray:
        total = np.zeros(self.dim, np.uint64)
        for u in sorted(clients):
            total = field.add(total, self._shares[u], self.bits)
        return total

    @property
    def senders(self) -> frozenset[int]:
        return frozenset(self._shares)


def secure_sum(
    vectors: np.ndarray,
    *,
    clip: float,
    num_servers: int = 2,
    bits: int = 32,
    seed: int = 0,
    stochastic: bool = False,
    deterministic_shares: bool = False,
) -> tuple[np.ndarray, dict]:
    """Sum of the clipped float rows of ``vectors`` (n, d) via S-server additive sharing.

    Returns the decoded sum (error per coordinate <= ``FieldEncoder.error_bound(n)``) and stats:
    ``bytes_sent`` per client, ``seconds`` for sharing and aggregation, and the ``servers``.

    Examples:
        >>> x = np.array([[0.5, -1.0], [0.25, 0.5]])
        >>> s, _ = secure_sum(x, clip=1.0, num_servers=3)
        >>> np.allclose(s, x.sum(0), atol=1e-6)
        True
    """
    vectors = np.asarray(vectors, np.float64)
    n, d = vectors.shape
    enc = field.FieldEncoder(clip, n, bits, stochastic)
    rng = np.random.default_rng([seed, 2])
    share_rng = np.random.default_rng([seed, 3]) if deterministic_shares else None
    servers = [AggregationServer(range(n), dim=d, bits=bits) for _ in range(num_servers)]
    tic = time.perf_counter()
    for u in range(n):
        for server, s in zip(
            servers,
            share_vector(enc.encode(vectors[u], rng), num_servers, bits, share_rng),
            strict=True,
        ):
            server.receive(u, s)
    t_share = time.perf_counter() - tic
    tic = time.perf_counter()
    complete = frozenset.intersection(*(s.senders for s in servers))
    if not complete:
        raise ProtocolError("no client reached all servers")
    total = np.zeros(d, np.uint64)
    for server in servers:
        total = field.add(total, server.partial_sum(complete), bits)
    stats = {
        "bytes_sent": {u: num_servers * d * -(-bits // 8) for u in range(n)},
        "seconds": {"share": t_share, "aggregate": time.perf_counter() - tic},
        "servers": servers,
    }
    return enc.decode_sum(total, len(complete)), stats
