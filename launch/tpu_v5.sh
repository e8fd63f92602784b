#!/usr/bin/env bash
# Runs SpatialFlow-GRPO on every host of a Cloud TPU v5p slice (configs/tpu_v5.py, or the config file
# SFGRPO_CONFIG names, e.g. configs/omnigen2_tpu_v5.py).
#
#   launch/tpu_v5.sh setup TPU_NAME ZONE            # once: copy the committed tree to every host, install it
#   launch/tpu_v5.sh train TPU_NAME ZONE WORKDIR [--config.KEY=VALUE ...]
#   DRY_RUN=1 launch/tpu_v5.sh train ...            # print the commands (gcloud's, and the one every worker
#                                                   # would run), shell-quoted; run nothing
#
# Every host runs the same command; jax discovers the slice (coordinator, process ids) by itself. The
# model folder, the dataset and the prompt cache are paths on each host's disk (configs/tpu_v5.py). WORKDIR
# must be an absolute path to one shared directory (a GCS-fuse mount or NFS, the same path on every host)
# because process 0 writes metrics and checkpoints go to one directory. The judge (reward.url) must be
# reachable from every host. SFGRPO_DIR (default: sfgrpo) is the repository's directory on each host,
# relative to the home directory. setup ships the committed tree (HEAD), not uncommitted changes.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
die() { printf '%s: %s\n' "${0##*/}" "$*" >&2; exit 2; }

# One word for a POSIX shell (the remote login shell): bare when it is safe, else single-quoted.
q() {
  if [[ $1 =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/"'\\''"}"
  fi
}
# A command line to print: words as q() quotes them, control characters (a newline) as bash's $'...' so
# the line stays one line; the dry run's placeholder for the archive path as "$archive".
qline() {
  local word words=()
  for word; do
    # shellcheck disable=SC2016
    if [[ $word == '$archive' ]]; then
      words+=('"$archive"')
    elif [[ $word == *[[:cntrl:]]* ]]; then
      words+=("$(printf '%q' "$word")")
    else
      words+=("$(q "$word")")
    fi
  done
  local IFS=' '
  printf '%s\n' "${words[*]}"
}

case ${DRY_RUN:-0} in
  0) dry_run=0 ;;
  1) dry_run=1 ;;
  *) die "DRY_RUN must be 1 (print the commands, run nothing) or 0, got '$DRY_RUN'" ;;
esac
run() { if ((dry_run)); then qline "$@"; else "$@"; fi; }
# A remote command as a comment: what every worker's shell runs, before gcloud's quoting.
say_remote() { ((dry_run)) && printf '# on every worker of TPU %s: %s\n' "$tpu" "${1//$'\n'/$'\n# '}"; return 0; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
action=$1
case $action in
  -h | --help) usage; exit 0 ;;
  setup) [[ $# -ge 3 ]] || { usage >&2; exit 2; }
    [[ $# -eq 3 ]] || die "setup takes TPU_NAME ZONE only; unexpected: ${*:4}" ;;
  train) [[ $# -ge 4 ]] || { usage >&2; exit 2; } ;;
  *) die "unknown action '$action' (setup or train)" ;;
esac
tpu=$2 zone=$3
shift 3
[[ -n $tpu && $tpu != -* ]] || die "TPU_NAME '$tpu' is not a TPU name (the second argument)"
[[ -n $zone && $zone != -* ]] || die "ZONE '$zone' is not a zone (the third argument)"
repo_dir=${SFGRPO_DIR:-sfgrpo}
[[ $repo_dir != -* && $repo_dir != '~'* ]] ||
  die "SFGRPO_DIR '$repo_dir' must be a path relative to the home directory (or absolute), not starting with - or ~"
rdir=$(q "$repo_dir")
ssh_all() { run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }
if ((dry_run)); then
  echo "# DRY_RUN=1: nothing was run. gcloud runs each ssh command on every worker of TPU $tpu (zone $zone);"
  echo "# the worker list is the TPU's, gcloud's --worker=all reads it."
fi

case $action in
  setup)
    # The committed tree (git archive: no virtualenv, no workdirs), unpacked and installed on every host.
    root=$(CDPATH="" cd -- "$(dirname -- "$0")/.." && pwd)
    if ((dry_run)); then
      # shellcheck disable=SC2016
      archive='$archive'
      # shellcheck disable=SC2016
      echo 'archive=$(mktemp -d)/sfgrpo.tar.gz'
    else
      tmp=$(mktemp -d)
      trap 'rm -rf "$tmp"' EXIT
      archive=$tmp/sfgrpo.tar.gz
    fi
    run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all "$archive" "$tpu:sfgrpo.tar.gz"
    remote="mkdir -p $rdir && tar -xzf sfgrpo.tar.gz -C $rdir && cd $rdir && python3 -m venv .venv"
    remote+=" && . .venv/bin/activate && pip install -e $(q '.[tpu]')"
    say_remote "$remote"
    ssh_all "$remote"
    ;;
  train)
    workdir=$1
    shift
    [[ $workdir != -* ]] || die "WORKDIR '$workdir' looks like an option: give the workdir before the overrides"
    [[ $workdir == /* ]] ||
      die "WORKDIR '$workdir' must be an absolute path, the same shared directory on every host"
    config=${SFGRPO_CONFIG:-configs/tpu_v5.py}
    [[ $config =~ ^configs/[A-Za-z0-9_]+\.py$ ]] ||
      die "SFGRPO_CONFIG '$config' must be a file of the repository's configs/ (configs/NAME.py)"
    root=$(CDPATH="" cd -- "$(dirname -- "$0")/.." && pwd)
    [[ -f $root/$config ]] || die "SFGRPO_CONFIG '$config': no such file in $root"
    args=(python -m sfgrpo.main "--config=$config" "--workdir=$workdir" "$@")
    remote="cd $rdir && . .venv/bin/activate &&"
    for arg in "${args[@]}"; do remote+=" $(q "$arg")"; done
    say_remote "$remote"
    ssh_all "$remote"
    ;;
esac
