"""Privacy accounting for DP-SGD: the event, its epsilon, and noise calibration (host NumPy).

A DP-SGD run with Poisson sampling at rate ``q``, noise multiplier ``sigma`` and ``T`` steps is
the event ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)`` of
``dp_accounting`` (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133), under add-or-remove
one unit neighbouring. Its ``(epsilon, delta)`` is computed by either

* ``"rdp"``: Renyi DP of the subsampled Gaussian (Mironov, CSF 2017,
  https://arxiv.org/abs/1702.07476; Mironov, Talwar, Zhang 2019,
  https://arxiv.org/abs/1908.10530) on the order grid :data:`RDP_ORDERS`; fast, slightly loose;
* ``"pld"``: privacy loss distributions (Koskela et al., AISTATS 2020,
  https://arxiv.org/abs/1906.03049; Doroshenko et al., PETS 2022,
  https://arxiv.org/abs/2207.04380) with a pessimistic discretisation of the privacy loss of
  :data:`PLD_VALUE_DISCRETIZATION_INTERVAL`; tighter. The pessimistic estimate rounds losses up,
  so a coarser interval only ever *over*-states epsilon; 1e-3 stays within about 0.5% of 1e-4
  on typical DP-SGD settings at a tenth of the cost.

Fixed-size batches drawn without replacement are a *different* event,
``SampledWithoutReplacementDpEvent(N, b, GaussianDpEvent(sigma))``, under replace-one
neighbouring, where the clipped sum has sensitivity ``2 C`` (Lebeda et al. 2024,
https://arxiv.org/abs/2405.20769; Chua et al., ICML 2024, https://arxiv.org/abs/2403.17673); only
the RDP accountant supports it (Wang, Balle, Kasiviswanathan, AISTATS 2019,
https://arxiv.org/abs/1808.00087, Theorem 27; dp_accounting's PLD accountant has no such event),
and its epsilon is for a different neighbouring relation, so it is not comparable with the
Poisson one.

In both modes the noise multiplier means what it means to ``dp_accounting`` and to
:func:`fedjax_med.privacy.noise.dp_aggregate`: the noise standard deviation divided by the L2
sensitivity of the clipped sum *under the event's neighbouring relation*,

    stddev = sigma * sensitivity(C, relation),   relation = sensitivity_relation(sampling),

i.e. ``stddev = sigma C`` for ``"poisson"`` and ``stddev = 2 sigma C`` for ``"shuffle"``. The same
``sigma`` goes into :func:`dpsgd_event` and ``dp_aggregate(sigma, C, ..., relation=relation)``.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "shuffle")
# The neighbouring relation (as named by fedjax_med.privacy.clipping.sensitivity) of each sampling.
_RELATIONS = {"poisson": "add_or_remove_one", "shuffle": "replace_one"}
# Accountants that dp_accounting supports for each sampling's event.
_SUPPORTED = {"poisson": ("rdp", "pld"), "shuffle": ("rdp",)}

# Renyi orders: every 0.05 up to 3 and every 0.1 up to 11 (where the optimum lies for
# epsilon between about 1 and 20), every integer up to 64 (small epsilon), then a coarse tail.
RDP_ORDERS = tuple(
    float(round(order, 4))
    for order in np.concatenate(
        [
            np.arange(1.05, 3.0, 0.05),
            np.arange(3.0, 11.0, 0.1),
            np.arange(11, 65),
            [72, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048],
        ]
    )
)
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-3
# Search range of the calibration: below MIN the answer is returned as MIN (any target that
# MIN meets is met with less noise too, but such targets are far beyond meaningful privacy).
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1e4
# The most compositions the PLD accountant is asked for. Its discretised loss distribution
# widens with the number of steps, so its cost grows without bound (10^7 steps at sigma 20
# takes about 30 s, 10^9 minutes), while RDP costs the same for any count; beyond this limit
# PLD is refused, naming RDP (a valid, slightly looser upper bound) as the way on.
PLD_MAX_STEPS = 10**6


def check_noise_multiplier(noise_multiplier: float) -> None:
    """Raises ValueError unless ``0 < noise_multiplier < inf``."""
    if not (isinstance(noise_multiplier, numbers.Real) and 0 < noise_multiplier < math.inf):
        raise ValueError(f"{noise_multiplier=} must be a finite number > 0")


def check_sampling_rate(sampling_rate: float) -> None:
    """Raises ValueError unless ``0 < sampling_rate <= 1``."""
    if not (isinstance(sampling_rate, numbers.Real) and 0 < sampling_rate <= 1):
        raise ValueError(f"{sampling_rate=} must be in (0, 1]")


def check_steps(steps: int) -> None:
    """Raises ValueError unless ``steps`` is an integer ``>= 0``."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"{steps=} must be an integer >= 0")


def check_accountant(accountant: str) -> None:
    """Raises ValueError unless ``accountant`` is one of :data:`ACCOUNTANTS`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"{accountant=} must be one of {ACCOUNTANTS}")


def check_sampling(sampling: str) -> None:
    """Raises ValueError unless ``sampling`` is one of :data:`SAMPLINGS`."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"{sampling=} must be one of {SAMPLINGS}")


def check_supported(accountant: str, sampling: str) -> None:
    """Raises ValueError unless ``accountant`` can account ``sampling``'s event.

    dp_accounting's PLD accountant has no ``SampledWithoutReplacementDpEvent``, so
    ``sampling="shuffle"`` needs ``accountant="rdp"``.

    Examples:
      >>> check_supported("pld", "poisson")
      >>> check_supported("pld", "shuffle")
      Traceback (most recent call last):
      ...
      ValueError: accountant='pld' cannot account sampling='shuffle' (dp_accounting's PLD \
accountant does not support SampledWithoutReplacementDpEvent); use one of ('rdp',)
    """
    check_accountant(accountant)
    check_sampling(sampling)
    if accountant not in _SUPPORTED[sampling]:
        raise ValueError(
            f"{accountant=} cannot account {sampling=} (dp_accounting's PLD accountant does not "
            f"support SampledWithoutReplacementDpEvent); use one of {_SUPPORTED[sampling]}"
        )


def sensitivity_relation(sampling: str) -> str:
    """The neighbouring relation of ``sampling``, for the sensitivity the noise is scaled to.

    ``dpsgd_event(sigma, ..., sampling)`` accounts exactly the noise of
    ``noise.dp_aggregate(sigma, C, L, key, relation=sensitivity_relation(sampling))``, whose
    stddev is ``sigma * clipping.sensitivity(C, relation=...)``.

    Examples:
      >>> sensitivity_relation("poisson"), sensitivity_relation("shuffle")
      ('add_or_remove_one', 'replace_one')
    """
    check_sampling(sampling)
    return _RELATIONS[sampling]


def composed_steps(event: dp_accounting.DpEvent) -> int:
    """How many releases ``event`` composes (self-compositions multiply, compositions add)."""
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return int(event.count) * composed_steps(event.event)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return sum(composed_steps(e) for e in event.events)
    return 1


def check_pld_work(steps: int) -> None:
    """Refuses PLD accounting of more than :data:`PLD_MAX_STEPS` steps, naming the limit.

    Examples:
      >>> check_pld_work(PLD_MAX_STEPS)
      >>> check_pld_work(10**9)
      Traceback (most recent call last):
      ...
      ValueError: accountant='pld' composes at most PLD_MAX_STEPS=1000000 steps, asked for ...
    """
    if steps > PLD_MAX_STEPS:
        raise ValueError(
            f"accountant='pld' composes at most PLD_MAX_STEPS={PLD_MAX_STEPS} steps, asked for "
            f"{steps}: its discretised privacy loss distribution grows with the steps and would "
            "take minutes or more; use accountant='rdp' (an upper bound on the same epsilon, "
            "about a second for any number of steps)"
        )


def check_delta(delta: float, num_units: int | None = None) -> None:
    """Validates ``delta``: error unless ``0 < delta < 1``; warning if ``delta >= 1 / N``.

    A mechanism that publishes one random unit's record in the clear is ``(0, 1/N)``-DP, so a
    ``delta`` of ``1 / N`` or more allows a total breach for some unit; use ``delta << 1 / N``.

    Args:
      delta: the ``delta`` of ``(epsilon, delta)``-DP.
      num_units: ``N``, the number of units of privacy (examples or patients), if known.

    Examples:
      >>> check_delta(1e-5, num_units=60_000)
      >>> check_delta(0.0)
      Traceback (most recent call last):
      ...
      ValueError: delta=0.0 must be in (0, 1)
    """
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"{delta=} must be in (0, 1)")
    if num_units is not None and (
        isinstance(num_units, bool) or not isinstance(num_units, numbers.Integral) or num_units < 1
    ):
        raise ValueError(f"{num_units=} (the number of units of privacy) must be an integer >= 1")
    if num_units is not None and delta >= 1 / num_units:
        warnings.warn(
            f"{delta=} >= 1/num_units = {1 / num_units:.3g}: such a delta permits publishing a "
            "unit's data outright; choose delta much smaller than 1/num_units",
            stacklevel=2,
        )


def dpsgd_event(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    sampling: str = "poisson",
    num_examples: int | None = None,
    batch_size: int | None = None,
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``steps`` DP-SGD steps.

    Each step releases the clipped sum plus ``N(0, (sigma S)^2 I)``, ``S`` the L2 sensitivity of
    the sum under the sampling's neighbouring relation (:func:`sensitivity_relation`): ``S = C``
    for add/remove one, ``S = 2 C`` for replace one. As in ``dp_accounting``, a
    ``GaussianDpEvent``'s noise multiplier is stddev over sensitivity under the accountant's
    relation, so in both modes it is ``sigma`` itself.

    Args:
      noise_multiplier: ``sigma > 0``: the noise standard deviation over the sensitivity ``S``
        of the clipped sum under the sampling's relation (``C`` for ``"poisson"``, ``2 C`` for
        ``"shuffle"``), the same ``sigma`` that ``noise.dp_aggregate(sigma, C, ...,
        relation=sensitivity_relation(sampling))`` is given.
      sampling_rate: ``q`` in ``(0, 1]``; for ``"shuffle"`` it must equal ``batch_size /
        num_examples``.
      steps: ``T >= 0``; ``T = 0`` gives ``NoOpDpEvent`` (epsilon 0).
      sampling: ``"poisson"`` (add/remove one, Abadi et al. 2016:
        ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``) or ``"shuffle"`` (fixed-size
        batches, replace one, Wang et al. 2019: ``SampledWithoutReplacementDpEvent(N, b,
        GaussianDpEvent(sigma))``; the factor 2 of the replace-one sensitivity is in the noise,
        stddev ``2 sigma C``, not in the event).
      num_examples: ``N``, required for ``"shuffle"``.
      batch_size: ``b``, required for ``"shuffle"``.

    Returns:
      ``SelfComposedDpEvent(<one step>, T)``.

    Guarantees:
      With the noise and sampling above, the run is ``(epsilon(event, delta), delta)``-DP under
      add/remove-one (``"poisson"``) or replace-one (``"shuffle"``) neighbouring of units.

    Examples:
      >>> dpsgd_event(1.0, 0.01, 100)
      SelfComposedDpEvent(event=PoissonSampledDpEvent(sampling_probability=0.01, \
event=GaussianDpEvent(noise_multiplier=1.0)), count=100)
      >>> dpsgd_event(1.0, 0.01, 100, "shuffle", num_examples=1000, batch_size=10)
      SelfComposedDpEvent(event=SampledWithoutReplacementDpEvent(source_dataset_size=1000, \
sample_size=10, event=GaussianDpEvent(noise_multiplier=1.0)), count=100)
    """
    check_noise_multiplier(noise_multiplier)
    check_sampling_rate(sampling_rate)
    check_steps(steps)
    if sampling == "poisson":
        one_step = dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
    elif sampling == "shuffle":
        if num_examples is None or batch_size is None:
            raise ValueError("sampling='shuffle' needs num_examples and batch_size")
        if not 1 <= batch_size <= num_examples:
            raise ValueError(f"{batch_size=} must be in [1, {num_examples=}]")
        if not math.isclose(batch_size / num_examples, sampling_rate, rel_tol=1e-6):
            raise ValueError(f"{sampling_rate=} must equal batch_size / num_examples")
        one_step = dp_accounting.SampledWithoutReplacementDpEvent(
            int(num_examples),
            int(batch_size),
            dp_accounting.GaussianDpEvent(noise_multiplier),
        )
    else:
        raise ValueError(f"{sampling=} must be one of {SAMPLINGS}")
    if steps == 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(one_step, int(steps))


def with_preceding(
    event: dp_accounting.DpEvent, preceding_noise_multipliers: tuple[float, ...] = ()
) -> dp_accounting.DpEvent:
    """``event`` after Gaussian releases on the whole training set (no sampling), e.g. the two
    sums of private feature statistics (:mod:`fedjax_med.privacy.data_norm`).

    ``ComposedDpEvent((GaussianDpEvent(s_1), ..., GaussianDpEvent(s_m), event))``; ``event``
    itself when there are none. Each ``s_j`` is a noise stddev over that release's sensitivity
    under the event's relation, as in :func:`dpsgd_event`.

    Examples:
      >>> with_preceding(dpsgd_event(1.0, 0.5, 1), (4.0,))
      ComposedDpEvent(events=(GaussianDpEvent(noise_multiplier=4.0), \
SelfComposedDpEvent(event=PoissonSampledDpEvent(sampling_probability=0.5, \
event=GaussianDpEvent(noise_multiplier=1.0)), count=1)))
    """
    if not preceding_noise_multipliers:
        return event
    for sigma in preceding_noise_multipliers:
        check_noise_multiplier(sigma)
    gaussians = tuple(dp_accounting.GaussianDpEvent(float(s)) for s in preceding_noise_multipliers)
    return dp_accounting.ComposedDpEvent((*gaussians, event))


def neighbouring_relation(event: dp_accounting.DpEvent) -> dp_accounting.NeighboringRelation:
    """Replace-one if ``event`` contains sampling without replacement, add/remove one otherwise."""
    if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    if isinstance(event, dp_accounting.ComposedDpEvent):
        children = event.events
    elif isinstance(
        event, (dp_accounting.SelfComposedDpEvent, dp_accounting.PoissonSampledDpEvent)
    ):
        children = [event.event]
    else:
        children = []
    for child in children:
        if neighbouring_relation(child) == dp_accounting.NeighboringRelation.REPLACE_ONE:
            return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def make_accountant(
    accountant: str,
    relation: dp_accounting.NeighboringRelation = (
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    ),
    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
) -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp_accounting`` accountant as used by :func:`epsilon`."""
    check_accountant(accountant)
    if accountant == "rdp":
        return rdp.RdpAccountant(list(RDP_ORDERS), relation)
    return pld.PLDAccountant(relation, value_discretization_interval=value_discretization_interval)


def epsilon(
    event: dp_accounting.DpEvent,
    delta: float,
    accountant: str = "rdp",
    *,
    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """The epsilon of ``event`` at ``delta`` (results are cached; PLD is slow).

    Args:
      event: e.g. from :func:`dpsgd_event`.
      delta: in ``(0, 1)``.
      accountant: ``"rdp"`` or ``"pld"`` (see the module docstring).
      value_discretization_interval: PLD only; smaller is tighter and slower.

    Returns:
      epsilon as a float (``inf`` if the event is not private, e.g. zero noise).

    Examples:
      >>> round(epsilon(dpsgd_event(1.1, 0.01, 1000), 1e-5), 4)
      1.7118
      >>> shuffle = dpsgd_event(1.0, 256 / 60_000, 1000, "shuffle", 60_000, 256)
      >>> round(epsilon(shuffle, 1e-5), 2)  # noise stddev 2 C: sigma = 1 relative to 2 C
      1.48
    """
    check_delta(delta)
    check_accountant(accountant)
    if not value_discretization_interval > 0:
        raise ValueError(f"{value_discretization_interval=} must be > 0")
    if accountant == "pld":
        check_pld_work(composed_steps(event))
    return _epsilon(event, float(delta), accountant, float(value_discretization_interval))


def clear_cache() -> None:
    """Forgets cached epsilon values and RDP curves (for timing measurements)."""
    _epsilon.cache_clear()
    _one_step_rdp.cache_clear()


@functools.lru_cache(maxsize=4096)
def _epsilon(event, delta, accountant, value_discretization_interval) -> float:
    relation = neighbouring_relation(event)
    acc = make_accountant(accountant, relation, value_discretization_interval)
    if not acc.supports(event):
        raise ValueError(
            f"{accountant=} does not support this event ({type(event).__name__}); "
            "sampling without replacement needs accountant='rdp'"
        )
    if accountant == "rdp":
        curve = _rdp_curve(event, relation)
        if curve is not None:
            return float(rdp.compute_epsilon(RDP_ORDERS, curve, delta)[0])
    acc.compose(event)
    return float(acc.get_epsilon(delta))


# Events whose RDP curve composes linearly: ``count`` repetitions add ``count`` times the curve
# of one (dp_accounting's RdpAccountant does exactly this for them).
_LINEAR_RDP_EVENTS = (
    dp_accounting.GaussianDpEvent,
    dp_accounting.PoissonSampledDpEvent,
    dp_accounting.SampledWithoutReplacementDpEvent,
)


def _rdp_curve(event, relation, count: int = 1) -> np.ndarray | None:
    """The RDP curve on :data:`RDP_ORDERS` of ``count`` times ``event``; ``None`` if not linear.

    ``RDP(E_1 o E_2) = RDP(E_1) + RDP(E_2)`` at every order, so ``RDP(T x E) = T RDP(E)``
    (adaptive composition, Mironov 2017, Proposition 1). The terms are added in the order
    dp_accounting's ``RdpAccountant.compose`` adds them, so the curve is that accountant's to
    the last bit; the curve of one step (:func:`_one_step_rdp`, the whole cost: about 0.25 s
    on one CPU core) is computed once per event, not once per step count.
    """
    total = np.zeros(len(RDP_ORDERS), np.float64)
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return total
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return _rdp_curve(event.event, relation, count * event.count)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        for child in event.events:
            curve = _rdp_curve(child, relation, count)
            if curve is None:
                return None
            total += curve
        return total
    if isinstance(event, _LINEAR_RDP_EVENTS):
        total += count * _one_step_rdp(event, relation)
        return total
    return None


@functools.lru_cache(maxsize=1024)
def _one_step_rdp(event, relation) -> np.ndarray:
    acc = rdp.RdpAccountant(list(RDP_ORDERS), relation)
    acc.compose(event)
    curve = acc.rdp
    curve.setflags(write=False)
    return curve


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    *,
    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
    sampling: str = "poisson",
    num_examples: int | None = None,
    batch_size: int | None = None,
    progress: Callable[[str, float, float], None] | None = None,
    preceding_noise_multipliers: tuple[float, ...] = (),
) -> float:
    """The smallest noise multiplier (within ``tolerance``) with epsilon ``<= target_epsilon``.

    Calibrates the event of :func:`dpsgd_event` with the same ``sampling``, ``num_examples`` and
    ``batch_size`` (Poisson, add/remove one by default; ``"shuffle"``: fixed-size batches,
    replace one, RDP only), so ``sigma`` has the meaning given there: noise stddev over the
    sensitivity of the clipped sum under the sampling's relation. The search keeps a bracket
    ``lo < hi`` with ``epsilon(lo) > target >= epsilon(hi)``, both evaluated by :func:`epsilon`
    with the same accountant and discretisation as later accounting, and returns ``hi`` once
    ``hi <= (1 + tolerance) lo``. New points come from interpolating ``log epsilon`` linearly in
    ``log sigma`` (nearly exact for DP-SGD), so a handful of epsilon evaluations suffice; PLD
    searches start from the RDP answer, which brackets it from above.

    Args:
      target_epsilon: ``> 0``.
      sampling_rate: ``q`` in ``(0, 1]``; ``batch_size / num_examples`` for ``"shuffle"``.
      steps: ``T >= 1``.
      delta: in ``(0, 1)``.
      accountant: ``"rdp"`` or ``"pld"`` (``"pld"`` only with ``sampling="poisson"``).
      tolerance: relative width of the final bracket, in ``(0, 1)``.
      value_discretization_interval: PLD discretisation (as in :func:`epsilon`).
      sampling: ``"poisson"`` (default) or ``"shuffle"``, as in :func:`dpsgd_event`.
      num_examples: ``N``, required for ``"shuffle"``.
      batch_size: ``b``, required for ``"shuffle"``.
      progress: called as ``progress(accountant, sigma, epsilon)`` after every epsilon
        evaluation of the search (for a command line to show long work; also a work count).
      preceding_noise_multipliers: fixed Gaussian releases before the steps
        (:func:`with_preceding`), whose cost the calibrated steps leave room for.

    Returns:
      ``sigma`` with ``epsilon(dpsgd_event(sigma, q, T, sampling, N, b), delta) <=
      target_epsilon`` and ``sigma <= (1 + tolerance) sigma_min`` (``sigma_min`` the smallest
      such value, assuming epsilon decreases with sigma; searched in ``[MIN_NOISE_MULTIPLIER,
      MAX_NOISE_MULTIPLIER]``, and ``MIN_NOISE_MULTIPLIER`` is returned if it already suffices).

    Raises:
      ValueError: invalid arguments, an accountant that cannot account ``sampling``
        (:func:`check_supported`), or a target that needs more than ``MAX_NOISE_MULTIPLIER``.

    Examples:
      >>> sigma = calibrate_noise_multiplier(2.0, 0.01, 1000, 1e-5)
      >>> epsilon(dpsgd_event(sigma, 0.01, 1000), 1e-5) <= 2.0
      True
      >>> shuffle = dict(sampling="shuffle", num_examples=10_000, batch_size=100)
      >>> sigma = calibrate_noise_multiplier(8.0, 0.01, 400, 1e-5, **shuffle)
      >>> epsilon(dpsgd_event(sigma, 0.01, 400, **shuffle), 1e-5) <= 8.0
      True
    """
    if not (isinstance(target_epsilon, numbers.Real) and 0 < target_epsilon < math.inf):
        raise ValueError(f"{target_epsilon=} must be a finite number > 0")
    check_sampling_rate(sampling_rate)
    check_steps(steps)
    if steps < 1:
        raise ValueError(f"{steps=} must be >= 1 to calibrate (0 steps spend no privacy)")
    check_delta(delta)
    check_supported(accountant, sampling)
    if not 0 < tolerance < 1:
        raise ValueError(f"{tolerance=} must be in (0, 1)")
    # Validates num_examples and batch_size against sampling and sampling_rate before searching.
    dpsgd_event(1.0, sampling_rate, steps, sampling, num_examples, batch_size)
    if accountant == "pld":
        check_pld_work(steps)

    def eps_fn(acc):
        def fn(sigma):
            event = dpsgd_event(sigma, sampling_rate, steps, sampling, num_examples, batch_size)
            event = with_preceding(event, preceding_noise_multipliers)
            eps = epsilon(
                event, delta, acc, value_discretization_interval=value_discretization_interval
            )
            if progress is not None:
                progress(acc, sigma, eps)
            return eps

        return fn

    start = _initial_guess(target_epsilon, sampling_rate, steps, delta)
    if accountant == "rdp":
        return _calibrate(eps_fn("rdp"), target_epsilon, tolerance, start)
    # RDP (fast) over-states epsilon relative to PLD, so a rough RDP answer is a close upper
    # starting point for the PLD search.
    rdp_sigma = _calibrate(eps_fn("rdp"), target_epsilon, max(tolerance, 0.05), start)
    return _calibrate(eps_fn("pld"), target_epsilon, tolerance, rdp_sigma)


def _initial_guess(target_epsilon, sampling_rate, steps, delta) -> float:
    # Moments-accountant scaling eps ~ q sqrt(T log(1/delta)) / sigma (Abadi et al. 2016).
    guess = sampling_rate * math.sqrt(2 * steps * math.log(1 / delta)) / target_epsilon
    return min(max(guess, 0.5), MAX_NOISE_MULTIPLIER)


def _calibrate(eps_fn, target, tolerance, start) -> float:
    """Bracketed search for the smallest sigma with ``eps_fn(sigma) <= target``."""
    lo = hi = None  # (sigma, eps) with eps > target, resp. eps <= target
    sigma, eps = start, eps_fn(start)
    if eps <= target:
        hi = (sigma, eps)
    else:
        lo = (sigma, eps)
    # Expand until bracketed. Since epsilon is roughly proportional to 1 / sigma, the ratio
    # eps / target predicts the step; it is kept within [1 + tolerance, 4].
    while lo is None or hi is None:
        if lo is None:  # every point so far meets the target: go down
            sigma, eps = hi
            if sigma <= MIN_NOISE_MULTIPLIER:
                return MIN_NOISE_MULTIPLIER
            step = target / eps if eps > 0 else 4.0
            sigma = max(sigma / min(max(step, 1 + tolerance), 4.0), MIN_NOISE_MULTIPLIER)
        else:  # no point meets the target yet: go up
            sigma, eps = lo
            if sigma >= MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon={target} is unreachable: even noise_multiplier="
                    f"{MAX_NOISE_MULTIPLIER:g} gives epsilon={eps:.4g}; ask for "
                    f"target_epsilon >= {eps:.4g}, fewer steps or a lower sampling rate"
                )
            step = min(max(eps / target, 1 + tolerance), 4.0) * (1 + tolerance / 4)
            sigma = min(sigma * step, MAX_NOISE_MULTIPLIER)
        eps = eps_fn(sigma)
        if eps <= target:
            hi = (sigma, eps)
        else:
            lo = (sigma, eps)
    guard = math.log1p(tolerance) / 3
    for _ in range(200):
        if hi[0] <= (1 + tolerance) * lo[0]:
            return hi[0]
        a, b = math.log(lo[0]), math.log(hi[0])
        x = (a + b) / 2
        if math.isfinite(lo[1]) and hi[1] > 0:
            # log eps is close to linear in log sigma: interpolate to the target.
            t = (math.log(lo[1]) - math.log(target)) / (math.log(lo[1]) - math.log(hi[1]))
            x = a + t * (b - a)
        x = min(max(x, a + guard), b - guard)
        sigma = math.exp(x)
        eps = eps_fn(sigma)
        if eps <= target:
            hi = (sigma, eps)
        else:
            lo = (sigma, eps)
    raise RuntimeError("noise calibration did not converge")  # pragma: no cover
