"""Footage benchmark: start from the *real* first visit of a place, generate the walk back to it, and
compare the generated return with the real first-visit frames. egolcd vs window, same model, same seeds.

Held-out Memory Maze episodes (``egolcd prepare-data memory-maze ... --seed 1``; their narratives, camera
poses and ``revisits.json``). For each episode's first revisit to a middle segment ``k`` (segment ``j``
returns to it at least 3 chunks later, as in ``benchmarks/drift.py``):

* the **footage** is the real frames of the first visit, segment ``k`` (``--from-video``: encoded and written
  into memory through the clean pass; trimmed to whole chunks);
* the **narrative** is a ``footage: true`` segment with ``k``'s id and action, then the episode's segments
  ``k+1 .. j`` (their revisits to segments before ``k`` dropped); ``j`` keeps ``revisit: k``;
* the **score** pairs each frame of the generated return ``j`` with the *real* first-visit frame of the
  nearest ground-truth pose (``egolcd.revisits.revisit_pairs``; the generated walk follows the narrative's
  timing, so the real poses at those times stand for it) and reports their PSNR; **chance** pairs the same
  generated frame with a real look-around at another place with the nearest heading;
* beside them: the same pairs in the real footage (real return vs real first visit: the ceiling a perfect
  generator reaches) and the paired bootstrap 95% interval of egolcd - window per (episode, seed).

    .venv/bin/python benchmarks/footage.py --model egolcd/assets/demo --data data/maze40-heldout \\
        --episodes 12 --seeds 0 --out outputs/footage

Writes ``OUT/footage.json``, ``OUT/footage.md`` (the table), ``OUT/strip.png`` (real first visit, real
return, generated return per policy) and ``OUT/timeline.png`` (episode 0's egolcd run, one frame a second).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drift import load_episodes  # noqa: E402  (the held-out episodes with middle revisits, as drift.py)

logger = logging.getLogger("footage")


def footage_case(ep: dict, real: np.ndarray, pipe: Any) -> dict:
    """The first middle revisit of an episode as a footage run: footage frames, narrative, frame offset."""
    from egolcd.footage import whole_chunk_frames
    from egolcd.narrative import load_narrative

    r = ep["revisits"][0]
    narrative = load_narrative(ep["narrative"])
    ids = [s.id for s in narrative.segments]
    k, j = ids.index(r["revisits"]), ids.index(r["segment"])
    a, b = r["first_visit_frames"]
    used = whole_chunk_frames(b - a, pipe.chunk_frames, pipe.vae.temporal_factor)
    if used > b - a:
        raise ValueError(f"{ep['video_id']}: the first visit ({b - a} frames) is shorter than a chunk")
    kept = {s.id for s in narrative.segments[k : j + 1]}
    segments = [replace(narrative.segments[k], footage=True, seconds=0.0, revisit=None)]
    for s in narrative.segments[k + 1 : j + 1]:
        segments.append(replace(s, revisit=s.revisit if s.revisit in kept else None))
    # output frame of real frame f >= b: the generated segments start right after the (trimmed) footage
    return dict(narrative=replace(narrative, segments=segments), footage=real[a:b], revisit=r,
                offset=b - used, used=used, a=a, b=b)


def run_case(pipe: Any, case: dict, policy: str, seed: int, steps: int) -> tuple[np.ndarray, dict]:
    """Generate one case; return the whole output video (footage reconstruction + generated), uint8."""
    from egolcd.video_io import VideoWriter

    frames: list[np.ndarray] = []

    def keep(report: Any, decoded: Any) -> None:
        frames.append(((decoded[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy())

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "first-visit.mp4"
        h, w = case["footage"].shape[1:3]
        with VideoWriter(clip, fps=8, width=w, height=h, crf=0, pix_fmt="yuv444p") as writer:  # near lossless
            writer.write(case["footage"])
        result = pipe(case["narrative"], Path(tmp) / "v.mp4", memory=policy, steps=steps, seed=seed,
                      progress=False, callback=keep, init_video=clip)
    video = np.concatenate(frames, axis=0)[: result.num_frames]
    return video, {"seconds": time.perf_counter() - t0, "chunks": result.num_chunks}


def score_case(video: np.ndarray, case: dict, ep: dict) -> dict[str, float]:
    """Pose-paired PSNR of the generated return against the real first visit, and chance."""
    from egolcd.revisits import chance_pairs, paired_psnr, revisit_pairs

    r = case["revisit"]
    pairs = revisit_pairs(ep["poses"], r["revisit_frames"], r["first_visit_frames"])
    ids = ep["compiled"].segment_ids
    here = {ids.index(r["segment"]), ids.index(r["revisits"])}
    chance = chance_pairs(ep["poses"], r["revisit_frames"], [rng for i, rng in ep["looks"] if i not in here])
    real = case["real"]

    def against_real(p: np.ndarray) -> float:
        if not len(p):
            return float("nan")
        gen = p[:, 0] - case["offset"]  # real frame index of the return -> output frame index
        ok = (gen >= 0) & (gen < len(video))
        return paired_psnr(video, np.stack([gen[ok], p[ok, 1]], axis=1), other=real)

    return {"revisit_psnr": against_real(pairs), "chance_psnr": against_real(chance),
            "real_revisit_psnr": paired_psnr(real, pairs), "real_chance_psnr": paired_psnr(real, chance),
            "pairs": int(len(pairs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="egolcd/assets/demo")
    parser.add_argument("--data", default="data/maze40-heldout")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N episodes (split a run over processes)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--policies", default="egolcd,window")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/footage")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("egolcd", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from egolcd.pipeline import EgoLCDPipeline
    from egolcd.revisits import bootstrap_mean_ci
    from egolcd.video_io import read_video

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = EgoLCDPipeline.from_pretrained(args.model)
    steps = args.steps or pipe.config.steps
    episodes = load_episodes(Path(args.data), args.episodes, pipe.chunk_frames, pipe.vae.temporal_factor)[args.skip :]
    if not episodes:
        raise SystemExit(f"no held-out episode in {args.data} has a revisit to a middle segment")
    policies, seeds = args.policies.split(","), [int(s) for s in args.seeds.split(",")]
    logger.info("%d episodes x %d seeds x %d policies, %d steps", len(episodes), len(seeds), len(policies), steps)

    cases, results, strip = [], {}, {}
    for i, ep in enumerate(episodes):
        real, _ = read_video(ep["video"])
        case = {**footage_case(ep, real, pipe), "real": real}
        cases.append(case)
        for seed in seeds:
            for policy in policies:
                video, info = run_case(pipe, case, policy, seed, steps)
                s = score_case(video, case, ep)
                results[(i, policy, seed)] = {**s, **info}
                with open(out / "runs.jsonl", "a") as f:  # as they finish: a cut run keeps what it measured
                    f.write(json.dumps({"episode": ep["video_id"], "policy": policy, "seed": seed, **s, **info}) + "\n")
                if i == 0 and seed == seeds[0]:
                    strip[policy] = video
                logger.info("%s %-7s seed %d: generated return vs real first visit %.2f dB (chance %.2f; real "
                            "return %.2f) %d pairs, %.0f s", ep["video_id"], policy, seed, s["revisit_psnr"],
                            s["chance_psnr"], s["real_revisit_psnr"], s["pairs"], info["seconds"])

    def values(policy: str, key: str) -> np.ndarray:
        return np.array([results[(i, policy, s)][key] for i in range(len(episodes)) for s in seeds])

    table = {}
    for p in policies:
        rev, cha = values(p, "revisit_psnr"), values(p, "chance_psnr")
        table[p] = {"revisit_psnr": float(np.nanmean(rev)), "chance_psnr": float(np.nanmean(cha)),
                    "recall_db": bootstrap_mean_ci(rev - cha)}
    diffs = {}
    if "egolcd" in policies:
        for other in policies:
            if other != "egolcd":
                diffs[f"egolcd - {other}"] = bootstrap_mean_ci(values("egolcd", "revisit_psnr") - values(other, "revisit_psnr"))
    real_rev = float(np.nanmean([results[(i, policies[0], seeds[0])]["real_revisit_psnr"] for i in range(len(episodes))]))
    real_cha = float(np.nanmean([results[(i, policies[0], seeds[0])]["real_chance_psnr"] for i in range(len(episodes))]))
    lines = [f"{len(episodes)} held-out episodes x {len(seeds)} seed(s), {steps} steps: footage = the real first "
             "visit; pose-paired PSNR of the generated return against the real first-visit frames", "",
             "| policy | return vs real first visit (dB) | chance: vs a real other place (dB) | "
             "recall = return - chance (95% CI) |", "|---|---|---|---|"]
    for p, r in table.items():
        m, lo, hi = r["recall_db"]
        lines.append(f"| {p} | {r['revisit_psnr']:.2f} | {r['chance_psnr']:.2f} | {m:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    lines.append(f"| real footage (real return vs real first visit) | {real_rev:.2f} | {real_cha:.2f} | "
                 f"{real_rev - real_cha:+.2f} |")
    lines += ["", "| paired difference (return vs real first visit) | mean (dB) | 95% bootstrap CI |", "|---|---|---|"]
    for name, (m, lo, hi) in diffs.items():
        lines.append(f"| {name} | {m:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")
    (out / "footage.md").write_text("\n".join(lines) + "\n")
    runs = [{"episode": episodes[i]["video_id"], "policy": p, "seed": s, **v} for (i, p, s), v in sorted(results.items())]
    (out / "footage.json").write_text(json.dumps({"table": table, "differences": diffs, "real_revisit_psnr": real_rev,
                                                  "real_chance_psnr": real_cha, "episodes": len(episodes),
                                                  "seeds": seeds, "steps": steps, "runs": runs}, indent=1))
    _strip(out / "strip.png", cases[0], episodes[0], strip)
    if "egolcd" in strip:
        _timeline(out / "timeline.png", strip["egolcd"], cases[0]["used"])
    logger.info("\n%s", "\n".join(lines))


def _timeline(path: Path, video: np.ndarray, footage: int, step: int = 8) -> None:
    """One frame per second of a run from footage (the footage's VAE reconstruction, then generated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = list(range(0, len(video), step))
    fig, axes = plt.subplots(1, len(picks), figsize=(0.85 * len(picks), 1.2), squeeze=False)
    for ax, f in zip(axes[0], picks):
        ax.imshow(video[f])
        ax.set_title(f"{'footage' if f < footage else 'gen'} {f / 8:.0f}s", fontsize=6,
                     color="tab:blue" if f < footage else "black")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _strip(path: Path, case: dict, ep: dict, videos: dict[str, np.ndarray]) -> None:
    """Real first visit, real return and each policy's generated return at one pose-paired frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from egolcd.revisits import revisit_pairs

    r = case["revisit"]
    pairs = revisit_pairs(ep["poses"], r["revisit_frames"], r["first_visit_frames"])
    if not len(pairs):
        return
    f, g = pairs[len(pairs) // 2]
    panels = [("real first visit", case["real"][g]), ("real return", case["real"][f])]
    panels += [(f"{p}: generated return", v[f - case["offset"]]) for p, v in videos.items()
               if 0 <= f - case["offset"] < len(v)]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 2.3), squeeze=False)
    for ax, (name, image) in zip(axes[0], panels):
        ax.imshow(image)
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
