"""Thin wrapper of the built-in config ``medmnist`` (the file under fedjax_med/configs/).

``--config configs/medmnist.py[:ARG]`` and ``--config medmnist[:ARG]``
load the same config.
"""

from fedjax_med.configs.medmnist import get_config

__all__ = ["get_config"]
