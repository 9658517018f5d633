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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..text import TextEncoder
from ..vae import VideoVAE
from .egovid import ClipError, EgoVidDataset

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

LATENT_FORMAT = "egolcd-latents"
LATENT_FORMAT_VERSION = 1
INDEX_NAME = "index.json"


# ------------------------------------------------------------------------------------------ index
@dataclass
class LatentGeometry:
    """What every clip of a cache looks like.

    Args:
        chunk_frames: latent frames per chunk.
        chunks_per_clip: N, chunks (and prompts) per clip.
        num_latent_frames: L = N * chunk_frames.
        latent_channels: C.
        latent_height, latent_width: h, w.
        num_frames, height, width, fps, vae_temporal: the pixel clip the latents encode.
        text_dim: D of the token states; text_len: Lt, their padded length; pooled_dim: E.
    """

    chunk_frames: int
    chunks_per_clip: int
    num_latent_frames: int
    latent_channels: int
    latent_height: int
    latent_width: int
    num_frames: int
    height: int
    width: int
    fps: int
    vae_temporal: int
    text_dim: int
    text_len: int
    pooled_dim: int


@dataclass
class LatentClip:
    """One cached clip.

    Args:
        video_id: the dataset id.
        shard: shard file name.
        key: tensor-name prefix inside the shard.
        num_latent_frames: L of its latents.
    """

    video_id: str
    shard: str
    key: str
    num_latent_frames: int


@dataclass
class LatentIndex:
    """The contents of ``index.json``.

    Args:
        geometry: clip geometry.
        vae: identity of the VAE (class, config and weight hashes, source path).
        text_encoder: identity of the text encoder (class, model, max_length).
        clips: cached clips in dataset order.
        shards: shard file names.
        skipped: clips left out, by reason (the dataset's scan plus clips that failed to decode).
        failed: video_id -> reason for clips that failed to decode (not retried on resume).
        complete: the run finished (no clip of the dataset left to encode).
        preset: the preset name, when known.
        format, version: ``"egolcd-latents"``, ``1``.
    """

    geometry: LatentGeometry
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    clips: list[LatentClip] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    complete: bool = False
    preset: str | None = None
    format: str = LATENT_FORMAT
    version: int = LATENT_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (format and version first)."""
        data = asdict(self)
        return {"format": data.pop("format"), "version": data.pop("version"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentIndex:
        """Parse an ``index.json`` object (raises ``KeyError``/``TypeError`` on a malformed one)."""
        if data.get("format") != LATENT_FORMAT:
            raise ValueError(f"not an egolcd latent index (format {data.get('format')!r})")
        if int(data.get("version", -1)) != LATENT_FORMAT_VERSION:
            raise ValueError(
                f"latent index version {data.get('version')!r}, this egolcd reads {LATENT_FORMAT_VERSION}"
            )
        body = dict(data)
        body["geometry"] = LatentGeometry(**data["geometry"])
        body["clips"] = [LatentClip(**c) for c in data["clips"]]
        return cls(**body)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``directory/index.json`` atomically."""
        text = json.dumps(self.to_dict(), indent=1 if len(self.clips) < 10_000 else None)
        _atomic_write(Path(directory) / INDEX_NAME, lambda tmp: tmp.write_text(text + "\n"))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> LatentIndex:
        """Read ``directory/index.json``.

        Raises:
            FileNotFoundError: no index (one line).
            ValueError: unreadable, malformed or of another format version (one line).
        """
        path = Path(directory).expanduser() / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no latent index {path} (run `egolcd prepare-latents` first)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"corrupt latent index {path}: {first}") from None


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through ``write(tmp)`` to a hidden temporary file beside ``path``, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ identity
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def vae_identity(vae: VideoVAE) -> dict[str, Any]:
    """What makes two VAEs encode alike: class, config hash and a hash of the weights.

    Args:
        vae: the VAE.
    """
    config = {k: v for k, v in dict(vae.model.config).items() if not k.startswith("_")}
    h = hashlib.sha256()
    for name, tensor in sorted(vae.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return dict(
        cls=type(vae.model).__name__,
        config=_sha(json.dumps(config, sort_keys=True, default=str).encode()),
        weights=h.hexdigest()[:16],
        path=str(getattr(vae.model.config, "_name_or_path", "") or ""),
    )


def text_encoder_identity(encoder: TextEncoder) -> dict[str, Any]:
    """Class, model location and token geometry of a text encoder.

    Args:
        encoder: the text encoder.
    """
    source = getattr(encoder, "path_or_id", None) or getattr(encoder, "model_dir", None) or ""
    return dict(
        cls=type(encoder).__name__,
        model=str(source),
        max_length=int(encoder.max_length),
        dim=int(encoder.dim),
        pooled_dim=int(encoder.pooled_dim),
        dtype=str(getattr(getattr(encoder, "model", None), "dtype", "")),
    )


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


# ------------------------------------------------------------------------------------------ reading
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
        window, so only long-term memory holds it).
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
                count = 0
                for j in range(start, start + c):
                    target = revisits[j] if revisits else -1
                    if target >= 0 and any(segments[q] == target for q in range(start, j - window_chunks)):
                        count += 1
                if count >= min_revisit_chunks:
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
