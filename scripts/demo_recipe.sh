#!/usr/bin/env bash
# The embedded demo model's whole recipe (data, VAE, DiT stages 1 and 2), end to end, on the CPU.
#
#   bash scripts/demo_recipe.sh [WORKDIR]        # or: make demo-recipe WORKDIR=...
#
# Runs in WORKDIR (default: the repository root), where it writes data/, models/ and runs/ with the paths of
# configs/train/demo-t2-stage{1,2}.yaml. A step that finished is marked in WORKDIR/.recipe-done/demo-t2/ and skipped
# on a rerun; an interrupted one runs again, the trainings from their last checkpoint, so after an interruption the
# same command resumes. The finished model is WORKDIR/models/demo-t2 (use it with `egolcd generate --model
# models/demo-t2`); the embedded model in egolcd/assets/demo is never touched. Each step's wall time is appended to
# WORKDIR/recipe-times.tsv (time, geometry, step, seconds). Both cores are used throughout (THREADS, default 2):
# the data and the latents as threads or workers, the VAE and the DiT stages as PROCESSES (default 2) one-thread
# processes. The VAE's global batch of 4 crops is split between them; the DiT stages run with grad_accum 4 /
# PROCESSES, so every step still takes 4 clips. Either way these are the same steps as one process (the small
# models do not get faster with threads; two processes train the DiT about 1.75x and the VAE 1.6x faster). The
# commands are those of egolcd/assets/demo/README.md. GEOMETRY=demo runs the previous embedded model's (v3's)
# recipe: the VAE 4x in time, 8,000 steps, configs/train/demo-v2-stage{1,2}.yaml, into WORKDIR/models/demo, with
# its own done-markers.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "${1:-$REPO}"
WORKDIR="$(cd "${1:-$REPO}" && pwd)"
THREADS="${THREADS:-2}"
PROCESSES="${PROCESSES:-2}"
case "$PROCESSES" in 1|2|4) ;; *) echo "PROCESSES must be 1, 2 or 4 (4 clips a step), got $PROCESSES" >&2; exit 2 ;; esac
# GEOMETRY=demo-t2 (the embedded model's since v4: VAE 2x in time, DiT temporal patch 2; the VAE's steps cut to its
# hour: docs/METHOD.md, benchmarks/NOTES.md) or demo (v3's: VAE 4x in time). Each writes its own folders and
# done-markers.
# POSHEADS: the self-attention heads per block re-initialised as position-matching heads before stage 2, half of
# the DiT's heads (demo 2 of 4, demo-t2 4 of 8).
GEOMETRY="${GEOMETRY:-demo-t2}"
case "$GEOMETRY" in
    demo-t2) TAG=t2; VAE_STEPS=5600; VAE_DIR=models/demo-t2-vae; INIT_DIR=models/demo-t2-init; MODEL=models/demo-t2; MARK=/demo-t2; POSHEADS=4 ;;
    demo) TAG=v2; VAE_STEPS=8000; VAE_DIR=models/demo-vae; INIT_DIR=models/demo-init-v2; MODEL=models/demo; MARK=; POSHEADS=2 ;;
    *) echo "GEOMETRY must be demo or demo-t2, got $GEOMETRY" >&2; exit 2 ;;
esac
if [[ -x "$REPO/.venv/bin/egolcd" ]]; then EGOLCD="${EGOLCD:-$REPO/.venv/bin/egolcd}"; else EGOLCD="${EGOLCD:-egolcd}"; fi
if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="${PYTHON:-$REPO/.venv/bin/python}"; else PYTHON="${PYTHON:-python3}"; fi
cd "$WORKDIR"
export OMP_NUM_THREADS="$THREADS"
TIMES="$WORKDIR/recipe-times.tsv"
DONE="$WORKDIR/.recipe-done$MARK"
mkdir -p "$DONE"

step() {  # step NAME COMMAND...: run COMMAND unless step NAME finished before; log its wall time, mark it done
    local name="$1"
    shift
    if [[ -e "$DONE/$name" ]]; then
        echo "== $name: done already ($DONE/$name)"
        return
    fi
    echo "== $name: $*"
    local t0
    t0=$(date +%s)
    "$@"
    printf '%s\t%s\t%s\t%d\n' "$(date -u +%FT%TZ)" "$GEOMETRY" "$name" "$(( $(date +%s) - t0 ))" | tee -a "$TIMES"
    touch "$DONE/$name"
}

processes() {  # processes EGOLCD train|train-vae ...: a training on PROCESSES one-thread processes (gloo)
    if [[ "$PROCESSES" == 1 ]]; then
        "$@"
        return
    fi
    shift
    local extra=(--threads 1)  # train-vae: its --batch-size is the global batch, split between the processes
    if [[ "$1" == train ]]; then
        extra=(--set grad_accum=$((4 / PROCESSES)))  # still the configs' 4 clips a step
    fi
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone \
        --nproc_per_node "$PROCESSES" -m egolcd "$@" "${extra[@]}"
}

fresh() {  # fresh DIR COMMAND...: remove what an interrupted run left in DIR, then run COMMAND
    rm -rf "$1"
    shift
    "$@"
}

step data \
    "$EGOLCD" prepare-data memory-maze --out data/maze40a --episodes 48 --seconds 40 --seed 0 --size 64x64 --fps 8 \
    --workers "$THREADS"
step vae processes \
    "$EGOLCD" train-vae data/maze40a --out "$VAE_DIR" --preset "$GEOMETRY" --batch-size 4 --lr 1e-3 --crop-size 32 \
    --crop-frames 13 --chunks-per-clip 26 --threads "$THREADS" --seed 0 --lr-schedule cosine --posterior mode \
    --loss mse --steps "$VAE_STEPS" --resume
step init fresh "$INIT_DIR" \
    "$EGOLCD" create-model "$INIT_DIR" --preset "$GEOMETRY" --vae "$VAE_DIR" --seed 0
step latents \
    "$EGOLCD" prepare-latents data/maze40a --out "data/latents/demo-$TAG" --model "$INIT_DIR" --preset "$GEOMETRY" \
    --chunks-per-clip 26
step stage1 processes \
    "$EGOLCD" train "$REPO/configs/train/demo-$TAG-stage1.yaml" --resume latest
step export1 fresh "models/demo-$TAG-stage1" \
    "$EGOLCD" export "runs/demo-$TAG-stage1" "models/demo-$TAG-stage1"
step poshead fresh "models/demo-$TAG-poshead-init" \
    "$EGOLCD" create-model "models/demo-$TAG-poshead-init" --init-from "models/demo-$TAG-stage1" --position-heads "$POSHEADS"
step stage2 processes \
    "$EGOLCD" train "$REPO/configs/train/demo-$TAG-stage2.yaml" --resume latest
step export2 fresh "$MODEL" \
    "$EGOLCD" export "runs/demo-$TAG-stage2" "$MODEL" --memory-guidance 2
echo "== the $GEOMETRY model is in $WORKDIR/$MODEL; wall times (s) in $TIMES:"
cat "$TIMES"
