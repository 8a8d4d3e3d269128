"""The report's training pool: the same results as training here, in order, failures named."""

import contextlib
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_med.reporting import training_pool


def _draw(job):
    """A job's result: where it ran, the XLA setting it compiled under, and a seeded draw."""
    seed, fail = job
    if fail:
        raise ValueError(f"job {seed} is bad")
    sample = jax.jit(lambda k: jax.random.normal(k, (4,)))(jax.random.key(seed))
    return os.getpid(), bool(jax.config.read("jax_disable_most_optimizations")), np.asarray(sample)


@contextlib.contextmanager
def _importable_by_workers():
    """Puts the checkout on ``sys.path`` so that spawned workers can unpickle :func:`_draw`.

    A spawned process imports a pickled function's module by name (``tests.reporting.
    training_pool_test``), from the ``sys.path`` of the process that starts it; pytest's
    importlib mode does not put the checkout there.
    """
    root = str(Path(__file__).resolve().parents[2])
    sys.path.insert(0, root)
    try:
        yield
    finally:
        sys.path.remove(root)


def _collect(jobs, workers):
    """``(results before the first failure, that failure or None)``."""
    names = [f"setting_{seed}" for seed, _ in jobs]
    results = []
    with _importable_by_workers(), training_pool.trained_in_order(
        _draw, jobs, names, workers
    ) as trained:
        try:
            for result, _ in trained:
                results.append(result)
        except Exception as e:
            return results, e
    return results, None


@pytest.fixture(scope="module")
def pooled():
    """Jobs run by two workers and here, both under this process's flipped XLA setting."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", not previous)
    try:
        jobs = [(seed, False) for seed in range(3)] + [(3, True)]
        (results, error), (inline, _) = _collect(jobs, workers=2), _collect(jobs, workers=0)
        return results, inline, error, not previous
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def test_workers_give_the_same_results_in_the_order_of_the_jobs(pooled):
    results, inline, _, _ = pooled
    for (_, _, a), (_, _, b) in zip(results, inline, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len({tuple(r[2]) for r in results}) == 3  # each job its own seed, in job order


def test_workers_are_other_processes_that_compile_as_this_one(pooled):
    results, _, _, flag = pooled
    assert all(pid != os.getpid() for pid, _, _ in results)
    assert all(compiled_flag == flag for _, compiled_flag, _ in results)


def test_without_workers_each_job_runs_here_when_it_is_reached():
    names = ["a", "b"]
    with training_pool.trained_in_order(_draw, [(0, False), (1, True)], names, 0) as trained:
        (pid, _, _), _ = next(trained)
        assert pid == os.getpid()
        with pytest.raises(ValueError, match="job 1 is bad"):
            next(trained)


def test_a_failing_worker_job_is_raised_with_the_setting_name(pooled):
    results, _, error, _ = pooled
    assert len(results) == 3
    assert isinstance(error, RuntimeError)
    assert "report run 'setting_3' failed: job 3 is bad" in str(error)
