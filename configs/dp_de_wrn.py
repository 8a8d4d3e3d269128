"""Thin wrapper of the built-in config ``dp_de_wrn`` (the file under fedjax_med/configs/).

``--config configs/dp_de_wrn.py[:ARG]`` and ``--config dp_de_wrn[:ARG]``
load the same config.
"""

from fedjax_med.configs.dp_de_wrn import get_config

__all__ = ["get_config"]
