"""A privacy claim: what was accounted, for whom, against whom, and what was released outside it.

Every trainer builds one :class:`PrivacyClaim` for a private run and ``report.json`` carries its
:meth:`~PrivacyClaim.to_report` as ``privacy``; the report and the attacks read it back with
:meth:`~PrivacyClaim.from_report`, never by guessing at keys. A claim is a promise against a
named adversary (the threat model), so it states:

* the *unit* (example, patient, client) and the *neighbouring relation* that was accounted
  (add/remove one unit, replace one unit, or zero-out: one client's update replaced by zero);
* the *mechanism* that ran and the accountant's ``(epsilon, delta)`` for the noise it added;
* who is *trusted* and the *adversary* the guarantee holds against;
* the *randomness mode* (:mod:`fedjax_med.randomness`): a ``reproducible`` run is a simulation
  and no guarantee holds against anyone who holds its seed;
* what is *released outside the guarantee* (diagnostics, sizes, metrics that read the data).

Accounting follows Abadi et al. (CCS 2016, https://arxiv.org/abs/1607.00133) for DP-SGD,
McMahan et al. (ICLR 2018, https://arxiv.org/abs/1710.06963) for client-level DP-FedAvg and
Kairouz, Liu, Steinke (ICML 2021, https://arxiv.org/abs/2102.06387) for distributed DP.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dp_accounting

from fedjax_med import randomness

MECHANISMS = ("dp_sgd", "local_dp_sgd", "dp_fedavg", "distributed_dp")
UNITS = ("example", "patient", "client")
RELATIONS = ("add_or_remove_one", "replace_one", "zero_out")
_DP_ACCOUNTING_RELATIONS = {
    "add_or_remove_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}
_RELATION_TEXT = {
    "add_or_remove_one": "adding or removing one {unit}",
    "replace_one": "replacing one {unit} by another",
    "zero_out": "replacing one {unit}'s update by zero",
}
# The keys of to_report() that are the claim itself; any others are mechanism details.
_CLAIM_KEYS = (
    "mechanism",
    "epsilon",
    "delta",
    "unit",
    "level",
    "neighbouring_relation",
    "accountant",
    "noise_multiplier",
    "clip_norm",
    "sampling",
    "sampling_rate",
    "steps",
    "noise_seed_mode",
    "trusted",
    "adversary",
    "released_outside_guarantee",
    "per_site_epsilon",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyClaim:
    """The ``(epsilon, delta)`` guarantee of one run and its threat model.

    Attributes:
      mechanism: one of :data:`MECHANISMS`.
      epsilon: the accountant's epsilon for the noise the run added (the worst site's for local
        DP-SGD).
      delta: its delta.
      unit: what one neighbouring dataset differs by, one of :data:`UNITS`.
      relation: the neighbouring relation accounted, one of :data:`RELATIONS`.
      accountant: e.g. ``"rdp"``, ``"pld"``.
      noise_multiplier: ``sigma``: noise stddev over the sensitivity under ``relation``.
      clip_norm: the clipping norm (per example, patient or client update).
      sampling: ``"poisson"``, ``"shuffle"`` or ``"none"`` (no amplification claimed).
      sampling_rate: ``q`` (per site for local DP-SGD).
      steps: releases accounted (per site for local DP-SGD).
      randomness_mode: ``"reproducible"`` or ``"secure"``.
      trusted: who must be honest for the guarantee to hold.
      adversary: who the guarantee is against.
      released_outside: what the run publishes that the guarantee does not cover.
      per_site_epsilon: local DP-SGD: each site's epsilon.
      details: mechanism-specific report entries (target epsilon, expected batch size, ...).
    """

    mechanism: str
    epsilon: float
    delta: float
    unit: str
    relation: str
    accountant: str
    noise_multiplier: float
    clip_norm: float
    sampling: str
    sampling_rate: float | dict[str, float]
    steps: int | dict[str, int]
    randomness_mode: str
    trusted: str
    adversary: str
    released_outside: tuple[str, ...] = ()
    per_site_epsilon: dict[str, float] | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, value, allowed in (
            ("mechanism", self.mechanism, MECHANISMS),
            ("unit", self.unit, UNITS),
            ("relation", self.relation, RELATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"PrivacyClaim.{name}={value!r} must be one of {allowed}")
        randomness.check_mode(self.randomness_mode)
        if not 0 < self.delta < 1:
            raise ValueError(f"PrivacyClaim.delta={self.delta} must lie in (0, 1)")
        if not self.epsilon >= 0:
            raise ValueError(f"PrivacyClaim.epsilon={self.epsilon} must be >= 0")

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation | None:
        """The ``dp_accounting`` relation (``None`` for zero-out, which it does not name)."""
        return _DP_ACCOUNTING_RELATIONS.get(self.relation)

    @property
    def guarantee(self) -> str:
        """One sentence a privacy officer can read."""
        relation = _RELATION_TEXT[self.relation].format(unit=self.unit)
        text = (
            f"({self.epsilon:.4g}, {self.delta:.3g})-DP with respect to {relation} "
            f"({self.mechanism.replace('_', '-')}, {self.accountant} accountant), against "
            f"{self.adversary}; trusted: {self.trusted}"
        )
        if self.randomness_mode == "reproducible":
            text += "; reproducible randomness: a simulation, no guarantee against anyone who "
            text += "holds the seed"
        return text

    def to_report(self) -> dict[str, Any]:
        """The ``privacy`` object of report.json (every key of earlier versions is kept)."""
        out = dict(self.details)
        out.update(
            mechanism=self.mechanism,
            epsilon=float(self.epsilon),
            delta=float(self.delta),
            unit=self.unit,
            level=self.unit,
            neighbouring_relation=self.relation,
            accountant=self.accountant,
            noise_multiplier=float(self.noise_multiplier),
            clip_norm=float(self.clip_norm),
            sampling=self.sampling,
            sampling_rate=self.sampling_rate,
            steps=self.steps,
            noise_seed_mode=self.randomness_mode,
            randomness=randomness.Randomness(self.randomness_mode).describe(),
            trusted=self.trusted,
            adversary=self.adversary,
            released_outside_guarantee=list(self.released_outside),
            guarantee=self.guarantee,
        )
        if self.per_site_epsilon is not None:
            out["per_site_epsilon"] = dict(self.per_site_epsilon)
        return out

    @classmethod
    def from_report(cls, privacy: dict[str, Any]) -> PrivacyClaim:
        """Inverse of :meth:`to_report`."""
        details = {
            k: v
            for k, v in privacy.items()
            if k not in _CLAIM_KEYS and k not in ("randomness", "guarantee")
        }
        return cls(
            mechanism=privacy["mechanism"],
            epsilon=float(privacy["epsilon"]),
            delta=float(privacy["delta"]),
            unit=privacy["unit"],
            relation=privacy["neighbouring_relation"],
            accountant=privacy["accountant"],
            noise_multiplier=float(privacy["noise_multiplier"]),
            clip_norm=float(privacy["clip_norm"]),
            sampling=privacy["sampling"],
            sampling_rate=privacy["sampling_rate"],
            steps=privacy["steps"],
            randomness_mode=privacy["noise_seed_mode"],
            trusted=privacy["trusted"],
            adversary=privacy["adversary"],
            released_outside=tuple(privacy["released_outside_guarantee"]),
            per_site_epsilon=privacy.get("per_site_epsilon"),
            details=details,
        )
