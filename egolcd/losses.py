"""Training objectives: per-chunk flow matching and the Memory Regulation Loss, run through the one
``MemoryPolicy`` by teacher forcing (METHOD.md, "Training = inference policy").

For a clip of N chunks with clean latents ``x0``: chunk ``i`` reads ``policy.context(state)`` (built
from the *clean* latents of chunks ``< i``), is denoised from ``x_t = (1 - t_i) x0_i + t_i eps_i`` and
scored against ``v = eps_i - x0_i``; then its clean pass (t = 0) writes it into memory exactly as in
inference. ``L = L_flow + lambda_MR * L_MR``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .clean_pass import clean_pass_write
from .memory import ChunkContext, MemoryChunk, MemoryPolicy
from .transformer import EgoLCDTransformer3DModel

LOSS_VARIANTS = ("mr", "anchor", "none")


@dataclass
class LossWeights:
    """Args: memory: lambda of the memory term; variant: ``mr`` (Memory Regulation Loss), ``anchor``
    (flow target anchored on retrieved clean latents) or ``none``."""

    memory: float = 0.1
    variant: str = "mr"

    def __post_init__(self) -> None:
        if self.variant not in LOSS_VARIANTS:
            raise ValueError(f"unknown memory loss variant {self.variant!r}; choose one of {LOSS_VARIANTS}")


@dataclass
class ClipLoss:
    """Losses of one clip. ``predictions``: per chunk ``(B, C, K, H, W)`` (``None``: not scored); ``contexts``: what each saw;
    ``stores``: the long-term entries held before each chunk (to swap into another clip's pass)."""

    loss: Tensor
    flow: Tensor
    memory: Tensor
    predictions: list[Tensor | None] = field(default_factory=list)
    contexts: list[ChunkContext] = field(default_factory=list)
    stores: list[list[MemoryChunk]] = field(default_factory=list)


def flow_loss(v_pred: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """Rectified-flow loss ``||v_theta - (eps - x0)||^2`` (mean)."""
    return (v_pred.float() - (eps.float() - x0.float())).square().mean()


def memory_regulation_loss(memory_outputs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``L_MR = mean_l ||O_mem - sg(O_full)||^2 / ||sg(O_full)||^2``.

    Args:
        memory_outputs: per layer ``(O_mem, O_full)``, each ``(B, N, heads*d)``: the current chunk's
            self-attention output with the policy-limited memory and with the full clean history.
    """
    terms = []
    for o_mem, o_full in memory_outputs:
        ref = o_full.detach().float()
        terms.append((o_mem.float() - ref).square().sum() / ref.square().sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def anchor_loss(v_pred: Tensor, eps: Tensor, retrieved_latents: Sequence[Tensor]) -> Tensor:
    """``||v_theta - (eps - mean(z_R))||^2`` with ``z_R`` the clean latents of the retrieved chunks."""
    anchor = torch.stack([z.float() for z in retrieved_latents]).mean(0)
    return (v_pred.float() - (eps.float() - anchor)).square().mean()


def scored_chunks(
    segments: Sequence[int], revisits: dict[int, int], count: int | None, rng: random.Random
) -> list[int] | None:
    """Which chunks of a clip training scores: every chunk whose segment revisits an earlier one (it must
    recall a place from memory), then other chunks drawn by ``rng`` until there are ``count`` (``None``:
    all chunks). Revisit chunks beyond ``count`` are subsampled. Unscored chunks still write memory.
    """
    if count is None or count >= len(segments):
        return None
    recall = [i for i, s in enumerate(segments) if s in revisits]
    other = [i for i, s in enumerate(segments) if s not in revisits]
    if len(recall) >= count:
        return sorted(rng.sample(recall, count))
    return sorted(recall + rng.sample(other, count - len(recall)))


def teacher_forcing_loss(
    model: EgoLCDTransformer3DModel,
    policy: MemoryPolicy,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    text: Tensor | Sequence[Tensor],
    embeddings: Tensor | Sequence[Tensor],
    segments: Sequence[int] | None = None,
    revisits: dict[int, int] | None = None,
    weights: LossWeights | None = None,
    timestep_scale: float = 1000.0,
    long_term_override: Sequence[list[MemoryChunk]] | None = None,
    scored: Collection[int] | None = None,
) -> ClipLoss:
    """Run a clip through the policy chunk by chunk and compute ``L_flow + lambda * L_memory``.

    Args:
        x0: ``(B, C, N*K, H, W)`` clean latents. eps: noise of the same shape.
        t: ``(B, N)`` per-chunk noise levels in [0, 1] (diffusion forcing: each chunk its own level).
        text: ``(B, L, text_dim)`` for all chunks, or one such tensor per chunk.
        embeddings: ``(B, E)`` pooled prompt embedding for all chunks, or one per chunk (memory keys).
        segments: segment index of each chunk (default: chunk i -> segment i).
        revisits: segment index -> revisited segment index (forces its long-term entries in).
        long_term_override: per chunk, long-term entries to read *instead of* the clip's own (e.g. another
            episode's ``ClipLoss.stores``): the "does the model use its memory" test.
        scored: chunk indices whose denoising pass runs and is scored (default: all). The others only
            run their clean pass, so memory is written exactly as before; training uses it to spend its
            gradient on the chunks that must recall a place (:func:`scored_chunks`).
    """
    weights = weights or LossWeights()
    k = policy.chunk_frames
    n_chunks = x0.shape[2] // k
    if x0.shape[2] % k:
        raise ValueError(f"clip of {x0.shape[2]} latent frames is not a whole number of {k}-frame chunks")
    if t.shape != (x0.shape[0], n_chunks):
        raise ValueError(f"t must be (B, num_chunks) = {(x0.shape[0], n_chunks)}, got {tuple(t.shape)}")
    segments = list(segments) if segments is not None else list(range(n_chunks))
    revisits = revisits or {}
    state = policy.init_state()
    history: list[MemoryChunk] = []
    flow_terms, mem_terms, preds, contexts, stores = [], [], [], [], []
    use_mr = weights.variant == "mr" and weights.memory > 0
    for i in range(n_chunks):
        sl = slice(i * k, (i + 1) * k)
        txt = text[i] if isinstance(text, (list, tuple)) else text
        emb = embeddings[i] if isinstance(embeddings, (list, tuple)) else embeddings
        revisit = [revisits[segments[i]]] if segments[i] in revisits else []
        # 1. What this chunk sees: exactly the inference context
        stores.append(list(state.store.entries))
        own = state.store.entries
        if long_term_override is not None:
            state.store.entries = list(long_term_override[i]) if i < len(long_term_override) else []
        ctx = policy.context(state, emb, revisit, segment=segments[i])
        state.store.entries = own
        contexts.append(ctx)
        ti = t[:, i : i + 1]  # (B, 1)
        # 2. Denoising prediction on the noisy chunk (gradients flow here); unscored chunks skip it
        if scored is not None and i not in scored:
            preds.append(None)
        else:
            x_t = (1 - ti)[:, :, None, None, None] * x0[:, :, sl] + ti[:, :, None, None, None] * eps[:, :, sl]
            reference = policy.reference_context(history, ctx) if use_mr else None
            out = model.forward_chunk(
                x_t, (ti * timestep_scale).expand(-1, k), txt, ctx.layers, ctx.frame_start, reference_context=reference
            )
            preds.append(out.sample)
            flow_terms.append(flow_loss(out.sample, x0[:, :, sl], eps[:, :, sl]))
            if use_mr and out.memory_outputs is not None:
                mem_terms.append(memory_regulation_loss(out.memory_outputs))
            elif weights.variant == "anchor" and weights.memory > 0:
                retrieved = [x0[:, :, s.chunk * k : (s.chunk + 1) * k] for s in ctx.spans if s.kind == "retrieved"]
                if retrieved:
                    mem_terms.append(anchor_loss(out.sample, eps[:, :, sl], retrieved))
        # 3. Clean pass (t = 0) writes the chunk into memory, as inference does (the same function)
        history.append(clean_pass_write(
            model, policy, state, ctx, x0[:, :, sl], txt, emb, segments[i], torch.zeros_like(ti).expand(-1, k)
        ))
    flow = torch.stack(flow_terms).mean()
    memory = torch.stack(mem_terms).mean() if mem_terms else flow.new_zeros(())
    return ClipLoss(flow + weights.memory * memory, flow, memory, preds, contexts, stores)
