"""Per-frame consistency (subject, background), flicker, drift and NRDP of one video (see :mod:`egolcd.metrics`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..video_io import to_uint8_frames

logger = logging.getLogger(__name__)

DESCRIPTOR_NAME = "fixed descriptor (16x16 colour thumbnail + gradient-orientation histograms)"
BORDER = 0.25  # background = the outer quarter of each side of the frame

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps images ``(B, 3, H, W)`` float in [0, 1] to features ``(B, D)``."""



# --------------------------------------------------------------------------------------- conversion
def as_uint8(video: np.ndarray | torch.Tensor, layout: str = "CTHW") -> np.ndarray:
    """Any supported video (see ``egolcd.video_io.to_uint8_frames``) as ``uint8 (T, H, W, 3)``."""
    return to_uint8_frames(video, layout)


def as_float(frames: np.ndarray) -> torch.Tensor:
    """``uint8 (T, H, W, 3)`` -> float32 torch ``(T, 3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def _batches(frames: np.ndarray, size: int = 64) -> Iterator[torch.Tensor]:
    for i in range(0, len(frames), size):
        yield as_float(frames[i : i + size])


# --------------------------------------------------------------------------------------- features
def _cell_mask(cells: int, border: float) -> torch.Tensor:
    """``(cells, cells)`` bool mask of grid cells in the outer ``border`` band (at least one cell wide)."""
    band = max(1, round(border * cells))
    idx = torch.arange(cells)
    edge = (idx < band) | (idx >= cells - band)
    return edge[:, None] | edge[None, :]


def _descriptor_grids(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour ``(B, 3, 16, 16)`` in [-1, 1] and gradient histograms ``(B, 8, 4, 4)`` of ``(B, 3, H, W)`` images."""
    small = F.interpolate(images.float(), size=(64, 64), mode="area")
    colour = F.avg_pool2d(small, 4) * 2 - 1
    luma = (small * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, sobel[None, None]), F.conv2d(padded, sobel.t()[None, None])
    mag = torch.sqrt(gx**2 + gy**2)[:, 0]
    bins = (torch.remainder(torch.atan2(gy, gx)[:, 0], math.pi) / (math.pi / 8)).long().clamp(0, 7)
    hist = F.one_hot(bins, 8).permute(0, 3, 1, 2).float() * mag[:, None]
    return colour, F.avg_pool2d(hist, 16)


def _from_grids(colour: torch.Tensor, hist: torch.Tensor, border: float | None) -> torch.Tensor:
    if border is not None:
        colour, hist = colour[:, :, _cell_mask(16, border)], hist[:, :, _cell_mask(4, border)]
    b = colour.shape[0]
    parts = [F.normalize(p.reshape(b, -1), dim=-1) for p in (colour, hist)]
    return torch.cat(parts, dim=-1) / math.sqrt(2.0)


def descriptor_features(images: torch.Tensor, border: float | None = None) -> torch.Tensor:
    """A fixed, parameter-free frame descriptor (works offline, no weights).

    From the 64x64 area-averaged image, two L2-normalised parts, concatenated and scaled by 1/sqrt(2) (so
    cosine = mean of the parts' cosines): a 16x16 colour thumbnail mapped to [-1, 1] (768 values; sensitive
    to colour and layout), and magnitude-weighted histograms of unsigned Sobel gradient orientation (8 bins)
    of the luma on a 4x4 grid (128 values; sensitive to edges and structure). It sees appearance, not
    object identity, and is more sensitive to camera motion than DINO features.

    Args:
        images: ``(B, 3, H, W)`` float in [0, 1].
        border: when given, keep only grid cells in the outer ``border`` fraction of each side (background).

    Returns:
        ``(B, D)`` float32 features (D = 896 for whole frames).
    """
    return _from_grids(*_descriptor_grids(images), border)


def _mask_centre(x: torch.Tensor, border: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    bh, bw = max(1, round(border * h)), max(1, round(border * w))
    x = x.clone()
    x[:, :, bh : h - bh, bw : w - bw] = 0.5
    return x


def frame_features(
    frames: np.ndarray,
    features: FeatureFn | None = None,
    borders: Sequence[float | None] = (None,),
    batch: int = 64,
) -> list[torch.Tensor]:
    """Per-frame features of a video, for whole frames and/or image borders, in one pass over the frames.

    Args:
        frames: ``uint8 (T, H, W, 3)``.
        features: a ``FeatureFn`` (e.g. ``ImageEncoder``); ``None`` = ``descriptor_features``.
        borders: one entry per output: ``None`` = whole frame, a float = the image border only (the
            descriptor keeps its border cells; a model sees the frame with its centre, all but the outer
            ``border`` of each side, filled with mid-grey).
        batch: frames per forward pass.

    Returns:
        One ``(T, D)`` float32 tensor per entry of ``borders``.
    """
    out: list[list[torch.Tensor]] = [[] for _ in borders]
    for x in _batches(frames, batch):
        grids = _descriptor_grids(x) if features is None else None
        for acc, border in zip(out, borders):
            if grids is not None:
                acc.append(_from_grids(*grids, border))
            else:
                with torch.no_grad():
                    acc.append(features(x if border is None else _mask_centre(x, border)).float().cpu())
    return [torch.cat(acc) for acc in out]


def consistency_scores(feats: torch.Tensor) -> np.ndarray:
    """VBench-style per-frame consistency: ``max(0, (cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2)``.

    Args:
        feats: ``(T, D)`` per-frame features, T >= 2.

    Returns:
        ``(T - 1,)`` float64 scores of frames 1..T-1 (frame 0 would trivially score 1 and is left out).
    """
    if feats.shape[0] < 2:
        raise ValueError(f"consistency needs at least 2 frames, got {feats.shape[0]}")
    f = F.normalize(feats.double(), dim=-1)
    first = (f[1:] * f[:1]).sum(-1)
    prev = (f[1:] * f[:-1]).sum(-1)
    return ((first + prev) / 2).clamp_min(0).numpy()


def subject_consistency(frames: np.ndarray, features: FeatureFn | None = None) -> np.ndarray:
    """Per-frame subject consistency of whole frames (``(T - 1,)``; see ``consistency_scores``)."""
    return consistency_scores(frame_features(as_uint8(frames), features)[0])


def background_consistency(
    frames: np.ndarray, features: FeatureFn | None = None, border: float = BORDER
) -> np.ndarray:
    """Per-frame background consistency: the same score on the image border only (``(T - 1,)``)."""
    return consistency_scores(frame_features(as_uint8(frames), features, (border,))[0])


def flicker_scores(frames: np.ndarray, batch: int = 64) -> np.ndarray:
    """``1 - mean|x_t - x_{t-1}| / 255`` for each consecutive pair: ``(T - 1,)`` float64 in [0, 1]."""
    frames = as_uint8(frames)
    if len(frames) < 2:
        raise ValueError(f"flicker needs at least 2 frames, got {len(frames)}")
    out = []
    for i in range(0, len(frames) - 1, batch):
        x = torch.from_numpy(frames[i : i + batch + 1]).float()
        out.append(1.0 - (x[1:] - x[:-1]).abs_().mean(dim=(1, 2, 3)).double() / 255.0)
    return torch.cat(out).numpy()


def temporal_flicker(frames: np.ndarray) -> float:
    """VBench-like temporal flickering score of a video (1 = no change between frames)."""
    return float(flicker_scores(frames).mean())


# --------------------------------------------------------------------------------------- drift
def drift(scores: Sequence[float] | np.ndarray, frac: float = 0.15) -> float:
    """``|mean(first frac) - mean(last frac)|`` of a per-frame score (FramePack's drift measure).

    Args:
        scores: ``(N,)`` per-frame scores; each end uses ``max(1, round(frac * N))`` of them.
        frac: fraction of the scores at each end.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("drift needs at least one score")
    k = max(1, int(frac * s.size + 0.5))
    return float(abs(s[:k].mean() - s[-k:].mean()))


def nrdp(
    gen_scores: Sequence[float] | np.ndarray,
    ref_scores: Sequence[float] | np.ndarray,
    eps: float = 1e-8,
    frac: float = 0.15,
) -> float:
    """Normalized Referenced Drifting Penalty: ``max(0, drift(G) - drift(R)) / (mean(R) + eps)``.

    Lower is better; 0 means the generated video drifts no more than the real reference.
    """
    ref = np.asarray(ref_scores, dtype=np.float64)
    return max(0.0, drift(gen_scores, frac) - drift(ref, frac)) / (float(ref.mean()) + eps)


def window_curve(values: Sequence[float] | np.ndarray, window: int) -> list[float]:
    """Means over consecutive windows of ``window`` values (the last one may be shorter), for plotting."""
    v = np.asarray(values, dtype=np.float64).ravel()
    window = max(1, int(window))
    return [float(v[i : i + window].mean()) for i in range(0, v.size, window)]
