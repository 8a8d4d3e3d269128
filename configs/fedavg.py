"""Thin wrapper of the built-in config ``fedavg`` (the file under fedjax_med/configs/).

``--config configs/fedavg.py[:ARG]`` and ``--config fedavg[:ARG]``
load the same config.
"""

from fedjax_med.configs.fedavg import get_config

__all__ = ["get_config"]
