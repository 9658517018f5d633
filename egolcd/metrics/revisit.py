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

    Computed by ``torchmetrics.functional.image.peak_signal_noise_ratio`` (``dim=(1, 2, 3)``, no reduction).
    torchmetrics keeps ``log(data_range)`` and ``10 / log(10)`` in float32, so values agree with the exact
    float64 formula to about 1e-6 dB.

    Args:
        a, b: images as uint8 numpy ``(N, H, W, 3)`` or torch ``(N, C, H, W)`` in [0, data_range].
        data_range: the value range.

    Returns:
        ``(N,)`` float64.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio  # seconds to import: only when used

    x, y = _nchw(a), _nchw(b)
    return peak_signal_noise_ratio(
        x, y, data_range=float(data_range), reduction="none", dim=(1, 2, 3)
    ).double()


def _gaussian_sigma(sigma: float, side: int) -> float:
    """``sigma``, or a narrower one whose torchmetrics window (``2 int(3.5 sigma + 0.5) + 1``) fits ``side``."""
    if 2 * int(3.5 * sigma + 0.5) + 1 <= side:
        return sigma
    half = (side - 1) // 2  # the largest odd window that fits is 2 half + 1
    return max(half / 3.5, 1e-3)


def ssim(
    a: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor,
    data_range: float = 255.0,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, on each RGB channel, averaged.

    The SSIM map is ``torchmetrics.functional.image.structural_similarity_index_measure`` (Gaussian window of
    ``2 int(3.5 sigma + 0.5) + 1`` px, 11 for ``sigma = 1.5``; ``k1 = 0.01``, ``k2 = 0.03``, so
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``). torchmetrics averages its map over every pixel, the border
    ones computed on a reflection-padded image; here the map is averaged over the valid positions only
    (windows wholly inside the image), as Wang et al.'s reference and scikit-image do, which is also what this
    function computed before it used torchmetrics. Images smaller than the window use a narrower Gaussian
    whose window fits (before torchmetrics: the ``sigma`` Gaussian truncated to the image).

    Args:
        a, b: images as uint8 numpy ``(N, H, W, 3)`` or torch ``(N, C, H, W)`` in [0, data_range].
        data_range: L, the value range.
        sigma: standard deviation of the Gaussian window, in pixels.

    Returns:
        ``(N,)`` float64 in [-1, 1]; 1 for identical images.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure  # see psnr

    x, y = _nchw(a), _nchw(b)
    h, w = x.shape[-2:]
    s = _gaussian_sigma(sigma, min(h, w))
    pad = int(3.5 * s + 0.5)
    out = []
    for xi, yi in zip(x, y):  # one image at a time bounds memory at full resolution
        _, smap = structural_similarity_index_measure(
            xi[None],
            yi[None],
            gaussian_kernel=True,
            sigma=s,
            data_range=float(data_range),
            reduction="none",
            return_full_image=True,
        )
        out.append(smap[..., pad : h - pad, pad : w - pad].mean())
    return torch.stack(out).double()


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
