"""Batch samplers whose randomness matches what the privacy accountant assumes.

The accountant's event must describe how batches were really drawn; mismatches are a known
source of wrong guarantees (Lebeda et al. 2024, https://arxiv.org/abs/2405.20769; Chua et al.
2024, "How private are DP-SGD implementations?", https://arxiv.org/abs/2403.17673).

* :class:`PoissonSampler`: every example enters the batch independently with probability ``q``
  (Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133), the
  ``PoissonSampledDpEvent`` of :func:`fedjax_med.privacy.accounting.dpsgd_event`. The batch size
  is random; to keep compiled shapes static it is padded to a fixed ``capacity`` with a mask, and
  a batch larger than ``capacity`` is returned as several chunks instead of being truncated
  (truncating would drop examples depending on the data and break the Poisson analysis).
* :class:`PoissonUnitSampler`: the same for units of privacy (patients): every patient enters
  with probability ``q`` and contributes at most ``max_per_unit`` examples (McMahan et al., ICLR
  2018, https://arxiv.org/abs/1710.06963; Levy et al., NeurIPS 2021,
  https://arxiv.org/abs/2102.11845); the gradient of each patient is clipped as a whole by
  :func:`fedjax_med.privacy.clipping.clipped_unit_grad_sum`.
* :class:`ShuffledSampler`: fixed-size batches drawn without replacement, which must be accounted
  with ``SampledWithoutReplacementDpEvent`` under replace-one neighbouring.

All samplers are stateless in the step: ``sample(step)`` draws from the run's
:class:`~fedjax_med.randomness.Randomness` (stream :data:`~fedjax_med.randomness.BATCHES`). In
``reproducible`` mode that is ``np.random.default_rng([seed, step])``, so a resumed run sees
exactly the same batches; in ``secure`` mode every step draws from a fresh ChaCha20 generator
keyed by the operating system, so nobody who knows the seed can tell which steps used an example
(the hidden batch is what amplification by subsampling assumes).

Device-side draws (``jax.random``, inside a jitted federated client's local step, where the
client's rows are already on device and a host round-trip per step would serialise the cohort):

* :func:`poisson_rows`: every real row enters independently with probability ``q``, exactly
  the ``PoissonSampledDpEvent(q)`` of the accountant;
* :func:`poisson_unit_rows`: every unit (patient) enters independently with probability ``q`` and
  contributes at most ``k`` of its rows, chosen uniformly, as :class:`PoissonUnitSampler` does;
* :func:`sum_over_chunks`: processes such a batch in fixed-size chunks with a ``while_loop`` (a
  batch larger than one chunk gets further chunks, never truncated) and adds up the results;
* :func:`poisson_chunk_size`: the static chunk size for an expected batch ``L``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fedjax_med import randomness as randomness_lib


class BatchChunk(NamedTuple):
    """One fixed-shape piece of a batch.

    Attributes:
      indices: ``(capacity,)`` int64 example indices; padded slots hold index 0.
      mask: ``(capacity,)`` bool, True for real examples.
      unit_index: for :class:`PoissonUnitSampler`, ``(capacity,)`` int32 slot of each example's
        unit within this chunk, in ``[0, capacity)`` (padded slots: 0); None otherwise.
    """

    indices: np.ndarray
    mask: np.ndarray
    unit_index: np.ndarray | None = None


class SampledBatch(NamedTuple):
    """All chunks of one step's batch; process every chunk and add the clipped sums.

    Attributes:
      chunks: usually one chunk; more when the sampled batch exceeded the capacity.
      realised_size: number of sampled examples (private: do not normalise by it).
      num_units: number of sampled units (equals ``realised_size`` at example level).
    """

    chunks: tuple[BatchChunk, ...]
    realised_size: int
    num_units: int


def _check_sampling_rate(sampling_rate: float) -> None:
    if not (0 < sampling_rate <= 1):
        raise ValueError(f"{sampling_rate=} must be in (0, 1]")


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def poisson_batch_capacity(
    num_examples: int, sampling_rate: float, overflow_prob: float = 1e-9, multiple_of: int = 1
) -> int:
    """Smallest padded batch size ``c`` with ``P[Binomial(N, q) > c] <= overflow_prob``.

    The realised Poisson batch size is ``Binomial(N, q)``; a batch larger than the capacity is
    not truncated but returned in extra chunks (:class:`PoissonSampler`), so the capacity only
    trades memory against how often an extra chunk is processed.

    Args:
      num_examples: ``N >= 1`` (examples, or units for unit-level sampling).
      sampling_rate: ``q`` in ``(0, 1]``.
      overflow_prob: target probability of needing more than one chunk, in ``(0, 1)``.
      multiple_of: round the capacity up to a multiple of this (e.g. the microbatch size).

    Returns:
      The capacity, at least 1.

    Examples:
      >>> poisson_batch_capacity(60_000, 256 / 60_000)
      357
      >>> poisson_batch_capacity(10, 1.0)
      10
    """
    _check_positive_int(num_examples, "num_examples")
    _check_sampling_rate(sampling_rate)
    _check_positive_int(multiple_of, "multiple_of")
    if not (0 < overflow_prob < 1):
        raise ValueError(f"{overflow_prob=} must be in (0, 1)")
    capacity = int(stats.binom.isf(overflow_prob, num_examples, sampling_rate))
    while stats.binom.sf(capacity, num_examples, sampling_rate) > overflow_prob:
        capacity += 1  # guards against rounding in the quantile
    capacity = max(capacity, 1)
    return -(-capacity // multiple_of) * multiple_of


def _randomness(
    seed: int, randomness: randomness_lib.Randomness | None
) -> randomness_lib.Randomness:
    if randomness is None:
        return randomness_lib.Randomness("reproducible", int(seed))
    return randomness


def _pad(values: np.ndarray, capacity: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    padded = np.zeros(capacity, dtype)
    padded[: len(values)] = values
    mask = np.zeros(capacity, bool)
    mask[: len(values)] = True
    return padded, mask


class PoissonSampler:
    """Poisson sampling: each example is in a step's batch independently with probability ``q``.

    Args:
      num_examples: dataset size ``N``.
      sampling_rate: ``q`` in ``(0, 1]``; the expected batch size is ``q N``.
      capacity: padded chunk size (default :func:`poisson_batch_capacity`).
      seed: integer seed of reproducible mode.
      randomness: where the draws come from (default: reproducible from ``seed``).

    Guarantees:
      The set of sampled examples has exactly the distribution of ``PoissonSampledDpEvent(q, .)``
      and every sampled example appears in exactly one chunk slot with ``mask`` True.

    Examples:
      >>> sampler = PoissonSampler(100, 0.1, capacity=8, seed=0)
      >>> batch = sampler.sample(step=3)
      >>> sum(int(c.mask.sum()) for c in batch.chunks) == batch.realised_size
      True
    """

    def __init__(
        self,
        num_examples: int,
        sampling_rate: float,
        capacity: int | None = None,
        seed: int = 0,
        randomness: randomness_lib.Randomness | None = None,
    ):
        _check_positive_int(num_examples, "num_examples")
        _check_sampling_rate(sampling_rate)
        if capacity is None:
            capacity = poisson_batch_capacity(num_examples, sampling_rate)
        _check_positive_int(capacity, "capacity")
        self.num_examples = int(num_examples)
        self.sampling_rate = float(sampling_rate)
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.randomness = _randomness(seed, randomness)

    @property
    def expected_batch_size(self) -> float:
        """``q N``, the public normaliser of the noisy sum."""
        return self.sampling_rate * self.num_examples

    def sample(self, step: int) -> SampledBatch:
        """Draws the batch of ``step`` (reproducible: a pure function of ``seed`` and ``step``)."""
        rng = self.randomness.generator(randomness_lib.BATCHES, step)
        selected = np.flatnonzero(rng.random(self.num_examples) < self.sampling_rate)
        chunks = []
        for start in range(0, max(len(selected), 1), self.capacity):
            indices, mask = _pad(selected[start : start + self.capacity], self.capacity, np.int64)
            chunks.append(BatchChunk(indices, mask))
        return SampledBatch(tuple(chunks), len(selected), len(selected))


class ShuffledSampler:
    """Fixed-size batches: every step draws ``batch_size`` distinct examples uniformly at random.

    Each step's batch is a uniformly random subset of size ``b``, independent of other steps.
    This must be accounted with ``SampledWithoutReplacementDpEvent`` under *replace-one*
    neighbouring (``dpsgd_event(..., sampling="shuffle")``), whose sensitivity is ``2 C``; using the
    Poisson event for it is wrong (Lebeda et al. 2024; Chua et al. 2024). Epoch-wise shuffling into
    disjoint batches is a different scheme, not covered by that event, and is not offered here.

    Args:
      num_examples: dataset size ``N``.
      batch_size: ``b`` in ``[1, N]``.
      seed: integer seed of reproducible mode.
      randomness: where the draws come from (default: reproducible from ``seed``).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int = 0,
        randomness: randomness_lib.Randomness | None = None,
    ):
        _check_positive_int(num_examples, "num_examples")
        _check_positive_int(batch_size, "batch_size")
        if batch_size > num_examples:
            raise ValueError(f"{batch_size=} must be <= {num_examples=}")
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.capacity = int(batch_size)
        self.seed = int(seed)
        self.randomness = _randomness(seed, randomness)

    @property
    def sampling_rate(self) -> float:
        """``b / N``."""
        return self.batch_size / self.num_examples

    @property
    def expected_batch_size(self) -> float:
        return float(self.batch_size)

    def sample(self, step: int) -> SampledBatch:
        """Draws the batch of ``step``: one chunk, all slots real."""
        rng = self.randomness.generator(randomness_lib.BATCHES, step)
        indices = np.sort(rng.choice(self.num_examples, self.batch_size, replace=False))
        chunk = BatchChunk(indices.astype(np.int64), np.ones(self.batch_size, bool))
        return SampledBatch((chunk,), self.batch_size, self.batch_size)


class PoissonUnitSampler:
    """Poisson sampling of units (patients), then at most ``max_per_unit`` examples of each.

    Every unit enters the batch independently with probability ``q``; of a sampled unit with more
    than ``k = max_per_unit`` examples, ``k`` are chosen uniformly without replacement. Units are
    packed whole into chunks of ``capacity`` example slots (a unit is never split, so its summed
    gradient is clipped once), and ``unit_index`` gives each slot's unit within its chunk, for
    :func:`fedjax_med.privacy.clipping.clipped_unit_grad_sum` with ``num_unit_slots = capacity``.

    Args:
      unit_ids: ``(N,)`` unit (patient) identifier of every example, any hashable dtype.
      sampling_rate: ``q`` in ``(0, 1]`` over units; the expected number of units is ``q U``.
      max_per_unit: ``k >= 1``.
      capacity: example slots per chunk, ``>= k`` (default: enough for
        :func:`poisson_batch_capacity` units of ``min(k, largest unit)`` examples each).
      seed: integer seed of reproducible mode.
      randomness: where the draws come from (default: reproducible from ``seed``).

    Guarantees:
      The set of sampled units is ``PoissonSampledDpEvent(q, .)`` over units, and each sampled
      unit has between 1 and ``k`` examples, all in one chunk.
    """

    def __init__(
        self,
        unit_ids: np.ndarray,
        sampling_rate: float,
        max_per_unit: int,
        capacity: int | None = None,
        seed: int = 0,
        randomness: randomness_lib.Randomness | None = None,
    ):
        unit_ids = np.asarray(unit_ids)
        if unit_ids.ndim != 1 or len(unit_ids) == 0:
            raise ValueError(f"unit_ids.shape={unit_ids.shape} must be (N,) with N >= 1")
        _check_sampling_rate(sampling_rate)
        _check_positive_int(max_per_unit, "max_per_unit")
        self.units, codes = np.unique(unit_ids, return_inverse=True)
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes, minlength=len(self.units))
        self._members = np.split(order, np.cumsum(sizes)[:-1])
        per_unit = int(min(max_per_unit, sizes.max()))
        if capacity is None:
            capacity = poisson_batch_capacity(len(self.units), sampling_rate) * per_unit
        _check_positive_int(capacity, "capacity")
        if capacity < per_unit:
            raise ValueError(f"{capacity=} must be >= min(max_per_unit, largest unit) = {per_unit}")
        self.num_examples = len(unit_ids)
        self.sampling_rate = float(sampling_rate)
        self.max_per_unit = int(max_per_unit)
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.randomness = _randomness(seed, randomness)

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def num_unit_slots(self) -> int:
        """Slots for distinct units per chunk (each unit uses at least one example slot)."""
        return self.capacity

    @property
    def expected_batch_size(self) -> float:
        """``q U``, the expected number of units: the public normaliser of the noisy sum."""
        return self.sampling_rate * self.num_units

    def sample(self, step: int) -> SampledBatch:
        """Draws the batch of ``step`` (reproducible: a pure function of ``seed`` and ``step``)."""
        rng = self.randomness.generator(randomness_lib.BATCHES, step)
        sampled_units = np.flatnonzero(rng.random(self.num_units) < self.sampling_rate)
        groups = []
        for unit in sampled_units:
            members = self._members[unit]
            if len(members) > self.max_per_unit:
                members = np.sort(rng.choice(members, self.max_per_unit, replace=False))
            groups.append(members)
        chunks, current = [], []
        for members in groups + [None]:
            used = sum(len(m) for m in current)
            if members is None or used + len(members) > self.capacity:
                if current or not chunks:
                    chunks.append(self._chunk(current))
                current = []
            if members is not None:
                current.append(members)
        return SampledBatch(tuple(chunks), int(sum(len(m) for m in groups)), len(groups))

    def _chunk(self, groups: list[np.ndarray]) -> BatchChunk:
        flat = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        slots = np.repeat(np.arange(len(groups)), [len(m) for m in groups])
        indices, mask = _pad(flat, self.capacity, np.int64)
        unit_index, _ = _pad(slots, self.capacity, np.int32)
        return BatchChunk(indices, mask, unit_index)


# ---- device-side draws (jax.random), for local DP-SGD inside a jitted client -------------------


def poisson_chunk_size(expected_batch: int | float) -> int:
    """Rows (or units) per chunk of a Poisson batch of mean ``L``: ``ceil(L + 3 sqrt(L))``.

    A static shape; the realised size exceeds it with probability about ``0.1 %`` (Binomial
    tail), and then :func:`sum_over_chunks` processes further chunks.

    Examples:
      >>> poisson_chunk_size(16), poisson_chunk_size(1)
      (28, 4)
    """
    if not (isinstance(expected_batch, (int, float, np.integer)) and expected_batch > 0):
        raise ValueError(f"{expected_batch=} must be a number > 0")
    return int(math.ceil(expected_batch + math.ceil(3 * math.sqrt(expected_batch))))


def poisson_rows(key: jax.Array, mask: jax.Array, rate: jax.Array | float):
    """Poisson sampling of real rows (Abadi et al. 2016): each independently with probability ``q``.

    Row ``j`` is sampled iff ``mask[j]`` and ``u_j < q`` for i.i.d. ``u_j ~ U[0, 1)``, which is
    exactly the sampling that ``PoissonSampledDpEvent(q, .)`` assumes (add/remove-one neighbours).

    Args:
      key: the batch key of this step (never the noise key).
      mask: ``(M,)`` bool, true for real rows.
      rate: ``q`` in ``[0, 1]`` (may be traced, e.g. a client's ``min(B, n) / n``).

    Returns:
      ``(order, realised)``: a permutation of the ``M`` rows with the ``realised`` sampled rows
      first, in random order, so ``order[:realised]`` is the batch.

    Examples:
      >>> order, realised = poisson_rows(jax.random.key(0), jnp.array([True, True, False]), 1.0)
      >>> int(realised), sorted(order[:2].tolist())
      (2, [0, 1])
    """
    u = jax.random.uniform(key, mask.shape)
    selected = mask & (u < rate)
    order = jnp.argsort(jnp.where(selected, u, 2.0 + u))
    return order, jnp.sum(selected, dtype=jnp.int32)


class UnitDraw(NamedTuple):
    """One Poisson draw of units (see :func:`poisson_unit_rows`).

    Attributes:
      rows: ``(M, k)`` int32: ``rows[u]`` are the (at most ``k``) rows chosen for unit ``u``,
        ``-1`` in unused slots and for ids with no rows.
      order: ``(M,)`` unit ids with the ``realised`` sampled units first, in random order.
      realised: number of sampled units (private: never normalise by it).
      num_units: number of units with at least one real row, ``U`` (the rate's denominator).
    """

    rows: jax.Array
    order: jax.Array
    realised: jax.Array
    num_units: jax.Array


def unit_counts(unit_ids: jax.Array) -> jax.Array:
    """Number of distinct units (ids ``>= 0``) of a ``(M,)`` unit-id row; ``-1`` is padding.

    Examples:
      >>> int(unit_counts(jnp.array([0, 0, 2, 1, -1])))
      3
    """
    m = unit_ids.shape[0]
    present = jnp.zeros(m, bool).at[jnp.where(unit_ids >= 0, unit_ids, m)].set(True, mode="drop")
    return jnp.sum(present, dtype=jnp.int32)


def poisson_unit_rows(
    key: jax.Array, unit_ids: jax.Array, rate: jax.Array | float, max_per_unit: int
) -> UnitDraw:
    """Poisson sampling of units (patients), then at most ``k`` uniformly chosen rows of each.

    Unit-level DP-SGD (McMahan et al., ICLR 2018, arXiv:1710.06963; Levy et al., NeurIPS 2021,
    arXiv:2102.11845): unit ``u`` is sampled iff ``v_u < q`` for i.i.d. ``v_u ~ U[0, 1)``
    (``PoissonSampledDpEvent(q)`` over units), and of a sampled unit with more than
    ``k = max_per_unit`` rows, ``k`` are chosen uniformly without replacement (the ``k``
    smallest of i.i.d. uniform row scores). The device twin of :class:`PoissonUnitSampler`.

    Args:
      key: the batch key of this step (split here into the unit draw and the row choice).
      unit_ids: ``(M,)`` int, each row's unit id in ``[0, M)``, ``-1`` for padding rows.
      rate: ``q`` in ``[0, 1]`` over units (may be traced).
      max_per_unit: ``k >= 1``, a Python int (static).

    Returns:
      A :class:`UnitDraw`; process it unit by unit (e.g. with :func:`sum_over_chunks` over
      ``order``) so that all rows of a unit are clipped together.

    Guarantees:
      The set of sampled units has the distribution of ``PoissonSampledDpEvent(q)`` over the
      ``num_units`` units, and each sampled unit contributes between 1 and ``k`` rows.

    Examples:
      >>> draw = poisson_unit_rows(jax.random.key(0), jnp.array([0, 0, 0, 1, -1]), 1.0, 2)
      >>> int(draw.realised), int(draw.num_units), int((draw.rows[0] >= 0).sum())
      (2, 2, 2)
    """
    if isinstance(max_per_unit, bool) or not isinstance(max_per_unit, int) or max_per_unit < 1:
        raise ValueError(f"{max_per_unit=} must be a Python int >= 1")
    unit_ids = jnp.asarray(unit_ids, jnp.int32)
    m = unit_ids.shape[0]
    unit_key, row_key = jax.random.split(key)
    ids = jnp.where(unit_ids >= 0, unit_ids, m)  # padding sorts last, as the sentinel id m
    order = jnp.lexsort((jax.random.uniform(row_key, (m,)), ids))  # by unit, then random score
    sorted_ids = ids[order]
    rank = jnp.arange(m) - jnp.searchsorted(sorted_ids, sorted_ids, side="left")
    keep = (sorted_ids < m) & (rank < max_per_unit)
    # Rows not kept all write -1 into the sentinel slot (m, 0), which is dropped.
    rows = jnp.full((m + 1, max_per_unit), -1, jnp.int32)
    rows = rows.at[jnp.where(keep, sorted_ids, m), jnp.where(keep, rank, 0)].set(
        jnp.where(keep, order, -1).astype(jnp.int32)
    )[:m]
    present = rows[:, 0] >= 0
    v = jax.random.uniform(unit_key, (m,))
    selected = present & (v < rate)
    unit_order = jnp.argsort(jnp.where(selected, v, 2.0 + v))
    return UnitDraw(
        rows=rows,
        order=unit_order,
        realised=jnp.sum(selected, dtype=jnp.int32),
        num_units=jnp.sum(present, dtype=jnp.int32),
    )


def sum_over_chunks(
    chunk_fn: Callable[[jax.Array, jax.Array], Any],
    order: jax.Array,
    realised: jax.Array,
    capacity: int,
) -> Any:
    """``sum_c chunk_fn(items_c, real_c)`` over fixed-size chunks of the first ``realised`` items.

    Chunk ``c`` holds ``order[c * capacity:(c + 1) * capacity]`` (padded past the end) and
    ``real_c`` marks its slots below ``realised``. The first chunk always runs (an empty batch
    gives ``chunk_fn`` of an all-false mask); further chunks run in a ``lax.while_loop`` only
    while items remain, so a batch larger than ``capacity`` is never truncated and the usual
    batch costs one chunk.

    Args:
      chunk_fn: ``chunk_fn(items (capacity,), real (capacity,) bool) -> pytree`` of arrays.
      order: ``(N,)`` items, the ``realised`` selected ones first (from :func:`poisson_rows` or
        ``UnitDraw.order``).
      realised: number of selected items (may be traced).
      capacity: items per chunk, a Python int ``>= 1``.

    Returns:
      The leafwise sum of ``chunk_fn`` over the chunks.

    Examples:
      >>> total = sum_over_chunks(lambda i, r: jnp.sum(jnp.where(r, i, 0)), jnp.arange(10), 7, 3)
      >>> int(total)  # 0 + 1 + ... + 6, in three chunks
      21
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"{capacity=} must be a Python int >= 1")
    padded = jnp.concatenate([order, jnp.zeros(capacity, order.dtype)])
    slots = jnp.arange(capacity)
    total = chunk_fn(padded[:capacity], slots < realised)

    def more(carry):
        return carry[0] * capacity < realised

    def next_chunk(carry):
        i, acc = carry
        start = i * capacity
        items = jax.lax.dynamic_slice(padded, (start,), (capacity,))
        acc = jax.tree.map(jnp.add, acc, chunk_fn(items, start + slots < realised))
        return i + 1, acc

    _, total = jax.lax.while_loop(more, next_chunk, (1, total))
    return total
