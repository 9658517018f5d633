"""Revisit consistency: PSNR / SSIM between the frames of a place and of its revisit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..narrative import CompiledNarrative
from .consistency import as_float, as_uint8

logger = logging.getLogger(__name__)

PSNR_CAP = 100.0  # dB; identical frames (infinite PSNR) count as this in averages


# --------------------------------------------------------------------------------------- PSNR / SSIM
def _nchw(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 numpy ``(N, H, W, 3)``/``(H, W, 3)`` or torch ``(N, C, H, W)``/``(C, H, W)`` -> float64 NCHW."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t[None] if t.ndim == 3 else t
        return t.permute(0, 3, 1, 2).double()
    return (x[None] if x.ndim == 3 else x).double()


def psnr(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 255.0
) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(range^2 / MSE)``; identical images give ``inf``.

    Args:
        a, b: images as uint8 numpy ``(N, H, W, 3)`` or torch ``(N, C, H, W)`` in [0, data_range].
        data_range: the value range.

    Returns:
        ``(N,)`` float64.
    """
    mse = ((_nchw(a) - _nchw(b)) ** 2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(
    a: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor,
    data_range: float = 255.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, on each RGB channel, averaged.

    Constants ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``; the map is averaged over valid positions (no padding);
    the window shrinks to the image for images smaller than it.

    Args:
        a, b: images as uint8 numpy ``(N, H, W, 3)`` or torch ``(N, C, H, W)`` in [0, data_range].
        data_range: L, the value range.
        window_size, sigma: Gaussian window.

    Returns:
        ``(N,)`` float64 in [-1, 1]; 1 for identical images.
    """
    x, y = _nchw(a) / data_range, _nchw(b) / data_range
    k = min(window_size, x.shape[-2], x.shape[-1])
    k -= 1 - k % 2
    g = torch.exp(-((torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).tolist()

    def blur1d(t: torch.Tensor, dim: int) -> torch.Tensor:  # valid Gaussian filtering along one axis
        n = t.shape[dim] - k + 1
        acc = t.narrow(dim, 0, n) * g[0]
        for j in range(1, k):
            acc.add_(t.narrow(dim, j, n), alpha=g[j])
        return acc

    c1, c2 = 0.01**2, 0.03**2
    out = []
    for xi, yi in zip(x, y):  # one image at a time bounds memory at full resolution
        maps = blur1d(blur1d(torch.stack([xi, yi, xi * xi, yi * yi, xi * yi]), -1), -2)
        mx, my, exx, eyy, exy = maps
        sxx, syy, sxy = exx - mx**2, eyy - my**2, exy - mx * my
        smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        out.append(smap.mean())
    return torch.stack(out)


@dataclass
class RevisitScore:
    """Consistency of one revisit (segment ``segment`` returns to the place of ``revisited``).

    Args:
        segment, revisited: segment ids.
        psnr, ssim: means over the matched frame pairs (PSNR capped at ``PSNR_CAP``).
        first_visit_frame, revisit_frame: absolute frame indices of the first pair (for the frame strip).
        pairs: number of matched pairs.
    """

    segment: str
    revisited: str
    psnr: float
    ssim: float
    first_visit_frame: int
    revisit_frame: int
    pairs: int


def _small(frames: np.ndarray, side: int) -> torch.Tensor:
    x = as_float(frames)
    h, w = x.shape[-2:]
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="area").flatten(1)


def revisit_consistency(
    frames: np.ndarray,
    compiled: CompiledNarrative,
    num_frames: int = 8,
    max_candidates: int = 64,
    match_side: int = 64,
) -> list[RevisitScore]:
    """Revisit consistency (when the camera returns, the place looks the same) for every narrative revisit.

    The compiled prompt of a revisit segment ends with "a return to the initial view of <the revisited
    segment's beginning>", so the first-visit view is the first ``num_frames`` frames of the *revisited*
    segment (its last frames are not used: by then its action has changed the view). Each of them is
    matched with the most similar frame of the *revisit* segment (all its frames, evenly subsampled to
    ``max_candidates``; similarity = MSE at ``match_side`` px on the longer side), and PSNR / SSIM of the
    matched pairs are computed at full resolution and averaged.

    Args:
        frames: ``uint8 (T, H, W, 3)``, laid out as ``compiled`` (segment i starts at
            ``compiled.segment_start_frames[i]``); segments past the video's end are skipped with a warning.
        compiled: the compiled narrative (``revisits``: segment index -> revisited segment index).
        num_frames: first-visit frames to match.
        max_candidates: revisit-segment frames considered.
        match_side: resolution of the matching step.
    """
    frames = as_uint8(frames)
    if len(frames) != compiled.num_frames:
        logger.warning("video has %d frames, the narrative %d", len(frames), compiled.num_frames)
    starts, out = compiled.segment_start_frames, []
    for r, s in sorted(compiled.revisits.items()):
        first = np.arange(
            starts[s], min(starts[s] + min(num_frames, compiled.segment_frames[s]), len(frames))
        )
        cand = np.arange(starts[r], min(starts[r] + compiled.segment_frames[r], len(frames)))
        if first.size == 0 or cand.size == 0:
            ids = compiled.segment_ids
            logger.warning("revisit %s -> %s lies past the video's end; skipped", ids[r], ids[s])
            continue
        if cand.size > max_candidates:
            cand = cand[np.linspace(0, cand.size - 1, max_candidates).round().astype(int)]
        best = cand[
            torch.cdist(_small(frames[first], match_side), _small(frames[cand], match_side)).argmin(1)
        ]
        p = psnr(frames[first], frames[best]).clamp(max=PSNR_CAP)
        q = ssim(frames[first], frames[best])
        out.append(
            RevisitScore(
                compiled.segment_ids[r],
                compiled.segment_ids[s],
                float(p.mean()),
                float(q.mean()),
                int(first[0]),
                int(best[0]),
                int(first.size),
            )
        )
    return out
