"""Thin wrapper of the built-in config ``poisoning`` (the file under fedjax_med/configs/).

``--config configs/poisoning.py[:ARG]`` and ``--config poisoning[:ARG]``
load the same config.
"""

from fedjax_med.configs.poisoning import get_config

__all__ = ["get_config"]
