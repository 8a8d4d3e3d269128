"""Additive secret sharing among S non-colluding aggregation servers (SMPC backend).

Client u splits its encoded vector x_u in Z_(2^bits) into S shares: S - 1 uniform vectors (from the
AES-CTR PRG under a fresh seed) and one correcting share x_u - sum of the others mod R. Server j
receives share j of every client and publishes only its sum; the sum of the S server sums is
sum_u x_u mod R. Any S - 1 servers together see only uniform vectors (SPDZ-style sharing, as in the
SMPC setting of secure medical FL). Unlike SecAgg there is no dropout recovery: a client's shares
are counted only if all S servers received them. Share randomness comes from a
:class:`fedjax_med.randomness.Randomness` (a fresh OS-keyed CSPRNG per client in secure mode).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from fedjax_med import randomness as randomness_lib
from fedjax_med.secure import crypto, field, secagg
from fedjax_med.secure.secagg import (
    DuplicateMessageError,
    MalformedMessageError,
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


def secure_sum_ring(
    inputs: np.ndarray,
    *,
    num_servers: int = 2,
    bits: int = 32,
    dropped: Iterable[int] = (),
    randomness: randomness_lib.Randomness | None = None,
    round_index: int = 0,
) -> tuple[np.ndarray, secagg.SecureSumStats]:
    """Ring sum of the rows of ``inputs`` (n, d) uint64 over clients not in ``dropped``.

    Client u's shares come from ``randomness.generator(ADDITIVE_SHARES, round_index, u)`` (a
    fresh CSPRNG in secure mode, the default). A dropped client sends nothing.

    Raises:
      RoundAbortedError: no client reached all servers.
    """
    rand = randomness or randomness_lib.Randomness("secure")
    inputs = np.asarray(inputs, np.uint64)
    n, d = inputs.shape
    gone = secagg.check_client_ids(dropped, n, "dropped")
    servers = [AggregationServer(range(n), dim=d, bits=bits) for _ in range(num_servers)]
    word = -(-bits // 8)
    sent = dict.fromkeys(range(n), 0)
    tic = time.perf_counter()
    for u in range(n):
        if u in gone:
            continue
        rng = rand.generator(randomness_lib.ADDITIVE_SHARES, round_index, u)
        for server, s in zip(servers, share_vector(inputs[u], num_servers, bits, rng), strict=True):
            server.receive(u, s)
            sent[u] += d * word
    t_share = time.perf_counter() - tic
    tic = time.perf_counter()
    complete = frozenset.intersection(*(s.senders for s in servers))
    if not complete:
        raise secagg.RoundAbortedError("no client reached all servers")
    total = np.zeros(d, np.uint64)
    for server in servers:
        total = field.add(total, server.partial_sum(complete), bits)
    stats = secagg.SecureSumStats(
        "additive",
        sent,
        dict.fromkeys(range(n), 0),  # clients receive nothing
        {"share": t_share, "aggregate": time.perf_counter() - tic},
        tuple(sorted(complete)),
        tuple(sorted(set(range(n)) - complete)),
        views=tuple(servers),
    )
    return total, stats


def secure_sum(
    vectors: np.ndarray,
    *,
    clip: float,
    num_servers: int = 2,
    dropped: Iterable[int] = (),
    randomness: randomness_lib.Randomness | None = None,
    round_index: int = 0,
    bits: int = 32,
    stochastic: bool = False,
    raise_on_abort: bool = True,
    seed: int | None = None,
    deterministic_shares: bool = False,
) -> tuple[np.ndarray, secagg.SecureSumStats]:
    """Sum of the clipped float rows of ``vectors`` (n, d) via S-server additive sharing.

    Same signature and result as :func:`fedjax_med.secure.secagg.secure_sum` apart from the
    method's own option (``num_servers`` here; ``threshold``, ``neighbours`` there). Returns the
    decoded sum over the clients not in ``dropped`` (error per coordinate <=
    ``FieldEncoder.error_bound(m)``) and a :class:`~fedjax_med.secure.secagg.SecureSumStats`
    whose ``views`` are the S servers.

    Args:
      vectors, clip, dropped, randomness, round_index, bits, stochastic, raise_on_abort: as for
        :func:`fedjax_med.secure.secagg.secure_sum`.
      num_servers: S >= 2 non-colluding servers.
      seed, deterministic_shares: legacy for ``randomness=Randomness("reproducible", seed)``.

    Examples:
        >>> x = np.array([[0.5, -1.0], [0.25, 0.5]])
        >>> s, stats = secure_sum(x, clip=1.0, num_servers=3)
        >>> np.allclose(s, x.sum(0), atol=1e-6), stats.survivors
        (True, (0, 1))
    """
    rand = secagg._resolve(randomness, seed, deterministic_shares)
    vectors = np.asarray(vectors, np.float64)
    n = vectors.shape[0]
    dropped = secagg.check_client_ids(dropped, n, "dropped")
    secagg.check_finite_rows(vectors, dropped)
    vectors = vectors.copy()
    vectors[sorted(dropped)] = 0.0  # a dropped client sends nothing; its row is never encoded
    enc = field.FieldEncoder(clip, n, bits, stochastic)
    ring = np.stack(
        [
            enc.encode(v, rand.generator(randomness_lib.ADDITIVE_SHARES, round_index, n + u))
            for u, v in enumerate(vectors)
        ]
    )
    try:
        total, stats = secure_sum_ring(
            ring,
            num_servers=num_servers,
            bits=bits,
            dropped=dropped,
            randomness=rand,
            round_index=round_index,
        )
    except secagg.RoundAbortedError:
        if raise_on_abort:
            raise
        return np.zeros(vectors.shape[1]), secagg.aborted_stats("additive", n)
    return enc.decode_sum(total, len(stats.survivors)), stats
