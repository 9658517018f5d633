"""Side-by-side measurement of the inference fast path's options in one run.

Each variant runs the ``egolcd bench`` chunk loop (``egolcd.bench.run_policy``) in its own process, in
alternating repeats (A B C A B C ...) so a busy machine slows every variant alike; the table reports the
median steady-state seconds per chunk (last 8 chunks) of each variant and its ratio to the baseline.

    python benchmarks/fast_path.py --preset demo --chunks 32 --repeats 3 --threads 1 --out outputs/fast_path.json
    python benchmarks/fast_path.py --preset wan2.1-1.3b --device cuda --dtype bfloat16 --height 480 --width 832 \\
        --variants arena,concat,compile,offload --text-tokens 512
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from egolcd.bench import BenchConfig, bench_matmul_peak, mfu, run_policy

logger = logging.getLogger("fast_path")

VARIANTS = {
    "arena": {},  # the default path: preallocated context buffers
    "concat": {"arena": False},  # context concatenated into new tensors every step (training path)
    "plain": {"fast_path": False},  # no prompt cache, unfused kernels, softmax importance, full arena copy
    "bf16": {"dtype": "bfloat16"},
    "compile": {"compile": True},
    "offload": {"offload": True},
}


def run_variant(config: BenchConfig, policy: str) -> dict:
    if config.device.startswith("cuda"):
        return run_policy(config, policy)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(run_policy, config, policy).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--policy", default="egolcd")
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--variants", default="arena,concat,bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write all measurements as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    base = BenchConfig(
        preset=args.preset, chunks=args.chunks, steps=args.steps, device=args.device, dtype=args.dtype,
        height=args.height, width=args.width, threads=args.threads, text_tokens=args.text_tokens,
    )
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    configs = {name: replace(base, **VARIANTS[name]) for name in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in names:
            res = run_variant(configs[name], args.policy)
            steady = statistics.median(res["chunk_seconds"][-8:])
            logger.info("repeat %d %-8s %.4f s/chunk  %.1f frames/s", rep, name, steady, res["frames_per_second"])
            runs[name].append(res)

    # the matmul peak, once per dtype: variants of one dtype share one MFU denominator
    peaks = {dtype: bench_matmul_peak(replace(base, dtype=dtype)) for dtype in {c.dtype for c in configs.values()}}
    baseline = statistics.median(statistics.median(r["chunk_seconds"][-8:]) for r in runs[names[0]])
    table = [f"{'variant':<9} {'s/chunk':>9} {'ratio':>6} {'frames/s':>9} {'MFU':>6} {'peak MB':>9}"]
    summary = {}
    for name in names:
        sec = statistics.median(statistics.median(r["chunk_seconds"][-8:]) for r in runs[name])
        fps = statistics.median(r["frames_per_second"] for r in runs[name])
        util = statistics.median(mfu(r, peaks[configs[name].dtype]) for r in runs[name])
        peak = max(r["peak_mb"] for r in runs[name])
        summary[name] = {"chunk_seconds": sec, "ratio": sec / baseline, "frames_per_second": fps, "mfu": util,
                         "peak_mb": peak}
        table.append(f"{name:<9} {sec:>9.4f} {sec / baseline:>6.3f} {fps:>9.2f} {util:>6.1%} {peak:>9.1f}")
    print("\n".join(table))  # noqa: T201 - a script's report
    if args.out:
        peak_tflops = {dtype: flops / 1e12 for dtype, flops in peaks.items()}
        report = {"config": vars(args), "matmul_peak_tflops": peak_tflops, "summary": summary, "runs": runs}
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
