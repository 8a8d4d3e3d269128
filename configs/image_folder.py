"""Thin wrapper of the built-in config ``image_folder`` (the file under fedjax_med/configs/).

``--config configs/image_folder.py[:ARG]`` and ``--config image_folder[:ARG]``
load the same config.
"""

from fedjax_med.configs.image_folder import get_config

__all__ = ["get_config"]
