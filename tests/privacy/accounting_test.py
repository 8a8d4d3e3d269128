"""Accounting: epsilon equals dp_accounting, monotonicity, events, fast calibration, validation."""

import math
import time
import warnings

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedjax_med.privacy import accounting

Q, T, DELTA = 0.01, 1000, 1e-5


def _direct(sigma, q, steps, delta, accountant):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    if accountant == "rdp":
        acc = rdp.RdpAccountant(list(accounting.RDP_ORDERS))
    else:
        acc = pld.PLDAccountant(
            value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION_INTERVAL
        )
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_epsilon_equals_dp_accounting(accountant):
    ours = accounting.epsilon(accounting.dpsgd_event(1.1, Q, T), DELTA, accountant)
    assert ours == _direct(1.1, Q, T, DELTA, accountant)


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_monotone_in_noise_and_steps(accountant):
    def eps(sigma, steps):
        return accounting.epsilon(accounting.dpsgd_event(sigma, Q, steps), DELTA, accountant)

    assert eps(0.8, 500) > eps(1.0, 500) > eps(1.5, 500)
    assert eps(1.0, 100) < eps(1.0, 500) < eps(1.0, 2000)
    assert eps(1.0, 0) == 0.0


def test_rdp_orders_are_denser_and_never_looser_than_default():
    default = rdp.RdpAccountant()
    event = accounting.dpsgd_event(0.9, 0.004, 5000)
    ours = accounting.epsilon(event, DELTA, "rdp")
    assert len(accounting.RDP_ORDERS) > len(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    assert ours <= default.compose(event).get_epsilon(DELTA) + 1e-12


def test_shuffle_event_is_replace_one_without_replacement():
    event = accounting.dpsgd_event(1.0, 0.01, 10, "shuffle", num_examples=1000, batch_size=10)
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            1000, 10, dp_accounting.GaussianDpEvent(0.5)
        ),
        10,
    )
    assert event != accounting.dpsgd_event(1.0, 0.01, 10)
    assert accounting.neighbouring_relation(event).name == "REPLACE_ONE"
    eps_shuffle = accounting.epsilon(event, DELTA, "rdp")
    direct = rdp.RdpAccountant(
        list(accounting.RDP_ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    assert eps_shuffle == direct.compose(event).get_epsilon(DELTA)
    assert eps_shuffle != accounting.epsilon(accounting.dpsgd_event(1.0, 0.01, 10), DELTA)
    with pytest.raises(ValueError, match="rdp"):
        accounting.epsilon(event, DELTA, "pld")
    with pytest.raises(ValueError, match="num_examples"):
        accounting.dpsgd_event(1.0, 0.01, 10, "shuffle")
    with pytest.raises(ValueError, match="sampling_rate"):
        accounting.dpsgd_event(1.0, 0.02, 10, "shuffle", num_examples=1000, batch_size=10)


@pytest.mark.parametrize(
    "accountant,target,q,steps",
    [("rdp", 2.0, Q, T), ("pld", 2.0, Q, T), ("rdp", 8.0, 0.1, 500), ("pld", 0.5, 0.004, 10_000)],
)
def test_calibration_reaches_target_within_one_percent_quickly(accountant, target, q, steps):
    accounting.clear_cache()
    start = time.perf_counter()
    sigma = accounting.calibrate_noise_multiplier(target, q, steps, DELTA, accountant)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0  # the goal is < 2 s; slack for loaded CI machines
    assert _direct(sigma, q, steps, DELTA, accountant) <= target
    assert _direct(sigma / 1.01, q, steps, DELTA, accountant) > target


def test_calibration_is_tighter_with_pld():
    sigma_rdp = accounting.calibrate_noise_multiplier(2.0, Q, T, DELTA, "rdp")
    sigma_pld = accounting.calibrate_noise_multiplier(2.0, Q, T, DELTA, "pld")
    assert sigma_pld < sigma_rdp


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf])
def test_calibration_rejects_invalid_targets(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.calibrate_noise_multiplier(target, Q, T, DELTA)


def test_calibration_rejects_unreachable_target():
    with pytest.raises(ValueError, match="target_epsilon.*unreachable.*epsilon="):
        accounting.calibrate_noise_multiplier(1e-4, 1.0, 10_000, DELTA)


def test_calibration_huge_target_returns_search_floor():
    sigma = accounting.calibrate_noise_multiplier(1e4, 0.001, 1, DELTA)
    assert sigma == accounting.MIN_NOISE_MULTIPLIER


def test_check_delta():
    accounting.check_delta(1e-6, num_units=10_000)
    with pytest.warns(UserWarning, match="1/num_units"):
        accounting.check_delta(1e-3, num_units=1000)
    for bad in [0.0, 1.0, -1e-5, 2.0]:
        with pytest.raises(ValueError, match="delta"):
            accounting.check_delta(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accounting.check_delta(1e-5)


@pytest.mark.parametrize(
    "args,field",
    [
        ((0.0, Q, T), "noise_multiplier"),
        ((-1.0, Q, T), "noise_multiplier"),
        ((math.inf, Q, T), "noise_multiplier"),
        ((1.0, 0.0, T), "sampling_rate"),
        ((1.0, 1.01, T), "sampling_rate"),
        ((1.0, Q, -1), "steps"),
        ((1.0, Q, 2.5), "steps"),
    ],
)
def test_event_validation_names_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        accounting.dpsgd_event(*args)


def test_other_validation():
    event = accounting.dpsgd_event(1.0, Q, T)
    with pytest.raises(ValueError, match="accountant"):
        accounting.epsilon(event, DELTA, "moments")
    with pytest.raises(ValueError, match="sampling"):
        accounting.dpsgd_event(1.0, Q, T, sampling="replacement")
    with pytest.raises(ValueError, match="steps"):
        accounting.calibrate_noise_multiplier(1.0, Q, 0, DELTA)
    with pytest.raises(ValueError, match="tolerance"):
        accounting.calibrate_noise_multiplier(1.0, Q, T, DELTA, tolerance=0.0)
