"""EgoLCD memory: short-term window, Long-Term Sparse KV Cache, and the one ``MemoryPolicy``.

The attention context of chunk ``i`` is, per layer and in this order (METHOD.md)::

    [long-term retrieved sparse KV] + [sink: first chunk] + [short-term window: last W chunks] + [chunk i]

Memory holds keys *before* rotary encoding with absolute ``(frame, row, col)`` positions. When a context
is read, frame positions are re-indexed: the window keeps its offsets to the current chunk, the sink and
the retrieved entries occupy chunk-sized slots just before the window, and the earliest slot starts at
frame 0. The largest frame position is therefore ``(slots + window + 1) * chunk_frames - 1`` whatever the
video length. (``dense`` keeps everything in the window, so its positions are the absolute ones.)

The same ``MemoryPolicy`` drives training (teacher forcing over a clip) and inference (``pipeline``):
``context()`` says what a chunk sees, ``write()`` stores the chunk after its clean (t = 0) pass.
State is explicit (``MemoryState``), passed in and returned, and saves to safetensors.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .attention import LayerKV
from .chunk_context import ChunkContext, ContextSpan
from .config import MemoryConfig
from .context_arena import ContextArena

STATE_FORMAT = "egolcd-memory-state/1"
_UIDS = itertools.count()  # MemoryChunk.uid: what a retrieval memo recognises entries by (ids can be reused)


def _offload(kv: LayerKV, device: str, pin: bool) -> LayerKV:
    out = kv.to(device)
    if pin:
        out = LayerKV(out.key.pin_memory(), out.value.pin_memory(), out.pos.pin_memory())
    return out


def _version(t: Tensor) -> int | None:
    """``t``'s in-place modification counter (``None`` for inference tensors, which do not keep one)."""
    return None if t.is_inference() else t._version


def _top_tokens(score: Tensor, k: int) -> Tensor:
    """Indices ``(B, k)`` of the ``k`` highest scores per row, in time (index) order."""
    return torch.topk(score, k, dim=1).indices.sort(dim=1).values


@dataclass
class MemoryChunk:
    """One chunk's tokens in memory.

    Args:
        chunk: chunk index in the video. segment: narrative segment index that produced it.
        kv: per layer, keys/values with absolute positions ``(B, n_l, heads, d)``.
        importance: per layer ``(B, n_l)`` accumulated attention mass received from later queries.
        embedding: ``(B, E)`` pooled prompt embedding of its segment (the long-term key).
        retrievals: how many times a long-term entry was read (eviction order).
        mass_recorded: every layer's ``importance`` has received attention mass (``MemoryPolicy.write``), so
            ``sparsify`` ranks by it without checking for rows that never did (key-norm fallback).
    """

    chunk: int
    segment: int
    kv: list[LayerKV]
    importance: list[Tensor]
    embedding: Tensor
    retrievals: int = 0
    mass_recorded: bool = False
    uid: int = field(default_factory=lambda: next(_UIDS), repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.kv[0])

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self.kv) + sum(s.numel() * s.element_size() for s in self.importance)

    def keep(self, index: Tensor) -> MemoryChunk:
        """Keep tokens ``index`` ``(B, k)`` (same indices in every layer) or a per-layer list of them."""
        per_layer = index if isinstance(index, list) else [index] * len(self.kv)
        return MemoryChunk(
            chunk=self.chunk,
            segment=self.segment,
            kv=[kv.gather(ix.to(kv.key.device)) for kv, ix in zip(self.kv, per_layer)],
            importance=[s.index_select(1, ix[0]) if len(ix) == 1 else torch.gather(s, 1, ix)
                        for s, ix in zip(self.importance, per_layer)],
            embedding=self.embedding,
            retrievals=self.retrievals,
            mass_recorded=self.mass_recorded,
        )


@dataclass
class ShortTermWindow:
    """The last ``window_chunks`` chunks, dense, plus an optional sink (the first chunk).

    ``window_chunks=None`` keeps every chunk (the ``dense`` policy).
    """

    window_chunks: int | None
    sink: bool = False
    chunks: list[MemoryChunk] = field(default_factory=list)
    sink_chunk: MemoryChunk | None = None

    def push(self, item: MemoryChunk) -> MemoryChunk | None:
        """Append a chunk; return the chunk that left the window (``None`` if none, or if it became the sink)."""
        self.chunks.append(item)
        if self.window_chunks is None or len(self.chunks) <= self.window_chunks:
            return None
        evicted = self.chunks.pop(0)
        if self.sink and self.sink_chunk is None and evicted.chunk == 0:
            self.sink_chunk = evicted
            return None
        return evicted

    def tokens_per_layer(self) -> int:
        items = self.chunks + ([self.sink_chunk] if self.sink_chunk is not None else [])
        return sum(c.num_tokens for c in items)


@dataclass
class LongTermSparseKVCache:
    """Repository H of (prompt embedding, sparse KV) entries (METHOD.md, "Long-Term Sparse KV Cache").

    Write keeps the top ``k = ceil(keep_ratio * n)`` tokens per layer by importance (attention mass
    received while in the window; key norm when no mass was recorded). Read ranks entries by cosine
    similarity of pooled prompt embeddings. Budgets: at most ``max_entries`` entries and ``max_tokens``
    tokens per layer. Eviction rule: while over a budget, the least-retrieved entry (ties: the oldest)
    loses its lowest-importance tokens; an entry with no tokens left, or the victim of an entry-count
    overflow, is removed whole.

    ``offload_device`` (e.g. ``"cpu"``): entries' keys/values live there (pinned when CUDA is present)
    and are copied to the compute device only when retrieved; embeddings and importance stay put.
    """

    keep_ratio: float
    max_entries: int
    max_tokens: int | None = None
    offload_device: str | None = None
    entries: list[MemoryChunk] = field(default_factory=list)
    # the last similarity-only retrieval: (a copy of its query, top_m, threshold, skip_segment,
    # {entry uid: its embedding's version}, result)
    _memo: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def tokens_per_layer(self) -> int:
        return sum(e.num_tokens for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @staticmethod
    def sparsify(item: MemoryChunk, keep_ratio: float) -> MemoryChunk:
        """Keep the ``ceil(keep_ratio * n)`` most important tokens of each layer (in time order)."""
        if keep_ratio >= 1.0:  # whole entries (time order kept): nothing to rank
            return item
        sizes = {len(kv) for kv in item.kv}
        if len(sizes) == 1:  # every layer holds the same tokens (a chunk leaving the window): rank all at once
            n = sizes.pop()
            scores = torch.stack(item.importance)  # (L, B, n)
            # fallback when no attention mass was recorded (per layer and row): key norm. Chunks that went
            # through the window's clean passes skip the check; otherwise on the CPU the norms are only computed
            # when needed, and on an accelerator the fallback is chosen without a sync.
            recorded = None if item.mass_recorded else (scores > 0).any(dim=2, keepdim=True)  # (L, B, 1)
            if recorded is not None and (scores.device.type != "cpu" or not bool(recorded.all())):
                norms = torch.stack([kv.key.float().flatten(2).norm(dim=-1) for kv in item.kv])  # (L, B, n)
                scores = torch.where(recorded, scores, norms)
            index = _top_tokens(scores.flatten(0, 1), max(1, math.ceil(keep_ratio * n)))  # (L*B, k)
            return item.keep(list(index.unflatten(0, scores.shape[:2]).unbind(0)))
        index = []
        for kv, score in zip(item.kv, item.importance):
            k = max(1, math.ceil(keep_ratio * len(kv)))
            recorded = (score > 0).any(dim=1, keepdim=True)  # (B, 1)
            score = torch.where(recorded, score, kv.key.float().flatten(2).norm(dim=-1))
            index.append(_top_tokens(score, k))  # (B, k)
        return item.keep(index)

    def _victim(self) -> int:
        return min(range(len(self.entries)), key=lambda i: (self.entries[i].retrievals, self.entries[i].chunk))

    def _enforce_budgets(self) -> None:
        while len(self.entries) > self.max_entries:
            self.entries.pop(self._victim())
        if self.max_tokens is None:
            return
        while self.tokens_per_layer() > self.max_tokens:
            i = self._victim()
            entry = self.entries[i]
            excess = self.tokens_per_layer() - self.max_tokens
            if excess >= entry.num_tokens:
                self.entries.pop(i)
                continue
            keep = entry.num_tokens - excess
            index = [_top_tokens(s, keep) for s in entry.importance]
            self.entries[i] = entry.keep(index)

    def write(self, item: MemoryChunk) -> MemoryChunk:
        """Sparsify a chunk leaving the window and store it; returns the stored entry."""
        if self.max_entries == 0:
            return item
        entry = self.sparsify(item, self.keep_ratio)
        if self.offload_device is not None:
            pin = torch.cuda.is_available() and torch.device(self.offload_device).type == "cpu"
            entry.kv = [_offload(kv, self.offload_device, pin) for kv in entry.kv]
        self.entries.append(entry)
        self._enforce_budgets()
        return entry

    def retrieve(
        self,
        query: Tensor,
        top_m: int,
        threshold: float | None = None,
        forced_segments: Sequence[int] = (),
        skip_segment: int | None = None,
        progress: int | None = None,
    ) -> list[tuple[MemoryChunk, float]]:
        """At most ``top_m`` entries to read for a prompt embedding ``query`` ``(B, E)``.

        Entries of ``forced_segments`` (a narrative's ``revisit:``) are taken first and count inside
        ``top_m``; the remaining slots go to the highest cosine similarity (mean over the batch, optionally
        thresholded) among entries not of ``skip_segment`` (the chunk's own segment, whose entries have just
        left the window). So a chunk never reads more than ``top_m`` entries, in training as at inference.

        ``progress=None``: forced entries most recent first; everything returned in time order.
        ``progress=j`` (the reading chunk is the j-th of its segment): forced entries are ranked by how far
        their place in their segment is from ``j``; the similarity picks come first (time order), then the
        forced entries, farthest first, so the one aligned with ``j`` is always the last slot (METHOD.md,
        "Retrieve"). Each entry comes with its similarity.
        """
        if not self.entries or top_m <= 0:
            return []
        if not forced_segments and progress is None:
            reused = self._reuse(query, top_m, threshold, skip_segment)
            if reused is not None:
                return reused
        keys = torch.stack([e.embedding.float() for e in self.entries], dim=1)  # (B, M, E)
        sims = torch.nn.functional.cosine_similarity(query.float()[:, None], keys, dim=-1).mean(0).tolist()  # M
        forced = [i for i, e in enumerate(self.entries) if e.segment in forced_segments]
        if progress is None:
            chosen = sorted(forced, key=lambda i: self.entries[i].chunk, reverse=True)[:top_m]
        else:
            first = {}
            for i in forced:
                seg, chunk = self.entries[i].segment, self.entries[i].chunk
                first[seg] = min(first.get(seg, chunk), chunk)

            def distance(i: int) -> tuple[int, int]:
                e = self.entries[i]
                return abs(e.chunk - first[e.segment] - progress), -e.chunk

            chosen = sorted(forced, key=distance)[:top_m]
        n_forced = len(chosen)
        order = sorted(range(len(sims)), key=lambda i: -sims[i])  # stable: ties keep time order
        for i in order:
            if len(chosen) >= top_m:
                break
            if i in chosen or self.entries[i].segment == skip_segment:
                continue
            if threshold is None or sims[i] >= threshold:
                chosen.append(i)
        if progress is None:
            chosen.sort(key=lambda i: self.entries[i].chunk)
        else:  # similarity picks in time order, then the forced ones with the aligned entry last
            chosen = sorted(chosen[n_forced:], key=lambda i: self.entries[i].chunk) + chosen[:n_forced][::-1]
        result = [(self.entries[i], sims[i]) for i in chosen]
        if not forced_segments and progress is None:
            uids = {e.uid: _version(e.embedding) for e in self.entries}
            self._memo = (query.clone(), top_m, threshold, skip_segment, uids, result)
        return result

    def _reuse(
        self, query: Tensor, top_m: int, threshold: float | None, skip_segment: int | None
    ) -> list[tuple[MemoryChunk, float]] | None:
        """The last similarity-only retrieval's result, if it is still what ranking would give: the same query
        (equal values), budget and skipped segment, every entry it chose still held, no held embedding modified
        in place (tracked outside ``torch.inference_mode``, whose tensors have no version counter; egolcd never
        modifies a stored key), and every entry written since of ``skip_segment`` (never eligible). Removing an entry that was not
        chosen cannot change the top ``top_m``, and ties keep time order. Within a segment, each chunk writes
        an entry of its own segment, so most chunks reuse the ranking (the tiny bench: about 3 of 4)."""
        memo = self._memo
        if memo is None or memo[1:4] != (top_m, threshold, skip_segment):
            return None
        old_query, uids, result = memo[0], memo[4], memo[5]
        if (old_query.shape, old_query.device, old_query.dtype) != (query.shape, query.device, query.dtype) or (
            not torch.equal(old_query, query)
        ):
            return None
        held = {e.uid for e in self.entries}
        if any(e.uid not in held for e, _ in result):
            return None
        for e in self.entries:  # new entries must be of the skipped segment; kept ones unmodified
            changed = uids[e.uid] != _version(e.embedding) if e.uid in uids else e.segment != skip_segment
            if changed:
                return None
        return list(result)


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
