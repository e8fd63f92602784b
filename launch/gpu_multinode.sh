#!/usr/bin/env bash
# Runs SpatialFlow-GRPO on GPU hosts (configs/gpu.py, or the config file SFGRPO_CONFIG names, e.g.
# configs/omnigen2_gpu.py): start this script once on every host, each with its own rank. One process per
# host drives all of its GPUs.
#
#   COORDINATOR=host0:1234 NUM_HOSTS=2 HOST_RANK=0 launch/gpu_multinode.sh WORKDIR [--config.KEY=VALUE ...]
#   COORDINATOR=host0:1234 NUM_HOSTS=2 HOST_RANK=1 launch/gpu_multinode.sh WORKDIR [--config.KEY=VALUE ...]
#   DRY_RUN=1 COORDINATOR=... launch/gpu_multinode.sh WORKDIR ...   # print this host's command, run nothing
#
# COORDINATOR is host:port of the HOST_RANK=0 host, reachable from every host; NUM_HOSTS >= 1 and HOST_RANK
# in [0, NUM_HOSTS) go with it. Under SLURM, leave COORDINATOR/NUM_HOSTS/HOST_RANK unset and srun one task
# per node: jax reads SLURM's variables itself. Install once per host with: pip install -e '.[cuda]'. The
# workdir must be shared; a relative WORKDIR is taken from the current directory.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
die() { printf '%s: %s\n' "${0##*/}" "$*" >&2; exit 2; }

# One word for a shell: bare when it is safe, else single-quoted; control characters (a newline) as
# bash's $'...' so that a printed command stays on one line.
q() {
  if [[ $1 =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 == *[[:cntrl:]]* ]]; then
    printf '%q' "$1"
  else
    printf "'%s'" "${1//\'/"'\\''"}"
  fi
}

case ${DRY_RUN:-0} in
  0) dry_run=0 ;;
  1) dry_run=1 ;;
  *) die "DRY_RUN must be 1 (print the command, run nothing) or 0, got '$DRY_RUN'" ;;
esac
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case $1 in -h | --help) usage; exit 0 ;; esac
workdir=$1
shift
[[ -n $workdir ]] || die "WORKDIR is empty"
[[ $workdir != -* ]] || die "WORKDIR '$workdir' looks like an option: give the workdir before the overrides"
[[ $workdir == /* ]] || workdir=$PWD/$workdir

is_count() { [[ $1 =~ ^(0|[1-9][0-9]{0,8})$ ]]; }
config=${SFGRPO_CONFIG:-configs/gpu.py}
[[ $config =~ ^configs/[A-Za-z0-9_]+\.py$ ]] ||
  die "SFGRPO_CONFIG '$config' must be a file of the repository's configs/ (configs/NAME.py)"
root=$(CDPATH="" cd -- "$(dirname -- "$0")/.." && pwd)
[[ -f $root/$config ]] || die "SFGRPO_CONFIG '$config': no such file in $root"
args=("--config=$config" "--workdir=$workdir")
if [[ -n ${COORDINATOR:-} ]]; then
  port=
  [[ $COORDINATOR =~ ^[^[:space:]]+:([0-9]{1,5})$ ]] && port=$((10#${BASH_REMATCH[1]}))
  ((port >= 1 && port <= 65535)) ||
    die "COORDINATOR must be host:port (the HOST_RANK=0 host), got '$COORDINATOR'"
  [[ -n ${NUM_HOSTS:-} ]] || die "COORDINATOR is set but NUM_HOSTS is not: set NUM_HOSTS (the number of hosts)"
  [[ -n ${HOST_RANK:-} ]] || die "COORDINATOR is set but HOST_RANK is not: set HOST_RANK (0 to NUM_HOSTS-1)"
  # is_count first: bash arithmetic on an unchecked string would evaluate it.
  if ! is_count "$NUM_HOSTS" || ((NUM_HOSTS < 1)); then
    die "NUM_HOSTS must be an integer >= 1, got '$NUM_HOSTS'"
  fi
  if ! is_count "$HOST_RANK" || ((HOST_RANK >= NUM_HOSTS)); then
    die "HOST_RANK must be an integer in [0, NUM_HOSTS=$NUM_HOSTS), got '$HOST_RANK'"
  fi
  args+=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_HOSTS" --process_id="$HOST_RANK")
  where="This host, rank $HOST_RANK of $NUM_HOSTS (coordinator $COORDINATOR)"
else
  for name in NUM_HOSTS HOST_RANK; do
    [[ -z ${!name:-} ]] || die "$name is set but COORDINATOR is not: set COORDINATOR=host:port of rank 0 too"
  done
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    where="Under SLURM (job $SLURM_JOB_ID, task ${SLURM_PROCID:-?} of ${SLURM_NTASKS:-?}), jax reads SLURM's"
    where+=" variables for the coordinator, the number of processes and this one's id; this task"
  else
    where="No COORDINATOR and not under SLURM: jax looks for a cluster it knows, else one process; this host"
  fi
fi

root=$(CDPATH="" cd -- "$(dirname -- "$0")/.." && pwd)
if ((dry_run)); then
  echo "# DRY_RUN=1: nothing was run. $where would run:"
  line="cd $(q "$root") &&"
  for arg in python -m sfgrpo.main "${args[@]}" "$@"; do line+=" $(q "$arg")"; done
  printf '%s\n' "$line"
  exit 0
fi
cd "$root"
exec python -m sfgrpo.main "${args[@]}" "$@"
