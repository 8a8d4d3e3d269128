"""The privacy ledger: how much of the budget a run has spent, and whether it may go on.

A DP-SGD run is granted a target ``(epsilon, delta)``; the ledger records the steps taken, computes
the epsilon they cost with :mod:`fedjax_med.privacy.accounting` (Abadi et al., CCS 2016,
https://arxiv.org/abs/1607.00133), and refuses a step that would exceed the target, so training
stops at the target and never passes it. It is a frozen dataclass: ``record`` returns a new
ledger, and ``to_dict`` / ``from_dict`` store it in a checkpoint as JSON.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from fedjax_med.privacy import accounting


class BudgetExceededError(RuntimeError):
    """Raised by :meth:`PrivacyLedger.record` for steps that would exceed the target epsilon."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyLedger:
    """Spent and remaining privacy budget of one DP-SGD run.

    Attributes:
      noise_multiplier: ``sigma > 0``: noise stddev over the sensitivity of the clipped sum under
        the sampling's relation (``C`` for ``"poisson"``, ``2 C`` for ``"shuffle"``; see
        :func:`accounting.dpsgd_event`).
      sampling_rate: ``q`` in ``(0, 1]`` (of units: examples or patients).
      delta: the target ``delta`` in ``(0, 1)``.
      target_epsilon: the budget, ``> 0``.
      accountant: ``"rdp"`` or ``"pld"`` (``"pld"`` only with ``sampling="poisson"``).
      unit: the unit of privacy (``"example"``, ``"patient"``, ``"site"``), for reports.
      steps_taken: steps already accounted.
      sampling: ``"poisson"`` or ``"shuffle"`` (see :func:`accounting.dpsgd_event`).
      num_examples: number of units ``N``; required for ``"shuffle"``; if given, ``delta`` is
        checked against ``1 / N``.
      batch_size: fixed batch size, required for ``"shuffle"``.
      preceding_noise_multipliers: Gaussian releases on the whole training set made before step
        0 (e.g. the two sums of private feature statistics, :mod:`~fedjax_med.privacy.data_norm`),
        composed with the steps (:func:`accounting.with_preceding`).

    Examples:
      >>> ledger = PrivacyLedger(noise_multiplier=1.1, sampling_rate=0.01, delta=1e-5,
      ...                        target_epsilon=2.0)
      >>> ledger.steps_remaining()
      1404
      >>> ledger.record(1404).can_take(1)
      False
    """

    noise_multiplier: float
    sampling_rate: float
    delta: float
    target_epsilon: float
    accountant: str = "rdp"
    unit: str = "example"
    steps_taken: int = 0
    sampling: str = "poisson"
    num_examples: int | None = None
    batch_size: int | None = None
    preceding_noise_multipliers: tuple[float, ...] = ()

    def __post_init__(self):
        # A tuple (hashable, for the epsilon cache) also when read back from JSON's list.
        preceding = tuple(float(s) for s in self.preceding_noise_multipliers)
        object.__setattr__(self, "preceding_noise_multipliers", preceding)
        if not (isinstance(self.target_epsilon, numbers.Real) and self.target_epsilon > 0):
            raise ValueError(f"target_epsilon={self.target_epsilon!r} must be > 0")
        accounting.check_noise_multiplier(self.noise_multiplier)
        accounting.check_sampling_rate(self.sampling_rate)
        accounting.check_delta(self.delta, self.num_examples)
        accounting.check_supported(self.accountant, self.sampling)
        accounting.check_steps(self.steps_taken)
        self.event(0)  # validates sampling, num_examples and batch_size

    def event(self, steps: int | None = None):
        """The ``DpEvent`` of ``steps`` steps in total (default: the steps taken), after the
        preceding releases."""
        event = accounting.dpsgd_event(
            self.noise_multiplier,
            self.sampling_rate,
            self.steps_taken if steps is None else steps,
            sampling=self.sampling,
            num_examples=self.num_examples,
            batch_size=self.batch_size,
        )
        return accounting.with_preceding(event, self.preceding_noise_multipliers)

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon at ``delta`` after ``steps`` steps in total (default: the steps taken)."""
        return accounting.epsilon(self.event(steps), self.delta, self.accountant)

    def can_take(self, steps: int = 1) -> bool:
        """Whether ``steps`` more steps keep epsilon ``<= target_epsilon``."""
        accounting.check_steps(steps)
        return self.epsilon(self.steps_taken + steps) <= self.target_epsilon

    def record(self, steps: int = 1) -> PrivacyLedger:
        """A new ledger with ``steps`` more steps taken; raises if that exceeds the target.

        Raises:
          BudgetExceededError: ``can_take(steps)`` is False (nothing is recorded).
        """
        if not self.can_take(steps):
            raise BudgetExceededError(
                f"{steps} more step(s) would raise epsilon to "
                f"{self.epsilon(self.steps_taken + steps):.4g} > target_epsilon="
                f"{self.target_epsilon} ({self.steps_taken} steps taken)"
            )
        return dataclasses.replace(self, steps_taken=self.steps_taken + steps)

    def steps_remaining(self) -> int:
        """The largest ``k`` with ``can_take(k)`` (0 if none).

        A bracketed integer search: epsilon grows roughly like the square root of the steps, which
        predicts the boundary; a bisection step follows whenever one side failed to move, so the
        search needs a few to a few dozen epsilon evaluations (all cached).
        """
        target, base = self.target_epsilon, self.steps_taken

        def eps(k):
            return self.epsilon(base + k)

        if eps(1) > target:
            return 0
        good, e_good = 1, eps(1)
        bad = e_bad = None
        while bad is None:
            ratio = min((target / e_good) ** 2, 16.0) if e_good > 0 else 16.0
            k = max(int((base + good) * ratio) - base, 2 * good)
            e = eps(k)
            if e <= target:
                good, e_good = k, e
            else:
                bad, e_bad = k, e
        last_side = None
        while bad - good > 1:
            guess = (good + bad) // 2
            if e_good > 0 and last_side != "repeat":
                # log eps linear in log(total steps) between the two ends.
                a, b = math.log(base + good), math.log(base + bad)
                t = (math.log(target) - math.log(e_good)) / (math.log(e_bad) - math.log(e_good))
                guess = round(math.exp(a + t * (b - a))) - base
            k = min(max(guess, good + 1), bad - 1)
            e = eps(k)
            side = "good" if e <= target else "bad"
            last_side = "repeat" if side == last_side else side
            if side == "good":
                good, e_good = k, e
            else:
                bad, e_bad = k, e
        return good

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (plus the current epsilon, for readers of the checkpoint)."""
        out = dataclasses.asdict(self)
        out["epsilon"] = self.epsilon()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict` (derived entries such as ``epsilon`` are ignored)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def planned_ledger(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    planned_steps: int,
    delta: float,
    target_epsilon: float,
    accountant: str = "rdp",
    unit: str = "example",
    sampling: str = "poisson",
    num_examples: int | None = None,
    batch_size: int | None = None,
    preceding_noise_multipliers: tuple[float, ...] = (),
) -> PrivacyLedger:
    """The ledger of a run that plans ``planned_steps`` releases (DP-SGD steps, DP-FedAvg rounds).

    ``target_epsilon > 0`` is the budget; ``0`` means the plan itself (sigma, q, steps) is the
    budget, i.e. the epsilon of ``planned_steps`` steps (at least ``1e-12``, since huge noise can
    give epsilon 0.0 and a ledger needs a positive target).

    Examples:
      >>> ledger = planned_ledger(noise_multiplier=1.0, sampling_rate=0.01, planned_steps=100,
      ...                         delta=1e-5, target_epsilon=0.0)
      >>> ledger.can_take(100), ledger.can_take(101)
      (True, False)
    """
    extra = {"num_examples": num_examples, "batch_size": batch_size}
    target = target_epsilon
    if target <= 0:
        event = accounting.dpsgd_event(
            noise_multiplier, sampling_rate, planned_steps, sampling=sampling, **extra
        )
        event = accounting.with_preceding(event, tuple(preceding_noise_multipliers))
        target = max(accounting.epsilon(event, delta, accountant), 1e-12)
    return PrivacyLedger(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        delta=delta,
        target_epsilon=target,
        accountant=accountant,
        unit=unit,
        sampling=sampling,
        preceding_noise_multipliers=tuple(preceding_noise_multipliers),
        **extra,
    )


def check_affords_one(
    ledger: PrivacyLedger, *, release: str = "step", field: str = "privacy.target_epsilon"
) -> PrivacyLedger:
    """Returns ``ledger`` if it can take one more release; else a ``ValueError`` with the bound.

    A run whose budget cannot afford its first release would train nothing and still report;
    this is known before anything is compiled, so it is refused with the reachable bound: the
    epsilon one release spends at the configured noise.

    Examples:
      >>> ledger = PrivacyLedger(noise_multiplier=0.5, sampling_rate=0.5, delta=1e-5,
      ...                        target_epsilon=0.01)
      >>> check_affords_one(ledger)
      Traceback (most recent call last):
      ...
      ValueError: privacy.target_epsilon=0.01 cannot afford one step: ...
    """
    if ledger.can_take(1):
        return ledger
    one = ledger.epsilon(ledger.steps_taken + 1)
    raise ValueError(
        f"{field}={ledger.target_epsilon:g} cannot afford one {release}: one {release} at "
        f"noise multiplier {ledger.noise_multiplier:g} and sampling rate "
        f"{ledger.sampling_rate:.4g} already spends epsilon {one:.4g} at delta "
        f"{ledger.delta:g}; set {field} >= {one:.4g}, or more noise (privacy.noise_multiplier, "
        "or 0 to calibrate it to the target)"
    )
