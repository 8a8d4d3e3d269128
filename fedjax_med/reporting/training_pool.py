"""Training the report's runs in worker processes while the report attacks the finished ones.

Most of a default report's time on a small CPU is XLA compiling programs (each setting trains,
attacks and audits programs of its own), and XLA compiles on one thread. ``report.workers``
spawned processes therefore train the settings' runs ahead, in the report's order, while the
report process attacks each run as soon as it is trained: on 2 cores this keeps both busy.

Every run is the same as one trained in the report process: its config, seed and random streams
do not depend on where it runs, workers compile with the report process's JAX settings
(:data:`INHERITED_JAX_FLAGS`), and a worker writes only its own run folder. With
``report.workers = 0`` the runs are trained in the report process, one when it is needed.
Processes are started with ``spawn`` (JAX's runtime cannot be forked); a failure in a worker
is raised in the report process with the setting's name.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

# JAX settings a worker takes from the process that starts it: how much XLA optimises and where
# the persistent compilation cache lives.
INHERITED_JAX_FLAGS = (
    "jax_disable_most_optimizations",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)

# train(job) -> result; a module-level function, so that a worker can unpickle it.
TrainFn = Callable[[Any], Any]


def _jax_flags() -> dict[str, Any]:
    flags = {}
    for name in INHERITED_JAX_FLAGS:
        try:
            flags[name] = jax.config.read(name)
        except AttributeError:  # a flag with a context manager is read as an attribute
            flags[name] = getattr(jax.config, name)
    return flags


def _init_worker(flags: dict[str, Any]) -> None:
    for name, value in flags.items():
        if value is not None:
            jax.config.update(name, value)


def _timed(train: TrainFn, job: Any) -> tuple[Any, float]:
    tic = time.time()
    return train(job), time.time() - tic


@contextlib.contextmanager
def trained_in_order(
    train: TrainFn, jobs: Sequence[Any], names: Sequence[str], workers: int
) -> Iterator[Iterator[tuple[Any, float]]]:
    """Yields an iterator of ``(train(job), seconds)`` in the order of ``jobs``.

    With ``workers > 0`` every job is submitted at once to that many spawned processes and the
    iterator waits for each in turn; with ``workers == 0`` each job is trained in this process
    when the iterator reaches it. Leaving the block cancels the jobs not yet started.
    """
    if workers == 0:
        yield (_timed(train, job) for job in jobs)
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, max(len(jobs), 1)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(_jax_flags(),),
    )
    try:
        futures = [pool.submit(_timed, train, job) for job in jobs]

        def results():
            for name, future in zip(names, futures, strict=True):
                try:
                    yield future.result()
                except Exception as e:
                    raise RuntimeError(f"training report run '{name}' failed: {e}") from e

        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
