"""EgoLCD memory: short-term window, Long-Term Sparse KV Cache, and the one ``MemoryPolicy``.

The attention context of chunk ``i`` is, per layer and in this order (METHOD.md)::

    [long-term retrieved sparse KV] + [sink: first chunk] + [short-term window: last W chunks] + [chunk i]

Memory holds keys *before* rotary encoding with absolute ``(frame, row, col)`` positions. When a context
is read, frame positions are re-indexed: the window keeps its offsets to the current chunk, the sink and
the retrieved entries occupy chunk-sized slots just before the window, and the earliest slot starts at
frame 0. The largest frame position is therefore ``(slots + window + 1) * chunk_frames - p_t`` whatever the
video length (positions count latent frames; ``p_t`` is the DiT's temporal patch). (``dense`` keeps everything
in the window, so its positions are the absolute ones.)

The same ``MemoryPolicy`` drives training (teacher forcing over a clip) and inference (``pipeline``):
``context()`` says what a chunk sees, ``write()`` stores the chunk after its clean (t = 0) pass.
State is explicit (``MemoryState``), passed in and returned, and saves to safetensors. The stores themselves
(``MemoryChunk``, ``ShortTermWindow``, ``LongTermSparseKVCache``) live in ``memory_store``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .attention import LayerKV
from .chunk_context import ChunkContext, ContextSpan
from .config import MemoryConfig
from .context_arena import ContextArena
from .memory_store import LongTermSparseKVCache, MemoryChunk, ShortTermWindow

__all__ = [  # the store's classes are re-exported: ``egolcd.memory`` is where users import them from
    "STATE_FORMAT", "ChunkContext", "ContextArena", "ContextSpan", "LongTermSparseKVCache", "MemoryChunk",
    "MemoryPolicy", "MemoryState", "ShortTermWindow",
]

STATE_FORMAT = "egolcd-memory-state/1"
@dataclass
class MemoryState:
    """All memory of one generation (or one training clip): explicit, saved and restored whole."""

    window: ShortTermWindow
    store: LongTermSparseKVCache
    chunk: int = 0  # index of the next chunk

    def tokens_per_layer(self) -> int:
        return self.window.tokens_per_layer() + self.store.tokens_per_layer()

    @property
    def nbytes(self) -> int:
        items = self.window.chunks + ([self.window.sink_chunk] if self.window.sink_chunk else [])
        return sum(c.nbytes for c in items) + self.store.nbytes


class MemoryPolicy:
    """The one object that decides, for each chunk, which past tokens are visible.

    Named policies (``MemoryConfig.policy``): ``egolcd`` (window + sink + long-term sparse retrieval),
    ``dense`` (full history), ``window`` (last W chunks), ``sink-window`` (first chunk + last W),
    ``none`` (previous chunk only).
    """

    def __init__(self, config: MemoryConfig, chunk_frames: int) -> None:
        self.config = config
        self.chunk_frames = chunk_frames
        name = config.policy
        self.window_chunks: int | None = {"dense": None, "none": 1}.get(name, config.window_chunks)
        self.sink = name == "sink-window" or (name == "egolcd" and config.sink)
        self.long_term = name == "egolcd"
        # a revisit's aligned first-visit entry is read on the current chunk's positions (egolcd and dense)
        self.colocates = config.align_revisits and config.revisit_position == "current"

    @classmethod
    def from_name(cls, name: str, chunk_frames: int, base: MemoryConfig | None = None) -> MemoryPolicy:
        base = base or MemoryConfig()
        fields = {**base.__dict__, "policy": name}
        return cls(MemoryConfig(**fields), chunk_frames)

    @property
    def name(self) -> str:
        return self.config.policy

    @property
    def needs_attention_mass(self) -> bool:
        """Importance scores are only used when chunks are sparsified into long-term memory: not when the
        store keeps whole entries (``keep_ratio >= 1`` and no ``max_tokens`` budget to trim to)."""
        c = self.config
        return self.long_term and (c.keep_ratio < 1.0 or c.max_tokens is not None)

    def mass_start(self, ctx: ChunkContext) -> int:
        """The first context token whose attention mass (importance) is used: the window's, whose chunks are
        sparsified when they leave it (METHOD.md: mass received *while in the window*); also the retrieved
        entries' when a ``max_tokens`` budget trims them by importance. The sink is never sparsified.
        The context is laid out [retrieved, sink, window], so this is one cut."""
        if self.config.max_tokens is not None:
            return 0
        return next((s.start for s in ctx.spans if s.kind == "window"), ctx.tokens_per_layer)

    def init_state(self) -> MemoryState:
        c = self.config
        max_entries = c.max_entries if self.long_term else 0
        return MemoryState(
            window=ShortTermWindow(self.window_chunks, self.sink),
            store=LongTermSparseKVCache(c.keep_ratio, max_entries, c.max_tokens, c.offload_long_term),
        )

    # ------------------------------------------------------------------ read
    @staticmethod
    def segment_progress(state: MemoryState, segment: int | None) -> int:
        """Which chunk of its segment chunk ``state.chunk`` is (0: the first), from the earliest chunk of
        ``segment`` still held in the window, sink or store (0 when none is)."""
        sink = [state.window.sink_chunk] if state.window.sink_chunk else []
        held = state.window.chunks + sink + state.store.entries
        starts = [c.chunk for c in held if segment is not None and c.segment == segment]
        return state.chunk - min(starts) if starts else 0

    def context(
        self,
        state: MemoryState,
        embedding: Tensor,
        revisit: Sequence[int] = (),
        count_retrieval: bool = True,
        arena: ContextArena | None = None,
        segment: int | None = None,
    ) -> ChunkContext:
        """The context of chunk ``state.chunk``.

        Args:
            embedding: ``(B, E)`` pooled prompt embedding of the chunk's segment.
            revisit: segment indices whose long-term entries are forced in (``revisit:`` in a narrative).
            count_retrieval: count this read for the eviction order (off for side computations).
            arena: preallocated buffers to build the context in (inference); ``None`` concatenates new
                tensors (training, where autograd needs them).
            segment: the chunk's own segment index: similarity retrieval skips its entries.
        """
        k = self.chunk_frames
        abs_start = state.chunk * k
        retrieved, progress = [], None
        if self.long_term and self.config.top_m > 0:
            progress = self.segment_progress(state, segment) if revisit and self.config.align_revisits else None
            retrieved = state.store.retrieve(
                embedding, self.config.top_m, self.config.threshold, revisit, skip_segment=segment, progress=progress
            )
        elif self.window_chunks is None and self.colocates and any(c.segment in revisit for c in state.window.chunks):
            # dense: the whole history is in its window, and the aligned first-visit chunk is read once more on
            # the current chunk's own positions, as egolcd reads it: dense sees a superset of egolcd's context
            progress = self.segment_progress(state, segment)
            history = LongTermSparseKVCache(keep_ratio=1.0, max_entries=len(state.window.chunks),
                                            entries=list(state.window.chunks))
            retrieved = history.retrieve(embedding, 1, None, revisit, skip_segment=segment, progress=progress)
        slots: list[tuple[str, MemoryChunk, float | None]] = [("retrieved", e, s) for e, s in retrieved]
        sink = state.window.sink_chunk
        if sink is not None:
            slots.append(("sink", sink, None))
        window = state.window.chunks
        base = (len(slots) + len(window)) * k  # frame position of the current chunk
        spans, parts_per_item, items, offset = [], [], [], 0
        colocated = (  # the aligned revisit entry on the current chunk's own frame positions
            len(retrieved) - 1
            if retrieved and progress is not None and self.config.revisit_position == "current"
            and retrieved[-1][0].segment in revisit
            else None
        )
        for i, (kind, item, score) in enumerate(slots):  # slot i starts at frame i * k
            spans.append(ContextSpan(kind, item.chunk, item.segment, offset, offset + item.num_tokens, score))
            parts_per_item.append((base if i == colocated else i * k) - item.chunk * k)
            items.append(item)
            offset += item.num_tokens
            if kind == "retrieved" and count_retrieval:
                item.retrievals += 1
        for item in window:  # the window keeps its offsets to the current chunk
            spans.append(ContextSpan("window", item.chunk, item.segment, offset, offset + item.num_tokens))
            parts_per_item.append(base - abs_start)
            items.append(item)
            offset += item.num_tokens
        layers = None
        if items:
            n_layers = len(items[0].kv)
            device = embedding.device
            if arena is not None:
                arena.ensure(n_layers, offset, items[-1].kv[0])
                layers = [  # keys rotated once here, into the arena: every denoising step reads them
                    arena.fill(layer, [(it.kv[layer], d) for it, d in zip(items, parts_per_item)])
                    for layer in range(n_layers)
                ]
            else:
                layers = [  # keys rotated once here: every denoising step of the chunk reads them
                    LayerKV.cat(
                        [it.kv[layer].to(device).shift_frames(d) for it, d in zip(items, parts_per_item)]
                    ).with_rotary()
                    for layer in range(n_layers)
                ]
        return ChunkContext(layers, base, abs_start, spans, items)

    def reference_context(self, history: Sequence[MemoryChunk], ctx: ChunkContext) -> list[LayerKV] | None:
        """The full clean history (every earlier chunk, dense) in ``ctx``'s coordinates (MR loss)."""
        if not history:
            return None
        shift = ctx.frame_start - ctx.abs_frame_start
        n_layers = len(history[0].kv)
        return [
            LayerKV.cat([h.kv[layer].shift_frames(shift) for h in history]).with_rotary() for layer in range(n_layers)
        ]

    # ------------------------------------------------------------------ write
    def write(
        self,
        state: MemoryState,
        ctx: ChunkContext,
        kv: list[LayerKV],
        embedding: Tensor,
        segment: int,
        attention_mass: list[Tensor] | None = None,
    ) -> MemoryChunk:
        """Store chunk ``state.chunk`` after its clean pass and advance the state.

        Args:
            ctx: the context the clean pass read (its layout maps ``attention_mass`` back to chunks).
            kv: per layer, the chunk's keys/values in ``ctx`` coordinates (``ChunkOutput.kv``).
            embedding: ``(B, E)`` pooled embedding of the chunk's segment prompt.
            attention_mass: per layer ``(B, T_ctx - s)`` mass each context token from ``s`` on received
                (importance; ``s = self.mass_start(ctx)``, or 0 for the whole context). Only the chunks whose
                importance is used accumulate it (``mass_start``).
        """
        if attention_mass is not None:
            offset = ctx.tokens_per_layer - attention_mass[0].shape[1]  # the first scored context token
            first = max(offset, self.mass_start(ctx))
            for span, item in zip(ctx.spans, ctx.items):
                if span.start < first or span.kind == "sink":
                    continue
                for layer, mass in enumerate(attention_mass):  # (B, n) float32, no gradient
                    item.importance[layer].add_(mass[:, span.start - offset : span.end - offset])
                item.mass_recorded = len(attention_mass) == len(item.importance)
        shift = ctx.abs_frame_start - ctx.frame_start
        stored = [layer_kv.detach().shift_frames(shift) for layer_kv in kv]
        item = MemoryChunk(
            chunk=state.chunk,
            segment=segment,
            kv=stored,
            importance=[torch.zeros(s.key.shape[:2], device=s.key.device) for s in stored],
            embedding=embedding.detach(),
        )
        evicted = state.window.push(item)
        if evicted is not None and self.long_term:
            state.store.write(evicted)
        state.chunk += 1
        return item

    # ------------------------------------------------------------------ save / load
    def save_state(
        self,
        state: MemoryState,
        path: str | Path,
        extra: dict | None = None,
        extra_tensors: dict[str, Tensor] | None = None,
    ) -> None:
        """Write the whole memory to one safetensors file (tensors + a JSON layout in its metadata).

        Args:
            extra: JSON-serialisable run information stored alongside (seed, steps, ...).
            extra_tensors: further tensors to keep with the state (e.g. the latents generated so far).
        """
        tensors: dict[str, Tensor] = {f"extra.{k}": v.contiguous() for k, v in (extra_tensors or {}).items()}
        groups = {
            "window": state.window.chunks,
            "sink": [state.window.sink_chunk] if state.window.sink_chunk is not None else [],
            "store": state.store.entries,
        }
        layout: dict[str, list[dict]] = {}
        for group, items in groups.items():
            layout[group] = []
            for j, item in enumerate(items):
                p = f"{group}.{j}"
                tensors[f"{p}.embedding"] = item.embedding.clone()  # slices of one pooled batch
                for layer, (kv, score) in enumerate(zip(item.kv, item.importance)):
                    tensors[f"{p}.{layer}.key"] = kv.key.clone()
                    tensors[f"{p}.{layer}.value"] = kv.value.clone()
                    tensors[f"{p}.{layer}.pos"] = kv.pos.clone()  # layers may share one tensor
                    tensors[f"{p}.{layer}.importance"] = score.clone()
                layout[group].append(
                    {"chunk": item.chunk, "segment": item.segment, "retrievals": item.retrievals,
                     "layers": len(item.kv), "mass_recorded": item.mass_recorded}
                )
        meta = {
            "format": STATE_FORMAT,
            "policy": self.name,
            "config": json.dumps(self.config.__dict__),
            "chunk_frames": str(self.chunk_frames),
            "next_chunk": str(state.chunk),
            "layout": json.dumps(layout),
            "extra": json.dumps(extra or {}),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)  # atomic: a crash never leaves a half-written state

    def load_state(
        self, path: str | Path, device: torch.device | str = "cpu"
    ) -> tuple[MemoryState, dict, dict[str, Tensor]]:
        """Read a state written by ``save_state`` (same policy and chunk size, else ``ValueError``).

        Returns:
            ``(state, extra, extra_tensors)``.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"memory state not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path} is not a readable safetensors memory state ({exc})") from None
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not an egolcd memory state")
        if meta["policy"] != self.name or int(meta["chunk_frames"]) != self.chunk_frames:
            raise ValueError(
                f"memory state {path} was made with policy {meta['policy']!r}, chunk_frames {meta['chunk_frames']}; "
                f"this run uses {self.name!r}, {self.chunk_frames}"
            )
        tensors = load_file(str(path), device=str(device))
        layout = json.loads(meta["layout"])

        def build(group: str) -> list[MemoryChunk]:
            out = []
            for j, info in enumerate(layout[group]):
                p = f"{group}.{j}"
                out.append(
                    MemoryChunk(
                        chunk=info["chunk"],
                        segment=info["segment"],
                        retrievals=info["retrievals"],
                        mass_recorded=bool(info.get("mass_recorded", False)),  # states saved before 2026-12-03: checked
                        embedding=tensors[f"{p}.embedding"],
                        kv=[
                            LayerKV(tensors[f"{p}.{i}.key"], tensors[f"{p}.{i}.value"], tensors[f"{p}.{i}.pos"])
                            for i in range(info["layers"])
                        ],
                        importance=[tensors[f"{p}.{i}.importance"] for i in range(info["layers"])],
                    )
                )
            return out

        state = self.init_state()
        state.window.chunks = build("window")
        sink = build("sink")
        state.window.sink_chunk = sink[0] if sink else None
        state.store.entries = build("store")
        state.chunk = int(meta["next_chunk"])
        extra_tensors = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        return state, json.loads(meta.get("extra", "{}")), extra_tensors
