"""Drift benchmark: does a revisited place look the same? Every memory policy, same model, same seeds.

Held-out Memory Maze episodes (``egolcd prepare-data memory-maze ... --seed 1``, a data seed never trained
on) come with their narratives, camera poses and ground-truth revisits. Only revisits to *middle* segments
count (never the first segment, which the sink chunk always holds), at least 3 chunks after the first
visit. Each episode is generated under every policy with each seed, and scored by:

* **revisit PSNR**: each revisit frame against the first-visit frame of the nearest ground-truth pose, in
  the same generated video (``egolcd.revisits``);
* **chance PSNR**: the same revisit frame against a look-around at a *different* place with the nearest
  heading; ``recall = revisit - chance`` says whether the video recalls *this* place;
* beside them, the **VAE round-trip ceiling** (the same pairs in the real footage after encode + decode)
  and the VAE reconstruction PSNR of the footage;
* paired bootstrap 95% confidence intervals of egolcd - window, egolcd - sink-window, egolcd - dense
  (per episode and seed) and of egolcd's recall;
* the **memory gate**: teacher-forced flow loss on the revisit chunks of the real held-out latents with
  the clip's own long-term store, another episode's store swapped in, and no long-term store.

    .venv/bin/python benchmarks/drift.py --model egolcd/assets/demo --data data/maze40-heldout \\
        --episodes 12 --seeds 0,1,2 --out outputs/drift --workers 2

Writes ``OUT/drift.json``, ``OUT/drift.md`` (the table) and ``OUT/strip.png`` (first visit vs revisit).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("drift")
_PIPE: Any = None


# ------------------------------------------------------------------------------------------ episodes
def load_episodes(data: Path, limit: int, chunk_frames: int, vae_temporal: int, min_gap_chunks: int = 3) -> list[dict]:
    """Held-out episodes with at least one revisit to a middle segment, ``min_gap_chunks`` after it."""
    from egolcd.narrative import compile_narrative, load_narrative

    revisits = json.loads((data / "revisits.json").read_text())
    with open(data / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        vid = row["video_id"]
        narrative = load_narrative(data / row["narrative"])
        compiled = compile_narrative(narrative, fps=narrative.fps or 8, chunk_frames=chunk_frames, vae_temporal=vae_temporal)
        ids = compiled.segment_ids
        starts = compiled.segment_start_frames
        span = chunk_frames * vae_temporal
        kept = []
        for r in revisits.get(vid, []):
            k = ids.index(r["revisits"])
            gap = (r["revisit_frames"][0] - r["first_visit_frames"][1]) / span
            if k == 0 or gap < min_gap_chunks:
                continue
            kept.append(r)
        if not kept:
            continue
        looks = [  # look-arounds (chance candidates): (segment index, frame range)
            (i, (starts[i], starts[i] + compiled.segment_frames[i]))
            for i, s in enumerate(narrative.segments)
            if s.action.startswith("looks around")
        ]
        out.append(dict(
            video_id=vid, narrative=data / row["narrative"], video=data / "videos" / f"{vid}.mp4",
            poses=np.load(data / row["pose"]), revisits=kept, looks=looks, compiled=compiled,
        ))
        if len(out) >= limit:
            break
    return out


def _pairs(ep: dict) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """(revisit, pose pairs, chance pairs) of an episode."""
    from egolcd.revisits import chance_pairs, revisit_pairs

    ids = ep["compiled"].segment_ids
    out = []
    for r in ep["revisits"]:
        pairs = revisit_pairs(ep["poses"], r["revisit_frames"], r["first_visit_frames"])
        here = {ids.index(r["segment"]), ids.index(r["revisits"])}
        others = [rng for i, rng in ep["looks"] if i not in here]
        chance = chance_pairs(ep["poses"], r["revisit_frames"], others)
        out.append((r, pairs, chance))
    return out


def score(frames: np.ndarray, ep: dict) -> dict[str, float]:
    """Mean revisit and chance PSNR over an episode's middle revisits (frames: uint8 (T, H, W, 3))."""
    from egolcd.revisits import paired_psnr

    rev, cha = [], []
    for _, pairs, chance in _pairs(ep):
        pairs = pairs[pairs.max(axis=1) < len(frames)] if len(pairs) else pairs
        chance = chance[chance.max(axis=1) < len(frames)] if len(chance) else chance
        rev.append(paired_psnr(frames, pairs))
        cha.append(paired_psnr(frames, chance))
    return {"revisit_psnr": float(np.nanmean(rev)), "chance_psnr": float(np.nanmean(cha))}


def vae_round_trip(vae: Any, real: np.ndarray) -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` footage encoded and decoded whole by ``vae`` (cut to 4k + 1 frames)."""
    import torch

    from egolcd.video_io import to_uint8_frames

    n = len(real) - (len(real) - 1) % vae.temporal_factor  # 4k + 1 frames
    video = torch.from_numpy(real[:n]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        rec = vae.decode(vae.encode(video.to(vae.device, vae.dtype)))
    return to_uint8_frames(rec[0].float())


# ------------------------------------------------------------------------------------------ generation
def parse_policy(label: str) -> tuple[str, float | None]:
    """``egolcd`` -> (``egolcd``, the model's memory guidance); ``egolcd:mg2`` -> (``egolcd``, 2.0)."""
    name, _, option = label.partition(":")
    if not option:
        return name, None
    if not option.startswith("mg"):
        raise SystemExit(f"policy {label!r}: the only option is :mgG (memory guidance G), e.g. egolcd:mg2")
    try:
        return name, float(option[2:])
    except ValueError:
        raise SystemExit(f"policy {label!r}: memory guidance must be a number, e.g. egolcd:mg2") from None


def _init_worker(model: str, threads: int) -> None:
    import torch

    from egolcd.pipeline import EgoLCDPipeline

    global _PIPE
    torch.set_num_threads(threads)
    _PIPE = EgoLCDPipeline.from_pretrained(model)


def _generate(job: tuple[int, dict, str, int, int]) -> tuple[int, str, int, np.ndarray, dict]:
    """Generate one (episode, policy, seed) up to the last revisit; return its frames and timings."""
    index, ep, policy, seed, steps = job
    frames: list[np.ndarray] = []

    def keep(report: Any, decoded: Any) -> None:
        frames.append(((decoded[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy())

    compiled = ep["compiled"]
    last = max(r["revisit_frames"][1] for r in ep["revisits"])
    span = compiled.chunk_frames * compiled.vae_temporal
    max_chunks = min(compiled.num_chunks, (last - 1) // span + 2)
    t0 = time.perf_counter()
    name, mg = parse_policy(policy)
    with tempfile.TemporaryDirectory() as tmp:
        result = _PIPE(ep["narrative"], Path(tmp) / "v.mp4", memory=name, steps=steps, seed=seed,
                       memory_guidance=mg, progress=False, max_chunks=max_chunks, callback=keep)
    video = np.concatenate(frames, axis=0)[: result.num_frames]
    info = {"seconds": time.perf_counter() - t0,
            "peak_memory_bytes": max(c.memory_bytes for c in result.chunks),
            "median_chunk_seconds": float(np.median([c.seconds for c in result.chunks]))}
    return index, policy, seed, video, info


# ------------------------------------------------------------------------------------------ memory gate
def memory_gate(
    pipe: Any, episodes: list[dict], reals: list[np.ndarray], noise_levels: Sequence[float] = (0.6,), seed: int = 0
) -> dict[str, dict]:
    """Teacher-forced flow loss on revisit chunks, per noise level (keyed ``f"{t:g}"``): own long-term store vs
    another episode's vs none. Latents, prompts and noise are prepared once for every level."""
    import torch

    from egolcd.losses import teacher_forcing_loss
    from egolcd.memory import MemoryPolicy
    from egolcd.revisits import bootstrap_mean_ci

    policy = MemoryPolicy(pipe.config.memory, pipe.chunk_frames)
    k = pipe.chunk_frames
    runs = []
    g = torch.Generator().manual_seed(seed)
    for ep, real in zip(episodes, reals):
        c = ep["compiled"]
        n = min(c.num_chunks, pipe.vae.num_latent_frames(len(real) - (len(real) - 1) % pipe.vae.temporal_factor) // k)
        frames = pipe.vae.num_pixel_frames(n * k)
        video = torch.from_numpy(real[:frames]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            x0 = pipe.vae.encode(video.to(pipe.vae.device, pipe.vae.dtype)).float()
        emb = pipe.text_encoder.encode(c.prompts)
        keys = pipe.text_encoder.encode(c.key_texts).pooled
        segs = c.chunk_segments[:n]
        text = [emb.tokens[s : s + 1].to(pipe.transformer.dtype) for s in segs]
        pooled = [keys[s : s + 1] for s in segs]
        eps = torch.randn(x0.shape, generator=g)
        revisit_chunks = [
            i for i, s in enumerate(segs)
            if s in c.revisits and any(segs[q] == c.revisits[s] for q in range(0, max(0, i - policy.window_chunks)))
        ]
        runs.append(dict(x0=x0, eps=eps, text=text, pooled=pooled, segs=segs, revisits=c.revisits,
                         chunks=revisit_chunks))

    def loss(run: dict, level: float, override: list | None) -> list[float]:
        t = torch.full((1, len(run["segs"])), level)  # one noise level for every chunk (the same in all three runs)
        with torch.no_grad():
            out = teacher_forcing_loss(pipe.transformer, policy, run["x0"], run["eps"], t, run["text"],
                                       run["pooled"], run["segs"], run["revisits"], long_term_override=override)
        run.setdefault("stores", out.stores)
        v = [((out.predictions[i] - (run["eps"] - run["x0"])[:, :, i * k : (i + 1) * k]) ** 2).mean().item()
             for i in run["chunks"]]
        return v

    flat = lambda xs: np.array([v for x in xs for v in x])  # noqa: E731
    gates = {}
    for level in noise_levels:
        own = [loss(r, level, None) for r in runs]
        swapped = [loss(r, level, runs[(j + 1) % len(runs)]["stores"]) for j, r in enumerate(runs)]
        none = [loss(r, level, [[] for _ in r["segs"]]) for r in runs]
        gap = (flat(swapped) - flat(own)) / flat(own)  # per revisit chunk: how much worse another episode's store is
        gates[f"{level:g}"] = {
            "own_store": float(np.mean(flat(own))), "swapped_store": float(np.mean(flat(swapped))),
            "no_long_term_store": float(np.mean(flat(none))), "revisit_chunks": len(flat(own)),
            "swapped_over_own": bootstrap_mean_ci(gap), "noise_level": level}
    return gates


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="held-out dataset (egolcd prepare-data, another seed)")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--policies", default="egolcd,dense,window,sink-window,none",
                        help="comma-separated; NAME:mgG runs NAME with memory guidance G (e.g. egolcd:mg2)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="generation processes (1 thread each)")
    parser.add_argument("--out", default="outputs/drift")
    parser.add_argument("--gate-only", action="store_true",
                        help="only the teacher-forced memory gate (a minute; for checkpoints during training)")
    parser.add_argument("--no-gate", action="store_true",
                        help="skip the memory gate (it does not depend on sampling options such as :mgG)")
    parser.add_argument("--gate-t", default="0.6,0.9",
                        help="noise levels of the memory gate (comma-separated; at low noise the noisy latent "
                             "already shows most of the chunk, so memory matters most at high noise)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from egolcd.pipeline import EgoLCDPipeline
    from egolcd.revisits import bootstrap_mean_ci, frame_psnr
    from egolcd.video_io import read_video

    torch.set_num_threads(max(1, args.workers))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = EgoLCDPipeline.from_pretrained(args.model)
    episodes = load_episodes(Path(args.data), args.episodes, pipe.chunk_frames, pipe.vae.temporal_factor)
    if not episodes:
        raise SystemExit(f"no held-out episode in {args.data} has a revisit to a middle segment")
    policies, seeds = args.policies.split(","), [int(s) for s in args.seeds.split(",")]
    for p in policies:
        parse_policy(p)  # a bad label fails now, not after the gate
    logger.info("%d episodes x %d seeds x %d policies", len(episodes), len(seeds), len(policies))

    # 1. The memory gate (teacher forcing on the real held-out latents), at each noise level
    reals = [read_video(ep["video"])[0] for ep in episodes]
    gates = {} if args.no_gate else memory_gate(pipe, episodes, reals, [float(t) for t in args.gate_t.split(",")])
    for t, gate in gates.items():
        logger.info("memory gate t=%s: %s", t, gate)
    if args.gate_only:
        (out / "gate.json").write_text(json.dumps(gates, indent=2))
        return

    # 2. Real footage: its own revisit consistency, and through the VAE (the ceiling)
    ceiling = []
    for ep, real in zip(episodes, reals):
        rec = vae_round_trip(pipe.vae, real)
        s_real, s_vae = score(real, ep), score(rec, ep)
        ceiling.append(dict(video_id=ep["video_id"], vae_reconstruction_psnr=frame_psnr(rec, real[: len(rec)]),
                            real_revisit_psnr=s_real["revisit_psnr"], real_chance_psnr=s_real["chance_psnr"],
                            vae_revisit_psnr=s_vae["revisit_psnr"], vae_chance_psnr=s_vae["chance_psnr"]))
        logger.info("%s VAE reconstruction %.2f dB, revisit ceiling %.2f dB (chance %.2f)", ep["video_id"],
                    ceiling[-1]["vae_reconstruction_psnr"], s_vae["revisit_psnr"], s_vae["chance_psnr"])

    # 3. Generation: every (episode, policy, seed), in worker processes
    jobs = [(i, ep, p, s, args.steps) for i, ep in enumerate(episodes) for s in seeds for p in policies]
    results: dict[tuple[int, str, int], dict] = {}
    strip_videos: dict[str, np.ndarray] = {}
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.model, 1)) as pool:
        for i, policy, seed, video, info in pool.imap_unordered(_generate, jobs):
            s = score(video, episodes[i])
            results[(i, policy, seed)] = {**s, **info}
            if i == 0 and seed == seeds[0]:
                strip_videos[policy] = video
            logger.info("%s %-11s seed %d revisit %.2f chance %.2f (%.0f s)", episodes[i]["video_id"], policy,
                        seed, s["revisit_psnr"], s["chance_psnr"], info["seconds"])

    # 4. Table, paired differences with bootstrap CIs
    def values(policy: str, key: str) -> list[float]:
        return [results[(i, policy, s)][key] for i in range(len(episodes)) for s in seeds]

    table = {}
    for p in policies:
        rev, cha = np.array(values(p, "revisit_psnr")), np.array(values(p, "chance_psnr"))
        table[p] = {"revisit_psnr": float(np.nanmean(rev)), "chance_psnr": float(np.nanmean(cha)),
                    "recall_db": bootstrap_mean_ci(rev - cha),
                    "peak_memory_kib": float(np.mean(values(p, "peak_memory_bytes"))) / 1024,
                    "median_chunk_seconds": float(np.mean(values(p, "median_chunk_seconds")))}
    diffs = {}
    for mine in [p for p in policies if parse_policy(p)[0] == "egolcd"]:
        for other in policies:
            if other != mine and not (parse_policy(other)[0] == "egolcd" and policies.index(other) < policies.index(mine)):
                d = np.array(values(mine, "revisit_psnr")) - np.array(values(other, "revisit_psnr"))
                diffs[f"{mine} - {other}"] = bootstrap_mean_ci(d)
    mean = lambda key: float(np.nanmean([c[key] for c in ceiling]))  # noqa: E731
    summary = {"vae_reconstruction_psnr": mean("vae_reconstruction_psnr"), "real_revisit_psnr": mean("real_revisit_psnr"),
               "real_chance_psnr": mean("real_chance_psnr"), "vae_revisit_psnr": mean("vae_revisit_psnr"),
               "vae_chance_psnr": mean("vae_chance_psnr")}
    lines = [f"{len(episodes)} held-out episodes x {len(seeds)} seeds, {args.steps} steps; pose-paired revisit "
             "PSNR of middle segments",
             "", "| policy | revisit PSNR (dB) | chance PSNR (dB) | recall = revisit - chance (95% CI) | "
             "peak memory (KiB) | s/chunk |", "|---|---|---|---|---|---|"]
    for p, r in table.items():
        m, lo, hi = r["recall_db"]
        lines.append(f"| {p} | {r['revisit_psnr']:.2f} | {r['chance_psnr']:.2f} | {m:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
                     f"{r['peak_memory_kib']:.0f} | {r['median_chunk_seconds']:.3f} |")
    lines.append(f"| real footage through the VAE (ceiling) | {summary['vae_revisit_psnr']:.2f} | "
                 f"{summary['vae_chance_psnr']:.2f} | {summary['vae_revisit_psnr'] - summary['vae_chance_psnr']:+.2f} | | |")
    lines.append(f"| real footage | {summary['real_revisit_psnr']:.2f} | {summary['real_chance_psnr']:.2f} | "
                 f"{summary['real_revisit_psnr'] - summary['real_chance_psnr']:+.2f} | | |")
    lines += ["", f"VAE reconstruction PSNR of the held-out footage: {summary['vae_reconstruction_psnr']:.2f} dB", "",
              "| paired difference (revisit PSNR) | mean (dB) | 95% bootstrap CI |", "|---|---|---|"]
    for name, (m, lo, hi) in diffs.items():
        lines.append(f"| {name} | {m:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")
    if gates:
        lines += ["", "| memory gate: teacher-forced flow loss on held-out revisit chunks | own store | another "
                  "episode's store | no long-term store | (swapped - own) / own, 95% CI |", "|---|---|---|---|---|"]
    else:
        lines += ["", "memory gate: not run (--no-gate)"]
    for t, g in gates.items():
        m, lo, hi = g["swapped_over_own"]
        lines.append(f"| t = {t}, {g['revisit_chunks']} chunks | {g['own_store']:.4f} | {g['swapped_store']:.4f} | "
                     f"{g['no_long_term_store']:.4f} | {100 * m:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    (out / "drift.md").write_text("\n".join(lines) + "\n")
    per_run = [{"episode": episodes[i]["video_id"], "policy": p, "seed": s, **v} for (i, p, s), v in sorted(results.items())]
    (out / "drift.json").write_text(json.dumps({"table": table, "differences": diffs, "ceiling": summary,
                                                "per_episode_ceiling": ceiling, "memory_gate": gates,
                                                "episodes": len(episodes), "seeds": seeds, "steps": args.steps,
                                                "runs": per_run}, indent=1))
    _strip(out / "strip.png", episodes[0], strip_videos, reals[0])
    logger.info("\n%s", "\n".join(lines))


def _strip(path: Path, ep: dict, videos: dict[str, np.ndarray], real: np.ndarray) -> None:
    """First visit (top) vs pose-paired revisit (bottom) of episode 0, for the real footage and each policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, pairs, _ = _pairs(ep)[0]
    if not len(pairs):
        return
    f, g = pairs[len(pairs) // 2]
    cols = {"real footage": real, **videos}
    fig, axes = plt.subplots(2, len(cols), figsize=(1.8 * len(cols), 4.0), squeeze=False)
    for j, (name, video) in enumerate(cols.items()):
        axes[0, j].imshow(video[g])
        axes[1, j].imshow(video[f])
        axes[0, j].set_title(name, fontsize=8)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel(f"first visit\nframe {g}", fontsize=8)
    axes[1, 0].set_ylabel(f"revisit\nframe {f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
