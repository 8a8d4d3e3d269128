"""Samplers: Poisson rates, no truncation on overflow, patient caps, determinism by step."""

import collections

import numpy as np
import pytest
from scipy import stats

from fedjax_med.privacy import sampling


def _sampled(batch):
    return np.concatenate([c.indices[c.mask] for c in batch.chunks])


@pytest.mark.parametrize(
    "n,q,p", [(60_000, 256 / 60_000, 1e-9), (1000, 0.05, 1e-3), (7, 1.0, 1e-9)]
)
def test_capacity_is_the_binomial_quantile(n, q, p):
    capacity = sampling.poisson_batch_capacity(n, q, p)
    assert stats.binom.sf(capacity, n, q) <= p
    assert capacity == 1 or stats.binom.sf(capacity - 1, n, q) > p
    assert sampling.poisson_batch_capacity(n, q, p, multiple_of=32) % 32 == 0


@pytest.mark.parametrize(
    "args,field",
    [
        ((0, 0.1), "num_examples"),
        ((10, 0.0), "sampling_rate"),
        ((10, 1.5), "sampling_rate"),
        ((10, 0.1, 0.0), "overflow_prob"),
    ],
)
def test_capacity_validation(args, field):
    with pytest.raises(ValueError, match=field):
        sampling.poisson_batch_capacity(*args)


def test_poisson_rate_matches_q():
    n, q, steps = 2000, 0.02, 200
    sampler = sampling.PoissonSampler(n, q, seed=1)
    counts = np.zeros(n, int)
    total = 0
    for step in range(steps):
        batch = sampler.sample(step)
        chosen = _sampled(batch)
        assert len(chosen) == batch.realised_size == len(set(chosen.tolist()))
        counts[chosen] += 1
        total += batch.realised_size
    # Deterministic draws (fixed seed): a two-sided binomial test at level 1e-4.
    assert stats.binomtest(total, n * steps, q).pvalue > 1e-4
    # Each example's inclusion count is Binomial(steps, q): a chi-square goodness of fit.
    observed = np.bincount(np.minimum(counts, 10), minlength=11)
    expected = stats.binom.pmf(np.arange(11), steps, q)
    expected[-1] = stats.binom.sf(9, steps, q)
    assert stats.chisquare(observed, expected * n).pvalue > 1e-4


def test_poisson_is_stateless_by_step_and_seeded():
    a = sampling.PoissonSampler(500, 0.1, seed=3)
    b = sampling.PoissonSampler(500, 0.1, seed=3)
    np.testing.assert_array_equal(_sampled(a.sample(9)), _sampled(b.sample(9)))
    assert not np.array_equal(_sampled(a.sample(9)), _sampled(a.sample(10)))
    assert not np.array_equal(
        _sampled(a.sample(9)), _sampled(sampling.PoissonSampler(500, 0.1, seed=4).sample(9))
    )


def test_overflow_returns_extra_chunks_without_truncation():
    big = sampling.PoissonSampler(300, 0.1, capacity=1000, seed=2)
    small = sampling.PoissonSampler(300, 0.1, capacity=7, seed=2)
    full, chunked = big.sample(4), small.sample(4)
    assert chunked.realised_size == full.realised_size > 7
    assert len(chunked.chunks) == -(-full.realised_size // 7)
    for chunk in chunked.chunks:
        assert chunk.indices.shape == chunk.mask.shape == (7,)
        assert chunk.unit_index is None
    # Every sampled example appears exactly once, whatever the capacity.
    sampled = _sampled(chunked)
    assert sorted(sampled.tolist()) == sorted(set(sampled.tolist()))
    np.testing.assert_array_equal(np.sort(sampled), np.sort(_sampled(full)))


def test_empty_batch_is_one_padded_chunk():
    batch = sampling.PoissonSampler(3, 1e-9, capacity=4, seed=0).sample(0)
    assert batch.realised_size == 0 and len(batch.chunks) == 1
    assert not batch.chunks[0].mask.any()


def test_expected_batch_size():
    assert sampling.PoissonSampler(1000, 0.05).expected_batch_size == pytest.approx(50)


def test_shuffled_sampler_fixed_size_without_replacement():
    sampler = sampling.ShuffledSampler(50, 8, seed=0)
    batch = sampler.sample(3)
    (chunk,) = batch.chunks
    assert len(set(chunk.indices.tolist())) == 8 and chunk.mask.all()
    assert batch.realised_size == 8 and sampler.sampling_rate == 8 / 50
    np.testing.assert_array_equal(chunk.indices, sampler.sample(3).chunks[0].indices)
    with pytest.raises(ValueError, match="batch_size"):
        sampling.ShuffledSampler(5, 6)


def _unit_ids():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, size=400)  # patients with 1 to 8 images
    return np.repeat(np.array([f"patient-{i}" for i in range(400)]), sizes)


def test_unit_sampler_caps_examples_and_keeps_units_whole():
    ids = _unit_ids()
    sampler = sampling.PoissonUnitSampler(ids, 0.05, max_per_unit=3, capacity=16, seed=5)
    unit_draws = 0
    for step in range(40):
        batch = sampler.sample(step)
        units_seen = []
        for chunk in batch.chunks:
            assert chunk.indices.shape == chunk.mask.shape == chunk.unit_index.shape == (16,)
            real = chunk.mask
            per_slot = collections.defaultdict(set)
            for index, slot in zip(chunk.indices[real], chunk.unit_index[real], strict=True):
                per_slot[slot].add(ids[index])
            # One unit per slot, at most max_per_unit examples per unit.
            assert all(len(units) == 1 for units in per_slot.values())
            assert all(np.sum(chunk.unit_index[real] == s) <= 3 for s in per_slot)
            units_seen += [next(iter(units)) for units in per_slot.values()]
        # No unit is split across chunks; counts add up.
        assert len(units_seen) == len(set(units_seen)) == batch.num_units
        assert batch.realised_size == sum(int(c.mask.sum()) for c in batch.chunks)
        unit_draws += batch.num_units
    assert stats.binomtest(unit_draws, 400 * 40, 0.05).pvalue > 1e-4
    assert sampler.expected_batch_size == pytest.approx(20.0)


def test_unit_sampler_takes_all_examples_of_small_units():
    ids = np.array([0, 0, 1, 2, 2, 2, 2])
    sampler = sampling.PoissonUnitSampler(ids, 1.0, max_per_unit=3, capacity=10, seed=0)
    batch = sampler.sample(0)
    (chunk,) = batch.chunks
    chosen = chunk.indices[chunk.mask]
    assert set(chosen[:3].tolist()) == {0, 1, 2} and len(chosen) == 6
    assert batch.num_units == 3
    with pytest.raises(ValueError, match="capacity"):
        sampling.PoissonUnitSampler(ids, 0.5, max_per_unit=3, capacity=2)
