#!/usr/bin/env bash
# The embedded demo model's whole recipe (data, VAE, DiT stages 1 and 2), end to end, on the CPU.
#
#   bash scripts/demo_recipe.sh [WORKDIR]        # or: make demo-recipe WORKDIR=...
#
# Runs in WORKDIR (default: the repository root), where it writes data/, models/ and runs/ with the paths of
# configs/train/demo-v2-stage{1,2}.yaml. Every step is skipped when its output is already there, and the
# trainings continue from their last checkpoint, so after an interruption the same command resumes. The
# finished model is WORKDIR/models/demo (use it with `egolcd generate --model models/demo`); the embedded
# model in egolcd/assets/demo is never touched. Each step's wall time is appended to WORKDIR/recipe-times.tsv.
# Both cores are used throughout (THREADS, default 2). The commands are those of egolcd/assets/demo/README.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:-$REPO}"
THREADS="${THREADS:-2}"
if [[ -x "$REPO/.venv/bin/egolcd" ]]; then EGOLCD="${EGOLCD:-$REPO/.venv/bin/egolcd}"; else EGOLCD="${EGOLCD:-egolcd}"; fi
mkdir -p "$WORKDIR"
cd "$WORKDIR"
export OMP_NUM_THREADS="$THREADS"
TIMES="$WORKDIR/recipe-times.tsv"

step() {  # step NAME DONE_MARKER COMMAND...: run COMMAND unless DONE_MARKER exists, and log its wall time
    local name="$1" marker="$2"
    shift 2
    if [[ -e "$marker" ]]; then
        echo "== $name: done already ($marker)"
        return
    fi
    echo "== $name: $*"
    local t0
    t0=$(date +%s)
    "$@"
    printf '%s\t%s\t%d\n' "$(date -u +%FT%TZ)" "$name" "$(( $(date +%s) - t0 ))" | tee -a "$TIMES"
}

step data data/maze40a/revisits.json \
    "$EGOLCD" prepare-data memory-maze --out data/maze40a --episodes 48 --seconds 40 --seed 0 --size 64x64 --fps 8 \
    --workers "$THREADS"
step vae models/demo-vae/config.json \
    "$EGOLCD" train-vae data/maze40a --out models/demo-vae --preset demo --batch-size 2 --lr 1e-3 --crop-size 32 \
    --crop-frames 13 --chunks-per-clip 26 --threads "$THREADS" --seed 0 --lr-schedule cosine --posterior mode \
    --loss mse --steps 6000 --resume
step init models/demo-init-v2/egolcd_config.json \
    "$EGOLCD" create-model models/demo-init-v2 --preset demo --vae models/demo-vae --seed 0
step latents data/latents/demo-v2/index.json \
    "$EGOLCD" prepare-latents data/maze40a --out data/latents/demo-v2 --model models/demo-init-v2 --preset demo \
    --chunks-per-clip 26
step stage1 runs/demo-v2-stage1/checkpoint-001200/trainer_state.json \
    "$EGOLCD" train "$REPO/configs/train/demo-v2-stage1.yaml" --resume latest
step export1 models/demo-v2-stage1/egolcd_config.json \
    "$EGOLCD" export runs/demo-v2-stage1 models/demo-v2-stage1
step poshead models/demo-v2-poshead-init/egolcd_config.json \
    "$EGOLCD" create-model models/demo-v2-poshead-init --init-from models/demo-v2-stage1 --position-heads 2
step stage2 runs/demo-v2-stage2/checkpoint-000800/trainer_state.json \
    "$EGOLCD" train "$REPO/configs/train/demo-v2-stage2.yaml" --resume latest
step export2 models/demo/egolcd_config.json \
    "$EGOLCD" export runs/demo-v2-stage2 models/demo --memory-guidance 2
echo "== the demo model is in $WORKDIR/models/demo; wall times (s) in $TIMES:"
cat "$TIMES"
