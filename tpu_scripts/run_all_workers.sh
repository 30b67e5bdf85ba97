#!/usr/bin/env bash
# Run the same command on every worker of a TPU VM / pod slice (JAX multi-host needs all hosts to run it).
# Usage: tpu_scripts/run_all_workers.sh NAME ZONE 'cd fot && .venv/bin/python -m fot.train --gin_file=... --workdir=gs://...'
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}; cmd=${3:?command}
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$cmd"
