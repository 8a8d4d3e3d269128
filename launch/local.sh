#!/usr/bin/env bash
# Run a config on this machine (CPU or whatever accelerators JAX finds).
#   launch/local.sh configs/quickstart.py runs/quickstart [--config.FIELD=VALUE ...]
set -euo pipefail
CONFIG=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec fedjax-med train --config "$CONFIG" --workdir "$WORKDIR" "$@"
