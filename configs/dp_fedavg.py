"""Thin wrapper of the built-in config ``dp_fedavg`` (the file under fedjax_med/configs/).

``--config configs/dp_fedavg.py[:ARG]`` and ``--config dp_fedavg[:ARG]``
load the same config.
"""

from fedjax_med.configs.dp_fedavg import get_config

__all__ = ["get_config"]
