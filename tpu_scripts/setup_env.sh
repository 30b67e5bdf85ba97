#!/usr/bin/env bash
# Install fot on every worker: clones/copies must already be at ~/fot. Usage: tpu_scripts/setup_env.sh NAME ZONE
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}
tpu_scripts/run_all_workers.sh "$name" "$zone" \
  'cd ~/fot && python3 -m venv .venv && .venv/bin/pip install -q -e ".[tpu,data]"'
