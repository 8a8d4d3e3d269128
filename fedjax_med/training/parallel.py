"""Data parallelism over a 1-D device mesh (``data`` axis), single- or multi-host.

The global batch is split along its first axis over the mesh; parameters and optimizer state are
replicated; XLA inserts the gradient all-reduce. Every process computes the same global batch
indices (they are a pure function of seed and step) and materialises only its own shards, so the
same code runs on one CPU, one multi-GPU host, or many hosts after
``jax.distributed.initialize()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A ``data`` mesh plus helpers to place batches (sharded) and state (replicated)."""

    mesh: Mesh

    @property
    def size(self) -> int:
        """The number of devices in the mesh."""
        return self.mesh.devices.size

    @property
    def replicated_sharding(self) -> NamedSharding:
        """A sharding that puts a full copy on every device of the mesh."""
        return NamedSharding(self.mesh, P())

    def shard_batch(self, array: np.ndarray) -> jax.Array:
        """Places a global host batch, split along axis 0 over the mesh."""
        sharding = NamedSharding(self.mesh, P("data"))
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def replicate(self, tree: Any) -> Any:
        """``tree`` copied onto every device of the mesh (every process must pass equal values)."""
        # Every process holds the same values (same seed), as device_put requires across hosts.
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def check_batch_size(self, batch_size: int, field: str) -> None:
        """Checks that ``batch_size`` splits evenly over the devices.

        Raises:
          ValueError: ``<field>=<batch_size> must be divisible by the number of devices (...)``.
        """
        if batch_size % self.size:
            raise ValueError(
                f"{field}={batch_size} must be divisible by the number of devices ({self.size}); "
                "set train.num_devices to use fewer devices"
            )


def make_data_parallel(num_devices: int = 0) -> DataParallel:
    """A mesh over the first ``num_devices`` devices (0 = all).

    Raises:
      ValueError: if ``num_devices`` exceeds the available devices.
    """
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(
            f"train.num_devices={num_devices} must be <= the {len(devices)} available devices"
        )
    chosen = devices[: num_devices or len(devices)]
    return DataParallel(Mesh(np.array(chosen), ("data",)))
