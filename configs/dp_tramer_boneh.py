"""Thin wrapper of the built-in config ``dp_tramer_boneh`` (the file under fedjax_med/configs/).

``--config configs/dp_tramer_boneh.py[:ARG]`` and ``--config dp_tramer_boneh[:ARG]``
load the same config.
"""

from fedjax_med.configs.dp_tramer_boneh import get_config

__all__ = ["get_config"]
