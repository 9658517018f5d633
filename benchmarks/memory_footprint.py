"""Memory footprint of each policy after N chunks (tokens per layer, bytes), the tiny preset by default.

    .venv/bin/python benchmarks/memory_footprint.py --chunks 100 --preset tiny

Runs the real chunk loop (read context -> one denoising call -> clean pass -> write) with random
weights and random latents; prints a table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from egolcd.config import MEMORY_POLICIES, get_preset
from egolcd.memory import MemoryPolicy
from egolcd.transformer import EgoLCDTransformer3DModel

logger = logging.getLogger("memory_footprint")


@torch.inference_mode()
def footprint(preset_name: str, policy_name: str, chunks: int, size: int = 8, segments: int = 10) -> dict:
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel.from_preset(preset_name).eval()
    k = preset.chunk_frames
    policy = MemoryPolicy.from_name(policy_name, k, preset.memory)
    state = policy.init_state()
    text = torch.randn(1, 8, model.config.text_dim)
    keys = torch.nn.functional.normalize(torch.randn(segments, 16), dim=-1)
    ctx_tokens = []
    for c in range(chunks):
        seg = c * segments // chunks
        ctx = policy.context(state, keys[seg : seg + 1])
        x = torch.randn(1, model.config.in_channels, k, size, size)
        model.forward_chunk(x, torch.full((1, k), 500.0), text, ctx.layers, ctx.frame_start)
        clean = model.forward_chunk(x, torch.zeros(1, k), text, ctx.layers, ctx.frame_start, return_kv=True,
                                    return_attention_mass=policy.needs_attention_mass)
        policy.write(state, ctx, clean.kv, keys[seg : seg + 1], seg, clean.attention_mass)
        ctx_tokens.append(ctx.tokens_per_layer)
    return {
        "policy": policy_name,
        "chunks": chunks,
        "tokens_per_chunk": len(clean.kv[0]),
        "memory_tokens_per_layer": state.tokens_per_layer(),
        "max_context_tokens_per_layer": max(ctx_tokens),
        "memory_bytes": state.nbytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--policies", default=",".join(MEMORY_POLICIES))
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [footprint(args.preset, name, args.chunks) for name in args.policies.split(",")]
    logger.info("%-12s %8s %18s %20s %14s", "policy", "chunks", "memory tok/layer", "max ctx tok/layer", "bytes")
    for r in rows:
        logger.info("%-12s %8d %18d %20d %14d", r["policy"], r["chunks"], r["memory_tokens_per_layer"],
                    r["max_context_tokens_per_layer"], r["memory_bytes"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
