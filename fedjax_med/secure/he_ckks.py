r"""CKKS-encrypted secure aggregation: the server adds ciphertexts, a key holder decrypts the sum.

CKKS (Cheon, Kim, Kim, Song, "Homomorphic encryption for arithmetic of approximate numbers",
ASIACRYPT 2017, https://eprint.iacr.org/2016/421) encrypts a vector of ``N / 2`` reals as one
ciphertext; adding two ciphertexts adds the vectors. One round:

1. the **key holder** (:class:`KeyHolder`) generates the CKKS key pair once and publishes the
   public context (parameters and public key, no secret key);
2. each **client** (:func:`encrypt_update`) encrypts its flattened message (FedAvg:
   ``[w_k clip_c(delta_k), w_k]``) under the public key, ``ceil(d / (N / 2))`` ciphertexts;
3. the **server** (:class:`AggregationServer`) holds only the public context; it adds the
   ciphertexts of the clients that submitted and sends the one aggregate to the key holder;
4. the key holder decrypts the aggregate, at most once per round and only for >= 2 clients, and
   releases the sum, from which the server takes its step.

Library: TenSEAL (https://github.com/OpenMined/TenSEAL, Apache-2.0) on Microsoft SEAL. OpenFHE's
threshold CKKS (Mouchet, Troncoso-Pastoriza, Bossuat, Hubaux, PoPETs 2021) would spread the
secret key over the hospitals, but the ``openfhe`` wheel on PyPI ships only a CPython 3.10
extension; TenSEAL has no threshold decryption, so one separate party holds the key.

Trust model (who is trusted with what):

* the server is honest-but-curious and does **not collude with the key holder**; it holds no
  secret key, so it cannot decrypt any ciphertext, individual or summed (:class:`KeyHolder`'s
  public context fails to decrypt);
* the key holder sees only the aggregate ciphertext the server forwards, i.e. the sum the server
  learns anyway; it decrypts at most one ciphertext per round. A *malicious* server could forward
  one client's ciphertext as "the aggregate" and learn that update (the key holder cannot tell a
  sum from a single ciphertext); that needs verifiable aggregation and is not claimed here;
* clients see only the public context; a coalition of clients learns nothing about the others.

Dropouts: a client that does not submit is simply absent from the sum (its weight too, so the
FedAvg denominator ``sum_k w_k`` counts only submitters). The key holder is a single point of
failure: when it is offline (:attr:`KeyHolder.online` false) the round raises
:class:`KeyHolderUnavailableError` (a :class:`~fedjax_med.secure.secagg.RoundAbortedError`) and
releases nothing, never a wrong sum. Fewer than 2 submitters also aborts (a "sum" of one
client is its update).

Error bound (:func:`error_bound`), worst case, not heuristic. Slot ``j`` of a decoded
ciphertext is ``tau(m + e)_j / Delta`` (``tau`` the canonical embedding, ``Delta = 2^scale_bits``
the scale). SEAL encrypts with the public key at the key level and divides by the special prime
``P``, so a fresh ciphertext decrypts to ``Delta m + r_enc + r_0 + r_1 s + e' / P`` with rounding
polynomials ``r_enc, r_0, r_1`` (coefficients in ``[-1/2, 1/2]``), the ternary secret ``s`` and
``e' = e u + e_1 + e_2 s`` (errors ``|e_i| <= 21``, SEAL's centred binomial, ternary ``u``).
Since ``|tau(a)_j| <= ||a||_1`` and ``|tau(a b)_j| <= ||a||_1 max|tau(b)|``, per ciphertext
``||.||_can <= N/2 + N/2 + N^2/2 + 21 (2 N^2 + N) / P``; the sum of ``n`` ciphertexts adds ``n``
such noises. Encoding and decoding in double precision add at most ``2^-51 |S| N log2 N`` for a
sum of magnitude ``|S| <= n c``. Hence, per coordinate of the decrypted sum,

    |dec(sum) - sum| <= n (N + N^2 / 2 + 21 (2 N^2 + N) / P) / Delta + 2^-51 n c N log2 N.

At ``N = 4096``, ``Delta = 2^40`` that is about ``7.6e-6 n``. The sum must stay below the
decryption modulus: ``n c < 2^(q_bits - scale_bits - 2)`` (:meth:`CKKSParameters.max_sum`),
checked before encryption.

DP: this is an aggregation protocol, not a privacy mechanism. DP-FedAvg's Gaussian noise is
added to the released sum as with SecAgg (:mod:`fedjax_med.federated.secure_rounds`); the CKKS
error is deterministic given the keys, bounded above, and is never counted as privacy noise.
Randomness: SEAL draws keys and encryption noise from its own CSPRNG seeded by the operating
system in both randomness modes, so a ``reproducible`` run agrees with a rerun only up to the
error bound.

Example (three clients, one drops; the key holder decrypts the survivors' sum):

    >>> import numpy as np
    >>> params = CKKSParameters(poly_modulus_degree=4096)
    >>> holder = KeyHolder(params)
    >>> x = np.array([[0.5, -1.0], [0.25, 0.5], [1.0, 0.0]])
    >>> total, stats = secure_sum(x, clip=1.0, dropped={2}, key_holder=holder, round_index=0)
    >>> bool(np.all(np.abs(total - x[:2].sum(0)) <= error_bound(params, 2, 1.0))), stats.survivors
    (True, (0, 1))
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence

import numpy as np

from fedjax_med.secure import secagg

INSTALL_HINT = "pip install 'fedjax_med[he]'"
# Who is trusted with what, as report.json's aggregation_cost states it.
TRUST = (
    "a separate key holder, not colluding with the server, holds the CKKS secret key and "
    "decrypts only the per-round aggregate; the server (public key only) cannot decrypt; "
    "a malicious server forwarding one client's ciphertext as the aggregate is not covered"
)
# 128-bit security limits on the total coefficient modulus (HomomorphicEncryption.org standard,
# SEAL's CoeffModulus::MaxBitCount for a ternary secret).
MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438}
POLY_MODULUS_DEGREES = tuple(MAX_COEFF_BITS)
ERROR_MAX = 21  # SEAL's centred binomial error: sum of 21 coin pairs, |e| <= 21


class KeyHolderUnavailableError(secagg.RoundAbortedError):
    """The key holder is offline: the round aborts and releases nothing."""


def import_tenseal():
    """The ``tenseal`` module, or an ImportError that names the install command."""
    try:
        import tenseal
    except ImportError as err:  # the optional extra is absent
        raise ImportError(f"homomorphic encryption needs TenSEAL: {INSTALL_HINT} ({err})") from None
    return tenseal


@dataclasses.dataclass(frozen=True)
class CKKSParameters:
    """CKKS parameters of aggregation: ring degree ``N``, one data prime, the scale.

    Aggregation multiplies nothing, so the ciphertexts need one data prime ``q`` (``q_bits``)
    above the scale ``Delta = 2^scale_bits``; the special prime (``special_bits``) only serves
    encryption. ``N / 2`` coordinates fit in one ciphertext.
    """

    poly_modulus_degree: int = 4096
    q_bits: int = 60
    scale_bits: int = 40

    def __post_init__(self):
        if self.poly_modulus_degree not in MAX_COEFF_BITS:
            raise ValueError(
                f"poly_modulus_degree={self.poly_modulus_degree} must be one of "
                f"{POLY_MODULUS_DEGREES}"
            )
        if not 20 <= self.scale_bits <= self.q_bits - 10:
            raise ValueError(f"scale_bits={self.scale_bits} must be in [20, q_bits - 10]")

    @property
    def special_bits(self) -> int:
        return min(60, MAX_COEFF_BITS[self.poly_modulus_degree] - self.q_bits)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def max_sum(self) -> float:
        """Largest ``|sum|`` per coordinate that decrypts without wrapping around ``q``."""
        return 2.0 ** (self.q_bits - self.scale_bits - 2)

    def num_ciphertexts(self, dim: int) -> int:
        return max(1, math.ceil(dim / self.slots))


def error_bound(params: CKKSParameters, num_clients: int, clip: float) -> float:
    """Worst-case error per coordinate of a decrypted sum of ``num_clients`` ciphertexts.

    ``n (N + N^2/2 + 21 (2N^2 + N) / P) / Delta + 2^-51 n c N log2 N``; see the module docstring.

    Examples:
        >>> round(error_bound(CKKSParameters(4096), 1, 1.0), 7)
        7.6e-06
    """
    n, big_n = num_clients, params.poly_modulus_degree
    special = 2.0 ** (params.special_bits - 1)  # the special prime P > 2^(bits - 1)
    noise = big_n + big_n**2 / 2 + ERROR_MAX * (2 * big_n**2 + big_n) / special
    floating = 2.0**-51 * n * clip * big_n * math.log2(big_n)
    return n * noise / 2.0**params.scale_bits + floating


def _context(params: CKKSParameters):
    ts = import_tenseal()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=[params.q_bits, params.special_bits],
    )
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


class KeyHolder:
    """The one party holding the CKKS secret key: publishes the public context, decrypts sums.

    It decrypts at most one aggregate per round, claimed by the server to sum >= ``min_clients``
    clients, and only while :attr:`online`; see the module docstring's trust model.
    """

    def __init__(self, params: CKKSParameters, *, min_clients: int = 2):
        self.params = params
        self.min_clients = min_clients
        self.online = True
        self._context = _context(params)
        self._decrypted_rounds: set[int] = set()
        self.public_context = self._context.serialize(save_secret_key=False)

    def decrypt_sum(
        self, ciphertexts: Sequence[bytes], *, dim: int, round_index: int, num_clients: int
    ) -> np.ndarray:
        """The float64 sum of length ``dim`` under the aggregate ``ciphertexts`` of one round.

        Raises:
          KeyHolderUnavailableError: the key holder is offline (the round aborts).
          secagg.TooFewSurvivorsError: the aggregate claims fewer than ``min_clients`` clients.
          secagg.ProtocolError: a second decryption asked for the same round.
        """
        if not self.online:
            raise KeyHolderUnavailableError(f"round {round_index}: the key holder is offline")
        if num_clients < self.min_clients:
            raise secagg.TooFewSurvivorsError(
                f"{num_clients} clients in the aggregate < min_clients={self.min_clients}"
            )
        if round_index in self._decrypted_rounds:
            raise secagg.ProtocolError(f"round {round_index} was already decrypted once")
        self._decrypted_rounds.add(round_index)
        ts = import_tenseal()
        parts = [ts.ckks_vector_from(self._context, c).decrypt() for c in ciphertexts]
        return np.concatenate([np.asarray(p, np.float64) for p in parts])[:dim]


def public_context(data: bytes):
    """The TenSEAL context in ``data`` (:attr:`KeyHolder.public_context`); no secret key allowed."""
    ctx = import_tenseal().context_from(data)
    if ctx.has_secret_key():
        raise ValueError("a public context must not carry the secret key")
    return ctx


def encrypt_update(context, vector: np.ndarray, params: CKKSParameters) -> list[bytes]:
    """Client side: ``vector`` encrypted under the public key, ``N / 2`` coordinates each."""
    ts = import_tenseal()
    vector = np.asarray(vector, np.float64)
    return [
        ts.ckks_vector(context, vector[i : i + params.slots]).serialize()
        for i in range(0, max(vector.size, 1), params.slots)
    ]


class AggregationServer:
    """Adds the clients' ciphertexts; holds only the public context, so it decrypts nothing."""

    def __init__(self, public_context_bytes: bytes, num_ciphertexts: int):
        self.context = public_context(public_context_bytes)
        self.num_ciphertexts = num_ciphertexts
        self._sum = None
        self.contributors: list[int] = []

    def receive(self, client: int, ciphertexts: Sequence[bytes]) -> None:
        """Adds one client's ciphertexts to the running sum (refusing a repeat or a bad length)."""
        if client in self.contributors:
            raise secagg.DuplicateMessageError(f"client {client} already submitted")
        if len(ciphertexts) != self.num_ciphertexts:
            raise secagg.MalformedMessageError(
                f"client {client} sent {len(ciphertexts)} ciphertexts, not {self.num_ciphertexts}"
            )
        ts = import_tenseal()
        vectors = [ts.ckks_vector_from(self.context, c) for c in ciphertexts]
        if self._sum is not None:
            vectors = [a + b for a, b in zip(self._sum, vectors, strict=True)]
        self._sum = vectors
        self.contributors.append(client)

    def aggregate(self) -> list[bytes]:
        """The aggregate ciphertexts sent to the key holder."""
        if self._sum is None:
            raise secagg.TooFewSurvivorsError("no client submitted")
        return [v.serialize() for v in self._sum]


def secure_sum(
    vectors: np.ndarray,
    *,
    clip: float,
    key_holder: KeyHolder,
    dropped: Iterable[int] = (),
    round_index: int = 0,
) -> tuple[np.ndarray, secagg.SecureSumStats]:
    """Sum of the rows of ``vectors`` (n, d) over clients not in ``dropped``, through CKKS.

    Same result record as :func:`fedjax_med.secure.secagg.secure_sum`. The error per coordinate
    is at most :func:`error_bound` ``(params, m, clip)`` for ``m`` submitters; ``stats.seconds``
    holds ``encrypt`` (mean per client), ``aggregate`` and ``decrypt``.

    Args:
      vectors: client i's float vector is row i, each coordinate in ``[-clip, clip]``.
      clip: the bound per coordinate (checked: ``n clip`` must stay below ``max_sum``).
      key_holder: the party holding the secret key.
      dropped: clients that do not submit; they are absent from the sum.
      round_index: the round, so that the key holder decrypts it at most once.

    Raises:
      secagg.RoundAbortedError: key holder offline or fewer than 2 submitters (nothing released).
      ValueError: a coordinate beyond ``clip``, non-finite, or ``n clip`` too large for ``q``.
    """
    params = key_holder.params
    vectors = np.asarray(vectors, np.float64)
    n, dim = vectors.shape
    dropped = secagg.check_client_ids(dropped, n, "dropped")
    secagg.check_finite_rows(vectors, dropped)
    survivors = tuple(u for u in range(n) if u not in dropped)
    if n * clip >= params.max_sum():
        raise ValueError(
            f"n * clip = {n * clip:g} must be < {params.max_sum():g} (2^(q_bits - scale_bits - 2))"
        )
    if survivors and np.abs(vectors[list(survivors)]).max() > clip:
        raise ValueError(f"a submitted coordinate exceeds clip={clip}: clip before encrypting")
    context = public_context(key_holder.public_context)
    server = AggregationServer(key_holder.public_context, params.num_ciphertexts(dim))
    sent, tic = {}, time.perf_counter()
    for u in survivors:
        ciphertexts = encrypt_update(context, vectors[u], params)
        sent[u] = sum(len(c) for c in ciphertexts)
        server.receive(u, ciphertexts)
    encrypt_s = (time.perf_counter() - tic) / max(len(survivors), 1)
    tic = time.perf_counter()
    aggregate = server.aggregate()
    aggregate_s = time.perf_counter() - tic
    tic = time.perf_counter()
    total = key_holder.decrypt_sum(
        aggregate, dim=dim, round_index=round_index, num_clients=len(server.contributors)
    )
    stats = secagg.SecureSumStats(
        method="he_ckks",
        bytes_sent=sent,
        bytes_received=dict.fromkeys(survivors, 0),  # clients receive only the public context
        seconds={
            "encrypt": encrypt_s,
            "aggregate": aggregate_s,
            "decrypt": time.perf_counter() - tic,
        },
        survivors=survivors,
        dropped=tuple(sorted(dropped)),
        views=(server,),
    )
    return total, stats


def round_metrics(stats: secagg.SecureSumStats, key_holder: KeyHolder) -> dict[str, float]:
    """The HE figures of one round for ``metrics.jsonl`` (and ``report.json``'s cost)."""
    return {
        "he_ciphertext_bytes_per_client": stats.mean_bytes_sent,
        "he_public_context_bytes": float(len(key_holder.public_context)),
        "he_encrypt_seconds_per_client": stats.seconds.get("encrypt", 0.0),
        "he_aggregate_seconds": stats.seconds.get("aggregate", 0.0),
        "he_decrypt_seconds": stats.seconds.get("decrypt", 0.0),
        "he_poly_modulus_degree": float(key_holder.params.poly_modulus_degree),
    }
