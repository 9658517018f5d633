"""Latent cache: VAE latents and text embeddings of a dataset, written once, read at training time.

``prepare_latents`` (``egolcd prepare-latents``) encodes every clip of an :class:`EgoVidDataset` with the
VAE (posterior mean, normalised) and its per-segment prompts with the text encoder, into safetensors
shards plus an ``index.json``::

    OUT/index.json
    OUT/shard-00000.safetensors      up to shard_size clips, keys "<k>.<name>":
        <k>.latents    (C, L, h, w)   normalised VAE latents
        <k>.text       (S, l, D)      token states of the S unique (per-segment) prompts, cut to the
                                      longest real prompt l <= text_len (the reader zero-pads back)
        <k>.text_mask  (S, l) bool
        <k>.pooled     (S, E)         pooled prompt embeddings (the memory keys)
        <k>.segments   (N,) int64     row of text/pooled used by each latent chunk
        <k>.revisits   (N,) int64     row of the segment each chunk's segment revisits (-1: none); only for
                                      clips with a narrative file (ground-truth revisits)
        <k>.pose       (T, ...)       only for clips with poses

``k`` is the clip's position in ``index.json``'s ``clips`` list. Each shard is written to a temporary file
and renamed into place, and the index is rewritten (atomically) after each shard, so a killed run started
again skips the clips already in the index and produces the same cache as one uninterrupted run.

``LatentDataset`` reads the cache lazily (``safetensors.safe_open``) and returns per-chunk text.

This module writes the cache; the index and the model identities are :mod:`egolcd.data.latent_index`, the
reader :mod:`egolcd.data.latent_dataset`. Their names are re-exported here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..text import TextEncoder
from ..vae import VideoVAE
from .egovid import ClipError, EgoVidDataset
from .latent_dataset import LatentDataset, collate_latents
from .latent_index import (
    INDEX_NAME,
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    LatentClip,
    LatentGeometry,
    LatentIndex,
    _atomic_write,
    text_encoder_identity,
    vae_identity,
)

logger = logging.getLogger(__name__)

__all__ = [
    "INDEX_NAME",
    "LATENT_FORMAT",
    "LATENT_FORMAT_VERSION",
    "LatentClip",
    "LatentDataset",
    "LatentGeometry",
    "LatentIndex",
    "collate_latents",
    "prepare_latents",
    "text_encoder_identity",
    "vae_identity",
]


# ------------------------------------------------------------------------------------------ writing
class _SafeItems(Dataset):
    """Dataset items as ``(index, item)`` or ``(index, ClipError)``: a bad clip never stops a DataLoader."""

    def __init__(self, dataset: EgoVidDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, dict[str, Any] | ClipError]:
        index = self.indices[i]
        try:
            return index, self.dataset[index]
        except ClipError as exc:
            return index, exc


def _identity(item: Any) -> Any:
    return item


def _geometry(dataset: EgoVidDataset, vae: VideoVAE, text_encoder: TextEncoder) -> LatentGeometry:
    cfg = dataset.config
    if vae.temporal_factor != cfg.vae_temporal:
        raise ValueError(
            f"the VAE compresses time {vae.temporal_factor}x, the dataset assumes {cfg.vae_temporal}x"
        )
    s = vae.spatial_factor
    if cfg.height % s or cfg.width % s:
        raise ValueError(f"clip size {cfg.width}x{cfg.height} is not a multiple of the VAE's {s}")
    return LatentGeometry(
        chunk_frames=cfg.chunk_frames,
        chunks_per_clip=cfg.chunks_per_clip,
        num_latent_frames=cfg.num_latent_frames,
        latent_channels=vae.latent_channels,
        latent_height=cfg.height // s,
        latent_width=cfg.width // s,
        num_frames=int(cfg.num_frames or 0),
        height=cfg.height,
        width=cfg.width,
        fps=cfg.fps,
        vae_temporal=cfg.vae_temporal,
        text_dim=int(text_encoder.dim),
        text_len=int(text_encoder.max_length),
        pooled_dim=int(text_encoder.pooled_dim),
    )


#: Identity fields that only inform (a model moved to another folder is still the same model).
_INFORMATIVE = ("path", "model")


def _check_resumable(old: LatentIndex, new: LatentIndex, out_dir: Path) -> None:
    for what in ("geometry", "vae", "text_encoder"):
        a, b = getattr(old, what), getattr(new, what)
        a, b = (asdict(a), asdict(b)) if what == "geometry" else (a, b)
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        for k in [k for k in diff if k in _INFORMATIVE]:
            logger.warning("resuming %s: %s %s was %r, now %r", out_dir, what, k, a.get(k), b.get(k))
        diff = [k for k in diff if k not in _INFORMATIVE]
        if diff:
            k = diff[0]
            raise ValueError(
                f"{out_dir} holds latents made with another {what.replace('_', ' ')} "
                f"({k}={a.get(k)!r}, now {b.get(k)!r}); use a new output directory"
            )


def _clip_tensors(
    key: str, latents: torch.Tensor, item: dict[str, Any], text_encoder: TextEncoder, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    prompts: list[str] = item["prompts"]
    unique = list(dict.fromkeys(prompts))
    emb = text_encoder.encode(unique)
    length = max(1, int(emb.mask.sum(1).max()))
    rows = [unique.index(p) for p in prompts]
    pooled = emb.pooled
    if "keys" in item:  # narrative clips: memory keys from the key texts, as generate computes them
        keys = [item["keys"][prompts.index(p)] for p in unique]
        pooled = text_encoder.encode(keys).pooled
    tensors = {
        f"{key}.latents": latents.to("cpu", dtype).contiguous(),
        f"{key}.text": emb.tokens[:, :length].to("cpu", dtype).contiguous(),
        f"{key}.text_mask": emb.mask[:, :length].to("cpu", torch.bool).contiguous(),
        f"{key}.pooled": pooled.to("cpu", dtype).contiguous(),
        f"{key}.segments": torch.tensor(rows, dtype=torch.long),
    }
    if "revisits" in item:  # per chunk: the row of the segment its segment revisits (-1: none)
        segments = item["segments"].tolist()
        row_of = {seg: row for seg, row in zip(segments, rows)}
        tensors[f"{key}.revisits"] = torch.tensor(
            [row_of.get(int(r), -1) for r in item["revisits"].tolist()], dtype=torch.long
        )
    if "pose" in item:
        tensors[f"{key}.pose"] = item["pose"].to("cpu", torch.float32).contiguous()
    return tensors


def prepare_latents(
    dataset: EgoVidDataset,
    vae: VideoVAE,
    text_encoder: TextEncoder,
    out_dir: str | os.PathLike[str],
    shard_size: int = 64,
    progress: bool = True,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    preset: str | None = None,
    on_shard: Callable[[LatentIndex], bool | None] | None = None,
) -> LatentIndex:
    """Encode a dataset into a resumable latent cache (module docstring).

    Clips already in ``out_dir/index.json`` (or recorded there as failed) are skipped, so running again
    after an interruption continues where the last complete shard ended. Clips that fail to decode are
    skipped, counted in ``skipped`` and listed in ``failed``.

    Args:
        dataset: the clips; its geometry must match the VAE (size a multiple of the spatial factor).
        vae: the frozen VAE; latents are its normalised posterior mean ``(C, L, h, w)``.
        text_encoder: encodes each clip's unique prompts once (the encoder's cache serves repeats).
        out_dir: cache folder (created).
        shard_size: clips per shard file.
        progress: show a progress bar.
        batch_size: clips per VAE call.
        num_workers: DataLoader workers decoding videos.
        dtype: storage dtype of latents and text states (the reader returns float32).
        preset: preset name recorded in the index.
        on_shard: called with the index after each shard is written; returning ``False`` stops the run
            (the index stays resumable).

    Returns:
        The index (``complete`` is ``True`` unless ``on_shard`` stopped the run).

    Raises:
        ValueError: the VAE does not fit the dataset geometry, or ``out_dir`` holds a cache made with
            another geometry, VAE or text encoder.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    index = LatentIndex(
        geometry=_geometry(dataset, vae, text_encoder),
        vae=vae_identity(vae),
        text_encoder=text_encoder_identity(text_encoder),
        preset=preset,
    )
    if (out / INDEX_NAME).exists():
        old = LatentIndex.load(out)
        _check_resumable(old, index, out)
        index.clips, index.shards, index.failed = old.clips, old.shards, old.failed
        index.preset = index.preset or old.preset
        logger.info("resuming %s: %d clips in %d shards already cached", out, len(old.clips), len(old.shards))
    done = {c.video_id for c in index.clips} | set(index.failed)
    todo = [i for i, vid in enumerate(dataset.video_ids) if vid not in done]

    def update_skipped() -> None:
        counts = dict(dataset.skipped)
        for reason in index.failed.values():
            counts[reason] = counts.get(reason, 0) + 1
        index.skipped = counts

    buffer: dict[str, torch.Tensor] = {}
    buffered: list[LatentClip] = []
    stopped = False

    def flush() -> bool:
        """Write the buffered clips as the next shard and the index; False when on_shard says stop."""
        name = f"shard-{len(index.shards):05d}.safetensors"
        meta = {"format": LATENT_FORMAT, "version": str(LATENT_FORMAT_VERSION)}
        _atomic_write(out / name, lambda tmp: save_file(buffer, str(tmp), metadata=meta))
        for clip in buffered:
            clip.shard = name
        index.clips.extend(buffered)
        index.shards.append(name)
        buffer.clear()
        buffered.clear()
        update_skipped()
        index.save(out)
        return on_shard is None or on_shard(index) is not False

    loader = DataLoader(
        _SafeItems(dataset, todo),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
    )
    bar = tqdm(total=len(todo), desc="encoding latents", unit="clip", disable=not progress)
    pending: list[dict[str, Any]] = []

    def encode_pending() -> bool:
        latents = vae.encode(torch.stack([p["video"] for p in pending]))
        for item, lat in zip(pending, latents):
            key = str(len(index.clips) + len(buffered))
            buffer.update(_clip_tensors(key, lat, item, text_encoder, dtype))
            buffered.append(LatentClip(item["video_id"], "", key, int(lat.shape[1])))
            if len(buffered) >= shard_size and not flush():
                pending.clear()
                return False
        pending.clear()
        return True

    try:
        for index_in_dataset, item in loader:
            bar.update(1)
            if isinstance(item, ClipError):
                vid = dataset.video_ids[index_in_dataset]
                logger.warning("skipping clip %s: %s", vid, item)
                index.failed[vid] = item.reason
                continue
            pending.append(item)
            if len(pending) >= batch_size and not encode_pending():
                stopped = True
                break
        if not stopped and pending and not encode_pending():
            stopped = True
        if not stopped:
            if buffered:
                stopped = not flush()
            update_skipped()
            index.complete = not stopped
            index.save(out)
    finally:
        bar.close()
    logger.info(
        "latent cache %s: %d clips in %d shards%s",
        out,
        len(index.clips),
        len(index.shards),
        "" if index.complete else " (incomplete: run again to continue)",
    )
    return index
