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

Neighbours: all n - 1 peers (SecAgg) or a random k-regular graph from a public seed (SecAgg+,
Bell et al., CCS 2020, https://eprint.iacr.org/2020/704); the threshold t then counts shares among
a client's k + 1 holders, so t <= k + 1.

Guarantees (honest-but-curious server, the simulation's clients follow the protocol): the server's
view (``Server.log``) holds only public keys, ciphertexts, masked vectors and shares it is entitled
to; fewer than t survivors (overall or among any holder set) raises ``ProtocolError``, never
returns a wrong sum. Malformed, unknown, replayed, out-of-round and late messages are rejected.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping

import numpy as np

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


class TooFewSurvivorsError(ProtocolError):
    """Fewer than t clients (or shares) left to continue."""


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


def neighbour_graph(
    client_ids: Iterable[int], neighbours: str | int = "all", seed: int = 0
) -> dict[int, frozenset[int]]:
    """Public masking graph: every other client ("all"), or a random k-regular graph (SecAgg+).

    For integer k the clients are placed on a ring in a random order drawn from ``seed`` (public)
    and each is joined to the ceil(k/2) nearest on either side (a Harary graph), so every client has
    2 ceil(k/2) neighbours; k >= n - 1 gives the complete graph.

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
    half = math.ceil(neighbours / 2)
    if 2 * half >= n:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    graph = {u: set() for u in ids}
    for i, u in enumerate(order):
        for j in range(1, half + 1):
            v = order[(i + j) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: frozenset(vs) for u, vs in graph.items()}


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

    def close_masked_input(self) -> UnmaskRequest:
        self.u3 = self._close("unmasking")
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


@dataclasses.dataclass
class Stats:
    """Communication and time of one run: bytes per client, seconds per round, survivors."""

    bytes_sent: dict[int, int]
    bytes_received: dict[int, int]
    seconds: dict[str, float]
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


def secure_sum_ring(
    inputs: np.ndarray,
    *,
    threshold: int,
    bits: int = 32,
    neighbours: str | int = "all",
    dropout_after_masking: Iterable[int] = (),
    dropout_before_unmasking: Iterable[int] = (),
    seed: int = 0,
    deterministic_keys: bool = False,
) -> tuple[np.ndarray, Stats, Server]:
    """Run all four rounds on ring vectors ``inputs`` (n, d) uint64; return the ring sum.

    Args:
        inputs: client i's vector in Z_(2^bits) is row i; client ids are 0..n-1.
        threshold: t of the Shamir sharing, also the minimum number of clients per round.
        bits: ring size 2^bits.
        neighbours: "all" (SecAgg) or k (SecAgg+ graph from ``seed``).
        dropout_after_masking: clients that share keys (so masks are set up) but send no input.
        dropout_before_unmasking: clients that send their input but do not answer unmasking.
        seed: public seed of the neighbour graph.
        deterministic_keys: draw private keys and seeds from ``seed`` (tests only, insecure).

    Returns:
        (sum of surviving rows mod 2^bits, Stats, the Server with its ``log``).
    """
    inputs = np.asarray(inputs)
    n, d = inputs.shape
    ids = list(range(n))
    graph = neighbour_graph(ids, neighbours, seed)
    key_rng = np.random.default_rng([seed, 1]) if deterministic_keys else None
    clients = {
        u: Client(
            u, inputs[u], neighbours=graph[u], threshold=threshold, bits=bits, key_rng=key_rng
        )
        for u in ids
    }
    server = Server(ids, threshold=threshold, dim=d, bits=bits, graph=graph)
    sent = dict.fromkeys(ids, 0)
    recv = dict.fromkeys(ids, 0)
    seconds = {}
    drop_mask, drop_unmask = set(dropout_after_masking), set(dropout_before_unmasking)

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
    stats = Stats(sent, recv, seconds, tuple(sorted(server.u3)), tuple(sorted(request.dropped)))
    return total, stats, server


def secure_sum(
    vectors: np.ndarray,
    *,
    clip: float,
    threshold: int,
    dropout_after_masking: Iterable[int] = (),
    neighbours: str | int = "all",
    bits: int = 32,
    seed: int = 0,
    stochastic: bool = False,
    deterministic_keys: bool = False,
) -> tuple[np.ndarray, Stats]:
    """Sum of the clipped float rows of ``vectors`` (n, d) over surviving clients, via SecAgg.

    The error per coordinate is at most ``field.FieldEncoder(clip, n, bits).error_bound(m)`` for m
    survivors. ``seed`` drives the public graph and stochastic rounding; keys come from the OS
    unless ``deterministic_keys``.

    Examples:
        >>> x = np.array([[0.5, -1.0], [0.25, 0.5], [1.0, 0.0]])
        >>> s, stats = secure_sum(x, clip=1.0, threshold=2)
        >>> np.allclose(s, x.sum(0), atol=1e-6), stats.survivors
        (True, (0, 1, 2))
    """
    vectors = np.asarray(vectors, np.float64)
    n = vectors.shape[0]
    enc = field.FieldEncoder(clip, n, bits, stochastic)
    rng = np.random.default_rng([seed, 2])
    ring = np.stack([enc.encode(v, rng) for v in vectors])
    total, stats, _ = secure_sum_ring(
        ring,
        threshold=threshold,
        bits=bits,
        neighbours=neighbours,
        dropout_after_masking=dropout_after_masking,
        seed=seed,
        deterministic_keys=deterministic_keys,
    )
    return enc.decode_sum(total, len(stats.survivors)), stats
