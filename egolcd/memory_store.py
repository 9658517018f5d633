"""What the memory holds: one chunk's tokens (``MemoryChunk``), the short-term window with its sink
(``ShortTermWindow``) and the Long-Term Sparse KV Cache (``LongTermSparseKVCache``: sparsify on write,
similarity retrieval on read). ``memory.MemoryPolicy`` decides what each chunk sees from them (METHOD.md).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .attention import LayerKV, gather_tokens

__all__ = ["LongTermSparseKVCache", "MemoryChunk", "ShortTermWindow"]

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
            importance=[gather_tokens(s, ix) for s, ix in zip(self.importance, per_layer)],
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


class _RetrievalMemo(NamedTuple):
    """The last similarity-only retrieval (``LongTermSparseKVCache._reuse``)."""

    query: Tensor  # a copy
    top_m: int
    threshold: float | None
    skip_segment: int | None
    versions: dict[int, int | None]  # entry uid -> its embedding's version, for every entry held then
    result: list[tuple[MemoryChunk, float]]


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
    _memo: _RetrievalMemo | None = field(default=None, init=False, repr=False, compare=False)

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
            self._dropped(self.entries.pop(self._victim()))
        if self.max_tokens is None:
            return
        while self.tokens_per_layer() > self.max_tokens:
            i = self._victim()
            entry = self.entries[i]
            excess = self.tokens_per_layer() - self.max_tokens
            if excess >= entry.num_tokens:
                self._dropped(self.entries.pop(i))
                continue
            keep = entry.num_tokens - excess
            index = [_top_tokens(s, keep) for s in entry.importance]
            self.entries[i] = entry.keep(index)
            self._dropped(entry)

    def _dropped(self, entry: MemoryChunk) -> None:
        """``entry`` left the store: a retrieval memo that chose it is stale; drop it now rather than hold the
        entry's keys/values (uncounted in ``nbytes``) until the next retrieval."""
        if self._memo is not None and any(e is entry for e, _ in self._memo.result):
            self._memo = None

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
            versions = {e.uid: _version(e.embedding) for e in self.entries}
            self._memo = _RetrievalMemo(query.clone(), top_m, threshold, skip_segment, versions, result)
        return result

    def _reuse(
        self, query: Tensor, top_m: int, threshold: float | None, skip_segment: int | None
    ) -> list[tuple[MemoryChunk, float]] | None:
        """The last similarity-only retrieval's result, if it is still what ranking would give: the same query
        (equal values), budget and skipped segment, every entry it chose still held, no held embedding modified
        in place (tracked outside ``torch.inference_mode``, whose tensors have no version counter; egolcd never
        modifies a stored key), and every entry written since of ``skip_segment`` (never eligible). Removing
        an entry that was not chosen cannot change the top ``top_m``, and ties keep time order. Within a segment, each chunk writes
        an entry of its own segment, so most chunks reuse the ranking (the tiny bench: about 3 of 4)."""
        memo = self._memo
        if memo is None or (memo.top_m, memo.threshold, memo.skip_segment) != (top_m, threshold, skip_segment):
            return None
        old_query, versions, result = memo.query, memo.versions, memo.result
        if (old_query.shape, old_query.device, old_query.dtype) != (query.shape, query.device, query.dtype) or (
            not torch.equal(old_query, query)
        ):
            return None
        held = {e.uid for e in self.entries}
        if any(e.uid not in held for e, _ in result):
            return None
        for e in self.entries:  # new entries must be of the skipped segment; kept ones unmodified
            changed = versions[e.uid] != _version(e.embedding) if e.uid in versions else e.segment != skip_segment
            if changed:
                return None
        return list(result)
