"""Check an `egolcd bench` JSON: bounded memory for egolcd (hard), flatness ratio (reported).

    .venv/bin/python benchmarks/check_bench.py outputs/bench-tiny.json [--strict]

Context tokens and memory bytes are deterministic: egolcd's must stop growing, dense's must grow.
The timing ratio (median of the last 8 chunks / median of chunks 4-11, target <= 1.15) depends on the
machine's load, so it fails the check only with --strict. The egolcd / sink-window cost ratio is reported.
"""

from __future__ import annotations

import json
import logging
import sys

logger = logging.getLogger("check_bench")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = json.load(open(argv[0]))
    strict = "--strict" in argv
    ok = True
    ego = data["policies"]["egolcd"]
    half = len(ego["context_tokens"]) // 2
    if max(ego["context_tokens"][half:]) > max(ego["context_tokens"][:half]) or ego["memory_bytes"][-1] > max(
        ego["memory_bytes"][:half]
    ):
        logger.error("egolcd memory grew in the second half of the run: not bounded")
        ok = False
    if "dense" in data["policies"]:
        dense = data["policies"]["dense"]["context_tokens"]
        if not dense[-1] > dense[half]:
            logger.error("dense context did not grow with length")
            ok = False
    target = data["flatness_target"]
    logger.info("egolcd flatness ratio %.3f (target <= %.2f): %s", target["ratio"], target["target"],
                "met" if target["met"] else "NOT met")
    if strict and not target["met"]:
        ok = False
    for name, s in data["summary"].items():
        logger.info("%-12s median %.4f s/chunk, flatness %s, max ctx %d tokens, peak %.0f MB", name,
                    s["median_chunk_seconds"], None if s["flatness"] is None else round(s["flatness"], 3),
                    s["max_context_tokens"], s["peak_mb"])
    ratio = data.get("policy_ratio")
    if ratio:  # reported, never a failure: a timing on a shared machine
        low, high = ratio["paired_ci95"]
        logger.info("egolcd / sink-window %.3f, paired by pass %.3f [%.3f, %.3f] over %d passes (target <= %.2f)",
                    ratio["ratio"], ratio["paired_per_pass"], low, high, ratio["passes"], ratio["target"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
