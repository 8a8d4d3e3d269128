"""Thin wrapper of the built-in config ``quickstart`` (the file under fedjax_med/configs/).

``--config configs/quickstart.py[:ARG]`` and ``--config quickstart[:ARG]``
load the same config.
"""

from fedjax_med.configs.quickstart import get_config

__all__ = ["get_config"]
