"""Thin wrapper of the built-in config ``fedprox_noniid`` (the file under fedjax_med/configs/).

``--config configs/fedprox_noniid.py[:ARG]`` and ``--config fedprox_noniid[:ARG]``
load the same config.
"""

from fedjax_med.configs.fedprox_noniid import get_config

__all__ = ["get_config"]
