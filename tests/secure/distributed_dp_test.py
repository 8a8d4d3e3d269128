"""Distributed DP noise: discrete Gaussian and Skellam samplers, per-client calibration, epsilon."""

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from fedjax_med import randomness
from fedjax_med.privacy import accounting
from fedjax_med.secure import distributed_dp, secagg

N = 200_000


def _exact_discrete_gaussian_pmf(sigma, support):
    """P[x] for x in support, normalised over a range wide enough to hold all the mass."""
    half = int(40 * sigma) + 10
    full = np.arange(-half, half + 1)
    normaliser = np.sum(np.exp(-(full.astype(np.float64) ** 2) / (2 * sigma**2)))
    return np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2)) / normaliser


def _chi_square_p_value(samples, sigma_target):
    """Chi-square goodness of fit of integer samples to N_Z(0, sigma_target^2), tails merged."""
    limit = int(3.5 * sigma_target)
    support = np.arange(-limit, limit + 1)
    probs = _exact_discrete_gaussian_pmf(sigma_target, support)
    observed = np.array([np.sum(samples == x) for x in support], dtype=np.float64)
    observed = np.append(observed, samples.size - observed.sum())
    expected = np.append(probs, 1 - probs.sum()) * samples.size
    return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("sigma", [2.0, 3.7, 25.0])
def test_discrete_gaussian_mean_variance_dtype(sigma):
    x = distributed_dp.sample_discrete_gaussian(sigma, N, np.random.default_rng(1))
    assert x.dtype == np.int64 and x.shape == (N,)
    assert abs(x.mean()) < 5 * sigma / math.sqrt(N)
    # The true variance is within 1% of sigma^2 for sigma >= 2 ...
    support = np.arange(-int(40 * sigma) - 10, int(40 * sigma) + 11)
    true_var = np.sum(_exact_discrete_gaussian_pmf(sigma, support) * support.astype(float) ** 2)
    assert abs(true_var / sigma**2 - 1) < 0.01
    # ... and the sample variance is within 5 standard errors (sqrt(2/N) relative) of it.
    assert abs(x.var() / true_var - 1) < 5 * math.sqrt(2 / N)


def test_discrete_gaussian_is_symmetric():
    x = distributed_dp.sample_discrete_gaussian(3.0, N, np.random.default_rng(2))
    positive, negative = np.sum(x > 0), np.sum(x < 0)
    assert stats.binomtest(int(positive), int(positive + negative)).pvalue > 1e-3
    for k in range(1, 6):
        count_pos, count_neg = np.sum(x == k), np.sum(x == -k)
        assert stats.binomtest(int(count_pos), int(count_pos + count_neg)).pvalue > 1e-3


@pytest.mark.parametrize("sigma", [0.8, 3.0, 10.5])
def test_discrete_gaussian_pmf_chi_square_accepts_right_and_rejects_wrong_scale(sigma):
    x = distributed_dp.sample_discrete_gaussian(sigma, N, np.random.default_rng(3))
    assert _chi_square_p_value(x, sigma) > 1e-3
    assert _chi_square_p_value(x, sigma * 2 / 3) < 1e-9
    assert _chi_square_p_value(x, sigma * 3 / 2) < 1e-9


def test_samplers_shapes_zero_scale_and_reproducibility():
    a = distributed_dp.sample_discrete_gaussian(2.5, (3, 4), np.random.default_rng(5))
    b = distributed_dp.sample_discrete_gaussian(2.5, (3, 4), np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 4) and a.dtype == np.int64
    assert distributed_dp.sample_discrete_gaussian(1.0, None, np.random.default_rng(0)).shape == ()
    np.testing.assert_array_equal(
        distributed_dp.sample_discrete_gaussian(0.0, 5, np.random.default_rng(0)), np.zeros(5)
    )
    np.testing.assert_array_equal(
        distributed_dp.sample_skellam(0.0, 5, np.random.default_rng(0)), np.zeros(5)
    )
    assert distributed_dp.sample_discrete_gaussian(2.0, (0, 3), np.random.default_rng(0)).shape == (
        0,
        3,
    )


@pytest.mark.parametrize("mu", [0.5, 5.0, 300.0])
def test_skellam_mean_variance_dtype(mu):
    x = distributed_dp.sample_skellam(mu, N, np.random.default_rng(6))
    assert x.dtype == np.int64
    assert abs(x.mean()) < 5 * math.sqrt(2 * mu / N)
    # Var of the sample variance is (mu4 - var^2)/N with Skellam excess kurtosis 1/(2 mu).
    var = 2 * mu
    se = var * math.sqrt((2 + 1 / (2 * mu)) / N)
    assert abs(x.var() - var) < 5 * se


@pytest.mark.parametrize("kind", distributed_dp.KINDS)
def test_sum_over_clients_has_total_variance_z_delta_squared(kind):
    z, delta_2, n, size = 1.3, 20.0, 8, 50_000
    rng = np.random.default_rng(7)
    total = sum(distributed_dp.client_noise(kind, z, delta_2, n, size, rng) for _ in range(n))
    target = (z * delta_2) ** 2
    assert total.dtype == np.int64
    assert abs(total.mean()) < 5 * math.sqrt(target / size)
    assert abs(total.var() / target - 1) < 5 * math.sqrt(2 / size)


def test_client_scale_formulas():
    assert distributed_dp.client_scale("discrete_gaussian", 2.0, 30.0, 9) == pytest.approx(20.0)
    assert distributed_dp.client_scale("skellam", 2.0, 30.0, 9) == pytest.approx(3600 / 18)


def test_sensitivity_bounds():
    assert distributed_dp.quantised_l2_sensitivity(0.5, 64.0, 100) == pytest.approx(42.0)
    assert distributed_dp.quantised_l2_sensitivity(0.5, 64.0, 100, "nearest") == pytest.approx(37)
    assert distributed_dp.l1_sensitivity_bound(42.0, 100) == pytest.approx(420.0)
    assert distributed_dp.l1_sensitivity_bound(2.0, 100) == pytest.approx(4.0)
    # Worst case of stochastic rounding: every coordinate moved by almost 1 away from zero.
    rng = np.random.default_rng(8)
    for _ in range(20):
        v = rng.normal(size=100)
        v *= 0.5 / np.linalg.norm(v)
        rounded = np.sign(v) * np.ceil(np.abs(64.0 * v))
        assert np.linalg.norm(rounded) <= distributed_dp.quantised_l2_sensitivity(0.5, 64.0, 100)
        assert np.linalg.norm(np.round(64.0 * v)) <= distributed_dp.quantised_l2_sensitivity(
            0.5, 64.0, 100, "nearest"
        )


def _gaussian_epsilon(z, rounds, delta):
    accountant = dp_accounting.rdp.RdpAccountant(accounting.RDP_ORDERS)
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def test_ddg_with_one_client_is_the_gaussian_mechanism():
    # tau = 0 for n = 1: the bound is exactly the Gaussian mechanism's zCDP.
    eps = distributed_dp.distributed_epsilon("discrete_gaussian", 1.1, 50.0, 500.0, 1, 20, 1e-5)
    assert eps == pytest.approx(_gaussian_epsilon(1.1, 20, 1e-5), rel=1e-9)


def test_ddg_epsilon_includes_tau_slack_for_small_client_sigma():
    # sigma_c = 1: tau is visible; with dim the sqrt bound can be tighter than the L1 one.
    args = ("discrete_gaussian", 1.0, 4.0, 16.0, 16, 10, 1e-5)
    eps = distributed_dp.distributed_epsilon(*args)
    assert eps > _gaussian_epsilon(1.0, 10, 1e-5) * 1.01
    assert distributed_dp.distributed_epsilon(*args, dim=4) <= eps
    # With ample per-client noise, tau vanishes and the Gaussian epsilon is recovered.
    eps_big = distributed_dp.distributed_epsilon(
        "discrete_gaussian", 1.0, 400.0, 4000.0, 16, 10, 1e-5
    )
    assert eps_big == pytest.approx(_gaussian_epsilon(1.0, 10, 1e-5), rel=1e-9)


def test_skellam_epsilon_decreases_with_noise_and_approaches_gaussian():
    rounds, delta, dim = 10, 1e-5, 1000
    eps_by_z = [
        distributed_dp.distributed_epsilon("skellam", z, 100.0, 1000.0, 16, rounds, delta)
        for z in (0.7, 1.0, 1.5, 2.5)
    ]
    assert all(a > b for a, b in zip(eps_by_z, eps_by_z[1:], strict=False))
    # Finer quantisation (larger Delta at fixed z) means larger mu: the excess over the Gaussian
    # mechanism shrinks towards the gap left by Theorem 3.5's integer orders.
    z = 2.0
    gaussian = _gaussian_epsilon(z, rounds, delta)
    excess = []
    for delta_2 in (5.0, 50.0, 500.0, 5000.0):
        delta_1 = distributed_dp.l1_sensitivity_bound(delta_2, dim)
        eps = distributed_dp.distributed_epsilon("skellam", z, delta_2, delta_1, 16, rounds, delta)
        assert eps >= gaussian * (1 - 1e-9)
        excess.append(eps - gaussian)
    assert all(a >= b for a, b in zip(excess, excess[1:], strict=False))
    assert excess[-1] < 0.05 * gaussian


def test_epsilon_is_zero_for_no_rounds_and_grows_with_rounds():
    eps = [
        distributed_dp.distributed_epsilon("skellam", 1.0, 100.0, 1000.0, 8, t, 1e-6)
        for t in (0, 1, 10)
    ]
    assert eps[0] == 0.0 and eps[0] < eps[1] < eps[2]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (
            lambda: distributed_dp.sample_discrete_gaussian(-1.0, 3, np.random.default_rng()),
            "sigma",
        ),
        (lambda: distributed_dp.sample_discrete_gaussian(math.nan, 3, None), "sigma"),
        (lambda: distributed_dp.sample_skellam(-0.1, 3, np.random.default_rng()), "mu"),
        (lambda: distributed_dp.client_scale("laplace", 1.0, 1.0, 2), "kind"),
        (lambda: distributed_dp.client_scale("skellam", 0.0, 1.0, 2), "z"),
        (lambda: distributed_dp.client_scale("skellam", 1.0, -1.0, 2), "sensitivity"),
        (lambda: distributed_dp.client_scale("skellam", 1.0, 1.0, 0), "num_clients"),
        (lambda: distributed_dp.quantised_l2_sensitivity(1.0, 1.0, 4, "up"), "rounding"),
        (lambda: distributed_dp.quantised_l2_sensitivity(1.0, 0.0, 4), "scale"),
        (
            lambda: distributed_dp.distributed_epsilon("skellam", 1.0, 1.0, 1.0, 2, -1, 1e-5),
            "rounds",
        ),
        (lambda: distributed_dp.distributed_epsilon("skellam", 1.0, 1.0, 1.0, 2, 1, 0.0), "delta"),
        (
            # Client sigma = 1 * 1 / sqrt(16) = 0.25 < 1/2: outside Theorem 1's range.
            lambda: distributed_dp.distributed_epsilon(
                "discrete_gaussian", 1.0, 1.0, 1.0, 16, 1, 1e-5
            ),
            "sigma",
        ),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def _ddp(mode, **kw):
    args = dict(
        kind="discrete_gaussian",
        num_clients=8,
        dim=50,
        clip=1.0,
        noise_multiplier=1.0,
        delta=1e-5,
        threshold=5,
        randomness=randomness.Randomness(mode, 7),
    )
    args.update(kw)
    return distributed_dp.DistributedDP(**args)


@pytest.mark.parametrize("kind", distributed_dp.KINDS)
def test_server_regenerates_seeded_client_noise_but_not_secure_noise(kind):
    # Fault 5: client noise was default_rng([seed, 7919, round, k]) even in secure mode, so a
    # server that knows the seed subtracts every client's noise and reads the exact sum.
    round_index, errors = 3, {}
    updates = np.random.default_rng(0).normal(size=(8, 50)) * 0.05  # norms < clip
    for mode in ("reproducible", "secure"):
        ddp = _ddp(mode, kind=kind)
        ring = np.stack([ddp.encode(updates[k], round_index, k) for k in range(8)])
        total, stats, _ = secagg.secure_sum_ring(
            ring, threshold=ddp.threshold, bits=ddp.bits, randomness=ddp.randomness
        )
        noisy = ddp.decode(total)
        public = randomness.Randomness("reproducible", 7)
        guessed = sum(
            distributed_dp.client_noise(
                kind,
                ddp.noise_multiplier,
                ddp.sensitivity_l2,
                ddp.min_noisy_clients,
                50,
                public.generator(randomness.CLIENT_NOISE, round_index, k),
            )
            for k in range(8)
        )
        errors[mode] = np.abs(noisy - guessed / ddp.encoder.scale - updates.sum(0)).max()
    assert errors["reproducible"] < 1e-6  # quantisation only: the sum is in the clear
    noise_std = 1.0 * 1.0 * math.sqrt(8 / 5)  # z S, for 8 clients calibrated to 5
    assert errors["secure"] > 0.5 * noise_std


def test_distributed_dp_is_built_eagerly_and_says_what_it_claims():
    ddp = _ddp("secure", corrupted_fraction=0.125)
    assert ddp.min_noisy_clients == 4  # 5 - ceil(0.125 * 8) colluding clients' noise not counted
    assert ddp.sensitivity_l2 == distributed_dp.quantised_l2_sensitivity(
        1.0, ddp.encoder.scale, 50, rounding="nearest"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        ddp.threshold = 2
    assert ddp.relation == dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    assert ddp.relation_name == "zero_out" and "zero-out" in ddp.claim
    assert "replace-one" not in ddp.claim and ddp.guarantee_holds
    assert ddp.epsilon(0) == 0.0
    assert ddp.epsilon(3) == distributed_dp.distributed_epsilon(
        "discrete_gaussian", 1.0, ddp.sensitivity_l2, ddp.sensitivity_l1, 4, 3, 1e-5, dim=50
    )
    assert ddp.epsilon(2) < ddp.epsilon(3)  # only released rounds count
    seeded = _ddp("reproducible")
    assert not seeded.guarantee_holds
    assert "no guarantee holds against anyone who knows the seed" in seeded.claim
    with pytest.raises(ValueError, match="threshold"):
        _ddp("secure", threshold=9)
    with pytest.raises(ValueError, match="honest"):
        _ddp("secure", threshold=1, corrupted_fraction=0.25)
