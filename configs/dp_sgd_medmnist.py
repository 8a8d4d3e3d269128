"""Thin wrapper of the built-in config ``dp_sgd_medmnist`` (the file under fedjax_med/configs/).

``--config configs/dp_sgd_medmnist.py[:ARG]`` and ``--config dp_sgd_medmnist[:ARG]``
load the same config.
"""

from fedjax_med.configs.dp_sgd_medmnist import get_config

__all__ = ["get_config"]
