"""Thin wrapper of the built-in config ``segmentation`` (the file under fedjax_med/configs/).

``--config configs/segmentation.py[:ARG]`` and ``--config segmentation[:ARG]``
load the same config.
"""

from fedjax_med.configs.segmentation import get_config

__all__ = ["get_config"]
