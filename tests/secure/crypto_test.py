"""Key agreement symmetry, PRG determinism/range/speed, authenticated share encryption."""

import time

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


def test_prg_fast_for_a_million_parameters():
    tic = time.perf_counter()
    crypto.prg(bytes(32), 1_000_000, 32)
    assert time.perf_counter() - tic < 0.5


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
