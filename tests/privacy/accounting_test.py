"""Accounting: epsilon equals dp_accounting; the event matches the noise added; epsilon falls with
sigma and grows with steps; calibration (Poisson, shuffle) within 1% in few evaluations."""

import math
import warnings

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedjax_med.privacy import accounting, clipping, noise

Q, T, DELTA = 0.01, 1000, 1e-5
# A shuffle (fixed-size batch) run: N examples, batches of B, so q = B / N.
N, B = 10_000, 100


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


def _direct_shuffle(sigma, num_examples, batch_size, steps, delta):
    """RDP epsilon of the replace-one event built by hand, without fedjax_med."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            num_examples, batch_size, dp_accounting.GaussianDpEvent(sigma)
        ),
        steps,
    )
    acc = rdp.RdpAccountant(
        list(accounting.RDP_ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    return acc.compose(event).get_epsilon(delta)


def _count_evaluations(monkeypatch):
    """Counts uncached accountant evaluations (one ``make_accountant`` call each), by kind."""
    accounting.clear_cache()
    calls = []
    make = accounting.make_accountant

    def counting(accountant, *args, **kwargs):
        calls.append(accountant)
        return make(accountant, *args, **kwargs)

    monkeypatch.setattr(accounting, "make_accountant", counting)
    return calls


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_epsilon_equals_dp_accounting(accountant):
    ours = accounting.epsilon(accounting.dpsgd_event(1.1, Q, T), DELTA, accountant)
    assert ours == _direct(1.1, Q, T, DELTA, accountant)


def test_rdp_curve_of_one_step_is_reused_and_exact_to_the_bit():
    """Epsilon from the cached one-step RDP curve equals dp_accounting composing the whole event
    (bit for bit), for every step count, composition and relation; one curve per distinct step."""
    accounting.clear_cache()
    one = dp_accounting.PoissonSampledDpEvent(0.47, dp_accounting.GaussianDpEvent(1.0))
    events = [accounting.dpsgd_event(1.0, 0.47, t) for t in (1, 7)] + [
        accounting.with_preceding(accounting.dpsgd_event(1.0, 0.47, 3), (4.0, 2.5)),
        dp_accounting.SelfComposedDpEvent(dp_accounting.ComposedDpEvent((one, one)), 3),
        accounting.dpsgd_event(1.0, B / N, 5, "shuffle", N, B),
    ]
    for event in events:
        relation = accounting.neighbouring_relation(event)
        acc = rdp.RdpAccountant(list(accounting.RDP_ORDERS), relation)
        assert accounting.epsilon(event, DELTA) == acc.compose(event).get_epsilon(DELTA)
    # q=0.47 Poisson, the two preceding Gaussians (4.0, 2.5) and the shuffle step.
    assert accounting._one_step_rdp.cache_info().misses == 4  # noqa: SLF001


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
    # The noise multiplier is sigma itself (stddev over the replace-one sensitivity 2 C), not
    # sigma / 2.
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            1000, 10, dp_accounting.GaussianDpEvent(1.0)
        ),
        10,
    )
    assert event != accounting.dpsgd_event(1.0, 0.01, 10)
    assert accounting.neighbouring_relation(event).name == "REPLACE_ONE"
    eps_shuffle = accounting.epsilon(event, DELTA, "rdp")
    assert eps_shuffle == _direct_shuffle(1.0, 1000, 10, 10, DELTA)
    assert eps_shuffle != accounting.epsilon(accounting.dpsgd_event(1.0, 0.01, 10), DELTA)
    with pytest.raises(ValueError, match="rdp"):
        accounting.epsilon(event, DELTA, "pld")
    with pytest.raises(ValueError, match="num_examples"):
        accounting.dpsgd_event(1.0, 0.01, 10, "shuffle")
    with pytest.raises(ValueError, match="sampling_rate"):
        accounting.dpsgd_event(1.0, 0.02, 10, "shuffle", num_examples=1000, batch_size=10)


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5])
@pytest.mark.parametrize("num_examples,batch_size,steps", [(N, B, 400), (60_000, 256, 1000)])
def test_shuffle_epsilon_equals_rdp_of_sampled_without_replacement(
    sigma, num_examples, batch_size, steps
):
    event = accounting.dpsgd_event(
        sigma, batch_size / num_examples, steps, "shuffle", num_examples, batch_size
    )
    ours = accounting.epsilon(event, DELTA, "rdp")
    assert ours == _direct_shuffle(sigma, num_examples, batch_size, steps, DELTA)
    # The old event, GaussianDpEvent(sigma / 2), counted the factor 2 twice.
    assert ours < _direct_shuffle(sigma / 2, num_examples, batch_size, steps, DELTA)


def test_shuffle_epsilon_known_value():
    # sigma = 1 (stddev 2 C) at N = 60000, b = 256, 1000 steps; sigma / 2 reported 12.1.
    event = accounting.dpsgd_event(1.0, 256 / 60_000, 1000, "shuffle", 60_000, 256)
    assert accounting.epsilon(event, DELTA) == pytest.approx(1.484, abs=1e-3)


@pytest.mark.parametrize(
    "sampling,relation", [("poisson", "add_or_remove_one"), ("shuffle", "replace_one")]
)
def test_event_noise_multiplier_is_the_noise_dp_aggregate_adds(sampling, relation):
    sigma, clip_norm, batch = 1.3, 0.7, 10
    tx = noise.dp_aggregate(sigma, clip_norm, batch, 0, relation=relation)
    zeros = {"w": jnp.zeros((400, 500)), "b": jnp.zeros(1000)}
    out, _ = tx.update(zeros, tx.init(zeros))
    # dp_aggregate divides the noised sum by the expected batch size: undo it.
    draws = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(out)]) * batch
    measured = float(np.std(draws)) / clipping.sensitivity(clip_norm, relation=relation)
    event = accounting.dpsgd_event(sigma, batch / 1000, 5, sampling, 1000, batch)
    accounted = event.event.event.noise_multiplier  # SelfComposed -> sampled -> Gaussian
    # 201000 draws: the stddev estimate is within ~0.2% (one standard error); allow 2%.
    assert accounted == pytest.approx(measured, rel=0.02)
    assert accounted == sigma


@pytest.mark.parametrize(
    "accountant,target,q,steps",
    [("rdp", 2.0, Q, T), ("pld", 2.0, Q, T), ("rdp", 8.0, 0.1, 500), ("pld", 0.5, 0.004, 10_000)],
)
def test_calibration_reaches_target_within_one_percent_in_few_evaluations(
    accountant, target, q, steps, monkeypatch
):
    calls = _count_evaluations(monkeypatch)
    sigma = accounting.calibrate_noise_multiplier(target, q, steps, DELTA, accountant)
    # Work, not wall-clock: a bisection to 1% from [0.1, 1e4] alone would take ~20 evaluations;
    # interpolation in log-log needs a handful, and PLD (the slow one) fewer still.
    assert len(calls) <= 15
    assert calls.count("pld") <= 8
    assert set(calls) <= {"rdp", accountant}
    assert _direct(sigma, q, steps, DELTA, accountant) <= target
    assert _direct(sigma / 1.01, q, steps, DELTA, accountant) > target


@pytest.mark.parametrize("num_examples,batch_size,steps", [(N, B, 400), (60_000, 256, 1000)])
def test_shuffle_calibration_reaches_target_in_its_own_mode(
    num_examples, batch_size, steps, monkeypatch
):
    q = batch_size / num_examples
    calls = _count_evaluations(monkeypatch)
    sigma = accounting.calibrate_noise_multiplier(
        8.0,
        q,
        steps,
        DELTA,
        sampling="shuffle",
        num_examples=num_examples,
        batch_size=batch_size,
    )
    assert calls and len(calls) <= 15 and set(calls) == {"rdp"}
    assert _direct_shuffle(sigma, num_examples, batch_size, steps, DELTA) <= 8.0
    assert _direct_shuffle(sigma / 1.01, num_examples, batch_size, steps, DELTA) > 8.0
    # The Poisson answer is a different number and does not meet the target in shuffle mode.
    poisson = accounting.calibrate_noise_multiplier(8.0, q, steps, DELTA)
    assert not math.isclose(sigma, poisson, rel_tol=0.01)
    assert _direct_shuffle(poisson, num_examples, batch_size, steps, DELTA) > 8.0


def test_shuffle_calibration_validation():
    shuffle = {"sampling": "shuffle", "num_examples": N, "batch_size": B}
    with pytest.raises(ValueError, match="accountant='pld'.*shuffle.*rdp"):
        accounting.calibrate_noise_multiplier(8.0, B / N, 400, DELTA, "pld", **shuffle)
    with pytest.raises(ValueError, match="num_examples"):
        accounting.calibrate_noise_multiplier(8.0, B / N, 400, DELTA, sampling="shuffle")
    with pytest.raises(ValueError, match="sampling_rate"):
        accounting.calibrate_noise_multiplier(8.0, 2 * B / N, 400, DELTA, **shuffle)
    with pytest.raises(ValueError, match="sampling"):
        accounting.calibrate_noise_multiplier(8.0, B / N, 400, DELTA, sampling="replacement")


def test_check_supported_and_relation():
    for sampling in accounting.SAMPLINGS:
        accounting.check_supported("rdp", sampling)
    accounting.check_supported("pld", "poisson")
    with pytest.raises(ValueError, match="accountant"):
        accounting.check_supported("pld", "shuffle")
    assert accounting.sensitivity_relation("poisson") == "add_or_remove_one"
    assert accounting.sensitivity_relation("shuffle") == "replace_one"
    assert clipping.sensitivity(0.7, relation=accounting.sensitivity_relation("shuffle")) == 1.4
    with pytest.raises(ValueError, match="sampling"):
        accounting.sensitivity_relation("replacement")


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
