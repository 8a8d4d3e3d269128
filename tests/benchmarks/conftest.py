"""The benchmark tests' fixture: a script of benchmarks/ imported as a module."""

import contextlib
import importlib.util
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


@contextlib.contextmanager
def imported(filename: str):
    """``benchmarks/<filename>`` as a module, registered under its name while in use (dataclasses
    look their module up by name)."""
    name = "bench_" + os.path.splitext(filename)[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


@pytest.fixture(scope="session")
def import_benchmark():
    """:func:`imported`, for module fixtures: ``with import_benchmark("x.py") as module``."""
    return imported
