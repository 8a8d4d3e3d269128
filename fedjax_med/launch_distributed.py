"""Multi-host entry point: ``jax.distributed.initialize()`` then ``fedjax-med train``.

Run one process per host (``launch/multihost.sh``). On SLURM and TPU pods JAX detects the
coordinator and process ranks itself; elsewhere set ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Every process loads the same data and computes the
same batch indices; each feeds only its local devices' shards, and process 0 writes the outputs.
"""

from __future__ import annotations

import os
import sys

import jax


def initialize() -> None:
    # Cross-process collectives on CPU hosts go through gloo (accelerators use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()  # SLURM / TPU pod / other auto-detected clusters


def main() -> int:
    initialize()
    print(
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices",
        file=sys.stderr,
    )
    # Imported only after initialize(): nothing may touch a JAX backend before it.
    from fedjax_med.cli import main as cli_main

    return cli_main.main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
