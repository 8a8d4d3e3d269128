#!/usr/bin/env bash
# Multi-host launch: one process per host, joined with jax.distributed.initialize().
#
# SLURM (one task per node; JAX reads the coordinator and ranks from SLURM's variables):
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
#       --wrap "srun launch/multihost.sh configs/quickstart.py runs/mh"
# TPU pod slice (run on every worker; JAX finds the pod's topology itself):
#   gcloud compute tpus tpu-vm ssh NAME --worker=all \
#       --command "cd fedjax_med && launch/multihost.sh configs/quickstart.py runs/mh"
# Plain processes (e.g. two hosts, or two processes on one machine for testing):
#   JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 launch/multihost.sh ...
#   JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 launch/multihost.sh ...
set -euo pipefail
CONFIG=${1:?usage: launch/multihost.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: launch/multihost.sh CONFIG WORKDIR [overrides...]}
shift 2
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m fedjax_med.launch_distributed --config "$CONFIG" --workdir "$WORKDIR" "$@"
