"""The optional Flower dependency, imported on first use with the command that installs it."""

from __future__ import annotations

import functools
import importlib
import types

INSTALL = "pip install 'fedjax_med[deploy]'"


def require() -> types.SimpleNamespace:
    """``flwr``'s ``app``, ``clientapp`` and ``serverapp`` modules.

    Raises:
      ImportError: naming the install command when ``flwr`` is missing.
    """
    try:
        app = importlib.import_module("flwr.app")
        clientapp = importlib.import_module("flwr.clientapp")
        serverapp = importlib.import_module("flwr.serverapp")
    except ImportError as e:
        raise ImportError(
            f"deployment needs Flower (flwr>=1.42): {INSTALL}"
        ) from e
    return types.SimpleNamespace(app=app, clientapp=clientapp, serverapp=serverapp)


# Flower 1.42 retries an object of a message that is not stored yet after 1 s, doubling up to
# 10 s; its SuperNode announces a message before it has stored the message's objects (and the
# SuperLink a reply before the SuperNode has pushed them), so a message commonly waits a whole
# second for nothing. Retries here start after 0.05 s and wait at most 1 s.
PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 1.0}


def quick_object_pulls(module_name: str, function: str) -> bool:
    """Makes Flower's ``module_name.function`` (``pull_objects`` or
    ``pull_and_inflate_object_from_tree``) retry with :data:`PULL_BACKOFF`; whether it could.

    The module's own reference is replaced (the function's defaults are bound at import), for
    this process only; nothing else about the pull changes (its tries and time limits stay).
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    original = getattr(module, function, None)
    if original is None:
        return False
    if isinstance(original, functools.partial):  # already done
        return True
    setattr(module, function, functools.partial(original, **PULL_BACKOFF))
    return True

