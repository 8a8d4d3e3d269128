"""Cohort samplers: seeded and stateless by round, Poisson capacity and honest overflow."""

import numpy as np
import pytest
from scipy import stats

from fedjax_med.federated import sampling


def test_uniform_sampler_is_distinct_reproducible_and_varies_by_round():
    sampler = sampling.UniformSampler(num_clients=20, cohort_size=6, seed=1)
    a, b = sampler.sample(3), sampler.sample(3)
    assert np.array_equal(a.indices, b.indices) and a.mask.all()
    assert len(set(a.indices.tolist())) == 6
    assert any(not np.array_equal(a.indices, sampler.sample(r).indices) for r in range(4, 8))
    other_seed = sampling.UniformSampler(num_clients=20, cohort_size=6, seed=2)
    assert not np.array_equal(a.indices, other_seed.sample(3).indices)
    with pytest.raises(ValueError, match="cohort_size"):
        sampling.UniformSampler(num_clients=3, cohort_size=4, seed=0)


def test_poisson_sampler_rate_and_fixed_capacity():
    sampler = sampling.PoissonCohortSampler(num_clients=200, rate=0.05, seed=0)
    assert sampler.capacity == sampling.poisson_capacity(200, 0.05)
    counts = np.zeros(200)
    sizes = []
    for r in range(400):
        cohort = sampler.sample(r)
        assert cohort.capacity == sampler.capacity  # never overflowed at this tail
        assert not cohort.mask[cohort.num_sampled :].any()
        counts[cohort.sampled()] += 1
        sizes.append(cohort.num_sampled)
    # Every client is included in about q of the rounds; cohort sizes are Binomial(K, q).
    assert abs(counts.mean() / 400 - 0.05) < 0.005
    assert abs(np.mean(sizes) - 10) < 0.5


def test_poisson_capacity_is_the_binomial_tail():
    cap = sampling.poisson_capacity(500, 0.02, overflow_prob=1e-4)
    assert stats.binom.sf(cap, 500, 0.02) <= 1e-4 < stats.binom.sf(cap - 1, 500, 0.02)


def test_overflow_adds_whole_blocks_and_keeps_every_sampled_client():
    sampler = sampling.PoissonCohortSampler(num_clients=50, rate=0.5, seed=0, capacity=4)
    cohort = sampler.sample(0)
    expected = np.flatnonzero(np.random.default_rng([0, 0]).random(50) < 0.5)
    assert cohort.num_sampled == expected.size > 4
    assert cohort.capacity % 4 == 0 and cohort.capacity >= expected.size
    assert np.array_equal(cohort.sampled(), expected)


def test_empty_poisson_round_is_all_padding():
    cohort = sampling.padded_cohort(np.array([], np.int64), 3)
    assert cohort.capacity == 3 and cohort.num_sampled == 0


def test_secure_cohorts_are_not_the_seeds_cohorts():
    # The attack: recompute round t's cohort as default_rng([seed, t]) from the published seed
    # and read off which rounds a client was in (known cohorts: epsilon 15-20 instead of 8.5).
    from fedjax_med import randomness

    public = sampling.PoissonCohortSampler(num_clients=200, rate=0.2, seed=0)
    secret = sampling.PoissonCohortSampler(
        num_clients=200, rate=0.2, seed=0, randomness=randomness.Randomness("secure", 0)
    )
    for round_num in range(3):
        assert not np.array_equal(
            public.sample(round_num).sampled(), secret.sample(round_num).sampled()
        )
    # Still Poisson at rate q: the mean cohort over rounds is q K.
    sizes = [secret.sample(t).num_sampled for t in range(200)]
    assert abs(np.mean(sizes) - 40) < 4 * np.sqrt(200 * 0.2 * 0.8 / 200)
