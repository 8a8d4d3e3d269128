"""Secure sums refuse dropout ids that name no client and non-finite coordinates."""

import numpy as np
import pytest

from fedjax_med import randomness
from fedjax_med.secure import additive, secagg

RAND = randomness.Randomness("reproducible", 0)
X = np.array([[0.5, -1.0], [0.25, 0.5], [1.0, 0.0]])


@pytest.mark.parametrize("bad", [3, -1, 7])
def test_secagg_dropout_id_that_is_no_client(bad):
    with pytest.raises(
        ValueError, match=rf"dropped holds {bad}, which is not a client id in \[0, 3\)"
    ):
        secagg.secure_sum(X, clip=1.0, threshold=2, dropped=[bad], randomness=RAND)


def test_secagg_ring_dropout_ids_are_checked():
    ring = np.zeros((3, 2), np.uint64)
    with pytest.raises(ValueError, match=r"dropout_before_unmasking holds 5"):
        secagg.secure_sum_ring(ring, threshold=2, dropout_before_unmasking=[5], randomness=RAND)


def test_additive_dropout_id_that_is_no_client():
    with pytest.raises(ValueError, match=r"dropped holds 9"):
        additive.secure_sum(X, clip=1.0, dropped=[9], randomness=RAND)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_coordinate_is_refused(value):
    x = X.copy()
    x[1, 0] = value
    with pytest.raises(ValueError, match=r"vectors\[1, 0\]=.* \(client 1\) is not finite"):
        secagg.secure_sum(x, clip=1.0, threshold=2, randomness=RAND)
    with pytest.raises(ValueError, match=r"vectors\[1, 0\]"):
        additive.secure_sum(x, clip=1.0, randomness=RAND)


def test_a_dropped_clients_row_is_never_read():
    x = X.copy()
    x[1, 0] = np.nan
    total, stats = secagg.secure_sum(x, clip=1.0, threshold=2, dropped=[1], randomness=RAND)
    np.testing.assert_allclose(total, X[[0, 2]].sum(0), atol=1e-6)
    assert stats.survivors == (0, 2)
