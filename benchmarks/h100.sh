#!/usr/bin/env bash
# Issue 7's GPU measurement, as one command for a session that has an H100 (the `device` tool):
#   wan2.1-1.3b preset, random weights, 480x832, 3 latent frames per chunk, 4 Euler steps, no CFG,
#   512 prompt tokens (umT5), bf16; 80 chunks = 960 pixel frames = 60 s at 16 fps.
# Writes outputs/h100/*.json (+ plots) and prints frames/s, MFU, peak memory and flatness per policy.
#
# Real-weights mode (issue 14): benchmarks/h100.sh --model DIR
#   DIR: an egolcd model folder holding released weights, e.g. a converted Self-Forcing or LongLive DiT
#   with Wan2.1's VAE and umT5 (`egolcd convert` + `egolcd create-model DIR --from-wan ... --transformer`).
#   Generates a 60 s video (480x832, 16 fps, the model's own sampler: `distilled` on its step list) under
#   memory egolcd and window, end to end (text, DiT, memory, VAE decode, mp4), and prints frames/s, peak
#   memory and MFU per policy (benchmarks/real_weights.py), eager then compiled. Writes
#   outputs/h100/real[-compile]/{real_weights.json,egolcd.mp4,window.mp4}.
#   DEVICE, DTYPE, VIDEO_SECONDS, HEIGHT, WIDTH override the defaults (cuda, bfloat16, 60, the model's
#   size), e.g. DEVICE=cpu DTYPE=float32 VIDEO_SECONDS=3 HEIGHT=32 WIDTH=32 for a dry run with a tiny folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EGOLCD=${EGOLCD:-.venv/bin/egolcd}
if [[ "${1:-}" == "--model" ]]; then
  MODEL=${2:?usage: benchmarks/h100.sh --model DIR}
  [[ -f "$MODEL/egolcd_config.json" ]] || {
    echo "h100.sh: $MODEL is not an egolcd model folder (make one with egolcd create-model DIR --from-wan)" >&2
    exit 2
  }
  real=(--model "$MODEL" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --policies egolcd,window
        --seconds "${VIDEO_SECONDS:-60}")
  [[ -n "${HEIGHT:-}" ]] && real+=(--height "$HEIGHT")
  [[ -n "${WIDTH:-}" ]] && real+=(--width "$WIDTH")
  $PY benchmarks/real_weights.py "${real[@]}" --out outputs/h100/real
  if [[ "${DEVICE:-cuda}" == cuda* ]]; then
    $PY benchmarks/real_weights.py "${real[@]}" --compile --out outputs/h100/real-compile
  fi
  exit 0
fi
mkdir -p outputs/h100
common=(--preset wan2.1-1.3b --device cuda --dtype bfloat16 --height 480 --width 832 --steps 4 --text-tokens 512)
# 1. correctness first: GPU bf16 vs CPU fp32 on the tiny preset, and no host syncs in the denoising steps
$PY -m pytest -q tests/test_fast_path.py
# 2. egolcd vs window vs none over a 60-second video, eager then compiled
$EGOLCD bench "${common[@]}" --chunks 80 --policies egolcd,window,none \
  --json outputs/h100/bench-eager.json --plot outputs/h100/bench-eager.png
$EGOLCD bench "${common[@]}" --chunks 80 --policies egolcd,window --compile \
  --json outputs/h100/bench-compile.json --plot outputs/h100/bench-compile.png
# importance from every 4th query (MemoryConfig.importance_query_stride): the cost of the clean pass's mass
$EGOLCD bench "${common[@]}" --chunks 80 --policies egolcd,window --compile --importance-stride 4 \
  --json outputs/h100/bench-compile-stride4.json
# 3. the fast path's options side by side (arena vs concatenation, compile, long-term store offload)
$PY benchmarks/fast_path.py "${common[@]}" --chunks 24 --repeats 2 --variants arena,concat,compile,offload \
  --out outputs/h100/fast_path.json
