"""Drift benchmark: the same model, narratives and steps under every memory policy.

Held-out episodes of a simulated dataset (``egolcd prepare-data ... --seed 1``: narratives with
ground-truth revisits and the real footage) are generated under each policy and compared:

* revisit PSNR / SSIM: the revisit segment's frames against the first visit's, in the generated video
  (and, as the ceiling, in the real footage);
* NRDP (subject consistency, METHOD.md) of the generated video against the real one;
* peak memory (bytes of window + sink + long-term store) and median seconds per chunk.

    .venv/bin/python benchmarks/drift.py --model egolcd/assets/demo --data data/maze-heldout \\
        --episodes 4 --steps 4 --out outputs/drift

Writes ``OUT/drift.json``, ``OUT/drift.md`` (the table) and ``OUT/strip.png`` (first visit vs revisit).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
from pathlib import Path

import numpy as np

from egolcd.config import MEMORY_POLICIES
from egolcd.metrics import evaluate_video
from egolcd.narrative import compile_narrative, load_narrative
from egolcd.pipeline import EgoLCDPipeline
from egolcd.video_io import read_video

logger = logging.getLogger("drift")


def episodes(data: Path, limit: int) -> list[tuple[str, Path, Path]]:
    with open(data / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        narrative = data / row["narrative"]
        text = narrative.read_text()
        if "revisit:" in text:  # only episodes with a ground-truth return
            out.append((row["video_id"], narrative, data / "videos" / f"{row['video_id']}.mp4"))
    return out[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="held-out simulated dataset (egolcd prepare-data)")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--policies", default=",".join(MEMORY_POLICIES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/drift")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = EgoLCDPipeline.from_pretrained(args.model)
    policies = args.policies.split(",")
    rows: dict[str, list[dict]] = {p: [] for p in policies}
    real_rows: list[dict] = []
    strips: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # policy -> (first visit, revisit)
    for ep, (vid, narrative_path, real_path) in enumerate(episodes(Path(args.data), args.episodes)):
        narrative = load_narrative(narrative_path)
        compiled = compile_narrative(narrative, fps=narrative.fps or pipe.config.fps, chunk_frames=pipe.chunk_frames)
        real = evaluate_video(real_path, compiled=compiled)
        real_rows.append(real)
        for policy in policies:
            video = out / f"{vid}-{policy}.mp4"
            result = pipe(narrative, video, memory=policy, steps=args.steps, seed=args.seed, progress=False)
            metrics = evaluate_video(video, reference=real_path, compiled=compiled)
            metrics["peak_memory_bytes"] = max(c.memory_bytes for c in result.chunks)
            metrics["median_chunk_seconds"] = statistics.median(c.seconds for c in result.chunks)
            rows[policy].append(metrics)
            revs = metrics.get("revisits") or []
            if ep == 0 and revs:  # frame strip of the first episode: first visit vs revisit per policy
                frames, _ = read_video(video)
                strips[policy] = (frames[revs[0]["first_visit_frame"]], frames[revs[0]["revisit_frame"]])
            logger.info("%s %-12s revisit PSNR %.2f SSIM %.3f NRDP %.4f", vid, policy,
                        metrics.get("revisit_psnr", float("nan")), metrics.get("revisit_ssim", float("nan")),
                        metrics["nrdp_subject"])

    def mean(values: list) -> float:
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")

    table = {
        p: {
            "revisit_psnr": mean([m.get("revisit_psnr") for m in ms]),
            "revisit_ssim": mean([m.get("revisit_ssim") for m in ms]),
            "nrdp_subject": mean([m["nrdp_subject"] for m in ms]),
            "peak_memory_kib": mean([m["peak_memory_bytes"] for m in ms]) / 1024,
            "median_chunk_seconds": mean([m["median_chunk_seconds"] for m in ms]),
        }
        for p, ms in rows.items()
    }
    table["real footage"] = {
        "revisit_psnr": mean([m.get("revisit_psnr") for m in real_rows]),
        "revisit_ssim": mean([m.get("revisit_ssim") for m in real_rows]),
        "nrdp_subject": 0.0, "peak_memory_kib": float("nan"), "median_chunk_seconds": float("nan"),
    }
    lines = ["| policy | revisit PSNR (dB) ↑ | revisit SSIM ↑ | NRDP-subject ↓ | peak memory (KiB) | s/chunk |",
             "|---|---|---|---|---|---|"]
    for p, r in table.items():
        lines.append(f"| {p} | {r['revisit_psnr']:.2f} | {r['revisit_ssim']:.3f} | {r['nrdp_subject']:.4f} | "
                     f"{r['peak_memory_kib']:.0f} | {r['median_chunk_seconds']:.3f} |")
    (out / "drift.md").write_text("\n".join(lines) + "\n")
    (out / "drift.json").write_text(json.dumps({"table": table, "episodes": len(real_rows), "steps": args.steps,
                                                "per_episode": rows}, indent=2, default=str))
    if strips:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, len(strips), figsize=(2 * len(strips), 4.4), squeeze=False)
        for j, (key, (a, b)) in enumerate(strips.items()):
            axes[0, j].imshow(a)
            axes[1, j].imshow(b)
            axes[0, j].set_title(key, fontsize=9)
            for ax in axes[:, j]:
                ax.axis("off")
        axes[0, 0].text(-8, 32, "first visit", rotation=90, va="center", ha="right", fontsize=9)
        axes[1, 0].text(-8, 32, "revisit", rotation=90, va="center", ha="right", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "strip.png", dpi=110)
    logger.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
