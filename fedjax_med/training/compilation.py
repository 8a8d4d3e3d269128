"""How much XLA optimises what it compiles, for runs where compiling is most of the time.

A seconds-long smoke run (the privacy report's ``:tiny`` variant) spends most of its time in
XLA's optimisation passes over programs that then run for a few steps; skipping them
(``jax_disable_most_optimizations``) roughly halves such a run's wall time and changes results
only by floating-point reassociation. Long runs keep the optimisations: their programs run for
far longer than they take to compile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_FLAG = "jax_disable_most_optimizations"


@contextlib.contextmanager
def xla_optimizations(enabled: bool) -> Iterator[None]:
    """Compiles with (``enabled``) or without XLA's optimisation passes inside the block.

    The previous setting is restored on exit, also after an exception.
    """
    previous = bool(jax.config.read(_FLAG))
    jax.config.update(_FLAG, not enabled)
    try:
        yield
    finally:
        jax.config.update(_FLAG, previous)
