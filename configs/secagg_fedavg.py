"""Thin wrapper of the built-in config ``secagg_fedavg`` (the file under fedjax_med/configs/).

``--config configs/secagg_fedavg.py[:ARG]`` and ``--config secagg_fedavg[:ARG]``
load the same config.
"""

from fedjax_med.configs.secagg_fedavg import get_config

__all__ = ["get_config"]
