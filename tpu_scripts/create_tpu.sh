#!/usr/bin/env bash
# Create a TPU VM (or pod slice). Usage: tpu_scripts/create_tpu.sh NAME ZONE ACCELERATOR [VERSION]
#   e.g. tpu_scripts/create_tpu.sh fot-v4-32 us-central2-b v4-32 tpu-ubuntu2204-base
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}; accel=${3:?accelerator type, e.g. v4-8}; version=${4:-tpu-ubuntu2204-base}
gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" --version="$version"
