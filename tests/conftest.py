"""Test setup: CPU only, several fake devices for sharding tests, quiet logs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()

import tempfile  # noqa: E402

import jax  # noqa: E402

# Several tests build the same small programs in fresh closures; a persistent compilation cache
# lets the second build of an identical program skip XLA compilation.
jax.config.update(
    "jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "fedjax_med_test_jax_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The longest modules first (measured with --durations): under ``-n 2 --dist loadfile`` a
# module runs whole on one worker, so a long one scheduled last leaves the other worker idle.
LONGEST_FIRST = (
    "tests/reporting/privacy_report_test.py",
    "tests/deploy/loopback_test.py",
    "tests/trainers/federated_test.py",
    "tests/reporting/segmentation_report_test.py",
    "tests/trainers/dp_sgd_test.py",
    "tests/packaging/wheel_test.py",
    "tests/docs/readme_test.py",
    "tests/attacks/segmentation_attacks_test.py",
    "tests/config/field_coverage_test.py",
    "tests/federated/secure_rounds_test.py",
)


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every other module keeps its order
