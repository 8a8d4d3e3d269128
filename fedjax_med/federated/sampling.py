"""Which clients take part in a round: host NumPy samplers, seeded and stateless by round.

Round ``t`` draws from the sampler's :class:`~fedjax_med.randomness.Randomness` (stream
:data:`~fedjax_med.randomness.COHORTS`): in ``reproducible`` mode ``np.random.default_rng([s, t])``
for seed ``s``, so any round can be replayed (e.g. after resuming from a checkpoint) without
replaying the rounds before it; in ``secure`` mode a fresh ChaCha20 generator keyed by the
operating system, so the cohort (whose secrecy client-level amplification assumes) cannot be
recomputed from the seed.
A draw is a :class:`Cohort`: ``C`` client slots (sampled clients first, then padding slots that
point at client 0) and a mask, so the number of sampled clients never changes array shapes.

* :class:`UniformSampler`: ``C`` distinct clients uniformly at random (FedAvg's sampling,
  McMahan et al. 2017, https://arxiv.org/abs/1602.05629).
* :class:`PoissonCohortSampler`: each client independently with probability ``q`` (the sampling of
  DP-FedAvg, McMahan et al. 2018, https://arxiv.org/abs/1710.06963, whose privacy amplification
  the accountant's ``PoissonSampledDpEvent`` assumes). The cohort is padded to a fixed
  ``capacity``, by default the ``1 - overflow_prob`` quantile of ``Binomial(K, q)``. A round that
  samples more clients than ``capacity`` is never truncated: its cohort grows by whole extra
  blocks of ``capacity`` slots (one extra compilation for that shape), so every sampled client
  trains and the sampling stays exactly Poisson.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from scipy import stats

from fedjax_med import randomness as randomness_lib

logger = logging.getLogger("fedjax_med")


@dataclasses.dataclass(frozen=True)
class Cohort:
    """One round's clients: ``indices[i]`` is a sampled client iff ``mask[i]``.

    Attributes:
      indices: ``(C,)`` int32 client indices; padding slots hold 0.
      mask: ``(C,)`` bool, true for sampled clients (all of them come first).
    """

    indices: np.ndarray
    mask: np.ndarray

    @property
    def capacity(self) -> int:
        """Number of slots ``C`` (the static size the round compiles for)."""
        return int(self.mask.shape[0])

    @property
    def num_sampled(self) -> int:
        """Number of sampled clients (true entries of ``mask``)."""
        return int(self.mask.sum())

    def sampled(self) -> np.ndarray:
        """The sampled client indices, without padding."""
        return self.indices[self.mask]


def _generator(
    seed: int, randomness: randomness_lib.Randomness | None, round_num: int
) -> np.random.Generator:
    if randomness is None:
        randomness = randomness_lib.Randomness("reproducible", int(seed))
    return randomness.generator(randomness_lib.COHORTS, round_num)


def padded_cohort(sampled: np.ndarray, capacity: int) -> Cohort:
    """Pads the sampled client indices to ``capacity`` slots (or whole multiples of it).

    Examples:
      >>> c = padded_cohort(np.array([4, 7]), 3)
      >>> c.indices.tolist(), c.mask.tolist()
      ([4, 7, 0], [True, True, False])
      >>> padded_cohort(np.arange(5), 3).capacity  # overflow: two blocks of 3, nothing dropped
      6
    """
    sampled = np.asarray(sampled, np.int32)
    n = sampled.size
    size = max(1, -(-n // capacity)) * capacity
    indices = np.zeros(size, np.int32)
    indices[:n] = sampled
    mask = np.zeros(size, bool)
    mask[:n] = True
    return Cohort(indices=indices, mask=mask)


@dataclasses.dataclass(frozen=True)
class UniformSampler:
    """``cohort_size`` distinct clients out of ``num_clients``, uniformly, for each round.

    Examples:
      >>> sampler = UniformSampler(num_clients=10, cohort_size=3, seed=0)
      >>> c = sampler.sample(5)
      >>> c.capacity, c.num_sampled, np.array_equal(c.indices, sampler.sample(5).indices)
      (3, 3, True)
    """

    num_clients: int
    cohort_size: int
    seed: int
    randomness: randomness_lib.Randomness | None = None

    def __post_init__(self):
        if not 1 <= self.cohort_size <= self.num_clients:
            raise ValueError(
                f"cohort_size={self.cohort_size} must lie in [1, num_clients={self.num_clients}]"
            )

    def sample(self, round_num: int) -> Cohort:
        rng = _generator(self.seed, self.randomness, round_num)
        chosen = np.sort(rng.choice(self.num_clients, self.cohort_size, replace=False))
        return padded_cohort(chosen, self.cohort_size)


def poisson_capacity(
    num_clients: int, rate: float, overflow_prob: float = 1e-6, multiple: int = 1
) -> int:
    """Smallest ``C`` (rounded up to ``multiple``) with ``P[Binomial(K, q) > C] <= overflow_prob``.

    Examples:
      >>> poisson_capacity(1000, 0.01), poisson_capacity(1000, 0.01, multiple=8)
      (28, 32)
      >>> poisson_capacity(10, 1.0)
      10
    """
    if not 0 < rate <= 1:
        raise ValueError(f"{rate=} must lie in (0, 1]")
    if not 0 < overflow_prob < 1:
        raise ValueError(f"{overflow_prob=} must lie in (0, 1)")
    survival = stats.binom.sf(np.arange(num_clients + 1), num_clients, rate)
    capacity = int(np.flatnonzero(survival <= overflow_prob)[0])
    capacity = max(capacity, 1)
    return -(-capacity // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class PoissonCohortSampler:
    """Each client independently with probability ``rate``; cohort padded to ``capacity``.

    Attributes:
      num_clients: ``K``.
      rate: sampling probability ``q`` in ``(0, 1]``; the expected cohort is ``q K``.
      seed: host seed.
      capacity: slots per cohort; ``None`` = :func:`poisson_capacity` with ``overflow_prob``.
      overflow_prob: target probability that a round needs more than ``capacity`` slots.

    Examples:
      >>> sampler = PoissonCohortSampler(num_clients=100, rate=0.1, seed=0)
      >>> c = sampler.sample(0)
      >>> c.capacity == sampler.capacity, bool(np.all(c.sampled() < 100))
      (True, True)
    """

    num_clients: int
    rate: float
    seed: int
    capacity: int | None = None
    overflow_prob: float = 1e-6
    randomness: randomness_lib.Randomness | None = None

    def __post_init__(self):
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate={self.rate} must lie in (0, 1]")
        if self.capacity is None:
            capacity = poisson_capacity(self.num_clients, self.rate, self.overflow_prob)
            object.__setattr__(self, "capacity", capacity)
        if self.capacity < 1:
            raise ValueError(f"capacity={self.capacity} must be >= 1")

    @property
    def expected_clients(self) -> float:
        """``q K``, the public denominator of DP-FedAvg."""
        return self.rate * self.num_clients

    def sample(self, round_num: int) -> Cohort:
        rng = _generator(self.seed, self.randomness, round_num)
        chosen = np.flatnonzero(rng.random(self.num_clients) < self.rate)
        if chosen.size > self.capacity:
            logger.warning(
                "round %d sampled %d clients > capacity %d: running %d slots (recompiles once)",
                round_num,
                chosen.size,
                self.capacity,
                -(-chosen.size // self.capacity) * self.capacity,
            )
        return padded_cohort(chosen, self.capacity)
