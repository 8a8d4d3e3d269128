"""The optional Flower dependency, imported on first use with the command that installs it."""

from __future__ import annotations

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
