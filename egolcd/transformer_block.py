"""One DiT block of :class:`~egolcd.transformer.EgoLCDTransformer3DModel`: a Wan transformer block whose
self-attention reads an explicit memory context, and the per-layer inputs/outputs of one call (``_LayerIO``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from torch import Tensor

from .attention import (
    LayerKV,
    apply_rope,
    apply_rope_complex,
    attention,
    attention_and_mass,
    attention_mass,
    rope_cos_sin,
    rope_in_place_ok,
)


@dataclass
class _LayerIO:
    """Per-layer inputs and captured outputs of one block call."""

    cos: Tensor  # (B, N, 1, d) rotary of the current tokens
    sin: Tensor
    pos: Tensor  # (B, N, 3)
    context: LayerKV | None = None
    reference: LayerKV | None = None
    mask: Tensor | None = None
    want_kv: bool = False
    want_mass: bool = False
    mass_stride: int = 1
    mass_from: int = 0  # first context token whose attention mass is wanted
    fast: bool = False  # inference fast path: fused elementwise kernels, one-pass importance
    freqs: Tensor | None = None  # complex rotary of the current tokens (fast path, float32)
    cross_kv: tuple[Tensor, Tensor] | None = None  # cached text keys/values (PromptCache)
    kv: LayerKV | None = None
    mass: Tensor | None = None
    memory_output: tuple[Tensor, Tensor] | None = None


class EgoLCDTransformerBlock(nn.Module):
    """A Wan transformer block (same submodule names as ``WanTransformerBlock``) whose self-attention
    reads an explicit memory context."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str | None = "rms_norm_across_heads",
        cross_attn_norm: bool = False,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"unsupported qk_norm {qk_norm!r} (Wan2.1 uses 'rms_norm_across_heads')")
        self.num_heads = num_heads
        # 1. Self-attention
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(
            dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=eps, processor=WanAttnProcessor()
        )
        # 2. Cross-attention
        self.attn2 = WanAttention(
            dim=dim,
            heads=num_heads,
            dim_head=dim // num_heads,
            eps=eps,
            added_kv_proj_dim=added_kv_proj_dim,
            cross_attention_dim_head=dim // num_heads,
            processor=WanAttnProcessor(),
        )
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        # 3. Feed-forward
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def self_attention(self, x: Tensor, io: _LayerIO) -> Tensor:
        """Self-attention of the current tokens over ``[context + current]``.

        Args:
            x: ``(B, N, D)`` modulated, normalised hidden states of the current tokens.
        """
        attn = self.attn1
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (self.num_heads, -1))  # (B, N, h, d)
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (self.num_heads, -1))
        v = attn.to_v(x).unflatten(2, (self.num_heads, -1))
        if io.want_kv:
            io.kv = LayerKV(k, v, io.pos)
        freqs = io.freqs if io.freqs is not None and rope_in_place_ok(q) else None
        q = apply_rope(q, io.cos, io.sin) if freqs is None else apply_rope_complex(q, freqs)

        def rotate(x: Tensor, out: Tensor | None = None) -> Tensor:
            if freqs is not None and rope_in_place_ok(x) and (out is None or rope_in_place_ok(out)):
                return apply_rope_complex(x, freqs, out=out)
            return apply_rope(x, io.cos, io.sin, out=out)

        def read(ctx: LayerKV | None) -> tuple[Tensor, Tensor]:
            eager = not torch.compiler.is_compiling()  # compiled graphs concatenate (no input mutation)
            if ctx is not None and ctx.storage is not None and eager and not torch.is_grad_enabled():
                # Preallocated [context | current] buffers: write the current chunk into the tail in place
                buf_k, buf_v = ctx.storage
                start, end = len(ctx), len(ctx) + k.shape[1]
                if end <= buf_k.shape[1] and buf_k.dtype == k.dtype:
                    rotate(k, out=buf_k[:, start:end])
                    buf_v[:, start:end].copy_(v)
                    return buf_k[:, :end], buf_v[:, :end]  # (B, T_ctx + N, h, d) views
            k_cur = rotate(k)
            if ctx is None or len(ctx) == 0:
                return k_cur, v
            if ctx.rotated_key is not None:
                k_ctx = ctx.rotated_key.to(k.dtype)
            else:
                c_cos, c_sin = rope_cos_sin(ctx.pos, k.shape[-1])
                k_ctx = apply_rope(ctx.key.to(k.dtype), c_cos, c_sin)
            return torch.cat([k_ctx, k_cur], dim=1), torch.cat([ctx.value.to(v.dtype), v], dim=1)

        keys, values = read(io.context)
        n_ctx = 0 if io.context is None else len(io.context)
        if io.want_mass and io.fast and io.mask is None:
            # one attention gives the output and each query's log-sum-exp; the mass reads only the context
            out, io.mass = attention_and_mass(q, keys, values, n_ctx, io.mass_stride, start=io.mass_from)
            out = out.flatten(2, 3).type_as(q)
        else:
            out = attention(q, keys, values, io.mask).flatten(2, 3).type_as(q)  # (B, N, h*d)
            if io.want_mass:
                io.mass = attention_mass(q.detach()[:, :: io.mass_stride], keys.detach(), n_ctx, start=io.mass_from)
        if io.reference is not None:
            with torch.no_grad():
                ref_k, ref_v = read(io.reference)
                ref_out = attention(q, ref_k, ref_v).flatten(2, 3).type_as(q)
            io.memory_output = (out, ref_out)
        return attn.to_out[1](attn.to_out[0](out))

    def cross_kv(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys (after ``norm_k``) and values of projected text tokens, ``(B, L, h, d)``."""
        attn = self.attn2
        key = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1))
        return key, attn.to_v(text).unflatten(2, (attn.heads, -1))

    def cross_attention_cached(self, x: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """``attn2(x, text)`` (Wan's text cross-attention) with the text's keys/values given."""
        attn = self.attn2
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
        out = attention(q, key, value).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    def forward(
        self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor, io: _LayerIO
    ) -> Tensor:
        """
        Args:
            hidden_states: ``(B, N, D)`` current tokens, N = F * tokens_per_frame.
            encoder_hidden_states: ``(B, L, D)`` projected text tokens.
            temb: ``(B, F, 6, D)`` per-frame modulation.
            io: rotary, context, mask and capture requests for this layer.
        """
        b, n, d = hidden_states.shape
        frames = temb.shape[1]
        # 1. Per-frame modulation parameters, broadcast over the tokens of each frame.
        mod = (self.scale_shift_table.unsqueeze(0) + temb.float()).unsqueeze(3)  # (B, F, 6, 1, D)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mod.unbind(2)  # each (B, F, 1, D)

        def modulate(x: Tensor, norm: nn.Module, shift: Tensor, scale: Tensor) -> Tensor:
            y = norm(x.float()).view(b, frames, n // frames, d)  # (B, F, H*W, D)
            if io.fast:  # one fused kernel: shift + y * (1 + scale)
                return torch.addcmul(shift, y, 1 + scale).view(b, n, d).type_as(x)
            return (y * (1 + scale) + shift).view(b, n, d).type_as(x)

        def gated(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
            xf, yf = x.float().view(b, frames, n // frames, d), y.float().view(b, frames, n // frames, d)
            out = torch.addcmul(xf, yf, gate) if io.fast else xf + yf * gate
            return out.view(b, n, d).type_as(x)

        # 2. Self-attention over [memory context + current chunk]
        attn_out = self.self_attention(modulate(hidden_states, self.norm1, shift_msa, scale_msa), io)
        hidden_states = gated(hidden_states, attn_out, gate_msa)
        # 3. Cross-attention to the text (keys/values cached per prompt on the fast path)
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        if io.cross_kv is not None:
            hidden_states = hidden_states + self.cross_attention_cached(norm_hidden_states, *io.cross_kv)
        else:
            hidden_states = hidden_states + self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        # 4. Feed-forward
        ff_out = self.ffn(modulate(hidden_states, self.norm3, c_shift, c_scale))
        return gated(hidden_states, ff_out, c_gate)
