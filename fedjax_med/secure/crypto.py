"""Key agreement, mask PRG and share encryption for secure aggregation.

* X25519 Diffie-Hellman, then HKDF-SHA256 with a purpose label, gives a 32-byte shared seed.
* The PRG is AES-256 in CTR mode with a zero nonce keyed by the seed: one ``update`` call produces
  all d words at once, so a 1M-parameter mask costs a few milliseconds.
* Shares travel under AES-256-GCM keyed by the c-key agreement; the associated data binds sender and
  recipient so the server cannot re-route a ciphertext.

Private keys come from the OS CSPRNG unless the caller passes an ``np.random.Generator`` (for
reproducible simulations and statistical tests only).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
NONCE_BYTES = 12
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def random_bytes(n: int, rng: np.random.Generator | None = None) -> bytes:
    """n bytes from the OS CSPRNG, or from ``rng`` when given (simulation only)."""
    return os.urandom(n) if rng is None else rng.bytes(n)


def generate_private_key(rng: np.random.Generator | None = None) -> x25519.X25519PrivateKey:
    """A fresh X25519 private key (OS randomness unless ``rng`` is given)."""
    if rng is None:
        return x25519.X25519PrivateKey.generate()
    return x25519.X25519PrivateKey.from_private_bytes(rng.bytes(32))


def public_bytes(key: x25519.X25519PrivateKey) -> bytes:
    """The 32-byte raw public key."""
    return key.public_key().public_bytes(*_RAW)


def public_from_private(raw_private: bytes) -> bytes:
    """The raw public key of a raw 32-byte private key (checks a reconstructed key)."""
    return public_bytes(x25519.X25519PrivateKey.from_private_bytes(raw_private))


def private_bytes(key: x25519.X25519PrivateKey) -> bytes:
    """The 32-byte raw private key (what gets secret-shared)."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def agree(private: x25519.X25519PrivateKey | bytes, peer_public: bytes, info: bytes) -> bytes:
    """32-byte seed HKDF-SHA256(X25519(private, peer_public), info); symmetric in the parties."""
    if isinstance(private, bytes):
        private = x25519.X25519PrivateKey.from_private_bytes(private)
    shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def prg(seed: bytes, d: int, bits: int) -> np.ndarray:
    """Expand a 32-byte seed into d uniform words mod 2^bits (uint64), AES-256-CTR.

    Words are 4 bytes for bits <= 32 and 8 bytes otherwise; the low ``bits`` of a uniform word are
    uniform, so the mask is uniform on Z_(2^bits).

    Examples:
        >>> a = prg(bytes(32), 4, 16)
        >>> a.dtype, bool((a < 2**16).all()), bool((a == prg(bytes(32), 4, 16)).all())
        (dtype('uint64'), True, True)
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed has {len(seed)} bytes, must be {SEED_BYTES}")
    width = 4 if bits <= 32 else 8
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    raw = enc.update(bytes(d * width)) + enc.finalize()
    words = np.frombuffer(raw, dtype="<u4" if width == 4 else "<u8").astype(np.uint64)
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    return words


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM; returns nonce || ciphertext || tag with a fresh random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of ``encrypt``; raises ValueError when the ciphertext or its binding was altered."""
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as e:
        raise ValueError("share ciphertext failed authentication") from e
