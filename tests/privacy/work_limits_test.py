"""Accounting work is bounded (a step limit, never a clock) and bad counts are named."""

import pytest

from fedjax_med.privacy import accounting


def test_pld_beyond_the_step_limit_is_refused_naming_it():
    too_many = accounting.PLD_MAX_STEPS + 1
    event = accounting.dpsgd_event(1.0, 0.01, too_many)
    with pytest.raises(ValueError, match=r"PLD_MAX_STEPS=\d+ steps, asked for \d+.*'rdp'"):
        accounting.epsilon(event, 1e-5, "pld")
    with pytest.raises(ValueError, match=r"PLD_MAX_STEPS"):
        accounting.calibrate_noise_multiplier(2.0, 0.01, 10**9, 1e-5, "pld")
    # RDP has no such limit: the same event is accounted.
    assert accounting.epsilon(event, 1e-5, "rdp") > 0


def test_composed_steps_counts_nested_compositions():
    import dp_accounting

    event = accounting.dpsgd_event(1.0, 0.01, 10)
    assert accounting.composed_steps(event) == 10
    both = dp_accounting.ComposedDpEvent([event, dp_accounting.SelfComposedDpEvent(event, 3)])
    assert accounting.composed_steps(both) == 40


def test_calibration_reports_every_evaluation():
    seen = []
    sigma = accounting.calibrate_noise_multiplier(
        2.0, 0.01, 1000, 1e-5, progress=lambda acc, s, e: seen.append((acc, s, e))
    )
    assert 1 <= len(seen) <= 40  # the search does a bounded number of epsilon evaluations
    assert all(acc == "rdp" for acc, _, _ in seen)
    assert any(s == sigma and e <= 2.0 for _, s, e in seen)


@pytest.mark.parametrize("num_units", [0, -10, 2.5, True])
def test_check_delta_refuses_a_bad_number_of_units(num_units):
    with pytest.raises(ValueError, match=r"num_units=.* must be an integer >= 1"):
        accounting.check_delta(1e-5, num_units)
