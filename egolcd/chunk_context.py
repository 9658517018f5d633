"""What one chunk sees: the layout of its memory context (``ContextSpan``) and the context itself
(``ChunkContext``), as ``MemoryPolicy.context`` builds it; ``ChunkContext.short_term`` is the sink + window
part that memory guidance guides against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .attention import LayerKV

if TYPE_CHECKING:
    from .memory_store import MemoryChunk


@dataclass
class ContextSpan:
    """Where one memory chunk sits inside a context: tokens ``[start, end)`` of every layer."""

    kind: str  # "retrieved" | "sink" | "window"
    chunk: int
    segment: int
    start: int
    end: int
    score: float | None = None


@dataclass
class ChunkContext:
    """What one chunk sees: per-layer context (``None`` when empty), the chunk's frame position in the
    context's coordinates, and the layout (for importance accounting and the memory inspector)."""

    layers: list[LayerKV] | None
    frame_start: int
    abs_frame_start: int
    spans: list[ContextSpan]
    items: list[MemoryChunk]

    @property
    def tokens_per_layer(self) -> int:
        return 0 if self.layers is None else len(self.layers[0])

    def describe(self) -> list[dict]:
        return [
            {"kind": s.kind, "chunk": s.chunk, "segment": s.segment, "tokens": s.end - s.start, "score": s.score}
            for s in self.spans
        ]

    def short_term(self, window_chunks: int, sink: bool) -> ChunkContext:
        """This context restricted to what the ``sink-window`` policy would see: the sink (chunk 0, when
        ``sink``) and the last ``window_chunks`` window chunks, at the same frame positions, so every offset
        to the current chunk is unchanged. Retrieved long-term entries (egolcd) and older window chunks
        (dense) are left out. The unconditional branch of memory guidance (``chunk_loop``)."""
        window = [i for i, s in enumerate(self.spans) if s.kind == "window"][-window_chunks:] if window_chunks else []
        keep = [i for i, s in enumerate(self.spans) if i in window or (sink and s.chunk == 0 and s.kind != "retrieved")]
        spans, offset = [], 0
        for i in keep:
            s = self.spans[i]
            spans.append(ContextSpan(s.kind, s.chunk, s.segment, offset, offset + s.end - s.start, s.score))
            offset += s.end - s.start
        layers = None
        if self.layers is not None and keep:
            ranges = [(self.spans[i].start, self.spans[i].end) for i in keep]
            if ranges[-1][1] - ranges[0][0] == offset:  # contiguous (egolcd: the suffix after the retrieved)
                ranges = [(ranges[0][0], ranges[-1][1])]

            def take(t: Tensor) -> Tensor:  # (B, T_kept, ...): a view when contiguous
                return t[:, ranges[0][0] : ranges[0][1]] if len(ranges) == 1 else torch.cat(
                    [t[:, a:b] for a, b in ranges], dim=1)

            layers = [  # without ``storage``: attention concatenates the current chunk instead of writing in place
                LayerKV(take(kv.key), take(kv.value), take(kv.pos), None if kv.rotated_key is None else take(kv.rotated_key))
                for kv in self.layers
            ]
        return ChunkContext(layers, self.frame_start, self.abs_frame_start, spans, [self.items[i] for i in keep])
