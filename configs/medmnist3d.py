"""Thin wrapper of the built-in config ``medmnist3d`` (the file under fedjax_med/configs/).

``--config configs/medmnist3d.py[:ARG]`` and ``--config medmnist3d[:ARG]``
load the same config.
"""

from fedjax_med.configs.medmnist3d import get_config

__all__ = ["get_config"]
