"""Held-out reconstruction PSNR of one or more VAEs (the issue's 28 dB target for the demo VAE).

Each video of ``--data`` (an ``egolcd prepare-data`` folder, ideally a seed never trained on) is cut to
4k + 1 frames, encoded and decoded whole, and scored by mean per-frame PSNR against the original, as
``benchmarks/drift.py`` scores the VAE ceiling.

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
    parser.add_argument("--json", help="write the per-video figures here")
    args = parser.parse_args()
    from drift import vae_round_trip  # the VAE ceiling's own round trip

    from egolcd.revisits import frame_psnr
    from egolcd.vae import VideoVAE
    from egolcd.video_io import read_video

    with open(Path(args.data) / "metadata.csv", newline="") as f:
        ids = [row["video_id"] for row in csv.DictReader(f)][: args.episodes]
    if not ids:
        raise SystemExit(f"no videos listed in {args.data}/metadata.csv")
    reals = [read_video(Path(args.data) / "videos" / f"{i}.mp4")[0] for i in ids]
    result = {}
    for folder in args.vaes:
        vae = VideoVAE.from_pretrained(folder)
        scores = []
        for real in reals:
            rec = vae_round_trip(vae, real)
            scores.append(frame_psnr(rec, real[: len(rec)]))
        params = sum(p.numel() for p in vae.model.parameters())
        result[folder] = {"psnr": float(np.mean(scores)), "per_video": scores, "parameters": params,
                          "latent_channels": vae.latent_channels}
        print(f"{folder}: {np.mean(scores):.2f} dB over {len(scores)} videos "
              f"({params / 1e6:.2f} M parameters, {vae.latent_channels} latent channels)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
