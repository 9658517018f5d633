#!/usr/bin/env bash
# Issue 7's GPU measurement, as one command for a session that has an H100 (the `device` tool):
#   wan2.1-1.3b preset, random weights, 480x832, 3 latent frames per chunk, 4 Euler steps, no CFG,
#   512 prompt tokens (umT5), bf16; 80 chunks = 960 pixel frames = 60 s at 16 fps.
# Writes outputs/h100/*.json (+ plots) and prints frames/s, MFU, peak memory and flatness per policy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EGOLCD=${EGOLCD:-.venv/bin/egolcd}
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
