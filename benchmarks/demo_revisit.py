"""`make demo`'s revisit, side by side: the narrative's first look at a place and its return, per policy.

Generates ``examples/maze_revisit.yaml`` (or ``--narrative``) with the embedded demo model (or ``--model``)
under each policy, same seed, and writes a frame strip: for each policy, frames of the first look (top row)
over the same frames of the revisit's look (bottom row), two frames a second of the look. Also reports the
revisit-vs-first-look PSNR (frame by frame at the same offset in the look, which the demo narrative aligns
with latent chunks) against a different place in the same video (chance).

    .venv/bin/python benchmarks/demo_revisit.py --out docs/demo-revisit.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def segment_frames(compiled, segment_id: str) -> tuple[int, int]:
    """``[start, end)`` pixel frames of a segment."""
    if segment_id not in compiled.segment_ids:
        raise SystemExit(f"no segment {segment_id!r} in the narrative ({', '.join(compiled.segment_ids)})")
    i = compiled.segment_ids.index(segment_id)
    return compiled.segment_start_frames[i], compiled.segment_start_frames[i] + compiled.segment_frames[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "egolcd" / "assets" / "demo"))
    parser.add_argument("--narrative", default=str(ROOT / "examples" / "maze_revisit.yaml"))
    parser.add_argument("--policies", default="egolcd,sink-window,window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chance", default="junction", help="segment id of a different place (chance)")
    parser.add_argument("--out", default="outputs/demo-revisit.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from egolcd.narrative import load_narrative
    from egolcd.pipeline import EgoLCDPipeline
    from egolcd.revisits import frame_psnr
    from egolcd.video_io import read_video

    pipe = EgoLCDPipeline.from_pretrained(args.model)
    narrative = load_narrative(args.narrative)
    _, compiled = pipe.compile(narrative)
    revisits = {compiled.segment_ids[s]: compiled.segment_ids[t] for s, t in compiled.revisits.items()}
    if not revisits:
        raise SystemExit(f"{args.narrative} has no revisit: segment")
    back, first = next(iter(revisits.items()))
    (a0, a1), (b0, b1), (c0, c1) = (segment_frames(compiled, s) for s in (first, back, args.chance))
    n = min(a1 - a0, b1 - b0, c1 - c0)
    fps = compiled.fps
    picks = list(range(0, n, max(1, fps // 2)))  # two frames a second of the look
    videos, scores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            pipe(narrative, Path(tmp) / f"{policy}.mp4", memory=policy, seed=args.seed, progress=False)
            video = read_video(Path(tmp) / f"{policy}.mp4")[0]
            videos[policy] = video
            scores[policy] = {
                "revisit_psnr": frame_psnr(video[b0 : b0 + n], video[a0 : a0 + n]),
                "chance_psnr": frame_psnr(video[b0 : b0 + n], video[c0 : c0 + n]),
            }
            print(f"{policy:<12} {back} vs {first}: {scores[policy]['revisit_psnr']:.2f} dB; "
                  f"vs {args.chance} (chance): {scores[policy]['chance_psnr']:.2f} dB")
    fig, axes = plt.subplots(2 * len(videos), len(picks), figsize=(1.1 * len(picks), 2.3 * len(videos)),
                             squeeze=False)
    for p, (policy, video) in enumerate(videos.items()):
        for j, f in enumerate(picks):
            for r, start in enumerate((a0, b0)):
                ax = axes[2 * p + r, j]
                ax.imshow(video[start + f])
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * p, 0].set_ylabel(f"{policy}\n{first}", fontsize=7)
        axes[2 * p + 1, 0].set_ylabel(f"{policy}\n{back}", fontsize=7)
    for j, f in enumerate(picks):
        axes[0, j].set_title(f"+{f / fps:.1f} s", fontsize=7)
    fig.suptitle(f"{Path(args.narrative).name}: first look (upper) vs revisit (lower), seed {args.seed}", fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    out.with_name(out.stem + "-scores.json").write_text(json.dumps(
        {"narrative": args.narrative, "first": first, "revisit": back, "chance": args.chance, "seed": args.seed,
         "frames": {"first": [a0, a0 + n], "revisit": [b0, b0 + n], "chance": [c0, c0 + n]}, "scores": scores},
        indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
