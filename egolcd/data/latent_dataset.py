"""Reading a latent cache: :class:`LatentDataset` (lazy ``safe_open`` of the shards, per-chunk text) and
:func:`collate_latents`."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from .latent_index import LatentIndex

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ reading
def window_cuts_segment(segments: list[int], start: int, ids: tuple[int, ...]) -> bool:
    """Whether a window starting at chunk ``start`` begins inside (not at the start of) one of the
    segments ``ids``: the chunk before it and its first chunk belong to the same one of them. A segment that
    ended just before the window is not cut, it is simply not in it."""
    return start > 0 and segments[start - 1] == segments[start] and segments[start] in ids


class LatentDataset(Dataset):
    """Clips of a latent cache made by :func:`prepare_latents`.

    Item, a dict:
        latents: ``(C, L, h, w)`` float32.
        text: ``(N, Lt, D)`` float32 token states of each chunk's prompt (zero past the mask).
        text_mask: ``(N, Lt)`` bool.
        pooled: ``(N, E)`` float32.
        segments: ``(N,)`` long, the segment (prompt) index of each chunk.
        revisits: ``(N,)`` long, the segment (prompt row) each chunk's segment revisits (-1: none).
        video_id: str. first_chunk: where the window starts in the cached clip.
        pose: float32, only for clips with poses.

    Shards are opened lazily with ``safetensors.safe_open`` and up to ``max_open_files`` handles are kept
    (per process; DataLoader workers open their own).

    With ``clip_chunks`` smaller than the cached clips (whole episodes), items are windows of that many
    chunks starting at every chunk offset, so chunk 0 of a training clip (its sink) is not always the
    episode's start; ``min_revisit_chunks`` keeps only windows whose revisits exercise long-term memory.

    Args:
        directory: the cache folder.
        max_open_files: open shard handles kept.
        clip_chunks: chunks per item (default: the cached clip length).
        min_revisit_chunks: keep windows with at least this many chunks revisiting a segment that left the
            short-term window inside the window.
        window_chunks: the policy's short-term window W (for that test).

    Raises:
        FileNotFoundError: no ``index.json`` (one line).
        ValueError: a corrupt index (one line).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_open_files: int = 16,
        clip_chunks: int | None = None,
        min_revisit_chunks: int = 0,
        window_chunks: int = 0,
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.index = LatentIndex.load(self.directory)
        self.geometry = self.index.geometry
        self.max_open_files = max(1, int(max_open_files))
        self._handles: OrderedDict[str, Any] = OrderedDict()
        if not self.index.complete:
            logger.warning("latent cache %s is incomplete (prepare-latents was interrupted)", self.directory)
        n = self.geometry.chunks_per_clip
        self.clip_chunks = n if clip_chunks is None else int(clip_chunks)
        if not 1 <= self.clip_chunks <= n:
            raise ValueError(f"clip_chunks must be in 1..{n} (the cached clips' chunks), got {clip_chunks}")
        self.windows = self._windows(int(min_revisit_chunks), int(window_chunks))
        if not self.windows:
            raise ValueError(
                f"no window of {self.clip_chunks} chunks in {self.directory} has {min_revisit_chunks} revisiting "
                f"chunks beyond a {window_chunks}-chunk window"
            )

    def _windows(self, min_revisit_chunks: int, window_chunks: int) -> list[tuple[int, int]]:
        """``(clip, first chunk)`` of every training window (each cached clip when not cropping).

        A window is kept when at least ``min_revisit_chunks`` of its chunks revisit a segment that has a
        chunk inside the window more than ``window_chunks`` chunks earlier (it has left the short-term
        window, so only long-term memory holds it), and no revisit chunk's own or revisited segment is cut by
        the window's start. Generation always starts at an episode's first chunk, so the j-th chunk of a
        revisit reads the j-th chunk of the first visit (``MemoryPolicy.segment_progress``); a window that
        starts inside either segment would pair it with the wrong first-visit chunk.
        """
        n, c = self.geometry.chunks_per_clip, self.clip_chunks
        if c == n and min_revisit_chunks == 0:
            return [(i, 0) for i in range(len(self.index.clips))]
        out = []
        for i, clip in enumerate(self.index.clips):
            handle = self._handle(clip.shard)
            segments = handle.get_tensor(f"{clip.key}.segments").tolist()
            names = handle.keys()
            revisits = handle.get_tensor(f"{clip.key}.revisits").tolist() if f"{clip.key}.revisits" in names else []
            for start in range(n - c + 1):
                count, cut = 0, False
                for j in range(start, start + c):
                    target = revisits[j] if revisits else -1
                    if target < 0:
                        continue
                    cut = cut or window_cuts_segment(segments, start, (target, segments[j]))
                    if any(segments[q] == target for q in range(start, j - window_chunks)):
                        count += 1
                if count >= min_revisit_chunks and not cut:
                    out.append((i, start))
        return out

    def __len__(self) -> int:
        return len(self.windows)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()  # file handles do not cross processes
        return state

    def _handle(self, shard: str) -> Any:
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        path = self.directory / shard
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot read latent shard {path}: {first}") from None
        self._handles[shard] = handle
        while len(self._handles) > self.max_open_files:
            self._handles.popitem(last=False)
        return handle

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Clip ``i`` (see the class docstring).

        Args:
            i: clip number.
        """
        ci, first = self.windows[i]
        clip = self.index.clips[ci]
        handle = self._handle(clip.shard)
        k = clip.key
        chunks = slice(first, first + self.clip_chunks)
        frames = slice(first * self.geometry.chunk_frames, (first + self.clip_chunks) * self.geometry.chunk_frames)
        try:
            segments = handle.get_tensor(f"{k}.segments").long()[chunks]
            text = handle.get_tensor(f"{k}.text").float()
            mask = handle.get_tensor(f"{k}.text_mask").bool()
            item: dict[str, Any] = dict(
                latents=handle.get_tensor(f"{k}.latents").float()[:, frames],
                pooled=handle.get_tensor(f"{k}.pooled").float()[segments],
                segments=segments,
                video_id=clip.video_id,
                first_chunk=first,
            )
            names = handle.keys()
            item["revisits"] = (
                handle.get_tensor(f"{k}.revisits").long()[chunks]
                if f"{k}.revisits" in names
                else torch.full_like(segments, -1)
            )
            if f"{k}.pose" in names and first == 0 and self.clip_chunks == self.geometry.chunks_per_clip:
                item["pose"] = handle.get_tensor(f"{k}.pose").float()
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot read clip {clip.video_id} from {clip.shard}: {first_line}") from None
        pad = self.geometry.text_len - text.shape[1]
        item["text"] = torch.nn.functional.pad(text, (0, 0, 0, pad))[segments]
        item["text_mask"] = torch.nn.functional.pad(mask, (0, pad), value=False)[segments]
        return item


def collate_latents(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack :class:`LatentDataset` items B-first.

    Args:
        batch: items.

    Returns:
        dict: ``latents (B, C, L, h, w)``, ``text (B, N, Lt, D)``, ``text_mask (B, N, Lt)``,
        ``pooled (B, N, E)``, ``segments (B, N)``, ``video_id`` list, and ``pose (B, ...)`` when every item
        has one of the same shape.
    """
    out: dict[str, Any] = {
        name: torch.stack([b[name] for b in batch])
        for name in ("latents", "text", "text_mask", "pooled", "segments", "revisits")
        if all(name in b for b in batch)
    }
    out["video_id"] = [b["video_id"] for b in batch]
    poses = [b.get("pose") for b in batch]
    if poses and all(p is not None for p in poses) and len({tuple(p.shape) for p in poses}) == 1:
        out["pose"] = torch.stack(poses)
    return out
