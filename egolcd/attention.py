"""Attention over ``[memory context + current chunk]`` with rotary positions applied at read time.

Keys are stored *before* rotary encoding (METHOD.md, "Memory layout per layer"), together with their
``(frame, row, col)`` grid positions. Rotary cos/sin are computed on the fly from integer positions, so
there is no position table to overflow and the caller is free to re-index frame positions relative to
the current chunk. The frequencies are bit-identical to diffusers' ``WanRotaryPosEmbed`` (float64
angles, Wan's split of the head dimension into t/h/w parts).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LayerKV:
    """Keys/values of some tokens for one transformer layer.

    Args:
        key: ``(B, T, heads, head_dim)`` after the key RMS norm, before rotary encoding.
        value: ``(B, T, heads, head_dim)``.
        pos: ``(B, T, 3)`` int64 grid positions ``(frame, row, col)`` of each token.
        rotated_key: optional cache of ``key`` with rotary encoding at ``pos`` applied (``with_rotary``):
            a chunk's context is read by every denoising step, so it is rotated once per chunk.
        storage: optional ``(rotated keys, values)`` buffers, each ``(B, capacity, heads, head_dim)``,
            whose first ``len(self)`` tokens are this context (a ``ContextArena`` view). Attention then
            writes the current chunk's keys/values into the free tail in place instead of concatenating
            (no allocation and no copy of the context per denoising step). In such views ``key`` is the
            rotated key (the pre-rotary keys stay in memory, not in the arena).
    """

    key: Tensor
    value: Tensor
    pos: Tensor
    rotated_key: Tensor | None = None
    storage: tuple[Tensor, Tensor] | None = None

    def with_rotary(self, theta: float = 10000.0) -> LayerKV:
        """The same tokens with their rotary-encoded keys cached (positions as they are now)."""
        cos, sin = rope_cos_sin(self.pos, self.key.shape[-1], theta)
        return LayerKV(self.key, self.value, self.pos, apply_rope(self.key, cos, sin))

    def __len__(self) -> int:
        return int(self.key.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.key.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value, self.pos))

    @staticmethod
    def cat(parts: Sequence[LayerKV]) -> LayerKV:
        """Concatenate along the token axis (order is kept)."""
        if len(parts) == 1:
            return parts[0]
        return LayerKV(
            key=torch.cat([p.key for p in parts], dim=1),
            value=torch.cat([p.value for p in parts], dim=1),
            pos=torch.cat([p.pos for p in parts], dim=1),
        )

    def gather(self, index: Tensor) -> LayerKV:
        """Select tokens per batch element. ``index``: ``(B, k)`` int64 token indices."""
        return LayerKV(gather_tokens(self.key, index), gather_tokens(self.value, index), gather_tokens(self.pos, index))

    def slice(self, start: int, end: int) -> LayerKV:
        return LayerKV(self.key[:, start:end], self.value[:, start:end], self.pos[:, start:end])

    def shift_frames(self, offset: int) -> LayerKV:
        """The same tokens with ``offset`` added to their frame positions (keys stay pre-RoPE)."""
        if offset == 0:
            return self
        pos = self.pos.clone()
        pos[..., 0] += offset
        return LayerKV(self.key, self.value, pos)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerKV:
        return LayerKV(
            self.key.to(device=device, dtype=dtype),
            self.value.to(device=device, dtype=dtype),
            self.pos.to(device=device),
        )

    def detach(self) -> LayerKV:
        return LayerKV(self.key.detach(), self.value.detach(), self.pos)


def gather_tokens(t: Tensor, index: Tensor) -> Tensor:
    """Tokens ``index`` ``(B, k)`` of ``t`` ``(B, n, ...)`` along dim 1, per batch row. One row (generation)
    takes one ``index_select`` instead of an expanded index and a ``gather``."""
    if index.shape[0] == 1:
        return t.index_select(1, index[0])
    expanded = index.reshape(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    return torch.gather(t, 1, expanded)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of the head dimension into (t, h, w) rotary parts."""
    h_dim = w_dim = 2 * (head_dim // 6)
    return head_dim - h_dim - w_dim, h_dim, w_dim


@functools.lru_cache(maxsize=32)
def _rope_inv_freqs(head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Wan's inverse frequencies ``(head_dim / 2,)`` float64, its t/h/w parts concatenated, and the position
    axis ``(head_dim / 2,)`` each one reads. Made once per (head_dim, theta, device), outside inference mode
    (so training may use them too)."""
    with torch.inference_mode(False):
        freqs, axes = [], []
        for axis, dim in enumerate(rope_split(head_dim)):
            freqs.append(1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)))
            axes.append(torch.full((dim // 2,), axis, dtype=torch.long, device=device))
        return torch.cat(freqs), torch.cat(axes)


def rope_angles(pos: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Rotary angles ``(B, T, head_dim / 2)`` float64 of integer grid positions ``pos`` ``(B, T, 3)``."""
    inv_freqs, axes = _rope_inv_freqs(head_dim, float(theta), pos.device)
    return pos.to(torch.float64)[..., axes] * inv_freqs  # (B, T, head_dim / 2)


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin for integer grid positions.

    Args:
        pos: ``(B, T, 3)`` int64 ``(frame, row, col)``; any integer values (negative allowed).
        head_dim: attention head dimension.

    Returns:
        ``(cos, sin)``, each ``(B, T, 1, head_dim)`` float32, interleave-repeated as in Wan.
    """
    angles = rope_angles(pos, head_dim, theta)
    cos = angles.cos().float().repeat_interleave(2, dim=-1)[:, :, None, :]  # (B, T, 1, head_dim)
    sin = angles.sin().float().repeat_interleave(2, dim=-1)[:, :, None, :]
    return cos, sin


def rope_freqs_at(pos: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """``rope_freqs(*rope_cos_sin(pos, ...))`` without the interleaved cos/sin: ``(B, T, 1, head_dim / 2)``."""
    angles = rope_angles(pos, head_dim, theta)
    return torch.complex(angles.cos().float(), angles.sin().float())[:, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None) -> Tensor:
    """Rotate consecutive pairs of ``x`` ``(B, T, heads, head_dim)`` (Wan's ``apply_rotary_emb``).

    Args:
        out: optional destination like ``x`` (e.g. a slice of a preallocated buffer; may be ``x`` itself),
            written in place.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    even, odd = x1 * c - x2 * s, x1 * s + x2 * c  # both computed before writing: out may alias x
    if out is None:
        out = torch.empty_like(x)
    out[..., 0::2] = even
    out[..., 1::2] = odd
    return out


def rope_freqs(cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary of ``rope_cos_sin`` as complex factors ``(B, T, 1, head_dim / 2)`` for ``apply_rope_complex``."""
    return torch.complex(cos[..., 0::2].contiguous(), sin[..., 1::2].contiguous())


def apply_rope_complex(x: Tensor, freqs: Tensor, out: Tensor | None = None) -> Tensor:
    """``apply_rope`` as one complex multiply (one kernel instead of four multiplies, two adds and two
    strided copies): consecutive pairs of ``x`` are complex numbers rotated by ``freqs`` (``rope_freqs``).
    Same values as ``apply_rope`` within float rounding (tested). float32/float64 ``x`` only (there is no
    complex bfloat16); ``out`` may be ``x`` itself or a slice of a preallocated buffer."""
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    if out is None:
        return torch.view_as_real(xc * freqs).flatten(-2)
    torch.mul(xc, freqs, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
    return out


def rope_in_place_ok(x: Tensor) -> bool:
    """Whether ``apply_rope_complex`` can take ``x`` (float32/64, pairs contiguous, even offsets)."""
    return x.dtype in (torch.float32, torch.float64) and x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(
        s % 2 == 0 for s in x.stride()[:-1]
    )


def grid_positions(
    batch: int,
    frames: int,
    height: int,
    width: int,
    frame_start: int = 0,
    device: torch.device | None = None,
    frame_stride: int = 1,
) -> Tensor:
    """``(B, frames*height*width, 3)`` positions of a patch grid in ``(frame, row, col)`` raster order.

    Frame positions count latent frames: token frame ``j`` sits at ``frame_start + frame_stride * j``, where
    ``frame_stride`` is the DiT's temporal patch (1 for every Wan2.1 checkpoint, where this is the token index).
    """
    f = torch.arange(frame_start, frame_start + frame_stride * frames, frame_stride, device=device)
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    grid = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1).reshape(1, -1, 3)  # (1, F*H*W, 3)
    return grid.expand(batch, -1, -1)


def block_causal_mask(frames: int, tokens_per_frame: int, chunk_frames: int, device=None) -> Tensor:
    """Boolean ``(N, N)`` mask, True = may attend: bidirectional inside a chunk, causal across chunks."""
    chunk_id = torch.arange(frames, device=device) // chunk_frames
    chunk_id = chunk_id.repeat_interleave(tokens_per_frame)  # (N,)
    return chunk_id[:, None] >= chunk_id[None, :]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on ``(B, T, heads, head_dim)`` tensors (PyTorch SDPA backends).

    Args:
        q: ``(B, Tq, h, d)``; k, v: ``(B, Tk, h, d)``; mask: optional bool ``(Tq, Tk)``, True = attend.

    Returns:
        ``(B, Tq, h, d)``.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def attention_mass(
    q: Tensor, k: Tensor, num_context: int, query_block: int | None = None, start: int = 0
) -> Tensor:
    """Attention mass received by each of the context keys ``start .. num_context - 1``.

    The softmax is over *all* keys (context + current), as in the attention itself; the mass is the
    mean over heads and queries of the probability each context key receives (METHOD.md, "Importance").

    Args:
        q: ``(B, Tq, h, d)`` rotary-encoded queries; k: ``(B, Tk, h, d)`` rotary-encoded keys.
        num_context: how many leading keys are memory context.
        query_block: queries per softmax block (default: as many as keep one block's probabilities
            within 2**26 float32 values, 256 MiB).
        start: the first context key whose mass is wanted (the policy scores only what it will sparsify).

    Returns:
        ``(B, num_context - start)`` float32.
    """
    b, tq, h, d = q.shape
    query_block = query_block or max(16, (1 << 26) // (b * h * k.shape[1]))
    scale = 1.0 / math.sqrt(d)
    kt = k.transpose(1, 2).float()  # (B, h, Tk, d)
    total = q.new_zeros((b, num_context - start), dtype=torch.float32)
    for first in range(0, tq, query_block):
        qb = q[:, first : first + query_block].transpose(1, 2).float()  # (B, h, bq, d)
        probs = torch.softmax(qb @ kt.transpose(-1, -2) * scale, dim=-1)  # (B, h, bq, Tk)
        total += probs[..., start:num_context].sum(dim=(1, 2))
    return total / (h * tq)


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_LOG2E = 1.0 / math.log(2.0)

#: Up to this many attention scores (``B * heads * Tq * Tk``) ``attention_and_mass`` takes one explicit
#: softmax on the CPU: at such sizes the cost is per-op overhead, and the explicit path is 7 ops against
#: the kernel path's ~20 (single thread, AVX-512: tiny preset's clean pass 9k scores, 66 us against 146;
#: 55k scores 246 against 365; 190k 661 against 772; even near 262k; 664k 4.4 ms against 2.2).
EXPLICIT_MASS_SCORES = 1 << 17


def attention_and_mass(
    q: Tensor, k: Tensor, v: Tensor, num_context: int, stride: int = 1, query_block: int | None = None,
    start: int = 0, explicit_max: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The attention output and ``attention_mass`` from one attention (inference; no mask, no gradient).

    The attention kernel returns each query's log-sum-exp ``lse`` of its scaled scores with the output
    (PyTorch's CPU flash kernel; elsewhere ``lse`` is computed blocked, no softmax kept). The mass of a
    context key ``j`` is then ``mean over heads and queries of exp(q . k_j * scale - lse)``: one blocked
    matmul over the *context* keys only, no softmax over all keys materialised. It is the same quantity
    as ``attention_mass`` (METHOD.md, "Importance"), within float rounding (tested).

    Args:
        q: ``(B, Tq, h, d)``; k, v: ``(B, Tk, h, d)`` rotary-encoded. num_context: leading context keys.
        stride: average over every ``stride``-th query only (``importance_query_stride``).
        query_block: queries per block of the mass reduction (default: blocks of at most 2**26 values).
        start: the first context key whose mass is wanted; keys before it are not scored at all.
        explicit_max: on the CPU in float32, at most this many scores take one explicit softmax instead
            (default ``EXPLICIT_MASS_SCORES``; 0 never).

    Returns:
        ``((B, Tq, h, d) output, (B, num_context - start) float32 mass)``.
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, d)
    b, h, tq, d = qt.shape
    scale = 1.0 / math.sqrt(d)
    small = EXPLICIT_MASS_SCORES if explicit_max is None else explicit_max
    if q.device.type == "cpu" and q.dtype == torch.float32 and b * h * tq * kt.shape[2] <= small:
        # a small problem: one softmax, its probabilities give the output and the mass
        probs = torch.softmax((qt @ kt.transpose(-1, -2)).mul_(scale), dim=-1)  # (B, h, tq, Tk)
        sampled = probs if stride == 1 else probs[:, :, ::stride]
        mass = sampled[..., start:num_context].mean(dim=(1, 2))  # (B, n): mean over heads and queries
        return (probs @ vt).transpose(1, 2), mass
    if _flash_cpu is not None and q.device.type == "cpu":
        out, lse = _flash_cpu(qt, kt, vt)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt)
        lse = None
    q_s = qt[:, :, ::stride].float()  # (B, h, tq_s, d)
    tq_s = q_s.shape[2]
    n = num_context - start  # scored context keys
    if n <= 0:
        return out.transpose(1, 2), q.new_zeros((b, 0), dtype=torch.float32)
    query_block = query_block or max(16, (1 << 26) // (b * h * kt.shape[2]))
    k_all = kt.float()
    k_ctx_t = k_all[:, :, start:num_context].transpose(-1, -2)  # (B, h, d, n)
    total = q.new_zeros((b, n), dtype=torch.float32)
    for first in range(0, tq_s, query_block):
        qb = q_s[:, :, first : first + query_block] * scale  # (B, h, bq, d)
        if lse is None:
            lse_b = torch.logsumexp(qb @ k_all.transpose(-1, -2), dim=-1)  # (B, h, bq)
        else:
            lse_b = lse[:, :, ::stride][:, :, first : first + query_block].float()
        scores = torch.baddbmm(  # in base 2: exp2 is 3x cheaper than exp on the CPU (AVX-512: 106 us vs 344)
            lse_b.reshape(b * h, -1, 1) * -_LOG2E, qb.reshape(b * h, -1, d), k_ctx_t.reshape(b * h, d, n), alpha=_LOG2E
        )  # (q . k * scale - lse) * log2(e), (B*h, bq, n)
        total += scores.exp2_().view(b, h, -1, n).sum(dim=(1, 2))
    return out.transpose(1, 2), total / (h * tq_s)
