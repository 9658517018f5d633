"""The clean pass (t = 0): how a clean latent chunk is written into memory (METHOD.md, "Write").

One path for every clean chunk: a generated chunk after its denoising (``pipeline.generate_chunk``), a
training chunk under teacher forcing (``losses.teacher_forcing_loss``), a chunk of the user's own footage
(``EgoLCDPipeline(init_video=...)``) and a chunk replayed to rebuild the memory of an extended run. The
model runs once on the chunk at t = 0 with the chunk's memory context; its keys/values and the attention
mass its queries gave the context (importance) go through ``MemoryPolicy.write``, which pushes the chunk
into the short-term window and sparsifies the chunk leaving it into the long-term store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .memory import ChunkContext, ContextArena, MemoryChunk, MemoryPolicy, MemoryState
from .transformer import EgoLCDTransformer3DModel

__all__ = ["clean_pass_write", "write_clean_chunk"]


def clean_pass_write(
    transformer: EgoLCDTransformer3DModel,
    policy: MemoryPolicy,
    state: MemoryState,
    ctx: ChunkContext,
    x0: Tensor,
    text: Tensor,
    key: Tensor,
    segment: int,
    timestep: Tensor | None = None,
) -> MemoryChunk:
    """Run the clean pass of chunk ``state.chunk`` on the context ``ctx`` it read, and write it.

    Args:
        x0: ``(B, C, K, h, w)`` clean latents. text: ``(B, L, D)`` token states of its segment's prompt.
        key: ``(B, E)`` pooled memory key of its segment. segment: its segment index.
        timestep: ``(B, K)`` zeros to pass as the timestep (default: float32 zeros on ``x0``'s device;
            training passes zeros of its own ``t``'s dtype).

    Returns:
        the stored ``MemoryChunk`` (the state advances by one chunk).
    """
    if timestep is None:
        timestep = torch.zeros(x0.shape[0], x0.shape[2], device=x0.device)
    with torch.no_grad():
        clean = transformer.forward_chunk(
            x0, timestep, text, ctx.layers, ctx.frame_start,
            return_kv=True, return_attention_mass=policy.needs_attention_mass,
            attention_mass_stride=policy.config.importance_query_stride,
            attention_mass_from=policy.mass_start(ctx) if policy.needs_attention_mass else 0,
        )
    return policy.write(state, ctx, clean.kv, key, segment, clean.attention_mass)


def write_clean_chunk(
    transformer: EgoLCDTransformer3DModel,
    policy: MemoryPolicy,
    state: MemoryState,
    x0: Tensor,
    text: Tensor,
    key: Tensor,
    segment: int,
    revisit: Sequence[int] = (),
    arena: ContextArena | None = None,
) -> ChunkContext:
    """Read the memory as chunk ``state.chunk`` would (``policy.context``), then write ``x0`` through the
    clean pass: what a generated chunk does without its denoising.

    Returns:
        the context the chunk read (its tensors are views into ``arena`` when one is given).
    """
    ctx = policy.context(state, key, list(revisit), arena=arena, segment=segment)
    clean_pass_write(transformer, policy, state, ctx, x0, text, key, segment)
    return ctx
