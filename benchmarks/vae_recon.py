"""Held-out reconstruction PSNR of one or more VAEs (the issue's 28 dB target for the demo VAE).

Each video of ``--data`` (an ``egolcd prepare-data`` folder, ideally a seed never trained on) is cut to
fk + 1 frames, encoded and decoded whole, and scored by mean per-frame PSNR against the original, as
``benchmarks/drift.py`` scores the VAE ceiling. Beside it, where the loss is: the first frame (which the
causal Wan VAE encodes alone, so only spatial compression touches it) and the f positions of the frames
it encodes f to a latent frame (f = 4, or 2 for demo-t2; temporal compression as well); and, in time, the first
group of f (its
causal cache holds the first frame, as in a 5-frame training crop) against every later group (a cache
holding another group: trained only with crops of 9 frames or more). ``--frames N`` scores the first N
frames only (quicker, for pilots).

    .venv/bin/python benchmarks/vae_recon.py egolcd/assets/demo/vae models/vae-z16 --data data/maze40a-heldout
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vaes", nargs="+", help="VAE folders (diffusers layout)")
    parser.add_argument("--data", required=True, help="dataset root (metadata.csv + videos/)")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--frames", type=int, default=0,
                        help="score only the first N frames of each video (0: all; quicker for pilots)")
    parser.add_argument("--json", help="write the per-video figures here")
    args = parser.parse_args()
    from drift import vae_round_trip  # the VAE ceiling's own round trip

    from egolcd.metrics import psnr
    from egolcd.revisits import frame_psnr
    from egolcd.vae import VideoVAE
    from egolcd.video_io import read_video

    with open(Path(args.data) / "metadata.csv", newline="") as f:
        ids = [row["video_id"] for row in csv.DictReader(f)][: args.episodes]
    if not ids:
        raise SystemExit(f"no videos listed in {args.data}/metadata.csv")
    reals = [read_video(Path(args.data) / "videos" / f"{i}.mp4")[0] for i in ids]
    if args.frames > 0:
        reals = [real[: args.frames] for real in reals]
    result = {}
    for folder in args.vaes:
        vae = VideoVAE.from_pretrained(folder)
        tf = vae.temporal_factor
        scores, first, grouped = [], [], [[] for _ in range(tf)]
        group_one, later = [], []  # the group right after the first frame, and every group after it
        for real in reals:
            rec = vae_round_trip(vae, real)
            scores.append(frame_psnr(rec, real[: len(rec)]))
            per_frame = psnr(rec, real[: len(rec)]).numpy()  # (T,)
            first.append(float(per_frame[0]))
            for t in range(1, len(per_frame)):
                grouped[(t - 1) % tf].append(float(per_frame[t]))
            group_one.append(float(per_frame[1 : 1 + tf].mean()))
            if len(per_frame) > 1 + tf:
                later.append(float(per_frame[1 + tf :].mean()))
        params = sum(p.numel() for p in vae.model.parameters())
        positions = [float(np.mean(g)) for g in grouped]
        result[folder] = {"psnr": float(np.mean(scores)), "per_video": scores, "parameters": params,
                          "latent_channels": vae.latent_channels, "first_frame_psnr": float(np.mean(first)),
                          "grouped_position_psnr": positions, "group_one_psnr": float(np.mean(group_one)),
                          "later_groups_psnr": float(np.mean(later)) if later else None}
        print(f"{folder}: {np.mean(scores):.2f} dB over {len(scores)} videos "
              f"({params / 1e6:.2f} M parameters, {vae.latent_channels} latent channels); first frame "
              f"{np.mean(first):.2f} dB, frames {tf} to a latent by position " + " / ".join(f"{p:.2f}" for p in positions)
              + f"; the first group of {tf} {np.mean(group_one):.2f} dB, later groups "
              + (f"{np.mean(later):.2f} dB" if later else "none"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
