"""Thin wrapper of the built-in config ``tfds_patch_camelyon`` (the file under fedjax_med/configs/).

``--config configs/tfds_patch_camelyon.py[:ARG]`` and ``--config tfds_patch_camelyon[:ARG]``
load the same config.
"""

from fedjax_med.configs.tfds_patch_camelyon import get_config

__all__ = ["get_config"]
