#!/usr/bin/env bash
# Runs SpatialFlow-GRPO on every host of a Cloud TPU v5p slice (configs/tpu_v5.py).
#
#   launch/tpu_v5.sh setup TPU_NAME ZONE            # once: clone/copy the repo and install on every host
#   launch/tpu_v5.sh train TPU_NAME ZONE WORKDIR [--config.KEY=VALUE ...]
#
# Every host runs the same command; jax discovers the slice (coordinator, process ids) by itself. The
# model folder, the dataset and the prompt cache are paths on each host's disk (configs/tpu_v5.py); the
# workdir must be shared (a GCS-fuse mount or NFS) because process 0 writes metrics and checkpoints go to
# one directory. The judge (reward.url) must be reachable from every host.
set -euo pipefail
usage() { sed -n '2,12p' "$0"; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
repo_dir=${SFGRPO_DIR:-sfgrpo}
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }
case $action in
  setup)
    # The committed tree (git archive: no virtualenv, no workdirs), unpacked and installed on every host.
    archive=$(mktemp -d)/sfgrpo.tar.gz
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all "$archive" "$tpu:sfgrpo.tar.gz"
    ssh_all "mkdir -p $repo_dir && tar -xzf sfgrpo.tar.gz -C $repo_dir && cd $repo_dir && \
      python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[tpu]'"
    ;;
  train)
    [[ $# -ge 1 ]] || usage
    workdir=$1
    shift
    overrides=$(printf ' %q' "$@")
    ssh_all "cd $repo_dir && . .venv/bin/activate && python -m sfgrpo.main --config=configs/tpu_v5.py --workdir=$workdir$overrides"
    ;;
  *) usage ;;
esac
