#!/usr/bin/env bash
# TPU pod launcher: runs the same training command on every worker of a TPU VM
# slice (jax.distributed initialises itself from the TPU environment).
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- <train flags>
# Example (v5p-256, 7B, a8 phase):
#   launch/tpu_pod.sh my-v5p us-east5-a my-project -- \
#       --config=configs/bitnet_v2_7b.py --workdir=gs://BUCKET/v2_7b_a8 \
#       --config.data.tfds_data_dir=gs://BUCKET/tfds \
#       --config.data.tokenizer=gs://BUCKET/llama.model
# Then the a4 continuation:
#   launch/tpu_pod.sh my-v5p us-east5-a my-project -- \
#       --config=configs/bitnet_v2_7b_a4.py --workdir=gs://BUCKET/v2_7b_a4 \
#       --config.init_from=gs://BUCKET/v2_7b_a8 ...
# Prerequisites on every worker: this repository at $REPO (default
# ~/bitnet_jax) and `pip install -r requirements.txt "jax[tpu]==<same version>"`.
# Pre-emption: the VMs get SIGTERM; the run saves a checkpoint and exits, and
# re-running this command resumes from it.
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE [PROJECT] -- <train flags>}
zone=${2:?usage: $0 TPU_NAME ZONE [PROJECT] -- <train flags>}
shift 2
project_flag=()
if [[ "${1:-}" != "--" && -n "${1:-}" ]]; then project_flag=(--project="$1"); shift; fi
[[ "${1:-}" == "--" ]] && shift
repo=${REPO:-'~/bitnet_jax'}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project_flag[@]}" --worker=all \
  --command="cd ${repo} && python3 -m bitnet_jax.train --distributed=on${args} 2>&1 | tee -a train_\$(hostname).log"
