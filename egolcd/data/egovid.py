"""EgoVid-5M-format training data: a captions CSV plus a folder of mp4 clips, optional camera poses.

Layout (DESIGN.md, "Data formats")::

    ROOT/metadata.csv        video_id,frame_num,fps,llava_cap,name,noun_cls,verb_cls,...
    ROOT/videos/<video_id>.mp4                 one file per clip, or
    ROOT/videos/<VideoID>.mp4                  the long video, cut at <StartFrame>..<EndFrame> of the id
    ROOT/<video_id>/fused_pose.npy             optional poses (or ROOT/poses/<video_id>.npy)

``video_id`` is ``VideoID_StartFrame_EndFrame`` (source frame numbers, end exclusive). Any folder of mp4
files with a CSV of ``video_id`` (or ``path``) and ``caption`` columns works the same way.

A clip is ``num_frames = vae_temporal * (chunks_per_clip * chunk_frames - 1) + 1`` pixel frames at the
target fps, so its latent has exactly ``chunks_per_clip * chunk_frames`` frames. Captions become one
narrative prompt per chunk through :func:`egolcd.narrative.build_prompts`, so training prompts use the
exact template of inference prompts (:mod:`egolcd.data.captions`; its names are re-exported here).

    >>> cfg = EgoVidConfig(root="data/egovid", chunk_frames=2, chunks_per_clip=2)  # doctest: +SKIP
    >>> ds = EgoVidDataset(cfg)  # doctest: +SKIP
    >>> ds[0]["video"].shape  # doctest: +SKIP
    torch.Size([3, 13, 64, 64])
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..config import get_preset
from ..video_io import VideoReadError, iter_frames, probe_video
from .captions import caption_narrative, caption_prompts, narrative_prompts, split_sentences

logger = logging.getLogger(__name__)

__all__ = [
    "ClipError",
    "EgoVidConfig",
    "EgoVidDataset",
    "build_from_preset",
    "caption_narrative",
    "caption_prompts",
    "collate_videos",
    "skip_summary",
    "split_sentences",
]

ID_COLUMNS = ("video_id", "path")
CAPTION_COLUMNS = ("llava_cap", "caption", "name")
#: Individual warnings per skipped clip before the rest go to DEBUG (a summary is always logged).
MAX_SKIP_WARNINGS = 50
_ID_RE = re.compile(r"^(?P<video>.+)_(?P<start>\d+)_(?P<end>\d+)$")


class ClipError(VideoReadError):
    """A clip that cannot be used; ``reason`` is the skip-count key (``"corrupt"``, ``"too_short"``, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers
        return (type(self), (str(self), self.reason))


# ------------------------------------------------------------------------------------------ config
@dataclass
class EgoVidConfig:
    """Where the data is and what one training clip looks like.

    Args:
        root: dataset folder.
        csv: captions CSV (default ``root/metadata.csv``).
        video_dir: folder of mp4 files (default ``root/videos``; ``root`` itself when that does not exist).
        fps: target frame rate; videos are resampled to it.
        height, width: output size; frames are resized (aspect preserved) and centre-cropped.
        num_frames: pixel frames per clip; ``None``: ``vae_temporal * (chunks_per_clip * chunk_frames - 1)
            + 1``. When given it must be of that form and sets ``chunks_per_clip``.
        min_frames: videos with fewer frames (at ``fps``) are skipped as too short; ``None``: ``num_frames``.
            A smaller value admits shorter videos, padded by repeating their last frame.
        chunk_frames: latent frames per chunk (the preset's ``chunk_frames``).
        vae_temporal: pixel frames per latent frame after the first.
        chunks_per_clip: N, latent chunks per clip (one prompt each).
        load_poses: return ``fused_pose.npy`` poses when present.
        probe_workers: threads probing videos at construction (0: in the calling thread).
        max_clips: keep at most this many usable clips (in CSV order); ``None``: all.
    """

    root: str | os.PathLike[str]
    csv: str | os.PathLike[str] | None = None
    video_dir: str | os.PathLike[str] | None = None
    fps: int = 8
    height: int = 64
    width: int = 64
    num_frames: int | None = None
    min_frames: int | None = None
    chunk_frames: int = 2
    vae_temporal: int = 4
    chunks_per_clip: int = 4
    load_poses: bool = True
    probe_workers: int = 0
    max_clips: int | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()
        self.csv = Path(self.csv).expanduser() if self.csv is not None else self.root / "metadata.csv"
        if self.video_dir is None:
            self.video_dir = self.root / "videos" if (self.root / "videos").is_dir() else self.root
        self.video_dir = Path(self.video_dir).expanduser()
        for name in ("fps", "height", "width", "chunk_frames", "vae_temporal", "chunks_per_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"EgoVidConfig.{name} must be a positive integer, got {value!r}")
        if self.num_frames is None:
            self.num_frames = self.vae_temporal * (self.chunks_per_clip * self.chunk_frames - 1) + 1
        else:
            latent, rest = divmod(self.num_frames - 1, self.vae_temporal)
            latent += 1
            if self.num_frames < 1 or rest or latent % self.chunk_frames:
                raise ValueError(
                    f"num_frames must be {self.vae_temporal}*(n*{self.chunk_frames} - 1) + 1 so the latent "
                    f"holds whole chunks, got {self.num_frames}"
                )
            self.chunks_per_clip = latent // self.chunk_frames
        if self.min_frames is None:
            self.min_frames = self.num_frames
        if self.min_frames < 1:
            raise ValueError(f"EgoVidConfig.min_frames must be >= 1, got {self.min_frames}")

    @property
    def num_latent_frames(self) -> int:
        """L = ``chunks_per_clip * chunk_frames``."""
        return self.chunks_per_clip * self.chunk_frames


def build_from_preset(preset_name: str, root: str | os.PathLike[str], **overrides: Any) -> EgoVidConfig:
    """An :class:`EgoVidConfig` with the preset's ``chunk_frames``, ``vae_temporal``, size and fps.

    Args:
        preset_name: a key of ``egolcd.config.PRESETS``.
        root: dataset folder.
        **overrides: any other ``EgoVidConfig`` field (they win over the preset's values).
    """
    preset = get_preset(preset_name)
    kw: dict[str, Any] = dict(
        chunk_frames=preset.chunk_frames,
        vae_temporal=preset.vae_temporal,
        height=preset.height,
        width=preset.width,
        fps=preset.fps,
    )
    kw.update(overrides)
    return EgoVidConfig(root=root, **kw)


# ---------------------------------------------------------------------------------- scanning
@dataclass
class _Clip:
    video_id: str
    path: Path
    caption: str
    name: str
    start: int | None  # source frame range of a cut; None: the whole file
    end: int | None
    src_fps: float = 0.0
    pose_path: Path | None = None
    prompts: list[str] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # memory-key text per chunk (narrative clips only)
    revisits: list[int] = field(default_factory=list)  # per chunk: segment its segment revisits, or -1


def _available_frames(n_src: int, src_fps: float, fps: float) -> int:
    """Output frames ``iter_frames(fps=...)`` yields for ``n_src`` constant-rate source frames."""
    return max(0, math.ceil(fps * (n_src - 0.1) / src_fps - 1e-9))


def _source_index(k: int, src_fps: float, fps: float) -> int:
    """Source frame shown at output time ``k / fps`` (the rule of ``video_io.iter_frames``)."""
    return int(math.floor(k * src_fps / fps + 0.1))


def _read_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"captions CSV not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read captions CSV {path}: {first}") from None
    if not any(c in columns for c in ID_COLUMNS) or not any(c in columns for c in CAPTION_COLUMNS):
        raise ValueError(
            f"malformed captions CSV {path}: needs a 'video_id' (or 'path') column and a 'llava_cap' "
            f"(or 'caption') column; found: {', '.join(columns) or 'no header'}"
        )
    return rows, columns


def _reason_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items())


class EgoVidDataset(Dataset):
    """Clips of an EgoVid-5M-format folder (module docstring) as training items.

    Construction reads the CSV and probes each video's header; missing, corrupt or too-short videos (and
    rows without a caption or with a duplicate id) are skipped, counted in ``skipped`` by reason and logged
    once each.

    Item (``dataset[i]``), a dict:
        video: ``(3, T, H, W)`` float32 in [-1, 1], ``T = config.num_frames``.
        video_id: str.
        caption: str, the raw caption.
        prompts: list of N = ``chunks_per_clip`` prompts (one per latent chunk).
        segments: ``LongTensor (N,)``, segment index of each chunk.
        keys: list of N memory-key texts, and revisits: ``LongTensor (N,)`` (segment each chunk's segment
            revisits, -1: none); only for rows with a ``narrative`` file (:func:`narrative_prompts`).
        pose: float32 ``(T, ...)`` (or the file's shape when it does not match the source frames); only when
            a ``fused_pose.npy`` exists.

    ``__getitem__`` raises :class:`ClipError` (a ``VideoReadError``) for a video that fails to decode.

    Args:
        config: the dataset config.
        progress: show a progress bar while probing.

    Raises:
        FileNotFoundError: the CSV is missing.
        ValueError: malformed CSV, or no usable clip (the message gives the counts of why).
    """

    def __init__(self, config: EgoVidConfig, progress: bool = False) -> None:
        self.config = config
        self.skipped: dict[str, int] = {}
        self._warned = 0
        rows, columns = _read_csv(Path(config.csv))
        candidates = self._candidates(rows, columns)
        probed = self._probe_all(candidates, progress)
        self.clips: list[_Clip] = []
        for clip, error in zip(candidates, probed):
            if config.max_clips is not None and len(self.clips) >= config.max_clips:
                break
            if error is not None:
                self._skip(clip.video_id, *error)
                continue
            self.clips.append(clip)
        if self.skipped:
            logger.warning(
                "skipped %d of %d clips in %s: %s",
                sum(self.skipped.values()),
                len(rows),
                config.video_dir,
                _reason_text(self.skipped),
            )
        if not self.clips:
            why = _reason_text(self.skipped) if self.skipped else f"the CSV {config.csv} has no rows"
            raise ValueError(f"no usable clips in {config.video_dir}: {why}")
        logger.info("EgoVid dataset: %d clips from %s", len(self.clips), config.video_dir)

    # -------------------------------------------------------------- construction helpers
    def _skip(self, video_id: str, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self._warned += 1
        level = logging.WARNING if self._warned <= MAX_SKIP_WARNINGS else logging.DEBUG
        logger.log(level, "skipping clip %s: %s (%s)", video_id, reason.replace("_", " "), detail)
        if self._warned == MAX_SKIP_WARNINGS + 1:
            logger.warning("more clips skipped; further skips are logged at DEBUG level")

    def _resolve(self, row: dict[str, str]) -> tuple[str, Path, int | None, int | None]:
        """(video_id, path, start, end) of a row; the path may not exist."""
        video_dir = Path(self.config.video_dir)
        raw_path = row.get("path", "").strip()
        video_id = row.get("video_id", "").strip()
        if raw_path:
            p = Path(raw_path).expanduser()
            if not p.is_absolute():
                in_root = Path(self.config.root) / p
                p = in_root if not (video_dir / p).exists() and in_root.exists() else video_dir / p
            return video_id or p.stem, p, None, None
        whole = video_dir / f"{video_id}.mp4"
        match = _ID_RE.match(video_id)
        if not whole.exists() and match is not None:
            source = video_dir / f"{match['video']}.mp4"
            if source.exists():
                return video_id, source, int(match["start"]), int(match["end"])
        return video_id, whole, None, None

    def _pose_path(self, video_id: str) -> Path | None:
        if not self.config.load_poses:
            return None
        root, video_dir = Path(self.config.root), Path(self.config.video_dir)
        for p in (
            root / video_id / "fused_pose.npy",
            video_dir / video_id / "fused_pose.npy",
            root / "poses" / f"{video_id}.npy",
        ):
            if p.is_file():
                return p
        return None

    def _candidates(self, rows: list[dict[str, str]], columns: list[str]) -> list[_Clip]:
        seen: set[str] = set()
        out = []
        n = self.config.chunks_per_clip
        for line, row in enumerate(rows, start=2):
            video_id, path, start, end = self._resolve(row)
            if not video_id:
                self._skip(f"<CSV line {line}>", "no_id", "empty video_id/path")
                continue
            if video_id in seen:
                self._skip(video_id, "duplicate", f"CSV line {line} repeats it")
                continue
            seen.add(video_id)
            caption = " ".join((row.get("llava_cap") or row.get("caption") or "").split())
            name = " ".join(row.get("name", "").split())
            keys: list[str] = []
            revisits: list[int] = []
            narrative = (row.get("narrative") or "").strip()
            if narrative:  # a narrative file: the inference schedule (segments, keys, revisits)
                try:
                    prompts, segments, keys, revisits = narrative_prompts(
                        Path(self.config.root) / narrative, n, self.config.fps, self.config.chunk_frames,
                        self.config.vae_temporal,
                    )
                except (OSError, ValueError) as exc:
                    self._skip(video_id, "bad_narrative", f"CSV line {line}: {str(exc).splitlines()[0]}")
                    continue
            else:
                try:
                    prompts, segments = caption_prompts(caption, n, name)
                except ValueError:
                    self._skip(video_id, "no_caption", f"CSV line {line} has an empty caption")
                    continue
            out.append(
                _Clip(
                    video_id=video_id,
                    path=path,
                    caption=caption or name,
                    name=name,
                    start=start,
                    end=end,
                    pose_path=self._pose_path(video_id),
                    prompts=prompts,
                    segments=segments,
                    keys=keys,
                    revisits=revisits,
                )
            )
        return out

    def _probe(self, clip: _Clip) -> tuple[str, str] | None:
        """None if usable (fills ``clip.src_fps``), else ``(reason, detail)``."""
        if not clip.path.is_file():
            return "missing", f"no file {clip.path}"
        try:
            info = probe_video(clip.path)
        except VideoReadError as exc:
            return "corrupt", str(exc)
        clip.src_fps = info.fps
        n_src = info.num_frames
        if clip.start is not None:
            end = info.num_frames if clip.end is None else min(clip.end, info.num_frames)
            n_src = max(0, end - clip.start)
        available = _available_frames(n_src, info.fps, self.config.fps)
        if available < int(self.config.min_frames or 0):
            return "too_short", f"{available} frames at {self.config.fps} fps, need {self.config.min_frames}"
        return None

    def _probe_all(self, clips: list[_Clip], progress: bool) -> list[tuple[str, str] | None]:
        bar = dict(total=len(clips), desc="probing videos", unit="clip", disable=not progress)
        if self.config.probe_workers > 0 and len(clips) > 1:
            with ThreadPoolExecutor(self.config.probe_workers) as pool:
                return list(tqdm(pool.map(self._probe, clips), **bar))
        return [self._probe(c) for c in tqdm(clips, **bar)]

    # -------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.clips)

    @property
    def video_ids(self) -> list[str]:
        return [c.video_id for c in self.clips]

    def _fit(self, frame: np.ndarray) -> torch.Tensor:
        """uint8 ``(h, w, 3)`` -> float ``(3, H, W)`` in [-1, 1]: aspect-preserving resize + centre crop."""
        H, W = self.config.height, self.config.width
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float()[None]
        h, w = x.shape[-2:]
        scale = max(H / h, W / w)
        rh, rw = max(H, round(h * scale)), max(W, round(w * scale))
        if (rh, rw) != (h, w):
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (rh - H) // 2, (rw - W) // 2
        x = x[0, :, top : top + H, left : left + W]
        return (x / 127.5 - 1.0).clamp(-1.0, 1.0)

    def _frames(self, clip: _Clip) -> tuple[list[torch.Tensor], list[int]]:
        """Decoded, fitted frames and their source frame indices (relative to the clip start)."""
        cfg = self.config
        T, fps = int(cfg.num_frames), cfg.fps
        frames: list[torch.Tensor] = []
        if clip.start is None:
            for image in iter_frames(clip.path, fps=fps, max_frames=T):
                frames.append(self._fit(image))
            src_fps = clip.src_fps or fps
            return frames, [_source_index(k, src_fps, fps) for k in range(len(frames))]
        wanted = [clip.start + _source_index(k, clip.src_fps, fps) for k in range(T)]
        end = clip.end if clip.end is not None else wanted[-1] + 1
        wanted = [i for i in wanted if i < end]
        pos, last = 0, None
        for index, image in enumerate(iter_frames(clip.path)):
            if pos >= len(wanted):
                break
            if index == wanted[pos]:
                last = self._fit(image)
            while pos < len(wanted) and wanted[pos] == index:
                frames.append(last)  # type: ignore[arg-type]
                pos += 1
        return frames, [i - clip.start for i in wanted[: len(frames)]]

    def _pose(self, clip: _Clip, indices: list[int]) -> torch.Tensor | None:
        if clip.pose_path is None:
            return None
        try:
            pose = np.load(clip.pose_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable pose file %s: %s", clip.pose_path, exc)
            return None
        pose_t = torch.from_numpy(np.asarray(pose, dtype=np.float32))
        if pose_t.ndim >= 1 and indices and pose_t.shape[0] > max(indices):
            T = int(self.config.num_frames)
            idx = indices + [indices[-1]] * (T - len(indices))
            return pose_t[idx]
        return pose_t

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Decode clip ``index`` (see the class docstring).

        Args:
            index: clip number.
        """
        clip = self.clips[index]
        cfg = self.config
        try:
            frames, indices = self._frames(clip)
        except VideoReadError as exc:
            raise ClipError(f"clip {clip.video_id}: {exc}", "corrupt") from None
        if len(frames) < int(cfg.min_frames or 0) or not frames:
            raise ClipError(
                f"clip {clip.video_id}: decoded {len(frames)} frames, need {cfg.min_frames}", "too_short"
            )
        frames += [frames[-1]] * (int(cfg.num_frames) - len(frames))
        item: dict[str, Any] = dict(
            video=torch.stack(frames, dim=1).contiguous(),
            video_id=clip.video_id,
            caption=clip.caption,
            prompts=list(clip.prompts),
            segments=torch.tensor(clip.segments, dtype=torch.long),
        )
        if clip.keys:
            item["keys"] = list(clip.keys)
            item["revisits"] = torch.tensor(clip.revisits, dtype=torch.long)
        pose = self._pose(clip, indices)
        if pose is not None:
            item["pose"] = pose
        return item


def collate_videos(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack :class:`EgoVidDataset` items into a batch.

    Args:
        batch: items with ``video (3, T, H, W)`` and ``segments (N,)``.

    Returns:
        dict: ``video (B, 3, T, H, W)``, ``segments (B, N)``, ``video_id``/``caption``/``prompts`` lists, and
        ``pose`` (a list with ``None`` for clips without one) when any item has a pose.
    """
    out: dict[str, Any] = dict(
        video=torch.stack([b["video"] for b in batch]),
        segments=torch.stack([b["segments"] for b in batch]),
        video_id=[b["video_id"] for b in batch],
        caption=[b["caption"] for b in batch],
        prompts=[b["prompts"] for b in batch],
    )
    if any("pose" in b for b in batch):
        out["pose"] = [b.get("pose") for b in batch]
    return out


def skip_summary(skipped: dict[str, int]) -> str:
    """``"1 missing, 2 too short"`` for a ``skipped`` dict (for CLI messages).

    Args:
        skipped: counts by reason.
    """
    return _reason_text(skipped) if skipped else "none"
