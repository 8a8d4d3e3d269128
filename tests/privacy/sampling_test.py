"""Samplers: Poisson rates, no truncation on overflow, patient caps, determinism by step."""

import collections

import jax
import jax.numpy as jnp
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


# ---- device-side draws -------------------------------------------------------------------------


def test_device_poisson_rows_have_rate_q_and_only_real_rows():
    mask = jnp.arange(100) < 80
    keys = jax.random.split(jax.random.key(5), 400)
    order, realised = jax.vmap(lambda k: sampling.poisson_rows(k, mask, 0.25))(keys)
    realised = np.asarray(realised)
    # Binomial(80, 0.25): mean 20; the mean of 400 draws has sd ~0.19.
    assert abs(realised.mean() - 20.0) < 1.0
    assert realised.var() == pytest.approx(80 * 0.25 * 0.75, rel=0.2)
    for row, count in zip(np.asarray(order)[:50], realised[:50], strict=True):
        assert (row[:count] < 80).all() and len(set(row.tolist())) == 100


def test_device_unit_draw_samples_units_at_rate_q_whatever_their_size():
    # Unit 0 has 5 rows, unit 1 one row, unit 2 three rows; two padding rows.
    unit_ids = jnp.array([0, 0, 1, 0, 2, 0, 2, 2, 0, -1, -1])
    keys = jax.random.split(jax.random.key(1), 3000)
    draws = jax.vmap(lambda k: sampling.poisson_unit_rows(k, unit_ids, 0.3, 2))(keys)
    rows, order, realised = (np.asarray(x) for x in draws[:3])
    assert (np.asarray(draws.num_units) == 3).all()
    sampled = np.zeros((3000, 3), bool)
    for t in range(3000):
        sampled[t, order[t, : realised[t]]] = True
    # Each unit enters with probability 0.3 (sd of the frequency ~0.008), independently.
    np.testing.assert_allclose(sampled.mean(0), 0.3, atol=0.03)
    assert abs(np.corrcoef(sampled[:, 0], sampled[:, 2])[0, 1]) < 0.06
    # At most k = 2 rows per unit, all distinct and of that unit; small units give all rows.
    ids = np.asarray(unit_ids)
    for t in range(200):
        for u, size in ((0, 5), (1, 1), (2, 3)):
            chosen = rows[t, u][rows[t, u] >= 0]
            assert len(chosen) == min(2, size) and len(set(chosen.tolist())) == len(chosen)
            assert (ids[chosen] == u).all()
    assert (rows[:, 3:] == -1).all()  # ids with no rows have no rows
    # The k rows of the 5-row unit are uniform: each row chosen with probability 2 / 5.
    members = np.flatnonzero(ids == 0)
    freq = [(rows[:, 0] == j).any(axis=1).mean() for j in members]
    np.testing.assert_allclose(freq, 0.4, atol=0.04)


def test_sum_over_chunks_never_truncates_and_equals_one_shot_sum():
    values = jnp.arange(1.0, 41.0)
    order = jax.random.permutation(jax.random.key(0), 40)

    def chunk(items, real):
        return {"s": jnp.sum(jnp.where(real, values[items], 0.0)), "n": jnp.sum(real)}

    for realised, capacity in ((40, 7), (13, 13), (14, 13), (0, 5)):
        got = jax.jit(lambda r, c=capacity: sampling.sum_over_chunks(chunk, order, r, c))(realised)
        assert int(got["n"]) == realised
        assert float(got["s"]) == pytest.approx(float(values[order[:realised]].sum()))


def test_device_argument_checks_name_the_argument():
    with pytest.raises(ValueError, match="max_per_unit"):
        sampling.poisson_unit_rows(jax.random.key(0), jnp.zeros(3, jnp.int32), 0.5, 0)
    with pytest.raises(ValueError, match="capacity"):
        sampling.sum_over_chunks(lambda i, r: 0, jnp.arange(3), 3, 0)
    with pytest.raises(ValueError, match="expected_batch"):
        sampling.poisson_chunk_size(0)
