"""Additive sharing among S servers: sum within the bound, shares look uniform, misbehaviour."""

import numpy as np
import pytest
from scipy import stats as sps

from fedjax_med import randomness
from fedjax_med.secure import additive, field, secagg


@pytest.mark.parametrize("num_servers", [2, 3, 5])
@pytest.mark.parametrize("bits", [32, 48])
def test_sum_within_bound(num_servers, bits):
    x = np.random.default_rng(0).normal(size=(8, 100))
    s, stats = additive.secure_sum(x, clip=1.0, num_servers=num_servers, bits=bits)
    bound = field.FieldEncoder(1.0, 8, bits).error_bound(8)
    assert np.abs(s - np.clip(x, -1, 1).sum(0)).max() <= bound
    assert len(stats.views) == num_servers and stats.survivors == tuple(range(8))


def test_integer_shares_sum_exactly():
    q = np.random.default_rng(1).integers(-500, 500, 64)
    shares = additive.share_vector(field.to_ring(q, 32), 4, 32)
    total = np.zeros(64, np.uint64)
    for s in shares:
        total = field.add(total, s, 32)
    np.testing.assert_array_equal(field.from_ring(total, 32), q)


def test_a_server_sees_uniform_shares():
    x = np.zeros((2, 40_000))
    _, stats = additive.secure_sum(x, clip=1.0, num_servers=2, deterministic_shares=True)
    for server in stats.views:
        y = server.log[0][1]
        counts = np.bincount((y >> np.uint64(24)).astype(np.int64), minlength=256)
        assert sps.chisquare(counts).pvalue > 0.001


def test_server_rejects_misbehaviour():
    server = additive.AggregationServer(range(2), dim=3, bits=32)
    server.receive(0, np.zeros(3, np.uint64))
    with pytest.raises(secagg.DuplicateMessageError):
        server.receive(0, np.zeros(3, np.uint64))
    with pytest.raises(secagg.UnknownClientError):
        server.receive(7, np.zeros(3, np.uint64))
    with pytest.raises(secagg.MalformedMessageError):
        server.receive(1, np.zeros(4, np.uint64))
    with pytest.raises(ValueError):
        additive.share_vector(np.zeros(3, np.uint64), 1, 32)


def test_secure_mode_shares_do_not_follow_from_the_public_seed():
    # Fault 3: shares came from default_rng([seed, 3]); a server holding the seed could rebuild
    # the other server's share and so read a client's input.
    x = np.zeros((2, 64))
    views = {}
    for mode in ("reproducible", "secure"):
        _, stats = additive.secure_sum(
            x, clip=1.0, randomness=randomness.Randomness(mode, 3), round_index=1
        )
        views[mode] = stats.views[0].log[0][1]
    rng = randomness.Randomness("reproducible", 3).generator(randomness.ADDITIVE_SHARES, 1, 0)
    regenerated = additive.share_vector(np.zeros(64, np.uint64), 2, 32, rng)[0]
    np.testing.assert_array_equal(views["reproducible"], regenerated)
    assert np.mean(views["secure"] == regenerated) < 0.05
    legacy = additive.share_vector(np.zeros(64, np.uint64), 2, 32, np.random.default_rng([3, 3]))
    assert np.mean(views["secure"] == legacy[0]) < 0.05


def test_dropped_clients_send_nothing_and_are_not_summed():
    x = np.random.default_rng(2).uniform(-1, 1, (5, 4))
    s, stats = additive.secure_sum(x, clip=1.0, dropped=[1, 4])
    assert stats.survivors == (0, 2, 3) and stats.dropped == (1, 4)
    assert stats.bytes_sent[1] == stats.bytes_sent[4] == 0
    assert np.abs(s - x[[0, 2, 3]].sum(0)).max() <= field.FieldEncoder(1.0, 5).error_bound(3)
    _, aborted = additive.secure_sum(x, clip=1.0, dropped=range(5), raise_on_abort=False)
    assert aborted.aborted
