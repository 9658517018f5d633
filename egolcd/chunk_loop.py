"""One chunk of the EgoLCD loop (read memory, denoise, write memory) and what a run reports per chunk.

:func:`generate_chunk` is the step ``EgoLCDPipeline`` repeats; the benchmarks call it directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .clean_pass import clean_pass_write
from .flow import cfg_denoiser, distilled_sigmas, get_sigmas, to_model_timestep
from .memory import ChunkContext, ContextArena, MemoryPolicy, MemoryState
from .model_dir import GenerationConfig
from .narrative import CompiledNarrative
from .transformer import EgoLCDTransformer3DModel


@dataclass
class ChunkReport:
    """What happened at one chunk (progress callbacks, the memory inspector, benchmarks)."""

    chunk: int
    segment: int
    seconds: float
    context_tokens: int
    memory_tokens: int
    memory_bytes: int
    context: list[dict]
    footage: bool = False  # the chunk is the user's footage, written into memory, not generated


@dataclass
class GenerationResult:
    path: Path
    num_frames: int
    fps: int
    num_chunks: int
    chunks: list[ChunkReport]


def sampling_sigmas(config: GenerationConfig, sampler: str, steps: int) -> Tensor:
    """The schedule of a run: a distilled model's own step list (``config.denoising_step_list``) when it
    is sampled with the ``distilled`` sampler at that many steps, else ``get_sigmas(steps, config.shift)``."""
    step_list = config.denoising_step_list
    if sampler == "distilled" and step_list and steps == len(step_list):
        return distilled_sigmas(step_list, config.shift, config.warp_denoising_step)
    return get_sigmas(steps, config.shift)


def narrative_fingerprint(compiled: CompiledNarrative) -> str:
    text = json.dumps([compiled.prompts, compiled.segment_frames, compiled.fps], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(*modules: torch.nn.Module, samples: int = 4096) -> str:
    """A short hash of the weights (names, shapes and up to ``samples`` evenly spaced values of every
    parameter and buffer, rounded to bf16 so float32 and bf16 copies of one model agree): a state saved
    with one model refuses to resume with another of the same preset. Cost: a few ms, any model size."""
    digest = hashlib.sha256()
    for module in modules:
        tensors = dict(module.named_parameters())
        tensors.update(dict(module.named_buffers()))
        for name in sorted(tensors):
            t = tensors[name].detach()
            digest.update(f"{name}:{tuple(t.shape)};".encode())
            flat = t.reshape(-1)
            if flat.numel() > samples:
                flat = flat[torch.linspace(0, flat.numel() - 1, samples, device=flat.device).long()]
            values = flat.float().to(torch.bfloat16).float().cpu() if flat.is_floating_point() else flat.cpu()
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def chunk_denoiser(
    transformer: EgoLCDTransformer3DModel,
    ctx: ChunkContext,
    text: Tensor,
    negative: Tensor | None = None,
    guidance: float = 1.0,
    memory_guidance: float = 1.0,
    short_term: ChunkContext | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The model wrapped as ``v = denoiser(x, t)`` (t in [0, 1]) with one chunk's memory context fixed.

    ``memory_guidance`` g != 1 with ``short_term`` (``ctx.short_term(...)``: the sink and window part of
    ``ctx``) smaller than ``ctx`` guides on the long-term memory the way classifier-free guidance guides on
    the prompt: ``v = v(short_term) + g * (v(ctx) - v(short_term))`` (history guidance, docs/METHOD.md),
    one more forward per step. Prompt guidance, if any, applies on top.
    """
    k = int(transformer.config.chunk_frames)

    def call(x: Tensor, t: Tensor, txt: Tensor, c: ChunkContext = ctx) -> Tensor:
        timestep = to_model_timestep(t).to(x.device).reshape(-1, 1).expand(x.shape[0], k)
        return transformer.forward_chunk(x, timestep, txt, c.layers, c.frame_start).sample

    cond: Callable[[Tensor, Tensor], Tensor] = lambda x, t: call(x, t, text)  # noqa: E731
    if memory_guidance != 1.0 and short_term is not None and short_term.tokens_per_layer < ctx.tokens_per_layer:
        cond = cfg_denoiser(cond, lambda x, t: call(x, t, text, short_term), memory_guidance)
    if negative is None or guidance == 1.0:
        return cond
    return cfg_denoiser(cond, lambda x, t: call(x, t, negative), guidance)


def generate_chunk(
    transformer: EgoLCDTransformer3DModel,
    policy: MemoryPolicy,
    state: MemoryState,
    noise: Tensor,
    text: Tensor,
    key: Tensor,
    segment: int,
    revisit: list[int],
    sigmas: Tensor,
    sampler: Callable[..., Tensor],
    negative: Tensor | None = None,
    guidance: float = 1.0,
    arena: ContextArena | None = None,
    memory_guidance: float = 1.0,
) -> tuple[Tensor, ChunkContext]:
    """One chunk of the EgoLCD loop: read memory, denoise, write memory (state advances by one chunk).

    Args:
        noise: ``(B, C, K, h, w)`` starting noise. text: ``(B, L, D)`` the segment's token states.
        key: ``(B, E)`` pooled prompt embedding (memory key). revisit: forced segments.
        sigmas, sampler: the sampling schedule (on the host) and function (``egolcd.flow``).
        arena: preallocated context buffers reused across chunks (``ContextArena``); the returned
            context's tensors are views into it, valid until the next chunk.
        memory_guidance: guidance scale on the context beyond the sink and window (``chunk_denoiser``:
            egolcd's retrieved entries, dense's older chunks), applied only to chunks of a revisited place
            (``revisit`` given); 1 = off.

    Returns:
        ``(x0, ctx)``: the clean latents and the context the chunk saw.
    """
    # 1. Read memory: what this chunk sees
    ctx = policy.context(state, key, revisit, arena=arena, segment=segment)
    # 2. Denoise
    short_term = ctx.short_term(policy.config.window_chunks, policy.config.sink) if revisit and memory_guidance != 1.0 else None
    denoiser = chunk_denoiser(transformer, ctx, text, negative, guidance, memory_guidance, short_term)
    x0 = sampler(denoiser, noise, sigmas)
    # 3. Write memory: a clean pass (t = 0) gives the chunk's keys/values and importance
    clean_pass_write(transformer, policy, state, ctx, x0, text, key, segment)
    return x0, ctx


def compile_transformer(transformer: EgoLCDTransformer3DModel, **compile_kwargs: Any) -> EgoLCDTransformer3DModel:
    """``torch.compile`` each transformer block in place (regional compilation, diffusers'
    ``compile_repeated_blocks``), with dynamic shapes: the context length changes from chunk to chunk
    until the memory budget is reached. Same outputs; the first chunks pay the compile time.

    A block sees a handful of graph variants (denoising vs the clean pass that returns K/V and
    importance, with and without context, static then dynamic sizes), more than dynamo's default of 8
    recompiles per function, past which it would silently fall back to eager: the limit is raised to 32.
    """
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
    transformer.compile_repeated_blocks(**{"dynamic": True, **compile_kwargs})
    return transformer
