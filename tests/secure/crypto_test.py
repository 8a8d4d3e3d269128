"""Key agreement symmetry, PRG determinism/range/vectorisation, authenticated share encryption."""

import numpy as np
import pytest

from fedjax_med.secure import crypto


def test_agreement_is_symmetric_and_label_separated():
    a, b = crypto.generate_private_key(), crypto.generate_private_key()
    ab = crypto.agree(a, crypto.public_bytes(b), b"x")
    assert ab == crypto.agree(b, crypto.public_bytes(a), b"x")
    assert ab == crypto.agree(crypto.private_bytes(b), crypto.public_bytes(a), b"x")
    assert ab != crypto.agree(a, crypto.public_bytes(b), b"y")
    assert len(ab) == 32
    assert crypto.public_from_private(crypto.private_bytes(a)) == crypto.public_bytes(a)


@pytest.mark.parametrize("bits", [16, 32, 48, 64])
def test_prg_deterministic_and_in_range(bits):
    seed = bytes(range(32))
    m = crypto.prg(seed, 1000, bits)
    assert m.dtype == np.uint64 and m.shape == (1000,)
    np.testing.assert_array_equal(m, crypto.prg(seed, 1000, bits))
    assert not np.array_equal(m, crypto.prg(bytes(32), 1000, bits))
    if bits < 64:
        assert int(m.max()) < 2**bits
    assert int(m.max()) > 2 ** (bits - 2)  # uses the high bits too


class _CountingEncryptor:
    def __init__(self, encryptor, log):
        self._encryptor, self._log = encryptor, log

    def update(self, data):
        self._log.append(len(data))
        return self._encryptor.update(data)

    def finalize(self):
        return self._encryptor.finalize()


def test_prg_is_one_vectorised_aes_call_for_a_million_parameters(monkeypatch):
    # Work, not wall-clock (timings are in benchmarks/accounting.py): a million words must come
    # from one AES-CTR encryptor fed once, never a per-word or per-block Python loop.
    real_cipher, updates = crypto.Cipher, []

    class CountingCipher:
        def __init__(self, *args, **kwargs):
            self._cipher = real_cipher(*args, **kwargs)

        def encryptor(self):
            updates.append("encryptor")
            return _CountingEncryptor(self._cipher.encryptor(), updates)

    monkeypatch.setattr(crypto, "Cipher", CountingCipher)
    d, seed = 1_000_000, bytes(range(32))
    m = crypto.prg(seed, d, 32)
    assert updates == ["encryptor", 4 * d]  # one keystream of 4 bytes per 32-bit word
    assert m.dtype == np.uint64 and m.shape == (d,)
    assert int(m.max()) < 2**32 and int(m.max()) >= 2**32 - 2**16
    # Counter mode: a shorter mask is a prefix of the longer one.
    np.testing.assert_array_equal(m[:1000], crypto.prg(seed, 1000, 32))
    # Uniform on [0, 2^32): mean 2^31 with standard error 2^32 / sqrt(12 d) ~ 1.2e6; and every
    # bit is set about half the time (sd 5e-4).
    assert abs(float(m.mean()) - 2**31) < 6 * 2**32 / np.sqrt(12 * d)
    ones = [float(((m >> np.uint64(k)) & np.uint64(1)).mean()) for k in range(32)]
    np.testing.assert_allclose(ones, 0.5, atol=0.003)


def test_prg_rejects_short_seed():
    with pytest.raises(ValueError, match="seed"):
        crypto.prg(b"short", 4, 32)


def test_encrypt_roundtrip_and_tamper_detection():
    key = bytes(range(32))
    blob = crypto.encrypt(key, b"share", b"aad")
    assert crypto.decrypt(key, blob, b"aad") == b"share"
    with pytest.raises(ValueError, match="authentication"):
        crypto.decrypt(key, blob, b"other")
    bad = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(ValueError, match="authentication"):
        crypto.decrypt(key, bad, b"aad")
