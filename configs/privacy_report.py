"""Thin wrapper of the built-in config ``privacy_report`` (the file under fedjax_med/configs/).

``--config configs/privacy_report.py[:ARG]`` and ``--config privacy_report[:ARG]``
load the same config.
"""

from fedjax_med.configs.privacy_report import get_config

__all__ = ["get_config"]
