#!/usr/bin/env bash
# Runs SpatialFlow-GRPO on GPU hosts (configs/gpu.py): start this script once on every host, each with its
# own rank. One process per host drives all of its GPUs.
#
#   COORDINATOR=host0:1234 NUM_HOSTS=2 HOST_RANK=0 launch/gpu_multinode.sh WORKDIR [--config.KEY=VALUE ...]
#   COORDINATOR=host0:1234 NUM_HOSTS=2 HOST_RANK=1 launch/gpu_multinode.sh WORKDIR [--config.KEY=VALUE ...]
#
# Under SLURM, leave COORDINATOR/NUM_HOSTS/HOST_RANK unset and srun one task per node: jax reads SLURM's
# variables itself. Install once per host with: pip install -e '.[cuda]'. The workdir must be shared.
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,10p' "$0"; exit 2; }
workdir=$1
shift
cd "$(dirname "$0")/.."
args=(--config=configs/gpu.py --workdir="$workdir")
if [[ -n ${COORDINATOR:-} ]]; then
  : "${NUM_HOSTS:?set NUM_HOSTS with COORDINATOR}" "${HOST_RANK:?set HOST_RANK with COORDINATOR}"
  args+=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_HOSTS" --process_id="$HOST_RANK")
fi
exec python -m sfgrpo.main "${args[@]}" "$@"
