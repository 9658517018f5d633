"""The user's own footage as the start of a run (``egolcd generate --from-video/--from-image``).

Rules (the same for the command, the studio and ``EgoLCDPipeline(init_video=/init_image=)``):

* **Time.** A clip is resampled to the model's fps (``video_io.iter_frames``: each output frame is the
  latest source frame shown at its time). It is trimmed to whole chunks: a chunk of ``k`` latent frames is
  ``1 + 4 (k - 1)`` pixel frames for the first chunk and ``4 k`` after (Wan VAE), so ``n`` chunks are
  ``4 k n - 3`` frames and the frames after the last whole chunk are dropped. A clip shorter than one chunk,
  and a photo (a clip of one frame), is padded by repeating its last frame to one chunk.
* **Space.** The largest centred crop with the model's aspect ratio, then a resize to the model's size
  (PIL's antialiased bicubic); a frame already at the model's size is used as it is. The crop must keep at
  least a quarter of the source's width and height (aspect ratios within a factor of 4 of the model's);
  a narrower source is refused ("impossible aspect").
* **Errors.** A missing file, a folder, a corrupt or empty file, no video stream, an impossible aspect: one
  ``ValueError``/``OSError`` line naming the file, found by :func:`check_footage` from the header alone,
  before any weights work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .video_io import VideoReadError, iter_frames, probe_video

__all__ = [
    "FOOTAGE_KINDS",
    "MAX_ASPECT_FACTOR",
    "FootageInfo",
    "check_footage",
    "check_footage_path",
    "crop_box",
    "footage_chunks",
    "footage_frames",
    "whole_chunk_frames",
]

FOOTAGE_KINDS = ("video", "image")
MAX_ASPECT_FACTOR = 4.0


@dataclass(frozen=True)
class FootageInfo:
    """What :func:`check_footage` learnt from the header: ``kind`` (video or image), source size, fps
    (``None`` for an image) and frame count (1 for an image)."""

    path: Path
    kind: str
    width: int
    height: int
    fps: float | None
    num_frames: int


def crop_box(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)``: the largest centred crop of a ``src_width x src_height``
    frame with the aspect ratio of ``width x height``.

    Raises:
        ValueError: the crop would keep less than ``1 / MAX_ASPECT_FACTOR`` of the source's width or height.
    """
    if src_width * height >= src_height * width:  # wider than the model: crop the sides
        ch, cw = src_height, max(1, round(src_height * width / height))
    else:
        cw, ch = src_width, max(1, round(src_width * height / width))
    if cw * MAX_ASPECT_FACTOR < src_width or ch * MAX_ASPECT_FACTOR < src_height:
        raise ValueError(
            f"impossible aspect: a {src_width}x{src_height} frame cropped to the model's {width}x{height} aspect "
            f"would keep only {cw}x{ch} (the crop must keep at least 1/{MAX_ASPECT_FACTOR:g} of each side)"
        )
    return (src_width - cw) // 2, (src_height - ch) // 2, cw, ch


def check_footage_path(path: Path, what: str) -> None:
    """One line (FileNotFoundError, IsADirectoryError, ValueError) when ``path`` is not a regular file; the
    check that needs no model (its size) and reads nothing."""
    if not path.exists():
        raise FileNotFoundError(f"cannot read {what} {path}: file not found")
    if path.is_dir():
        raise IsADirectoryError(f"cannot read {what} {path}: it is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"cannot read {what} {path}: not a regular file")


def check_footage(path: str | os.PathLike[str], kind: str, width: int, height: int) -> FootageInfo:
    """Check footage from its header (no pixel decoding beyond a photo's): it exists, is a file, holds
    frames, and crops to ``width x height``.

    Args:
        kind: ``video`` or ``image``.

    Raises:
        ValueError / OSError: one line naming the file and the problem.
    """
    if kind not in FOOTAGE_KINDS:
        raise ValueError(f"footage kind must be one of {FOOTAGE_KINDS}, got {kind!r}")
    p = Path(path).expanduser()
    check_footage_path(p, kind)
    if kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                im.verify()  # header and structure, without decoding every pixel
            with Image.open(p) as im:
                src_w, src_h = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise ValueError(f"cannot read image {p}: {detail}") from None
        info = FootageInfo(p, kind, int(src_w), int(src_h), None, 1)
    else:
        probed = probe_video(p)
        if probed.num_frames <= 0:
            raise VideoReadError(f"cannot read video {p}: it has no frames")
        info = FootageInfo(p, kind, probed.width, probed.height, probed.fps, probed.num_frames)
    if info.width <= 0 or info.height <= 0:
        raise ValueError(f"cannot read {kind} {p}: empty frame size {info.width}x{info.height}")
    crop_box(info.width, info.height, width, height)
    return info


def _fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre-crop to the aspect of ``width x height`` and resize to it (uint8 ``(H, W, 3)``)."""
    src_h, src_w = image.shape[:2]
    if (src_w, src_h) == (width, height):
        return image
    left, top, cw, ch = crop_box(src_w, src_h, width, height)
    crop = image[top : top + ch, left : left + cw]
    if (cw, ch) == (width, height):
        return np.ascontiguousarray(crop)
    from PIL import Image

    return np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.BICUBIC))


def footage_frames(
    path: str | os.PathLike[str], kind: str, fps: int, width: int, height: int, max_frames: int | None = None
) -> Iterator[np.ndarray]:
    """The footage's frames at ``fps``, cropped and resized to ``width x height`` (uint8 ``(H, W, 3)``),
    at most ``max_frames`` of them; a photo is one frame."""
    if kind == "image":
        from PIL import Image

        p = Path(path).expanduser()
        try:
            with Image.open(p) as im:
                image = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise ValueError(f"cannot read image {p}: {' '.join(str(exc).split())}") from None
        yield _fit(image, width, height)
        return
    for frame in iter_frames(path, fps=fps, max_frames=max_frames):
        yield _fit(frame, width, height)


def whole_chunk_frames(available: int, chunk_frames: int, vae_temporal: int) -> int:
    """Pixel frames of the footage once trimmed to whole chunks (``n`` chunks: ``1 + vae_temporal (k n - 1)``;
    at least one chunk: a shorter clip is padded)."""
    first = 1 + vae_temporal * (chunk_frames - 1)
    per_chunk = vae_temporal * chunk_frames
    n = 1 + max(0, available - first) // per_chunk
    return first + (n - 1) * per_chunk


def footage_chunks(
    frames: Iterator[np.ndarray], total: int, chunk_frames: int, vae_temporal: int
) -> Iterator[torch.Tensor]:
    """Group frames into the pixel chunks of ``total`` frames (``whole_chunk_frames``): ``(1, 3, t, H, W)``
    float in [-1, 1], ``t = 1 + vae_temporal (k - 1)`` first, ``vae_temporal k`` after. The last frame is
    repeated when the source ends early (a photo, a clip shorter than one chunk)."""
    first = 1 + vae_temporal * (chunk_frames - 1)
    per_chunk = vae_temporal * chunk_frames
    sizes = [first] + [per_chunk] * ((total - first) // per_chunk)
    last: np.ndarray | None = None
    for size in sizes:
        batch = []
        for _ in range(size):
            frame = next(frames, None)
            if frame is None:
                if last is None:
                    raise ValueError("the footage has no frames")
                frame = last
            batch.append(frame)
            last = frame
        arr = torch.from_numpy(np.stack(batch)).permute(3, 0, 1, 2).float()  # (3, t, H, W)
        yield (arr / 127.5 - 1.0)[None]
