#!/usr/bin/env bash
# Local multi-process launcher: N processes on this machine form one
# jax.distributed run on CPU (gloo collectives), each with its own devices,
# its own share of the data, and one shared workdir. Used by the tests; also
# the quickest way to exercise multi-host code paths without a cluster.
#
# Usage:
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- <train flags>
# Example:
#   launch/local_multiprocess.sh 2 2 -- --config=configs/tiny.py --workdir=/tmp/mp \
#       --config.train.stop_step=20
# Logs are prefixed [p0], [p1], ...; the exit status is non-zero if any
# process failed. PORT overrides the coordinator port; PYTHON the interpreter.
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- <train flags>}
per=${2:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- <train flags>}
shift 2
[[ "${1:-}" == "--" ]] && shift
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python3}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${per}" \
    "$python" -m bitnet_jax.train --distributed=on \
    --coordinator_address="localhost:${port}" --num_processes="$n" \
    --process_id="$i" "$@" 2>&1 | sed -u "s/^/[p${i}] /" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status
