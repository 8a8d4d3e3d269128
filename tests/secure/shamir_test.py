"""Shamir t-of-n: any t shares reconstruct, t-1 fail, corrupted shares are detected."""

import dataclasses
import itertools

import numpy as np
import pytest

from fedjax_med.secure import shamir


@pytest.mark.parametrize("t,n", [(1, 1), (2, 3), (3, 5), (5, 5)])
def test_any_t_shares_reconstruct(t, n):
    secret = bytes(range(32))
    shares = shamir.share(secret, t, n, np.random.default_rng(0))
    for subset in itertools.combinations(shares, t):
        assert shamir.reconstruct(list(subset)) == secret
    assert shamir.reconstruct(shares) == secret


@pytest.mark.parametrize("secret", [b"", b"\x00", b"\x00" * 31 + b"\x01", bytes(range(15))])
def test_edge_secrets(secret):
    assert shamir.reconstruct(shamir.share(secret, 2, 3)[1:]) == secret


def test_too_few_shares():
    shares = shamir.share(b"k" * 32, 3, 5)
    with pytest.raises(ValueError, match="threshold"):
        shamir.reconstruct(shares[:2])
    with pytest.raises(ValueError, match="no shares"):
        shamir.reconstruct([])


def test_corrupted_share_detected():
    shares = shamir.share(b"k" * 32, 3, 5, np.random.default_rng(1))
    bad = dataclasses.replace(shares[0], values=(shares[0].values[0] + 1,) + shares[0].values[1:])
    with pytest.raises(shamir.ShareError, match="corrupted"):
        shamir.reconstruct([bad] + shares[1:3])
    other = shamir.share(b"j" * 32, 3, 5)
    with pytest.raises(shamir.ShareError, match="metadata"):
        shamir.reconstruct(shares[:2] + other[2:3])
    with pytest.raises(shamir.ShareError, match="duplicate"):
        shamir.reconstruct([shares[0], shares[0], shares[1]])


def test_serialisation_roundtrip():
    s = shamir.share(b"x" * 40, 2, 4)[3]
    assert shamir.Share.from_bytes(s.to_bytes()) == s
    with pytest.raises(shamir.ShareError, match="malformed"):
        shamir.Share.from_bytes(b"\x00" * 10)


def test_invalid_parameters():
    with pytest.raises(ValueError):
        shamir.share(b"x", 4, 3)
    with pytest.raises(ValueError):
        shamir.share(b"x", 0, 3)
