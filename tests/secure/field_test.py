"""Fixed-point ring encoding: no wraparound at the bound, quantisation error within the bound."""

import numpy as np
import pytest

from fedjax_med.secure import field


@pytest.mark.parametrize("bits", [16, 32, 48])
@pytest.mark.parametrize("stochastic", [False, True])
def test_sum_error_within_bound(bits, stochastic):
    n, clip = 7, 2.0
    enc = field.FieldEncoder(clip, n, bits, stochastic)
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (n, 500))
    total = np.zeros(500, np.uint64)
    for row in x:
        total = field.add(total, enc.encode(row, rng), bits)
    err = np.abs(enc.decode_sum(total, n) - np.clip(x, -clip, clip).sum(0))
    assert err.max() <= enc.error_bound(n)


@pytest.mark.parametrize("stochastic", [False, True])
def test_extreme_values_do_not_wrap(stochastic):
    n, bits = 50, 16
    enc = field.FieldEncoder(1.0, n, bits, stochastic)
    rng = np.random.default_rng(1)
    for sign in (1.0, -1.0):
        total = np.zeros(3, np.uint64)
        for _ in range(n):
            total = field.add(total, enc.encode(np.full(3, sign * 5.0), rng), bits)
        assert np.all(np.abs(enc.decode_sum(total, n) - sign * n) <= enc.error_bound(n))


def test_stochastic_rounding_is_unbiased():
    enc = field.FieldEncoder(1.0, 1, 8, stochastic=True)
    x = np.full(20_000, 0.3 / enc.scale)  # 0.3 of a quantisation step
    q = field.from_ring(enc.encode(x, np.random.default_rng(2)), 8)
    assert set(np.unique(q)) <= {0, 1}
    assert abs(q.mean() - 0.3) < 0.02


def test_ring_helpers_and_validation():
    a = field.to_ring(np.array([-5, 7, 0]), 32)
    b = field.to_ring(np.array([3, -9, 0]), 32)
    assert field.from_ring(field.add(a, b, 32), 32).tolist() == [-2, -2, 0]
    assert field.from_ring(field.sub(a, b, 32), 32).tolist() == [-8, 16, 0]
    assert field.from_ring(field.to_ring(np.array([-1]), 64), 64).tolist() == [-1]
    with pytest.raises(ValueError, match="clip"):
        field.FieldEncoder(0.0, 3)
    with pytest.raises(ValueError, match="bits"):
        field.FieldEncoder(1.0, 300, bits=8)
    with pytest.raises(ValueError, match="n="):
        field.FieldEncoder(1.0, 3).decode_sum(np.zeros(1, np.uint64), 4)
    with pytest.raises(ValueError, match="rng"):
        field.FieldEncoder(1.0, 3, stochastic=True).encode(np.zeros(2))
