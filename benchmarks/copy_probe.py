"""Copy probe: can the DiT learn to read its context at all? Random latents, one chunk an exact copy.

Each clip is 8 chunks of i.i.d. Gaussian latents. Chunks 6-7 repeat either chunks 4-5 (``--source window``:
the copy sits in the short-term window, 2 chunks back) or chunks 1-2 (``--source memory``: a segment the
narrative revisits, read through the long-term store with aligned revisit slots). Only chunks 6-7 are scored,
at noise levels t ~ U(t_min, 1). Nothing but the context says what a copied chunk holds, so:

* a model that ignores its context converges to the best *no-information* estimate, whose loss is
  ``E_t[2 - (2t - 1)^2 / ((1 - t)^2 + t^2)]`` (``no_info_loss``, 1.57 for t ~ U(0.5, 1));
* a model that copies reaches 0.

``copy_fraction = 1 - loss / no_info_loss`` over the last 100 steps says how much of the copy was learned.
The DiT is built from a preset with fresh weights (seeded), trained with AdamW through
``teacher_forcing_loss`` and the real ``MemoryPolicy``, exactly the training path of ``egolcd train``.

    .venv/bin/python benchmarks/copy_probe.py --preset demo --source window --steps 600 --out outputs/copy.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def no_info_loss(t_min: float, n: int = 10_000) -> float:
    """Flow loss of the best estimate of ``v = eps - x0`` from ``x_t`` alone (x0, eps ~ N(0, 1)), t ~ U(t_min, 1)."""
    t = t_min + (1 - t_min) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return float((2 - (2 * t - 1) ** 2 / ((1 - t) ** 2 + t**2)).mean())


def run(args: argparse.Namespace) -> dict:
    from egolcd.config import MemoryConfig
    from egolcd.losses import LossWeights, teacher_forcing_loss
    from egolcd.memory import MemoryPolicy
    from egolcd.transformer import EgoLCDTransformer3DModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = EgoLCDTransformer3DModel.from_preset(args.preset).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attn1.norm_q" in name or "attn1.norm_k" in name:
                p.fill_(args.qk_norm_init)
    if args.positional_init:
        from egolcd.training.model import init_position_heads

        init_position_heads(model, args.positional_heads, bias=args.positional_init, norm=args.qk_norm_init)
    k = model.config.chunk_frames
    c = model.config.in_channels
    memory = MemoryConfig(policy="egolcd", window_chunks=2, sink=True, keep_ratio=1.0, top_m=3,
                          revisit_position=args.revisit_position)
    policy = MemoryPolicy(memory, k)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    segments = [0, 1, 1, 2, 2, 2, 3, 3]  # segment 3 revisits segment 1 (chunks 1-2)
    revisits = {3: 1} if args.source == "memory" else {}
    src = slice(1 * k, 3 * k) if args.source == "memory" else slice(4 * k, 6 * k)
    g = torch.Generator().manual_seed(args.seed + 1)
    keys = [torch.nn.functional.normalize(torch.randn(1, 384, generator=g), dim=-1) for _ in range(4)]
    text = torch.zeros(1, 8, model.config.text_dim)
    n = len(segments)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        x0 = torch.randn(1, c, n * k, args.latent, args.latent, generator=g)
        x0[:, :, 6 * k : 8 * k] = x0[:, :, src]
        eps = torch.randn(x0.shape, generator=g)
        t = args.t_min + (1 - args.t_min) * torch.rand(1, n, generator=g)
        out = teacher_forcing_loss(model, policy, x0, eps, t, text, [keys[s] for s in segments], segments, revisits,
                                   weights=LossWeights(memory=0.0, variant="none"), scored=[6, 7])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.flow.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {sum(losses[-100:]) / 100:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    baseline = no_info_loss(args.t_min)
    last = sum(losses[-100:]) / min(100, len(losses))
    return {"args": vars(args), "no_info_loss": baseline, "final_loss": last,
            "copy_fraction": 1 - last / baseline, "losses": losses,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--source", choices=("window", "memory"), default="window")
    p.add_argument("--revisit-position", choices=("slot", "current"), default="slot",
                   help="where the aligned first-visit entry sits (MemoryConfig.revisit_position)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent", type=int, default=16, help="latent height = width")
    p.add_argument("--t-min", type=float, default=0.5)
    p.add_argument("--qk-norm-init", type=float, default=1.0, help="initial self-attention q/k RMSNorm weights")
    p.add_argument("--positional-init", type=float, default=0.0,
                   help="start --positional-heads heads per block as position-matching heads with this q/k bias (0: off)")
    p.add_argument("--positional-heads", type=int, default=2, help="heads per block that --positional-init sets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for the result")
    args = p.parse_args()
    result = run(args)
    print(f"no-information loss {result['no_info_loss']:.4f}, final {result['final_loss']:.4f}, "
          f"copy fraction {result['copy_fraction']:+.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    assert math.isfinite(result["final_loss"])


if __name__ == "__main__":
    main()
