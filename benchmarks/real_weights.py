"""Real weights, end to end: frames/s, peak memory and MFU of an egolcd model folder (e.g. a converted
Self-Forcing or LongLive DiT with Wan2.1's VAE and umT5, made by `egolcd create-model --from-wan`) under
each memory policy, over a video of ``--seconds`` (default 60 s) generated through ``EgoLCDPipeline``
with the model's own sampling defaults (a distilled model: its ``distilled`` sampler and step list).

Per policy, one run of the whole video (text encoding, every chunk's denoising, clean pass, memory write,
VAE decode and the mp4 write), the weights loaded once and shared:

* ``frames_per_second``: frames of the video / wall seconds of the run (end to end);
* ``steady_frames_per_second``: pixel frames per chunk / median seconds of the last 8 chunks;
* ``peak_mb``: ``torch.cuda.max_memory_allocated`` over the run (weights included); on CPU the process's
  peak RSS, which only grows across policies (run one policy per process for a per-policy figure);
* ``mfu``: the DiT's matmul FLOPs per chunk (``egolcd.bench.chunk_flops`` at the last chunk's context
  size, no CFG: guidance must be 1) over the median of the last 8 chunk times (which include the VAE
  decode, so this is a lower bound on the DiT's own MFU) over the measured matmul peak
  (``egolcd.bench.measure_matmul_peak``, once per run);
* ``flatness``: median of the last 8 chunk times / median of chunks 4-11 (``egolcd.bench.flatness``);
* ``context_tokens`` and ``memory_bytes`` per chunk, and the video (``OUT/<policy>.mp4``) to look at.

    python benchmarks/real_weights.py --model models/self-forcing --device cuda --dtype bfloat16 \\
        --policies egolcd,window --seconds 60 --out outputs/h100/real
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

# A 60-second walk through a kitchen that comes back to where it started (six 10 s segments, the last a
# revisit of the first): the geometry (480x832, 16 fps) comes from the model's config.
SEGMENTS = [
    ("sink", "rinses a blue mug under the tap at the white sink", None),
    ("counter", "puts the mug on the wooden counter next to a red kettle", None),
    ("stove", "turns to the gas stove and puts the kettle on", None),
    ("fridge", "opens the fridge and takes out a bottle of milk", None),
    ("table", "walks to the table and sets down the milk", None),
    ("back", "walks back to the white sink and picks up the blue mug", "sink"),
]


def narrative_dict(seconds: float, width: int | None, height: int | None, fps: int | None) -> dict:
    per = seconds / len(SEGMENTS)
    segments = []
    for sid, action, revisit in SEGMENTS:
        seg = {"id": sid, "seconds": per, "action": action}
        if revisit:
            seg["revisit"] = revisit
        segments.append(seg)
    out: dict = {
        "scene": "a small kitchen with a white sink, a red kettle, a gas stove and a wooden table",
        "actor": "The camera wearer",
        "segments": segments,
    }
    for key, value in (("width", width), ("height", height), ("fps", fps)):
        if value:
            out[key] = value
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    from egolcd.bench import chunk_flops, flatness, measure_matmul_peak
    from egolcd.config import MEMORY_POLICIES
    from egolcd.pipeline import EgoLCDPipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="egolcd model folder (create-model --from-wan)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--policies", default="egolcd,window")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--height", type=int, help="default: the model's")
    ap.add_argument("--width", type=int, help="default: the model's")
    ap.add_argument("--fps", type=int, help="default: the model's")
    ap.add_argument("--steps", type=int, help="default: the model's (a distilled model: its step list)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/h100/real", help="folder for the JSON and the videos")
    args = ap.parse_args(argv)

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name in policies:
        if name not in MEMORY_POLICIES:
            ap.error(f"unknown memory policy {name!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but no CUDA device is available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    pipe = EgoLCDPipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    cfg = pipe.config
    if cfg.guidance != 1.0:
        print(f"note: the model's guidance {cfg.guidance} is set to 1 (the FLOP count assumes no CFG)", file=sys.stderr)
    if args.compile:
        from egolcd.pipeline import compile_transformer

        compile_transformer(pipe.transformer)
    steps = args.steps or cfg.steps
    narrative_path = out / "narrative.json"
    narrative_path.write_text(json.dumps(narrative_dict(args.seconds, args.width, args.height, args.fps), indent=2))
    peak_flops = measure_matmul_peak(args.device, dtype)

    from egolcd.memory import MemoryPolicy

    results = {}
    for name in policies:
        _sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times: list[float] = []
        last = [time.perf_counter()]

        def on_chunk(report, frames, times=times, last=last) -> None:
            _sync(args.device)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        t0 = time.perf_counter()
        last[0] = t0
        result = pipe(narrative_path, out / f"{name}.mp4", memory=name, steps=steps, guidance=1.0, seed=args.seed,
                      progress=False, callback=on_chunk)
        _sync(args.device)
        wall = time.perf_counter() - t0
        peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        k = pipe.chunk_frames
        height, width = pipe.video_size(pipe.compile(narrative_path)[0])
        latent_hw = (height // pipe.vae.spatial_factor, width // pipe.vae.spatial_factor)
        tokens = pipe.transformer.tokens_per_chunk(*latent_hw)
        policy = MemoryPolicy(dataclasses.replace(cfg.memory, policy=name), k)
        contexts = [c.context_tokens for c in result.chunks]
        steady = statistics.median(times[-8:])
        flops = chunk_flops(pipe.transformer.config, tokens, contexts[-1], cfg.text_max_length, steps,
                            policy.needs_attention_mass, policy.config.importance_query_stride)
        results[name] = {
            "frames": result.num_frames, "chunks": result.num_chunks, "wall_seconds": wall,
            "frames_per_second": result.num_frames / wall,
            "steady_frames_per_second": pipe.vae.temporal_factor * k / steady,
            "peak_mb": peak_mb, "mfu": flops / steady / peak_flops, "flops_per_chunk": flops,
            "flatness": flatness(times), "chunk_seconds": times, "context_tokens": contexts,
            "memory_bytes": [c.memory_bytes for c in result.chunks], "video": str(out / f"{name}.mp4"),
        }
        r = results[name]
        flat = "-" if r["flatness"] is None else f"{r['flatness']:.3f}"
        print(f"{name:<12} {r['frames']} frames in {wall:.1f} s: {r['frames_per_second']:.2f} frames/s "
              f"(steady {r['steady_frames_per_second']:.2f}), peak {peak_mb:.0f} MB, MFU {r['mfu']:.1%}, "
              f"flatness {flat}, context {max(contexts)} tokens")
    summary = {
        "model": str(args.model), "preset": cfg.preset, "sampler": cfg.sampler, "steps": steps,
        "denoising_step_list": cfg.denoising_step_list, "shift": cfg.shift, "device": args.device
        if not args.device.startswith("cuda") else torch.cuda.get_device_name(), "dtype": args.dtype,
        "size": [height, width], "seconds": args.seconds, "compile": args.compile,
        "matmul_peak_tflops": peak_flops / 1e12, "policies": results,
    }
    (out / "real_weights.json").write_text(json.dumps(summary, indent=2))
    print(out / "real_weights.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
