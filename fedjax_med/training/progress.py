"""Progress of a training loop: a tqdm bar on a terminal, a log line every N updates elsewhere.

In CI, under ``nohup`` or SLURM, stderr is a file and tqdm would write a line per update (thousands
for a long run). There the same calls log ``step 120/400 (30%) loss=0.52 ex_s=810`` once every
``interval`` updates and at the end, with ``interval = max(every, ceil(total / MAX_LINES))``: at
most about :data:`MAX_LINES` progress lines, however long the run.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, TextIO

import tqdm

logger = logging.getLogger(__name__)

MAX_LINES = 20


class LogProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, written as occasional log lines.

    Examples:
      >>> bar = LogProgress(total=100, initial=0, unit="step", every=1)
      >>> bar.interval
      5
    """

    def __init__(self, total: int, initial: int, unit: str, every: int):
        self.total, self.n, self.unit = total, initial, unit
        self.interval = max(1, every, math.ceil(total / MAX_LINES))
        self.postfix: dict[str, Any] = {}
        self.start, self.start_n = time.perf_counter(), initial

    def set_postfix(self, **values: Any) -> None:
        """Values shown with the next line (the latest of each key)."""
        self.postfix = values

    def update(self, n: int = 1) -> None:
        """Advances by ``n``; logs a line when it crosses a multiple of the interval or the end."""
        before, self.n = self.n, self.n + n
        if self.n // self.interval > before // self.interval or self.n == self.total:
            self._log()

    def _log(self) -> None:
        rate = (self.n - self.start_n) / max(time.perf_counter() - self.start, 1e-9)
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        percent = 100 * self.n / max(self.total, 1)
        logger.info(
            "%s %d/%d (%.0f%%)%s, %.2f %ss/s",
            self.unit,
            self.n,
            self.total,
            percent,
            extra,
            rate,
            self.unit,
        )

    def close(self) -> None:
        """Nothing to close (tqdm's bar needs it)."""


def progress_bar(
    total: int, initial: int, unit: str, quiet: bool, every: int = 1, stream: TextIO | None = None
):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`LogProgress`.

    Args:
      total: updates in the whole run; ``initial``: those already done (a resumed run).
      unit: ``"step"`` or ``"round"``.
      quiet: no bar and no lines.
      every: the loop's own logging interval (``train.log_every``); lines are never denser.
    """
    stream = sys.stderr if stream is None else stream
    if quiet or stream.isatty():
        return tqdm.tqdm(total=total, initial=initial, disable=quiet, file=stream, unit=unit)
    return LogProgress(total, initial, unit, every)
