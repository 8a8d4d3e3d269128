"""Thin wrapper of the built-in config ``dp_sgd`` (the file under fedjax_med/configs/).

``--config configs/dp_sgd.py[:ARG]`` and ``--config dp_sgd[:ARG]``
load the same config.
"""

from fedjax_med.configs.dp_sgd import get_config

__all__ = ["get_config"]
