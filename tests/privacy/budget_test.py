"""Privacy ledger: stops at the target and never passes it; JSON round trip."""

import json

import dp_accounting
import pytest
from dp_accounting import rdp

from fedjax_med.privacy import accounting, budget

BASE = {"noise_multiplier": 1.2, "sampling_rate": 0.05, "delta": 1e-5, "target_epsilon": 2.0}


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_steps_remaining_is_the_exact_boundary(accountant):
    ledger = budget.PrivacyLedger(accountant=accountant, **BASE)
    k = ledger.steps_remaining()
    assert k > 0
    assert ledger.epsilon(k) <= 2.0 < ledger.epsilon(k + 1)
    assert ledger.epsilon(k) == accounting.epsilon(
        accounting.dpsgd_event(1.2, 0.05, k), 1e-5, accountant
    )
    spent = ledger.record(k)
    assert spent.steps_taken == k and spent.steps_remaining() == 0
    assert not spent.can_take(1)
    with pytest.raises(budget.BudgetExceededError, match="target_epsilon"):
        spent.record(1)


def test_training_loop_stops_at_target():
    ledger = budget.PrivacyLedger(**{**BASE, "target_epsilon": 1.3})
    steps = 0
    while ledger.can_take(1):
        ledger = ledger.record(1)
        steps += 1
        assert ledger.epsilon() <= ledger.target_epsilon
    assert (
        steps
        == ledger.steps_taken
        == budget.PrivacyLedger(**{**BASE, "target_epsilon": 1.3}).steps_remaining()
    )
    assert ledger.epsilon(steps + 1) > 1.3


def test_record_is_functional():
    ledger = budget.PrivacyLedger(**BASE)
    later = ledger.record(3)
    assert ledger.steps_taken == 0 and later.steps_taken == 3
    assert ledger.epsilon() == 0.0 < later.epsilon()


def test_json_round_trip():
    ledger = budget.PrivacyLedger(
        accountant="pld", unit="patient", steps_taken=12, num_examples=5000, **BASE
    )
    data = json.loads(json.dumps(ledger.to_dict()))
    assert data["epsilon"] == pytest.approx(ledger.epsilon())
    assert budget.PrivacyLedger.from_dict(data) == ledger


def test_shuffle_ledger():
    ledger = budget.PrivacyLedger(
        sampling="shuffle", num_examples=1000, batch_size=50, steps_taken=5, **BASE
    )
    assert ledger.epsilon() == accounting.epsilon(
        accounting.dpsgd_event(1.2, 0.05, 5, "shuffle", 1000, 50), 1e-5
    )
    # The ledger's sigma is the event's noise multiplier (stddev over the replace-one 2 C).
    by_hand = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            1000, 50, dp_accounting.GaussianDpEvent(1.2)
        ),
        5,
    )
    direct = rdp.RdpAccountant(
        list(accounting.RDP_ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    assert ledger.epsilon() == direct.compose(by_hand).get_epsilon(1e-5)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"sampling_rate": 2.0}, "sampling_rate"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "moments"}, "accountant"),
        ({"steps_taken": -3}, "steps"),
        ({"sampling": "shuffle"}, "num_examples"),
        ({"sampling": "replacement"}, "sampling"),
        (
            {"sampling": "shuffle", "num_examples": 1000, "batch_size": 50, "accountant": "pld"},
            "accountant='pld' cannot account sampling='shuffle'",
        ),
    ],
)
def test_validation(change, field):
    with pytest.raises(ValueError, match=field):
        budget.PrivacyLedger(**{**BASE, **change})


def test_large_delta_warns():
    with pytest.warns(UserWarning, match="num_units"):
        budget.PrivacyLedger(num_examples=100, **{**BASE, "delta": 0.05})
