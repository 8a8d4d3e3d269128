#!/usr/bin/env bash
# Run a config on one accelerator host, using every local GPU/TPU device JAX sees.
#   pip install -e ".[cuda12]"     # once, on a CUDA 12 host (or ".[tpu]" on a TPU VM)
#   launch/gpu.sh configs/quickstart.py runs/gpu_quickstart [--config.FIELD=VALUE ...]
set -euo pipefail
CONFIG=${1:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
# Let XLA take memory as needed instead of preallocating 75% (friendlier on shared hosts).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
python -c "import jax; print('devices:', jax.devices())"
exec fedjax-med train --config "$CONFIG" --workdir "$WORKDIR" "$@"
