"""The README's frame strip for `egolcd generate --from-video / --from-image` with the embedded demo model.

A held-out Memory Maze episode's first visit to a middle place is the clip (and its middle frame the
photo); `examples/maze_from_footage.yaml` walks on and comes back to it. Rows: the run from the clip and the
run from the photo, one frame per second, footage frames marked.

    .venv/bin/python scripts/footage_strip.py --data data/maze40-heldout --out docs/footage-strip.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/maze40-heldout")
    parser.add_argument("--episode", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    parser.add_argument("--narrative", default="examples/maze_from_footage.yaml")
    parser.add_argument("--out", default="docs/footage-strip.png")
    parser.add_argument("--kinds", default="video,image", help="rows: video (--from-video), image (--from-image)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from egolcd.video_io import VideoWriter, read_video

    data = Path(args.data)
    revisits = json.loads((data / "revisits.json").read_text())
    vid = sorted(revisits)[args.episode]
    visit = next(r for r in revisits[vid] if r["revisits"] != "s1")
    a, b = visit["first_visit_frames"]
    real, _ = read_video(data / "videos" / f"{vid}.mp4")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip, photo = Path(tmp) / "clip.mp4", Path(tmp) / "photo.png"
        with VideoWriter(clip, fps=8, width=real.shape[2], height=real.shape[1], crf=0, pix_fmt="yuv444p") as w:
            w.write(real[a:b])
        Image.fromarray(real[(a + b) // 2]).save(photo)
        for flag, path in (("--from-video", clip), ("--from-image", photo)):
            if flag[len("--from-"):] not in args.kinds.split(","):
                continue
            out = Path(tmp) / f"{flag[2:]}.mp4"
            cmd = [sys.executable, "-m", "egolcd", "generate", args.narrative, "-o", str(out), flag, str(path), "-q"]
            if args.model:
                cmd += ["--model", args.model]
            subprocess.run(cmd, check=True)
            video, _ = read_video(out)
            what = f"clip of {b - a} frames" if flag == "--from-video" else "one photo"
            rows.append((f"{flag} ({what})", video))
    step = 8
    cols = max(len(v) for _, v in rows) // step + 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.9 * cols, 1.25 * len(rows)), squeeze=False)
    for r, (name, video) in enumerate(rows):
        footage = 9 if "image" in name else 9 + 12 * ((b - a - 9) // 12)  # demo chunks: 9, then 12 frames
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            f = c * step
            if f < len(video):
                ax.imshow(video[f])
                ax.set_title(f"{'footage' if f < footage else 'gen'} {f / 8:.0f}s", fontsize=6,
                             color="tab:blue" if f < footage else "black")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, fontsize=6)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
