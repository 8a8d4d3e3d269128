"""Secure aggregation (SecAgg, Bonawitz et al., CCS 2017) as explicit message-passing rounds.

https://eprint.iacr.org/2017/281. Four rounds between a ``Server`` and ``Client`` objects:

0. AdvertiseKeys: client u publishes X25519 public keys c_u (share encryption) and s_u (masks).
1. ShareKeys: u draws a self-mask seed b_u and Shamir-shares (t-of-|H_u|) both b_u and its mask
   private key s_u^SK among its holders H_u = neighbours + itself; each share is sent through the
   server under AES-GCM keyed by the c-key agreement, so the server sees only ciphertexts.
2. MaskedInputCollection: y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) mod R,
   over neighbours v that completed round 1; pairwise masks cancel in the sum.
3. Unmasking: the server names the survivors (sent y) and the dropped (shared keys, sent no y);
   each survivor returns its share of b_u for survivors and of s_u^SK for the dropped, never both
   for one client. The server rebuilds b_u of survivors and removes their self masks, rebuilds
   s_u^SK of the dropped and removes the pairwise masks they left in survivors' inputs.

Neighbours: all n - 1 peers (SecAgg) or a random k-regular graph drawn from secret randomness
(SecAgg+, Bell, Bonawitz, Gascon, Lepoint, Raykova, CCS 2020, https://eprint.iacr.org/2020/704);
the threshold t then counts shares among a client's k + 1 holders, so t <= k + 1, and k, t come
from :func:`secagg_plus_parameters` (the paper's parameter choice for n clients, a dropout rate
and a corrupted fraction).

Randomness: every key, self-mask seed, Shamir coefficient, stochastic rounding and the SecAgg+
graph come from a :class:`fedjax_med.randomness.Randomness`; in secure mode (the default) each is
a fresh ChaCha20 CSPRNG keyed from the operating system, so nothing follows from a public seed. A
reproducible run is a simulation: whoever holds the seed can regenerate every key and unmask any
single client.

Guarantees (honest-but-curious server, the simulation's clients follow the protocol): the server's
view (``Server.log``) holds only public keys, ciphertexts, masked vectors and shares it is entitled
to; fewer than t survivors (overall or among any holder set) raises ``TooFewSurvivorsError`` and a
survivors' graph that is not connected raises ``DisconnectedSurvivorsError`` before any share is
requested (a disconnected graph would reveal each component's partial sum), never a wrong or
partial sum. Malformed, unknown, replayed, out-of-round and late messages are rejected.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import special
from scipy import stats as sps

from fedjax_med import randomness as randomness_lib
from fedjax_med.secure import crypto, field, shamir

MASK_INFO = b"fedjax_med/secagg/pairwise-mask"
ENC_INFO = b"fedjax_med/secagg/share-encryption"
ROUNDS = ("advertise_keys", "share_keys", "masked_input", "unmasking", "done")
_ID_BYTES = 4


class ProtocolError(ValueError):
    """A protocol violation or an aggregation that cannot finish correctly."""


class UnknownClientError(ProtocolError):
    """A message from, or naming, a client outside the round."""


class DuplicateMessageError(ProtocolError):
    """A second (replayed) message from the same client in one round."""


class LateMessageError(ProtocolError):
    """A message for a round that is closed, e.g. from a client already declared dropped."""


class MalformedMessageError(ProtocolError):
    """Wrong vector length/dtype/range or wrong set of recipients."""


class RoundAbortedError(ProtocolError):
    """The round cannot finish without revealing more than the sum: it aborts, releasing nothing."""


class TooFewSurvivorsError(RoundAbortedError):
    """Fewer than t clients (or shares) left to continue."""


class DisconnectedSurvivorsError(TooFewSurvivorsError):
    """The survivors' masking graph is not connected: unmasking would reveal each component's sum.

    A subclass of :class:`TooFewSurvivorsError` so that callers which abort a round on too few
    survivors abort on this too.
    """


class ReconstructionError(ProtocolError):
    """Shares that do not rebuild the committed secret."""


# ---------------------------------------------------------------------------------------------
# Messages. ``nbytes`` is the wire size used for communication statistics.


@dataclasses.dataclass(frozen=True)
class AdvertiseKeys:
    sender: int
    c_pk: bytes
    s_pk: bytes
    round = "advertise_keys"

    @property
    def nbytes(self) -> int:
        return _ID_BYTES + len(self.c_pk) + len(self.s_pk)


@dataclasses.dataclass(frozen=True)
class KeyBroadcast:
    """Server -> client: (c_pk, s_pk) of the client's neighbours that advertised keys."""

    keys: Mapping[int, tuple[bytes, bytes]]

    @property
    def nbytes(self) -> int:
        return sum(_ID_BYTES + len(c) + len(s) for c, s in self.keys.values())


@dataclasses.dataclass(frozen=True)
class ShareKeys:
    """Client -> server: one AES-GCM ciphertext of (s^SK share, b share) per holder."""

    sender: int
    ciphertexts: Mapping[int, bytes]
    round = "share_keys"

    @property
    def nbytes(self) -> int:
        return _ID_BYTES + sum(_ID_BYTES + len(c) for c in self.ciphertexts.values())


@dataclasses.dataclass(frozen=True)
class RoutedShares:
    """Server -> client: ciphertexts addressed to it, keyed by their sender."""

    ciphertexts: Mapping[int, bytes]

    @property
    def nbytes(self) -> int:
        return sum(_ID_BYTES + len(c) for c in self.ciphertexts.values())


@dataclasses.dataclass(frozen=True)
class MaskedInput:
    sender: int
    y: np.ndarray
    bits: int
    round = "masked_input"

    @property
    def nbytes(self) -> int:
        return _ID_BYTES + math.ceil(self.bits / 8) * int(self.y.size)


@dataclasses.dataclass(frozen=True)
class UnmaskRequest:
    """Server -> survivors: who sent a masked input and who dropped after sharing keys."""

    survivors: frozenset[int]
    dropped: frozenset[int]

    @property
    def nbytes(self) -> int:
        return _ID_BYTES * (len(self.survivors) + len(self.dropped))


@dataclasses.dataclass(frozen=True)
class UnmaskResponse:
    """Client -> server: serialised shares of s^SK for dropped, of b for surviving clients."""

    sender: int
    mask_key_shares: Mapping[int, bytes]
    self_mask_shares: Mapping[int, bytes]
    round = "unmasking"

    @property
    def nbytes(self) -> int:
        shares = list(self.mask_key_shares.values()) + list(self.self_mask_shares.values())
        return _ID_BYTES + sum(_ID_BYTES + len(s) for s in shares)


# ---------------------------------------------------------------------------------------------


SECURITY_BITS = 40  # sigma of Bell et al.: failure of privacy with probability <= 2^-sigma
CORRECTNESS_BITS = 30  # eta of Bell et al.: an abort with probability <= 2^-eta


def _log_disconnected_bound(m: int, p: float) -> float:
    """ln of ``sum_{s=1}^{m/2} C(m, s) (1 - p)^(s (m - s))``: a G(m, p) graph is disconnected."""
    if m <= 1 or p >= 1:
        return -math.inf
    s = np.arange(1, m // 2 + 1, dtype=np.float64)
    log_choose = special.gammaln(m + 1) - special.gammaln(s + 1) - special.gammaln(m - s + 1)
    return float(special.logsumexp(log_choose + s * (m - s) * math.log1p(-p)))


def _threshold_for(n: int, k: int, corrupted: int, log_target: float) -> int:
    """Smallest t > (k + 1) / 2 with ``n P[Hyp(n - 1, corrupted, k) >= t] <= exp(log_target)``."""
    majority = (k + 1) // 2 + 1
    if k >= n - 1:  # complete graph: every corrupted client is a neighbour
        return max(majority, min(corrupted, n - 1) + 1)
    ts = np.arange(1, k + 2)
    log_tail = sps.hypergeom.logsf(ts - 1, n - 1, min(corrupted, n - 1), k)
    ok = ts[math.log(n) + log_tail <= log_target]
    return max(majority, int(ok[0]) if ok.size else k + 2)


def secagg_plus_parameters(
    num_clients: int,
    dropout_rate: float,
    corrupted_fraction: float,
    *,
    security_bits: float = SECURITY_BITS,
    correctness_bits: float = CORRECTNESS_BITS,
    complete: bool = False,
) -> tuple[int, int]:
    """Degree k of the SecAgg+ neighbour graph and Shamir threshold t over a client's k + 1 holders.

    Bell, Bonawitz, Gascon, Lepoint, Raykova (CCS 2020, https://eprint.iacr.org/2020/704): the
    masking graph is a random k-regular graph drawn from secret randomness, and each client
    shares its secrets t-of-(k + 1) among its neighbours and itself. With ``n`` clients, a
    fraction ``delta`` dropping (independently) and a set of ``c = ceil(gamma n)`` clients
    corrupted and colluding with the server, returns the smallest k (with ``n k`` even, so the
    graph exists) and for it the smallest t such that:

    * security: no honest client has t corrupted holders, ``n P[Hyp(n - 1, c, k) >= t] <=
      2^-sigma`` (a client's neighbours are a uniform k-subset, so the number of corrupted ones
      is hypergeometric), and ``2 t > k + 1`` so honest holders alone cannot be made to reveal
      both secrets of one client;
    * reconstruction: every client keeps t surviving holders, ``n P[Bin(k, 1 - delta) < t] <=
      2^-eta``;
    * connectivity: the honest survivors' graph (about ``m = (1 - delta - gamma) n`` clients)
      is connected, bounded as in Bell et al.'s union bound over cuts of ``G(m, p)`` with
      ``p = k / (n - 1)``: ``sum_{s <= m/2} C(m, s) (1 - p)^(s (m - s)) <= 2^-eta``. A random
      k-regular graph is treated with the same bound (an approximation); the server also
      checks connectivity and refuses to unmask otherwise (:class:`DisconnectedSurvivorsError`),
      so a violation costs an abort, not privacy.

    If no k < n - 1 qualifies (small n), the graph is complete (k = n - 1, plain SecAgg) and
    t = max(floor((k + 1) / 2) + 1, c + 1). Always ``2 <= t <= k + 1``.

    Args:
      num_clients: ``n >= 2`` clients in the round.
      dropout_rate: ``delta`` in ``[0, 1)``.
      corrupted_fraction: ``gamma`` in ``[0, 1)``.
      security_bits: ``sigma`` (default 40, as in Bell et al.).
      correctness_bits: ``eta`` (default 30, as in Bell et al.).
      complete: use the complete graph (plain SecAgg, Bonawitz et al. 2017) and return its t.

    Returns:
      ``(k, t)``.

    Examples:
      >>> k, t = secagg_plus_parameters(1000, 0.05, 0.05)
      >>> k < 100 and t <= k + 1
      True
      >>> secagg_plus_parameters(24, 0.05, 0.05)  # too few clients for a sparse graph
      (23, 13)
    """
    n = int(num_clients)
    if n < 2:
        raise ValueError(f"{num_clients=} must be >= 2")
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"{dropout_rate=} must lie in [0, 1)")
    if not 0 <= corrupted_fraction < 1:
        raise ValueError(f"{corrupted_fraction=} must lie in [0, 1)")
    corrupted = math.ceil(corrupted_fraction * n - 1e-9)
    log_sec, log_cor = -security_bits * math.log(2), -correctness_bits * math.log(2)
    m = math.floor((1 - dropout_rate - corrupted_fraction) * n)

    def reconstructs(k, t):
        log_fail = sps.binom.logcdf(t - 1, k, 1 - dropout_rate) if dropout_rate else -math.inf
        return t <= k + 1 and math.log(n) + log_fail <= log_cor

    if not complete:
        for k in range(2, n - 1):
            if (n * k) % 2:
                continue
            t = _threshold_for(n, k, corrupted, log_sec)
            if (
                t <= k + 1
                and reconstructs(k, t)
                and _log_disconnected_bound(m, k / (n - 1)) <= log_sec
            ):
                return k, t
    k = n - 1
    t = _threshold_for(n, k, corrupted, log_sec)
    if t > n - math.floor(dropout_rate * n) or t > k + 1:
        raise ValueError(
            f"no SecAgg parameters for num_clients={n}, {dropout_rate=}, {corrupted_fraction=}: "
            f"threshold {t} exceeds the expected survivors"
        )
    return k, t


def random_regular_graph(
    client_ids: Iterable[int], k: int, rng: np.random.Generator
) -> dict[int, frozenset[int]]:
    """A random k-regular graph on ``client_ids``: the pairing model with rejection.

    Every client gets k half-edges; a uniform shuffle pairs them, pairs that would make a loop or
    a repeated edge are reshuffled among themselves, and a dead end restarts (Steger and Wormald,
    1999, whose output is asymptotically uniform); a disconnected result is redrawn (for k >= 3
    random regular graphs are connected with high probability, so this matters for k = 2). The
    law is invariant under relabelling, so a
    client's neighbours are a uniform k-subset of the others. ``rng`` must be secret for SecAgg+
    (a CSPRNG in secure mode): a graph predictable from a public seed lets colluding clients pick
    dropouts that cut an honest client off (Bell et al. 2020).

    Examples:
      >>> g = random_regular_graph(range(10), 4, np.random.default_rng(0))
      >>> sorted({len(v) for v in g.values()}), all(u in g[v] for u in g for v in g[u])
      ([4], True)
    """
    ids = sorted(set(int(i) for i in client_ids))
    n = len(ids)
    if not 1 <= k < n or (n * k) % 2:
        raise ValueError(f"{k=} must be in [1, {n - 1}] with n * k even (n={n})")
    for _ in range(1000):
        edges: set[tuple[int, int]] = set()
        stubs = np.repeat(np.arange(n), k)
        for _ in range(10 * k + 100):
            rng.shuffle(stubs)
            left = []
            for a, b in stubs.reshape(-1, 2).tolist():
                a, b = min(a, b), max(a, b)
                if a != b and (a, b) not in edges:
                    edges.add((a, b))
                else:
                    left += [a, b]
            if not left:
                graph = {u: set() for u in ids}
                for a, b in edges:
                    graph[ids[a]].add(ids[b])
                    graph[ids[b]].add(ids[a])
                if len(components(graph, ids)) == 1:
                    return {u: frozenset(vs) for u, vs in graph.items()}
                break  # disconnected even before dropouts (likely only for k = 2): redraw
            free = sorted(set(left))
            if not any((a, b) not in edges for a in free for b in free if a < b):
                break  # dead end: restart
            stubs = np.array(left)
    raise RuntimeError(f"no {k}-regular graph on {n} clients after 1000 attempts")


def neighbour_graph(
    client_ids: Iterable[int],
    neighbours: str | int = "all",
    seed: int | None = None,
    *,
    rng: np.random.Generator | None = None,
) -> dict[int, frozenset[int]]:
    """Masking graph: every other client ("all", SecAgg) or a random k-regular graph (SecAgg+).

    The SecAgg+ graph (Bell et al., CCS 2020) comes from ``rng``; without one, from the
    CSPRNG (:func:`fedjax_med.randomness.csprng`), or, only if ``seed`` is given, from the
    reproducible stream ``randomness.SECAGG_GRAPH`` of that seed (a simulation: anyone with the
    seed knows the graph). k >= n - 1 gives the complete graph; an odd k with an odd number of
    clients is raised to k + 1 (a k-regular graph needs n k even).

    Examples:
        >>> g = neighbour_graph(range(8), 2, seed=1)
        >>> sorted(len(v) for v in g.values()) == [2] * 8
        True
    """
    ids = sorted(set(int(i) for i in client_ids))
    n = len(ids)
    if neighbours == "all" or (isinstance(neighbours, int) and neighbours >= n - 1):
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    if isinstance(neighbours, str) or neighbours < 1:
        raise ValueError(f"{neighbours=} must be 'all' or an int >= 1")
    k = neighbours + (n * neighbours) % 2
    if k >= n - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    if rng is None:
        if seed is None:
            rng = randomness_lib.csprng()
        else:
            rng = randomness_lib.Randomness("reproducible", int(seed)).generator(
                randomness_lib.SECAGG_GRAPH
            )
    return random_regular_graph(ids, k, rng)


def components(graph: Mapping[int, Iterable[int]], nodes: Iterable[int]) -> list[frozenset[int]]:
    """Connected components of the subgraph of ``graph`` induced by ``nodes`` (largest first).

    Examples:
        >>> components({0: {1}, 1: {0, 2}, 2: {1}, 3: set()}, [0, 2, 3])
        [frozenset({0}), frozenset({2}), frozenset({3})]
    """
    left = set(int(u) for u in nodes)
    out = []
    while left:
        start = min(left)
        seen, frontier = {start}, [start]
        while frontier:
            u = frontier.pop()
            for v in graph[u]:
                if v in left and v not in seen:
                    seen.add(v)
                    frontier.append(v)
        left -= seen
        out.append(frozenset(seen))
    return sorted(out, key=lambda c: (-len(c), min(c)))


def _aad(sender: int, recipient: int) -> bytes:
    return sender.to_bytes(_ID_BYTES, "big") + recipient.to_bytes(_ID_BYTES, "big")


class Client:
    """One honest client; methods are called in round order, each returns its message."""

    def __init__(
        self,
        cid: int,
        x: np.ndarray,
        *,
        neighbours: frozenset[int],
        threshold: int,
        bits: int,
        key_rng: np.random.Generator | None = None,
    ):
        self.id = int(cid)
        self.x = np.asarray(x, np.uint64) & field.mask_of(bits)
        self.neighbours = frozenset(neighbours)
        self.t = threshold
        self.bits = bits
        self._rng = key_rng
        self._c_sk = crypto.generate_private_key(key_rng)
        self._s_sk = crypto.generate_private_key(key_rng)
        self._b = crypto.random_bytes(crypto.SEED_BYTES, key_rng)
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._own_shares: tuple[bytes, bytes] | None = None
        self._received: dict[int, bytes] = {}

    def advertise_keys(self) -> AdvertiseKeys:
        return AdvertiseKeys(
            self.id, crypto.public_bytes(self._c_sk), crypto.public_bytes(self._s_sk)
        )

    def share_keys(self, msg: KeyBroadcast) -> ShareKeys:
        keys = dict(msg.keys)
        if not set(keys) <= self.neighbours:
            raise UnknownClientError(f"client {self.id}: keys for non-neighbours {set(keys)}")
        all_pks = [pk for pair in keys.values() for pk in pair]
        if len(set(all_pks)) != len(all_pks):
            raise MalformedMessageError(f"client {self.id}: repeated public keys in broadcast")
        holders = sorted(set(keys) | {self.id})
        if len(holders) < self.t:
            raise TooFewSurvivorsError(f"client {self.id}: {len(holders)} holders < t={self.t}")
        self._keys = keys
        s_shares = shamir.share(crypto.private_bytes(self._s_sk), self.t, len(holders), self._rng)
        b_shares = shamir.share(self._b, self.t, len(holders), self._rng)
        cts = {}
        for v, s_sh, b_sh in zip(holders, s_shares, b_shares, strict=True):
            s_blob, b_blob = s_sh.to_bytes(), b_sh.to_bytes()
            if v == self.id:
                self._own_shares = (s_blob, b_blob)
                continue
            payload = _aad(self.id, v) + len(s_blob).to_bytes(2, "big") + s_blob + b_blob
            key = crypto.agree(self._c_sk, keys[v][0], ENC_INFO)
            cts[v] = crypto.encrypt(key, payload, _aad(self.id, v))
        return ShareKeys(self.id, cts)

    def masked_input(self, msg: RoutedShares) -> MaskedInput:
        if not set(msg.ciphertexts) <= set(self._keys):
            raise UnknownClientError(f"client {self.id}: shares from unknown senders")
        if len(msg.ciphertexts) + 1 < self.t:
            raise TooFewSurvivorsError(f"client {self.id}: too few peers completed ShareKeys")
        self._received = dict(msg.ciphertexts)
        d = self.x.size
        y = field.add(self.x, crypto.prg(self._b, d, self.bits), self.bits)
        for v in sorted(self._received):  # v completed ShareKeys: pairwise mask with it
            mask = crypto.prg(crypto.agree(self._s_sk, self._keys[v][1], MASK_INFO), d, self.bits)
            y = field.add(y, mask, self.bits) if v > self.id else field.sub(y, mask, self.bits)
        return MaskedInput(self.id, y, self.bits)

    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        if msg.survivors & msg.dropped:
            raise ProtocolError(f"client {self.id}: server asks for both shares of a client")
        if self.id not in msg.survivors:
            raise ProtocolError(f"client {self.id}: not listed as a survivor")
        if len(msg.survivors) < self.t:
            raise TooFewSurvivorsError(f"{len(msg.survivors)} survivors < t={self.t}")
        s_out, b_out = {}, {}
        for v in sorted(self._received):
            blob = crypto.decrypt(
                crypto.agree(self._c_sk, self._keys[v][0], ENC_INFO),
                self._received[v],
                _aad(v, self.id),
            )
            if blob[: 2 * _ID_BYTES] != _aad(v, self.id):
                raise ProtocolError(f"client {self.id}: share from {v} names other parties")
            n_s = int.from_bytes(blob[2 * _ID_BYTES : 2 * _ID_BYTES + 2], "big")
            body = blob[2 * _ID_BYTES + 2 :]
            if v in msg.dropped:
                s_out[v] = body[:n_s]
            elif v in msg.survivors:
                b_out[v] = body[n_s:]
        if self._own_shares is not None:
            b_out[self.id] = self._own_shares[1]
        return UnmaskResponse(self.id, s_out, b_out)


class Server:
    """Honest-but-curious server: routes messages, logs all it receives, outputs the ring sum."""

    def __init__(
        self,
        client_ids: Iterable[int],
        *,
        threshold: int,
        dim: int,
        bits: int,
        graph: Mapping[int, frozenset[int]],
    ):
        self.ids = frozenset(int(i) for i in client_ids)
        if not 1 <= threshold <= len(self.ids):
            raise ValueError(f"{threshold=} must be in [1, {len(self.ids)}]")
        self.t, self.dim, self.bits = threshold, dim, bits
        self.graph = {u: frozenset(graph[u]) for u in self.ids}
        self.round = ROUNDS[0]
        self.log: list[tuple[str, object]] = []
        self._inbox: dict[str, dict[int, object]] = {r: {} for r in ROUNDS[:4]}
        self._expected: frozenset[int] = self.ids  # senders allowed in the current round
        self.u1 = self.u2 = self.u3 = frozenset()
        self._request: UnmaskRequest | None = None

    def receive(self, msg) -> None:
        """Accept one client message; raises a ProtocolError subclass to reject it."""
        self.log.append((self.round, msg))
        r = getattr(msg, "round", None)
        if r not in ROUNDS[:4]:
            raise ProtocolError(f"unexpected message type {type(msg).__name__}")
        sender = msg.sender
        if sender not in self.ids:
            raise UnknownClientError(f"message from unknown client {sender}")
        if ROUNDS.index(r) < ROUNDS.index(self.round):
            raise LateMessageError(f"{r} message from {sender} after the round closed")
        if r != self.round:
            raise ProtocolError(f"{r} message from {sender} during {self.round}")
        if sender not in self._expected:
            raise LateMessageError(f"client {sender} was declared dropped before {r}")
        if sender in self._inbox[r]:
            raise DuplicateMessageError(f"second {r} message from client {sender}")
        getattr(self, f"_check_{r}")(msg)
        self._inbox[r][sender] = msg

    def _check_advertise_keys(self, msg: AdvertiseKeys) -> None:
        if len(msg.c_pk) != 32 or len(msg.s_pk) != 32:
            raise MalformedMessageError(f"client {msg.sender}: public keys must be 32 bytes")

    def _check_share_keys(self, msg: ShareKeys) -> None:
        want = self.graph[msg.sender] & self.u1
        if set(msg.ciphertexts) != want:
            raise MalformedMessageError(
                f"client {msg.sender}: ciphertexts for {sorted(msg.ciphertexts)}, "
                f"want {sorted(want)}"
            )

    def _check_masked_input(self, msg: MaskedInput) -> None:
        y = msg.y
        if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (self.dim,):
            raise MalformedMessageError(
                f"client {msg.sender}: masked input must be uint64 of shape ({self.dim},), "
                f"got {getattr(y, 'dtype', type(y))} {getattr(y, 'shape', None)}"
            )
        if msg.bits != self.bits or (self.bits < 64 and (y >> np.uint64(self.bits)).any()):
            raise MalformedMessageError(f"client {msg.sender}: values outside Z_(2^{self.bits})")

    def _check_unmasking(self, msg: UnmaskResponse) -> None:
        req = self._request
        if not set(msg.mask_key_shares) <= req.dropped:
            raise MalformedMessageError(f"client {msg.sender}: mask-key shares of non-dropped")
        if not set(msg.self_mask_shares) <= req.survivors:
            raise MalformedMessageError(f"client {msg.sender}: self-mask shares of non-survivors")

    def _close(self, nxt: str) -> frozenset[int]:
        got = frozenset(self._inbox[self.round])
        if len(got) < self.t:
            raise TooFewSurvivorsError(f"{len(got)} clients finished {self.round}, t={self.t}")
        self.round, self._expected = nxt, got
        return got

    def close_advertise_keys(self) -> dict[int, KeyBroadcast]:
        self.u1 = self._close("share_keys")
        inbox = self._inbox["advertise_keys"]
        pks = [pk for m in inbox.values() for pk in (m.c_pk, m.s_pk)]
        if len(set(pks)) != len(pks):
            raise MalformedMessageError("two advertised public keys are equal")
        return {
            u: KeyBroadcast({v: (inbox[v].c_pk, inbox[v].s_pk) for v in self.graph[u] & self.u1})
            for u in self.u1
        }

    def close_share_keys(self) -> dict[int, RoutedShares]:
        self.u2 = self._close("masked_input")
        inbox = self._inbox["share_keys"]
        return {
            v: RoutedShares({u: inbox[u].ciphertexts[v] for u in self.u2 if v in self.graph[u]})
            for v in self.u2
        }

    def _check_connected(self, survivors: frozenset[int]) -> None:
        parts = components(self.graph, survivors)
        if len(parts) > 1:
            raise DisconnectedSurvivorsError(
                f"the {len(survivors)} survivors' masking graph has {len(parts)} components "
                f"(sizes {[len(c) for c in parts]}): unmasking would reveal each one's sum"
            )

    def close_masked_input(self) -> UnmaskRequest:
        """Close input collection; refuses to go on if the survivors' graph is disconnected.

        With SecAgg+ (Bell et al. 2020) each survivor's pairwise masks involve only its
        neighbours, so if the survivors split into components A and B, removing the dropped
        clients' masks would give the server sum_A x and sum_B x separately.
        """
        self.u3 = self._close("unmasking")
        self._check_connected(self.u3)
        self._request = UnmaskRequest(self.u3, self.u2 - self.u3)
        return self._request

    def _rebuild(self, target: int, kind: str, responses) -> bytes:
        blobs = [getattr(r, kind)[target] for r in responses if target in getattr(r, kind)]
        try:
            shares = [shamir.Share.from_bytes(b) for b in blobs]
            if not shares or len(shares) < shares[0].threshold:
                raise TooFewSurvivorsError(f"{len(shares)} shares of client {target}'s {kind}")
            return shamir.reconstruct(shares)
        except shamir.ShareError as e:
            raise ReconstructionError(f"client {target}'s {kind}: {e}") from e

    def finalize(self) -> np.ndarray:
        """Close the unmasking round and return sum_{u in survivors} x_u mod 2^bits."""
        self._check_connected(self.u3)
        u4 = self._close("done")
        responses = [self._inbox["unmasking"][u] for u in sorted(u4)]
        adv = self._inbox["advertise_keys"]
        total = np.zeros(self.dim, np.uint64)
        for u in sorted(self.u3):
            total = field.add(total, self._inbox["masked_input"][u].y, self.bits)
        for u in sorted(self.u3):
            b = self._rebuild(u, "self_mask_shares", responses)
            total = field.sub(total, crypto.prg(b, self.dim, self.bits), self.bits)
        for u in sorted(self._request.dropped):
            s_sk = self._rebuild(u, "mask_key_shares", responses)
            if crypto.public_from_private(s_sk) != adv[u].s_pk:
                raise ReconstructionError(f"client {u}'s mask key does not match its public key")
            for v in sorted(self.graph[u] & self.u3):
                mask = crypto.prg(crypto.agree(s_sk, adv[v].s_pk, MASK_INFO), self.dim, self.bits)
                # y_v carries +mask if u > v and -mask if u < v; undo it.
                op = field.sub if v < u else field.add
                total = op(total, mask, self.bits)
        return total


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SecureSumStats:
    """What one secure sum cost and who is in it; the same record for every backend.

    Attributes:
      method: ``"secagg"`` (this module, any graph) or ``"additive"``.
      bytes_sent: upload bytes of each client over the whole protocol.
      bytes_received: download bytes of each client (0 for additive sharing).
      seconds: wall time per protocol round.
      survivors: clients whose input is in the sum (empty when aborted).
      dropped: clients that took part in setup but whose input is not in the sum.
      aborted: the protocol stopped without releasing a sum (too few or disconnected survivors).
      views: the server objects with their logs (what a curious server saw), for tests/audits.
    """

    method: str
    bytes_sent: Mapping[int, int]
    bytes_received: Mapping[int, int]
    seconds: Mapping[str, float]
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    aborted: bool = False
    views: tuple = ()

    @property
    def released(self) -> bool:
        """Whether a sum was released (the round counts for privacy accounting)."""
        return not self.aborted

    @property
    def mean_bytes_sent(self) -> float:
        return float(np.mean(list(self.bytes_sent.values()))) if self.bytes_sent else 0.0

    @property
    def mean_bytes_received(self) -> float:
        return float(np.mean(list(self.bytes_received.values()))) if self.bytes_received else 0.0

    def __getitem__(self, name: str):
        """Mapping access (``stats["bytes_sent"]``) kept for callers of the former dict stats."""
        if name == "servers":
            return self.views
        return getattr(self, name)


Stats = SecureSumStats  # the former name


def _resolve(
    randomness_: randomness_lib.Randomness | None, seed: int | None, deterministic: bool
) -> randomness_lib.Randomness:
    """The run's randomness; the legacy ``deterministic_keys=True, seed=s`` means reproducible."""
    if randomness_ is not None:
        if deterministic:
            raise ValueError("pass either randomness or deterministic_keys, not both")
        return randomness_
    if deterministic:
        return randomness_lib.Randomness("reproducible", int(seed or 0))
    return randomness_lib.Randomness("secure")


def check_client_ids(ids: Iterable[int], n: int, argument: str) -> set[int]:
    """``ids`` as a set, refusing any that is not a client id in ``[0, n)`` (naming ``argument``).

    A dropout id that names no client would otherwise be ignored silently, and the round would
    count a client as surviving that the caller meant to drop.
    """
    out = set()
    for u in ids:
        if isinstance(u, bool) or not isinstance(u, numbers.Integral) or not 0 <= u < n:
            raise ValueError(f"{argument} holds {u!r}, which is not a client id in [0, {n})")
        out.add(int(u))
    return out


def check_finite_rows(vectors: np.ndarray, dropped: set[int]) -> None:
    """Refuses a non-finite coordinate in a surviving client's row (encoding would make it 0)."""
    bad = ~np.isfinite(vectors)
    bad[sorted(dropped)] = False  # a dropped client's row is never sent
    if bad.any():
        u, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"vectors[{u}, {j}]={vectors[u, j]} (client {u}) is not finite: fixed-point encoding "
            f"would sum it as a clipped number; {int(bad.any(axis=1).sum())} client(s) hold "
            "non-finite coordinates; screen or drop them before the secure sum"
        )


def secure_sum_ring(
    inputs: np.ndarray,
    *,
    threshold: int,
    bits: int = 32,
    neighbours: str | int = "all",
    dropout_after_masking: Iterable[int] = (),
    dropout_before_unmasking: Iterable[int] = (),
    randomness: randomness_lib.Randomness | None = None,
    round_index: int = 0,
    graph: Mapping[int, frozenset[int]] | None = None,
    seed: int | None = None,
    deterministic_keys: bool = False,
) -> tuple[np.ndarray, SecureSumStats, Server]:
    """Run all four rounds on ring vectors ``inputs`` (n, d) uint64; return the ring sum.

    Args:
        inputs: client i's vector in Z_(2^bits) is row i; client ids are 0..n-1.
        threshold: t of the Shamir sharing, also the minimum number of clients per round; with
          SecAgg+ at most k + 1 (see :func:`secagg_plus_parameters`).
        bits: ring size 2^bits.
        neighbours: "all" (SecAgg) or k (SecAgg+: a random k-regular graph).
        dropout_after_masking: clients that share keys (so masks are set up) but send no input.
        dropout_before_unmasking: clients that send their input but do not answer unmasking.
        randomness: where keys, self-mask seeds, Shamir coefficients and the graph come from:
          per client ``randomness.generator(SECAGG_KEYS, round_index, u)`` and
          ``randomness.generator(SECAGG_GRAPH, round_index)``. In secure mode (the default when
          None) each is a fresh ChaCha20 CSPRNG keyed from the OS, never from a seed.
        round_index: distinguishes rounds of a reproducible run.
        graph: an explicit masking graph (tests and attacks); overrides ``neighbours``.
        seed: legacy, ignored unless ``deterministic_keys``.
        deterministic_keys: legacy for ``randomness=Randomness("reproducible", seed)``.

    Returns:
        (sum of surviving rows mod 2^bits, SecureSumStats, the Server with its ``log``).

    Raises:
        TooFewSurvivorsError: fewer than t clients or shares at some round, and its subclass
          DisconnectedSurvivorsError when the survivors' graph is not connected.
    """
    rand = _resolve(randomness, seed, deterministic_keys)
    inputs = np.asarray(inputs)
    n, d = inputs.shape
    ids = list(range(n))
    if graph is None:
        graph = neighbour_graph(
            ids, neighbours, rng=rand.generator(randomness_lib.SECAGG_GRAPH, round_index)
        )
    clients = {
        u: Client(
            u,
            inputs[u],
            neighbours=graph[u],
            threshold=threshold,
            bits=bits,
            key_rng=rand.generator(randomness_lib.SECAGG_KEYS, round_index, u),
        )
        for u in ids
    }
    server = Server(ids, threshold=threshold, dim=d, bits=bits, graph=graph)
    sent = dict.fromkeys(ids, 0)
    recv = dict.fromkeys(ids, 0)
    seconds = {}
    drop_mask = check_client_ids(dropout_after_masking, n, "dropout_after_masking")
    drop_unmask = check_client_ids(dropout_before_unmasking, n, "dropout_before_unmasking")

    def upload(msg):
        sent[msg.sender] += msg.nbytes
        server.receive(msg)

    def download(per_client):
        for u, m in per_client.items():
            recv[u] += m.nbytes
        return per_client

    tic = time.perf_counter()
    for u in ids:
        upload(clients[u].advertise_keys())
    broadcast = download(server.close_advertise_keys())
    seconds["advertise_keys"] = time.perf_counter() - tic

    tic = time.perf_counter()
    for u in sorted(broadcast):
        upload(clients[u].share_keys(broadcast[u]))
    routed = download(server.close_share_keys())
    seconds["share_keys"] = time.perf_counter() - tic

    tic = time.perf_counter()
    for u in sorted(routed):
        if u not in drop_mask:
            upload(clients[u].masked_input(routed[u]))
    request = server.close_masked_input()
    download({u: request for u in request.survivors})
    seconds["masked_input"] = time.perf_counter() - tic

    tic = time.perf_counter()
    for u in sorted(request.survivors - drop_unmask):
        upload(clients[u].unmask(request))
    total = server.finalize()
    seconds["unmasking"] = time.perf_counter() - tic
    stats = SecureSumStats(
        "secagg",
        sent,
        recv,
        seconds,
        tuple(sorted(server.u3)),
        tuple(sorted(request.dropped)),
        views=(server,),
    )
    return total, stats, server


def aborted_stats(method: str, n: int) -> SecureSumStats:
    """The stats of a round that aborted before any byte was counted."""
    return SecureSumStats(
        method,
        dict.fromkeys(range(n), 0),
        dict.fromkeys(range(n), 0),
        {},
        (),
        tuple(range(n)),
        aborted=True,
    )


def secure_sum(
    vectors: np.ndarray,
    *,
    clip: float,
    threshold: int,
    neighbours: str | int = "all",
    dropped: Iterable[int] = (),
    randomness: randomness_lib.Randomness | None = None,
    round_index: int = 0,
    bits: int = 32,
    stochastic: bool = False,
    raise_on_abort: bool = True,
    dropout_after_masking: Iterable[int] | None = None,
    seed: int | None = None,
    deterministic_keys: bool = False,
) -> tuple[np.ndarray, SecureSumStats]:
    """Sum of the clipped float rows of ``vectors`` (n, d) over surviving clients, via SecAgg.

    Same signature and result as :func:`fedjax_med.secure.additive.secure_sum` apart from the
    method's own options (``threshold`` and ``neighbours`` here, ``num_servers`` there). The
    error per coordinate is at most ``field.FieldEncoder(clip, n, bits).error_bound(m)`` for m
    survivors.

    Args:
      vectors: client i's float vector is row i.
      clip: per-coordinate clipping bound of the fixed-point encoding.
      threshold: Shamir threshold t (:func:`secagg_plus_parameters` for SecAgg+).
      neighbours: "all" or k.
      dropped: clients that share keys but submit no input (dropouts after masking).
      randomness: source of keys, masks, shares, graph and stochastic rounding (see
        :func:`secure_sum_ring`); None = secure (OS entropy).
      round_index: distinguishes the rounds of a reproducible run.
      bits: ring size 2^bits.
      stochastic: unbiased stochastic rounding.
      raise_on_abort: raise :class:`RoundAbortedError` subclasses (default) or return zeros
        with ``stats.aborted``.
      dropout_after_masking, seed, deterministic_keys: legacy names (``dropped``;
        ``randomness=Randomness("reproducible", seed)``).

    Examples:
        >>> x = np.array([[0.5, -1.0], [0.25, 0.5], [1.0, 0.0]])
        >>> s, stats = secure_sum(x, clip=1.0, threshold=2)
        >>> np.allclose(s, x.sum(0), atol=1e-6), stats.survivors, stats.aborted
        (True, (0, 1, 2), False)
    """
    rand = _resolve(randomness, seed, deterministic_keys)
    if dropout_after_masking is not None:
        dropped = set(dropped) | set(dropout_after_masking)
    vectors = np.asarray(vectors, np.float64)
    n = vectors.shape[0]
    dropped = check_client_ids(dropped, n, "dropped")
    check_finite_rows(vectors, dropped)
    vectors = vectors.copy()
    vectors[sorted(dropped)] = 0.0  # a dropped client sends nothing; its row is never encoded
    enc = field.FieldEncoder(clip, n, bits, stochastic)
    ring = np.stack(
        [
            enc.encode(v, rand.generator(randomness_lib.SECAGG_KEYS, round_index, n + u))
            for u, v in enumerate(vectors)
        ]
    )
    try:
        total, stats, _ = secure_sum_ring(
            ring,
            threshold=threshold,
            bits=bits,
            neighbours=neighbours,
            dropout_after_masking=dropped,
            randomness=rand,
            round_index=round_index,
        )
    except RoundAbortedError:
        if raise_on_abort:
            raise
        return np.zeros(vectors.shape[1]), aborted_stats("secagg", n)
    return enc.decode_sum(total, len(stats.survivors)), stats
