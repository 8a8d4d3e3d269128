"""Flower's SuperNode (``flower-supernode``) checking for messages every ``--poll`` seconds.

``python -m fedjax_med.deploy.supernode --poll=0.5 ARGS...`` runs Flower's own
``flower-supernode ARGS...`` in this process. Flower 1.42's SuperNode waits 3 s after each check
that found no message (and 0.5 s between checks for a reply of its ClientApp); with a small model
a round then costs seconds of waiting for nothing. ``--poll`` caps those waits (Flower's own
behaviour with ``--poll=3``); the price is one more small HTTPS request per ``--poll`` seconds
from each hospital to the server while it idles. Its retries of a message's objects start after
0.05 s, not 1 s (:func:`fedjax_med.deploy.flower.quick_object_pulls`).
"""

from __future__ import annotations

import sys
import time
import types


class _CappedSleep(types.ModuleType):
    """The ``time`` module with ``sleep(s)`` capped at ``poll`` seconds."""

    def __init__(self, poll: float):
        super().__init__("time")
        self._poll = poll

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._poll))


def parse_poll(argv: list[str]) -> tuple[float, list[str]]:
    """``(poll, the remaining arguments)`` of ``[--poll=S] ARGS...``.

    Examples:
      >>> parse_poll(["--poll=0.2", "--insecure"])
      (0.2, ['--insecure'])
      >>> parse_poll(["--insecure"])
      (3.0, ['--insecure'])
    """
    poll, rest = 3.0, list(argv)
    if rest and rest[0].startswith("--poll="):
        poll = float(rest.pop(0).split("=", 1)[1])
    if not 0 < poll <= 3:
        raise ValueError(f"--poll={poll} must be in (0, 3] seconds")
    return poll, rest


def main(argv: list[str]) -> None:
    poll, rest = parse_poll(argv)
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedjax_med.deploy import flower

    if start_client_internal.time is not time:
        raise ImportError("this Flower's SuperNode does not wait with time.sleep: use --poll=3")
    start_client_internal.time = _CappedSleep(poll)
    flower.quick_object_pulls(start_client_internal.__name__, "pull_objects")
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
