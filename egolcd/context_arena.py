"""``ContextArena``: preallocated attention-context buffers for the inference fast path (see ``memory``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .attention import LayerKV, apply_rope, apply_rope_complex, rope_cos_sin, rope_freqs_at, rope_in_place_ok

__all__ = ["ContextArena"]


class ContextArena:
    """Preallocated per-layer buffers for ``[context | current chunk]`` (the inference fast path).

    ``MemoryPolicy.context(..., arena=)`` writes the context's rotary-encoded keys, values and positions
    into these buffers once per chunk; the transformer then writes each denoising step's current-chunk
    keys/values into the tail in place. With a bounded policy the capacity stops growing after the
    first chunks, so the chunk loop allocates nothing for attention context. Buffers grow (x1.5) when a
    context plus ``reserve`` current tokens does not fit (``dense`` grows with the video).

    A part that sits where it sat in the previous fill of the layer (the same memory tensors at the same
    frame offset and token range, inside the previous context, so no current-chunk write touched it) is
    not copied or rotated again: the sink, retrieved entries kept in their slot, and with ``dense`` every
    chunk but the newest. ``reuse=False`` copies everything (the plain path, for equality tests).

    Args:
        reserve: tokens kept free after the context (the current chunk's tokens per layer).
        reuse: skip re-copying unchanged leading parts.
    """

    def __init__(self, reserve: int, growth: float = 1.5, reuse: bool = True) -> None:
        self.reserve = reserve
        self.growth = growth
        self.reuse = reuse
        self.capacity = 0
        self.reallocations = 0
        self.reused_tokens = 0  # tokens not copied again, all layers, since creation (a statistic)
        self.key: list[Tensor] = []
        self.value: list[Tensor] = []
        self.pos: list[Tensor] = []
        self._filled: list[list[tuple[LayerKV, int, int]]] = []  # per layer: (tokens, offset, start) as written

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.key, *self.value, *self.pos))

    def ensure(self, n_layers: int, tokens: int, like: LayerKV) -> None:
        """Room for ``tokens + reserve`` tokens per layer, shaped and typed like ``like``."""
        need = tokens + self.reserve
        b, _, h, d = like.value.shape
        same = self.key and self.key[0].dtype == like.value.dtype and self.key[0].device == like.value.device
        if need <= self.capacity and same and len(self.key) == n_layers and self.key[0].shape[0] == b:
            return
        cap = max(need, int(self.capacity * self.growth)) if same else need
        kw = {"dtype": like.value.dtype, "device": like.value.device}
        self.key = [torch.empty(b, cap, h, d, **kw) for _ in range(n_layers)]
        self.value = [torch.empty(b, cap, h, d, **kw) for _ in range(n_layers)]
        self.pos = [torch.empty(b, cap, 3, dtype=torch.long, device=like.value.device) for _ in range(n_layers)]
        self._filled = [[] for _ in range(n_layers)]
        self.capacity = cap
        self.reallocations += 1

    def fill(
        self, layer: int, parts: Sequence[tuple[LayerKV, int]], theta: float = 10000.0
    ) -> LayerKV:
        """Write ``parts`` (tokens, frame offset) of one layer in order; return the context view."""
        buf_k, buf_v, buf_p = self.key[layer], self.value[layer], self.pos[layer]
        previous = self._filled[layer] if self.reuse and layer < len(self._filled) else []
        written: list[tuple[LayerKV, int, int]] = []
        start, fresh = 0, 0  # fresh: the first token copied (and to rotate) in this fill
        for i, (kv, offset) in enumerate(parts):  # 1. copy tokens in (from the offload device too), re-index frames
            end = start + len(kv)
            same = (
                fresh == start and i < len(previous) and previous[i][0].key is kv.key
                and previous[i][0].value is kv.value and previous[i][0].pos is kv.pos
                and previous[i][1:] == (offset, start)
            )
            if same:  # still in the buffer, rotated, where this fill wants it
                fresh = end
            else:
                buf_p[:, start:end].copy_(kv.pos, non_blocking=True)
                if offset:
                    buf_p[:, start:end, 0] += offset
                buf_k[:, start:end].copy_(kv.key, non_blocking=True)
                buf_v[:, start:end].copy_(kv.value, non_blocking=True)
            written.append((kv, offset, start))
            start = end
        if layer < len(self._filled):
            self._filled[layer] = written
            self.reused_tokens += fresh
        # 2. rotate the newly copied context keys at once, in place
        view_k, view_p = buf_k[:, fresh:start], buf_p[:, fresh:start]
        if start > fresh:
            if rope_in_place_ok(view_k):
                apply_rope_complex(view_k, rope_freqs_at(view_p, buf_k.shape[-1], theta), out=view_k)
            else:
                apply_rope(view_k, *rope_cos_sin(view_p, buf_k.shape[-1], theta), out=view_k)
        return LayerKV(
            buf_k[:, :start], buf_v[:, :start], buf_p[:, :start], rotated_key=buf_k[:, :start], storage=(buf_k, buf_v)
        )
