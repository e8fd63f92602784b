#!/usr/bin/env bash
# The credit study's confirmation seeds on one lent accelerator, inside a fixed time, with what it measured
# packed under $OUT: the runs of docs/credit_study/kl01_confirm (β = 0.1, K = 2, 40 iterations, scalar,
# spatial and placebo) for the seeds not yet run, then their scoring on shapes:test:512. The CPU takes
# about 25 minutes per run and 74-110 for the warm start; this is for a GPU, where all of it should take
# minutes.
#
#   bash launch/device_wheels.sh                           # once, here (network): the wheels into .whl/
#   OUT=DIR bash launch/device_credit.sh                   # there: device tool, carry [".whl"], timeout 600
#   OUT=DIR TINY=1 PYTHON=python3 bash launch/device_credit.sh   # a CPU smoke test of the whole path
#
# Settings (environment): FIRST_SEED (7) and SEEDS (3): the study seeds FIRST_SEED .. +SEEDS-1; JOBS (3):
# runs at once; BUDGET_S (340): seconds the study may run before it is stopped (SIGTERM: each run saves a
# checkpoint; the study still reports what finished); SCORE_S (120): seconds for the 512-example scoring
# of the finished runs; WORK (/tmp/credit_device): the study folder, which a rerun resumes only on the same
# machine (a device machine goes back 30 s after a call); TINY=1: a few-step model and task, for a smoke
# test. The defaults end inside the device tool's 600 s. Exits 0 when every planned run finished and was
# scored, else non-zero; what finished is packed either way.
set -uo pipefail
cd "$(dirname "$0")/.."

die() { printf '%s: %s\n' "${0##*/}" "$*" >&2; exit 2; }
whole() { [[ ${!1} =~ ^(0|[1-9][0-9]*)$ ]] || die "$1 must be a whole number, got '${!1}'"; }
positive() { [[ ${!1} =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number of at least 1, got '${!1}'"; }

[[ -n ${OUT:-} ]] || die "OUT must name the folder the results are packed into (the device tool sets it)"
FIRST_SEED=${FIRST_SEED-7} SEEDS=${SEEDS-3} JOBS=${JOBS-3} BUDGET_S=${BUDGET_S-340} SCORE_S=${SCORE_S-120}
WORK=${WORK:-/tmp/credit_device} TINY=${TINY-0} PYTHON=${PYTHON:-python3}
whole FIRST_SEED
for name in SEEDS JOBS BUDGET_S SCORE_S; do positive "$name"; done
[[ $TINY == 0 || $TINY == 1 ]] || die "TINY must be 0 or 1, got '$TINY'"
mkdir -p "$OUT" "$WORK" || die "cannot create OUT=$OUT or WORK=$WORK"
log=$OUT/device_credit.log
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1

# The image's jax (0.11, with its CUDA plugin) stays; the packages it lacks come from .whl/ (no network).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || die "installing .whl/*.whl into /tmp/site failed"
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" - <<'EOF' || die "sfgrpo does not import here (missing wheels? run launch/device_wheels.sh and carry .whl)"
import jax, flax, sfgrpo.builders, sfgrpo.experiments.credit, sfgrpo.experiments.credit_heldout  # noqa: E401
print(f"jax {jax.__version__}, flax {flax.__version__}, devices: {jax.devices()}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

study=(
  --out "$WORK" --ks 2 --first-seed "$FIRST_SEED" --seeds "$SEEDS" --arms scalar,spatial,placebo
  --jobs "$JOBS" --sweep-seeds 0 --hparams docs/credit_study/kl_mid/hparams_beta0.1.json
  --set rl.grad_accum=1 --set rl.inner_epochs=2
)
examples=512
if [[ $TINY == 1 ]]; then
  # The tiny task of tests/test_credit_study.py: the path, not the science.
  study+=(--steps 2 --eval-every 1 --set warmstart.steps=4 --set data.shapes_train=64 --set data.shapes_eval=8
    --set rl.batch_size=16 --set rl.micro_batch=16 --set sampler.num_steps=3 --set sampler.eval_steps=3
    --set sampler.window_hi=1 --set data.resolution=64)
  examples=16
else
  study+=(--steps 40 --eval-every 5)
fi

start=$SECONDS
echo "study: $PYTHON -m sfgrpo.experiments.credit ${study[*]} (at most ${BUDGET_S} s)"
timeout -k 60 "$BUDGET_S" "$PYTHON" -m sfgrpo.experiments.credit "${study[@]}"
study_rc=$?
echo "study exited $study_rc after $((SECONDS - start)) s"
[[ $study_rc == 124 ]] && echo "the study reached BUDGET_S and was stopped; rerunning this script resumes it"

start=$SECONDS
echo "scoring on shapes:test:$examples (at most ${SCORE_S} s)"
timeout -k 20 "$SCORE_S" "$PYTHON" -m sfgrpo.experiments.credit_heldout --study "$WORK" --examples "$examples" \
  --jobs "$JOBS"
score_rc=$?
echo "scoring exited $score_rc after $((SECONDS - start)) s"

# Everything but checkpoints, caches and exports, in one archive; the reports beside it (the device tool
# brings back at most 8 files of at most 16 MiB each).
pack() {
  tar -czf "$OUT/credit_device.tar.gz" --exclude=checkpoints --exclude=warmstart --exclude=warmstart_progress \
    --exclude=compile_cache --exclude=export --exclude=tb --exclude='*.new' "$@" \
    -C "$(dirname "$WORK")" "$(basename "$WORK")"
}
pack
if (($(stat -c %s "$OUT/credit_device.tar.gz" 2>/dev/null || echo 0) > 15 * 1024 * 1024)); then
  echo "the archive is over 15 MiB: packed again without the image grids (*.png)"
  pack --exclude='*.png'
fi
for report in study.md summary.json; do
  [[ -f $WORK/$report ]] && cp "$WORK/$report" "$OUT/"
done
heldout=$(find "$WORK/heldout" -maxdepth 3 -name heldout.md -print -quit 2>/dev/null)
[[ -n $heldout ]] && cp "$heldout" "$(dirname "$heldout")/heldout.json" "$OUT/"
ls -la "$OUT"
[[ $study_rc == 0 && $score_rc == 0 ]]
