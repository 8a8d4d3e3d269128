"""The privacy ledger of a federated run: one protocol, one member per mechanism.

The round loop (:func:`fedjax_med.trainers.federated.run_rounds`) knows no mechanism; it asks its
ledger how many rounds the budget allows, which sampled clients may take part, records each
round, checkpoints the ledger and asks it for the run's claim:

* :class:`NoPrivacy`: nothing is accounted and no claim is made.
* :class:`ClientLevelLedger`: DP-FedAvg (McMahan et al., ICLR 2018,
  https://arxiv.org/abs/1710.06963): Poisson client sampling at rate ``q``, Gaussian noise
  ``z S`` on the sum of clipped client deltas, ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
  GaussianDpEvent(z)), T)`` under add/remove-one client.
* :class:`SiteLedgers`: local DP-SGD inside every site (Abadi et al., CCS 2016,
  https://arxiv.org/abs/1607.00133): each local step of site ``k`` is the Poisson-subsampled
  Gaussian mechanism on its ``n_k`` units (examples or patients) at rate
  ``q_k = min(B, n_k) / n_k``; each site has its own budget, and a site whose next round would
  pass it is left out of every later cohort.
* :class:`DistributedLedger`: distributed DP over secure aggregation (Kairouz, Liu, Steinke,
  ICML 2021; Agarwal, Kairouz, Liu, NeurIPS 2021): clients add integer noise and only the
  secure sum is seen; epsilon composes over the rounds that *released* a sum (an aborted
  secure round releases nothing), under zero-out neighbours.

Every ledger refuses, on resume, a checkpointed ledger that accounted other settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from fedjax_med.federated import sampling as cohort_sampling
from fedjax_med.privacy import accounting, budget
from fedjax_med.privacy import claim as claim_lib


class PrivacyAccountant(Protocol):
    """What the round loop asks of a privacy ledger."""

    def allowed(self, start: int, planned: int) -> int:
        """How many of ``planned`` more rounds (from round ``start``) the budget allows."""

    def admit(self, cohort: cohort_sampling.Cohort, round_num: int) -> cohort_sampling.Cohort:
        """The part of ``cohort`` whose budgets allow this round."""

    def record(self, cohort: cohort_sampling.Cohort, released: bool) -> dict[str, Any]:
        """Accounts one round (``released``: the server received an aggregate); returns the
        entries of the round's ``metrics.jsonl`` record (e.g. ``epsilon``)."""

    def record_personalization(self, k: int, steps: int) -> bool:
        """Accounts ``steps`` fine-tuning steps on client ``k``'s data; False if unaffordable."""

    def state_dict(self) -> dict[str, Any]:
        """JSON for the checkpoint."""

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; raises ``ValueError`` if it accounted other settings."""

    def claim(self, context: ClaimContext) -> claim_lib.PrivacyClaim | None:
        """The run's privacy claim (``None``: not private)."""

    @property
    def stopped_by_budget(self) -> bool:
        """Whether the budget ended the run before its planned rounds."""


@dataclasses.dataclass(frozen=True)
class ClaimContext:
    """What a ledger's claim needs from the run besides the ledger itself."""

    randomness_mode: str
    clip_norm: float
    client_names: tuple[str, ...]
    final_clip_norm: float | None = None
    adaptive_clipping: bool = False
    secure_aggregation: str = "none"
    released_outside: tuple[str, ...] = ()


def check_unchanged(saved: dict[str, Any], planned: dict[str, Any], what: str) -> None:
    """Refuses a resume whose plan would account other settings than the checkpoint's ``what``.

    Raises:
      ValueError: naming every changed setting (old -> new).
    """
    changed = [f"{k} ({saved.get(k)!r} -> {v!r})" for k, v in planned.items() if saved.get(k) != v]
    if changed:
        raise ValueError(
            f"--resume would change what the checkpoint's {what} accounted: "
            + ", ".join(changed)
            + "; resume with the run's own privacy settings or start a new --workdir"
        )


@dataclasses.dataclass
class NoPrivacy:
    """A non-private run: every sampled client takes part, nothing is accounted."""

    stopped_by_budget: bool = False

    def allowed(self, start: int, planned: int) -> int:
        """Every planned round: there is no budget."""
        return max(planned, 0)

    def admit(self, cohort, round_num):
        """Every sampled client."""
        return cohort

    def record(self, cohort, released):
        """Accounts nothing; adds no entries to the round's record."""
        return {}

    def record_personalization(self, k, steps):
        """Always True: there is nothing to account."""
        return True  # no per-client ledger: the claim names the fine-tuned metrics as released

    def state_dict(self):
        """Empty: there is nothing to checkpoint."""
        return {}

    def load_state_dict(self, data):
        """Accepts only an empty ledger; raises ``ValueError`` if the checkpoint holds one."""
        if data:
            raise ValueError(
                "--resume: the checkpoint holds a privacy ledger but the config is "
                "not private; resume with the run's own privacy settings"
            )

    def claim(self, context):
        """``None``: a non-private run makes no claim."""
        return None


@dataclasses.dataclass
class ClientLevelLedger:
    """DP-FedAvg's client-level ledger: one :class:`~fedjax_med.privacy.budget.PrivacyLedger`."""

    ledger: budget.PrivacyLedger
    stopped_by_budget: bool = False

    def allowed(self, start: int, planned: int) -> int:
        """The planned rounds the one client-level budget affords; sets ``stopped_by_budget``."""
        if planned <= 0:
            return 0
        allowed = planned if self.ledger.can_take(planned) else self.ledger.steps_remaining()
        allowed = min(planned, allowed)
        self.stopped_by_budget = allowed < planned
        return allowed

    def admit(self, cohort, round_num):
        """Every sampled client: one budget covers the whole population."""
        return cohort

    def record(self, cohort, released):
        """One more step if the round released; returns ``epsilon`` and ``delta`` so far."""
        # A plaintext round always releases (DP-FedAvg noises an empty sum too); a secure round
        # that aborted released nothing.
        if released:
            self.ledger = self.ledger.record(1)
        return {"epsilon": self.ledger.epsilon(), "delta": self.ledger.delta}

    def record_personalization(self, k, steps):
        """Always True: fine-tuning is outside this ledger (the claim names it as released)."""
        return True  # no per-client ledger: the claim names the fine-tuned metrics as released

    def state_dict(self):
        """``{"privacy_ledger": PrivacyLedger.to_dict()}``."""
        return {"privacy_ledger": self.ledger.to_dict()}

    def load_state_dict(self, data):
        """Restores the ledger; raises ``ValueError`` if it accounted other settings.

        The settings compared: noise multiplier, sampling rate, delta, accountant, target epsilon.
        """
        saved = budget.PrivacyLedger.from_dict(data["privacy_ledger"])
        fields = ("noise_multiplier", "sampling_rate", "delta", "accountant", "target_epsilon")
        check_unchanged(
            {f: getattr(saved, f) for f in fields},
            {f: getattr(self.ledger, f) for f in fields},
            "client-level ledger",
        )
        self.ledger = saved

    def claim(self, context):
        """A client-level ``dp_fedavg`` claim: add/remove one client, Poisson-sampled rounds."""
        eps = self.ledger.epsilon()
        trusted = "the server, which sees each sampled client's clipped update and adds the noise"
        if context.secure_aggregation != "none":
            trusted = (
                "the server to add the noise to the secure sum (it sees only the sum of the "
                f"clipped updates, through {context.secure_aggregation})"
            )
        return claim_lib.PrivacyClaim(
            mechanism="dp_fedavg",
            epsilon=eps,
            delta=self.ledger.delta,
            unit="client",
            relation="add_or_remove_one",
            accountant=self.ledger.accountant,
            noise_multiplier=self.ledger.noise_multiplier,
            clip_norm=context.clip_norm,
            sampling="poisson",
            sampling_rate=self.ledger.sampling_rate,
            steps=self.ledger.steps_taken,
            randomness_mode=context.randomness_mode,
            trusted=trusted,
            adversary="anyone who sees the released global models (other hospitals, the public)",
            released_outside=(
                "each round's number of sampled, dropped and contributing clients "
                "(metrics.jsonl num_sampled, num_dropped, num_clients)",
                "each round's mean client training loss and update norm (metrics.jsonl)",
                *context.released_outside,
            ),
            details={
                "final_clip_norm": context.final_clip_norm,
                "adaptive_clipping": context.adaptive_clipping,
                "target_epsilon": self.ledger.target_epsilon,
                "stopped_by_budget": self.stopped_by_budget,
            },
        )


@dataclasses.dataclass
class SiteLedgers:
    """Local DP-SGD: one budget per site, ``local_steps`` Poisson-subsampled releases a round.

    Attributes:
      names: the sites (clients).
      num_units: each site's number of units (examples, or patients for patient-level DP).
      targets: each site's epsilon budget (``inf``: none).
      noise_multiplier, batch_size, local_steps, delta, accountant, unit: the local DP-SGD.
      steps: local steps each site has taken in total (all rounds, and personalisation).
      exhausted_at_round: site -> the first round its budget kept it out.
    """

    names: tuple[str, ...]
    num_units: np.ndarray
    targets: np.ndarray
    noise_multiplier: float
    batch_size: int
    local_steps: int
    delta: float
    accountant: str
    unit: str = "example"
    steps: np.ndarray | None = None
    exhausted_at_round: dict[str, int] = dataclasses.field(default_factory=dict)
    stopped_by_budget: bool = False

    def __post_init__(self):
        if self.steps is None:
            self.steps = np.zeros(len(self.names), np.int64)

    def sampling_rate(self, k: int) -> float:
        """Site ``k``'s Poisson sampling rate ``q_k = min(B, n_k) / n_k``."""
        n = int(self.num_units[k])
        return min(self.batch_size, n) / n

    def epsilon(self, k: int, steps: int | None = None) -> float:
        """Site ``k``'s epsilon after ``steps`` local steps (default: those taken)."""
        steps = int(self.steps[k] if steps is None else steps)
        event = accounting.dpsgd_event(self.noise_multiplier, self.sampling_rate(k), steps)
        return accounting.epsilon(event, self.delta, self.accountant)

    def can_take(self, k: int, steps: int) -> bool:
        """Whether site ``k`` stays within its target after ``steps`` more local steps."""
        return self.epsilon(k, int(self.steps[k]) + steps) <= self.targets[k]

    def allowed(self, start, planned):
        """Every planned round: budgets are per site and act in :meth:`admit`."""
        return max(planned, 0)

    def admit(self, cohort, round_num):
        """Every sampled site whose budget allows one more round; notes when the others ran out."""
        admitted = []
        for k in cohort.sampled():
            if self.can_take(k, self.local_steps):
                admitted.append(k)
            else:
                self.exhausted_at_round.setdefault(self.names[k], round_num)
        return cohort_sampling.padded_cohort(np.asarray(admitted, np.int64), cohort.capacity)

    def record(self, cohort, released):
        """Adds ``local_steps`` to each admitted site, released or not; returns site epsilons."""
        # A site's local steps are releases whether or not the server used its delta.
        self.steps[cohort.sampled()] += self.local_steps
        eps = self.per_site_epsilon()
        return {"max_site_epsilon": max(eps.values()), "site_epsilon": eps}

    def record_personalization(self, k: int, steps: int) -> bool:
        """Accounts ``steps`` fine-tuning steps of site ``k`` if its budget allows them."""
        if not self.can_take(k, steps):
            return False
        self.steps[k] += steps
        return True

    def per_site_epsilon(self) -> dict[str, float]:
        """Site name -> its epsilon after the local steps it has taken."""
        return {name: self.epsilon(k) for k, name in enumerate(self.names)}

    def _settings(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "batch_size": self.batch_size,
            "local_steps": self.local_steps,
            "delta": self.delta,
            "accountant": self.accountant,
            "unit": self.unit,
            "num_units": [int(n) for n in self.num_units],
            "targets": [float(t) if np.isfinite(t) else None for t in self.targets],
        }

    def state_dict(self):
        """Steps, exhaustion rounds and settings under ``"site_budgets"``."""
        return {
            "site_budgets": {
                "steps": self.steps.tolist(),
                "exhausted_at_round": dict(self.exhausted_at_round),
                "settings": self._settings(),
            }
        }

    def load_state_dict(self, data):
        """Restores steps and exhaustion rounds; raises ``ValueError`` if the settings changed."""
        saved = data["site_budgets"]
        check_unchanged(saved.get("settings", {}), self._settings(), "site ledgers")
        self.steps = np.asarray(saved["steps"], np.int64)
        self.exhausted_at_round = dict(saved["exhausted_at_round"])

    def claim(self, context):
        """A ``local_dp_sgd`` claim at the worst site's epsilon, listing every site's epsilon."""
        per_site = self.per_site_epsilon()
        worst = max(per_site.values())
        return claim_lib.PrivacyClaim(
            mechanism="local_dp_sgd",
            epsilon=worst,
            delta=self.delta,
            unit=self.unit,
            relation="add_or_remove_one",
            accountant=self.accountant,
            noise_multiplier=self.noise_multiplier,
            clip_norm=context.clip_norm,
            sampling="poisson",
            sampling_rate={n: self.sampling_rate(k) for k, n in enumerate(self.names)},
            steps={n: int(s) for n, s in zip(self.names, self.steps, strict=True)},
            randomness_mode=context.randomness_mode,
            trusted="each site with its own images (nobody outside it)",
            adversary="everyone outside the site: the server, the other sites and the public",
            released_outside=(
                "each site's number of training examples (the FedAvg weight; report.json "
                "federated.client_sizes)",
                "which rounds each site took part in (its budget's exhaustion round)",
                *context.released_outside,
            ),
            per_site_epsilon=per_site,
            details={
                "per_site_target_epsilon": {
                    n: (float(t) if np.isfinite(t) else None)
                    for n, t in zip(self.names, self.targets, strict=True)
                },
                "site_budget_exhausted_at_round": dict(self.exhausted_at_round),
                "stopped_by_budget": self.stopped_by_budget,
            },
        )


@dataclasses.dataclass
class DistributedLedger:
    """Distributed DP: epsilon over the rounds that released a secure sum.

    Attributes:
      epsilon_fn: ``releases -> epsilon`` of the distributed mechanism (zero-out neighbours).
      delta: its delta.
      noise_multiplier, clip_norm, accountant: the mechanism, as the claim names it.
      settings: what the mechanism is (kind, noise, clip, threshold), checked on resume.
      claim_details: ``() -> dict``: extra entries of the claim (threshold, ...).
      releases: rounds that released a sum so far.
      rounds: rounds run so far (released or aborted).
    """

    epsilon_fn: Any
    delta: float
    noise_multiplier: float
    clip_norm: float
    accountant: str
    settings: dict[str, Any]
    claim_details: dict[str, Any]
    releases: int = 0
    rounds: int = 0
    stopped_by_budget: bool = False

    def allowed(self, start, planned):
        """Every planned round: no target epsilon is enforced, epsilon is only reported."""
        return max(planned, 0)

    def admit(self, cohort, round_num):
        """Every sampled client."""
        return cohort

    def record(self, cohort, released):
        """Counts the round, and a release if it released a sum; returns ``epsilon``, ``delta``."""
        self.rounds += 1
        self.releases += int(released)
        return {"epsilon": self.epsilon_fn(self.releases), "delta": self.delta}

    def record_personalization(self, k, steps):
        """Always True: fine-tuning is outside this ledger (the claim names it as released)."""
        return True  # no per-client ledger: the claim names the fine-tuned metrics as released

    def state_dict(self):
        """Releases, rounds and settings under ``"distributed_dp"``."""
        return {
            "distributed_dp": {
                "releases": self.releases,
                "rounds": self.rounds,
                "settings": self.settings,
            }
        }

    def load_state_dict(self, data):
        """Restores releases and rounds; raises ``ValueError`` if the settings changed."""
        saved = data["distributed_dp"]
        check_unchanged(saved.get("settings", {}), self.settings, "distributed-DP ledger")
        self.releases = int(saved["releases"])
        self.rounds = int(saved["rounds"])

    def claim(self, context):
        """A ``distributed_dp`` claim: zero-out neighbours, released rounds, no amplification."""
        return claim_lib.PrivacyClaim(
            mechanism="distributed_dp",
            epsilon=self.epsilon_fn(self.releases),
            delta=self.delta,
            unit="client",
            relation="zero_out",
            accountant=self.accountant,
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            sampling="none",
            sampling_rate=1.0,
            steps=self.releases,
            randomness_mode=context.randomness_mode,
            trusted=(
                "every client to add its share of the noise, and fewer than the secure-"
                "aggregation threshold of clients colluding with the server"
            ),
            adversary=(
                "the honest-but-curious server and anyone who sees the released global models"
            ),
            released_outside=(
                "each round's number of sampled and contributing clients (metrics.jsonl)",
                "no amplification by client sampling is claimed",
                *context.released_outside,
            ),
            details={**self.claim_details(), "rounds": self.rounds},
        )
