"""Evaluation of long egocentric videos: consistency, drift, NRDP, revisit consistency, flicker, FVD, CLIP.

Conventions: videos are ``uint8 (T, H, W, 3)`` RGB numpy arrays (``as_uint8`` also takes the float torch
layouts of ``egolcd.video_io``); image batches handed to feature extractors are float torch
``(B, 3, H, W)`` in [0, 1] (``as_float``).

What is measured (METHOD.md "NRDP (ours)"; the paper gives no formulas):

- **Subject / background consistency** (VBench style, *without* DINO/CLIP by default): for frame t >= 1,
  ``max(0, (cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2)`` of per-frame features ``f``. The default feature is
  ``descriptor_features``, a fixed parameter-free descriptor (a 16x16 colour thumbnail and a 4x4 grid of
  gradient-orientation histograms); it sees colour, layout and edges, not object identity. An
  ``ImageEncoder`` (DINO/DINOv2/CLIP weights from a local folder) can replace it. Background consistency
  uses the image border only (the outer ``border`` fraction of each side).
- **drift / NRDP**: ``drift = |mean(first 15%) - mean(last 15%)|`` of a per-frame score;
  ``NRDP = max(0, drift(G) - drift(R)) / (mean(R) + eps)``.
- **Revisit consistency**: see ``revisit_consistency``; PSNR and SSIM (Gaussian window, RGB).
- **Temporal flicker**: ``1 - mean|x_t - x_{t-1}| / 255`` (VBench "temporal flickering" without its
  static-scene filter).
- **FVD** (CD-FVD style): Frechet distance of mean-pooled VideoMAE features of clips; **CLIP score**: mean
  cosine of CLIP image and prompt embeddings per segment. Both need local weights and are skipped with a
  one-line message otherwise; nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .narrative import CompiledNarrative
from .video_io import read_video, to_uint8_frames

logger = logging.getLogger(__name__)

__all__ = [
    "ClipScorer",
    "ImageEncoder",
    "RevisitScore",
    "VideoMAEFeatures",
    "VideoScores",
    "as_float",
    "as_uint8",
    "background_consistency",
    "consistency_scores",
    "descriptor_features",
    "drift",
    "evaluate_video",
    "feature_stats",
    "flicker_scores",
    "frame_features",
    "frechet_distance",
    "fvd",
    "nrdp",
    "psnr",
    "revisit_consistency",
    "score_video",
    "ssim",
    "subject_consistency",
    "temporal_flicker",
    "window_curve",
]

FVD_SKIP = "FVD needs --fvd-model PATH (local weights of a VideoMAE model); skipped"
FVD_NO_REFERENCE = "FVD needs --reference REF (a real video to compare with); skipped"
CLIP_SKIP = "CLIP score needs --clip-model PATH (local weights of a CLIP model); skipped"
CLIP_NO_NARRATIVE = "CLIP score needs --narrative N (the prompts to score against); skipped"
DESCRIPTOR_NAME = "fixed descriptor (16x16 colour thumbnail + gradient-orientation histograms)"
BORDER = 0.25  # background = the outer quarter of each side of the frame
PSNR_CAP = 100.0  # dB; identical frames (infinite PSNR) count as this in averages
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

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


# --------------------------------------------------------------------------------------- Frechet distance
def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of features ``(N, D)`` (zero covariance when N < 2)."""
    f = np.asarray(feats, dtype=np.float64)
    if len(f) < 2:
        logger.warning("only %d feature vector(s): covariance taken as zero", len(f))
        return f.mean(0), np.zeros((f.shape[1], f.shape[1]))
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr (S1 S2)^(1/2)`` is computed without scipy as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), via ``eigh``.

    Args:
        mu1, mu2: ``(D,)`` means; sigma1, sigma2: ``(D, D)`` covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    r = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(((r @ s2 @ r) + (r @ s2 @ r).T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --------------------------------------------------------------------------------------- local models
def _load_local(cls: Any, path: str | os.PathLike[str], what: str) -> Any:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"cannot load {what} from {p}: not a directory (local weights only, nothing is downloaded)"
        )
    try:
        return cls.from_pretrained(str(p), local_files_only=True, use_safetensors=True)  # never a pickle
    except Exception as exc:  # transformers raises many types; report one line
        text = str(exc).strip().splitlines()
        raise ValueError(f"cannot load {what} from {p}: {text[0] if text else type(exc).__name__}") from None


def _norm_stats(path: str | os.PathLike[str], mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    cfg_file = Path(path).expanduser() / "preprocessor_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def _prepare(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Resize the short side to ``size`` (bilinear, antialiased), centre-crop ``size x size``, normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return (x[..., top : top + size, left : left + size] - mean) / std


def _pooled(out: Any) -> torch.Tensor:
    """Tensor or a model output's ``pooler_output`` (transformers 5 returns outputs from get_*_features)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ImageEncoder:
    """A pretrained image encoder from a local folder as a ``FeatureFn`` (DINO/DINOv2, CLIP, ...).

    Loaded with ``transformers.AutoModel`` (``local_files_only``). The feature is CLIP's projected image
    embedding for a ``CLIPModel``, else ``pooler_output`` (DINOv2: the normed CLS token), else the first
    token of ``last_hidden_state``. Images are short-side resized and centre-cropped to the model's
    ``image_size`` and normalised with the folder's ``preprocessor_config.json`` (if absent: CLIP's statistics
    for CLIP, ImageNet's otherwise).

    Args:
        path: local model folder.
        device: torch device.
    """

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel

        self.model = _load_local(AutoModel, path, "image encoder").eval().to(device)
        vision = getattr(self.model.config, "vision_config", self.model.config)
        self.size, self.device = int(vision.image_size), torch.device(device)
        is_clip = hasattr(self.model, "get_image_features")
        self.mean, self.std = _norm_stats(
            path, *((CLIP_MEAN, CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD))
        )
        self.name = f"{type(self.model).__name__} from {Path(path).expanduser()}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _prepare(images, self.size, self.mean, self.std).to(self.device)
        if hasattr(self.model, "get_image_features"):
            return _pooled(self.model.get_image_features(pixel_values=x))
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class VideoMAEFeatures:
    """Clip features for FVD from a ``transformers`` ``VideoMAEModel`` in a local folder (CD-FVD uses VideoMAE).

    A video is cut into clips of ``config.num_frames`` frames every ``stride`` frames (a video shorter than
    one clip is padded by repeating its last frame); frames are resized/centre-cropped to
    ``config.image_size`` and normalised (ImageNet statistics unless the folder has a preprocessor config);
    a clip's feature is the mean of the encoder's last hidden states over all tokens.

    Args:
        path: local model folder (``config.json`` + safetensors).
        device: torch device.
        batch_size: clips per forward pass.
    """

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu", batch_size: int = 4):
        from transformers import VideoMAEModel

        self.model = _load_local(VideoMAEModel, path, "VideoMAE model").eval().to(device)
        self.num_frames, self.size = int(self.model.config.num_frames), int(self.model.config.image_size)
        self.mean, self.std = _norm_stats(path, IMAGENET_MEAN, IMAGENET_STD)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, stride: int | None = None) -> np.ndarray:
        """Args: frames ``uint8 (T, H, W, 3)``; stride: clip step (default: ``num_frames``).

        Returns: ``(num_clips, hidden_size)`` float64."""
        frames, n = as_uint8(frames), self.num_frames
        if len(frames) < n:
            frames = np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])
        starts = list(range(0, len(frames) - n + 1, stride or n))
        feats = []
        for i in range(0, len(starts), self.batch_size):
            clips = [
                _prepare(as_float(frames[s : s + n]), self.size, self.mean, self.std)
                for s in starts[i : i + self.batch_size]
            ]
            out = self.model(pixel_values=torch.stack(clips).to(self.device))
            feats.append(out.last_hidden_state.mean(1).double().cpu())
        return torch.cat(feats).numpy()


def fvd(gen_features: np.ndarray, ref_features: np.ndarray) -> float:
    """Frechet distance between two sets of clip features ``(N, D)`` (from ``VideoMAEFeatures``)."""
    return frechet_distance(*feature_stats(gen_features), *feature_stats(ref_features))


class ClipScorer:
    """CLIP score with a ``transformers`` ``CLIPModel`` and its tokenizer from a local folder.

    Image embeddings come from frames short-side resized/centre-cropped to the vision ``image_size`` and
    normalised (CLIP statistics unless the folder has a preprocessor config); text embeddings from the
    folder's real tokenizer (``AutoTokenizer``, truncated to the text model's context length; our long SNP
    prompts may be cut there).

    Args:
        path: local model folder with a CLIP model and tokenizer.
        device: torch device.
    """

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.model = _load_local(CLIPModel, path, "CLIP model").eval().to(device)
        self.tokenizer = _load_local(AutoTokenizer, path, "CLIP tokenizer")
        self.size = int(self.model.config.vision_config.image_size)
        self.context = int(self.model.config.text_config.max_position_embeddings)
        self.mean, self.std = _norm_stats(path, CLIP_MEAN, CLIP_STD)
        self.device = torch.device(device)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, D)`` unit-norm embeddings."""
        x = _prepare(images, self.size, self.mean, self.std).to(self.device)
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=x)).float().cpu(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> ``(P, D)`` unit-norm embeddings."""
        tok = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.context, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return F.normalize(_pooled(out).float().cpu(), dim=-1)

    def segment_scores(
        self, frames: np.ndarray, compiled: CompiledNarrative, per_segment: int = 8
    ) -> list[float]:
        """Mean cosine(frame embedding, segment prompt embedding) per segment, ``per_segment`` frames each
        (evenly spaced); ``nan`` for segments past the video's end."""
        frames, text = as_uint8(frames), self.text_embeddings(list(compiled.prompts))
        out = []
        for i, (start, n) in enumerate(zip(compiled.segment_start_frames, compiled.segment_frames)):
            idx = np.unique(np.linspace(start, start + n - 1, min(per_segment, n)).round().astype(int))
            idx = idx[idx < len(frames)]
            out.append(
                float((self.image_embeddings(as_float(frames[idx])) @ text[i]).mean())
                if idx.size
                else math.nan
            )
        return out


# --------------------------------------------------------------------------------------- one video
@dataclass
class VideoScores:
    """All per-video measurements (no comparison with a reference yet).

    Args:
        summary: JSON-ready scalar metrics, revisit scores and per-window curves.
        subject, background, flicker: per-frame scores ``(T - 1,)``.
        fvd_features: VideoMAE clip features ``(N, D)`` or ``None``.
    """

    summary: dict[str, Any]
    subject: np.ndarray
    background: np.ndarray
    flicker: np.ndarray
    fvd_features: np.ndarray | None = None


def score_video(
    frames: np.ndarray,
    fps: float,
    compiled: CompiledNarrative | None = None,
    *,
    window: int | None = None,
    features: FeatureFn | None = None,
    fvd_encoder: VideoMAEFeatures | None = None,
    clip_scorer: ClipScorer | None = None,
) -> VideoScores:
    """Measure one video. Args: see ``evaluate_video``; ``frames`` is ``uint8 (T, H, W, 3)``, T >= 2."""
    frames = as_uint8(frames)
    window = window or max(1, round(fps))
    full, border = frame_features(frames, features, (None, BORDER))
    subj, bg, fl = consistency_scores(full), consistency_scores(border), flicker_scores(frames)
    centres = [(i + min(window, len(subj) - i) / 2 + 0.5) / fps for i in range(0, len(subj), window)]
    s: dict[str, Any] = {
        "frames": len(frames),
        "fps": float(fps),
        "seconds": len(frames) / fps,
        "features": DESCRIPTOR_NAME if features is None else getattr(features, "name", "custom FeatureFn"),
        "subject_consistency": float(subj.mean()),
        "background_consistency": float(bg.mean()),
        "flicker": float(fl.mean()),
        "drift_subject": drift(subj),
        "drift_background": drift(bg),
        "revisits": [],
        "revisit_psnr": None,
        "revisit_ssim": None,
        "clip_score": None,
        "clip_score_per_segment": None,
        "skipped": {},
        "curves": {
            "window_frames": window,
            "seconds": centres,
            "subject": window_curve(subj, window),
            "background": window_curve(bg, window),
            "flicker": window_curve(fl, window),
        },
    }
    if compiled is not None and compiled.revisits:
        revs = revisit_consistency(frames, compiled)
        s["revisits"] = [asdict(r) for r in revs]
        if revs:
            s["revisit_psnr"] = float(np.mean([r.psnr for r in revs]))
            s["revisit_ssim"] = float(np.mean([r.ssim for r in revs]))
    if clip_scorer is None or compiled is None:
        s["skipped"]["clip_score"] = CLIP_SKIP if clip_scorer is None else CLIP_NO_NARRATIVE
    else:
        per = clip_scorer.segment_scores(frames, compiled)
        s["clip_score_per_segment"] = [None if math.isnan(v) else v for v in per]
        s["clip_score"] = float(np.nanmean(per)) if not all(math.isnan(v) for v in per) else None
    feats = fvd_encoder(frames) if fvd_encoder is not None else None
    return VideoScores(s, subj, bg, fl, feats)


def _load_frames(
    video: str | os.PathLike[str] | np.ndarray | torch.Tensor, fps: float | None
) -> tuple[np.ndarray, float]:
    if isinstance(video, (str, os.PathLike)):
        frames, file_fps = read_video(video)
        return frames, float(fps or file_fps)
    return as_uint8(video), float(fps or 16.0)


def evaluate_video(
    video: str | os.PathLike[str] | np.ndarray | torch.Tensor,
    reference: str | os.PathLike[str] | np.ndarray | torch.Tensor | VideoScores | None = None,
    compiled: CompiledNarrative | None = None,
    *,
    fps: float | None = None,
    reference_fps: float | None = None,
    window: int | None = None,
    features: FeatureFn | None = None,
    fvd_encoder: VideoMAEFeatures | None = None,
    clip_scorer: ClipScorer | None = None,
    reference_compiled: CompiledNarrative | None = None,
) -> dict[str, Any]:
    """All metrics of one video, compared with a reference when given.

    Args:
        video: an mp4 path, ``uint8 (T, H, W, 3)`` frames or float torch ``(3, T, H, W)`` in [-1, 1].
        reference: a real video (same forms) or its ``score_video`` result; enables NRDP and FVD.
        compiled: the compiled narrative laid out at this video's fps (revisits, CLIP prompts).
        fps, reference_fps: frame rates of array input (files: read from the file; arrays: 16 if not given).
        window: frames per point of the drift curves (default: one second).
        features: consistency features (default: ``descriptor_features``).
        fvd_encoder: ``VideoMAEFeatures`` for FVD (``None``: FVD skipped with ``FVD_SKIP``).
        clip_scorer: ``ClipScorer`` for the CLIP score (``None``: skipped with ``CLIP_SKIP``).
        reference_compiled: the narrative compiled at the reference's fps (default: ``compiled``).

    Returns:
        The ``summary`` dict of ``score_video`` plus ``nrdp_subject``, ``nrdp_background`` and ``fvd``
        (``None`` when not computable; ``skipped`` maps each skipped metric to its one-line reason).
    """
    frames, fps = _load_frames(video, fps)
    gen = score_video(
        frames,
        fps,
        compiled,
        window=window,
        features=features,
        fvd_encoder=fvd_encoder,
        clip_scorer=clip_scorer,
    )
    ref = reference
    if ref is not None and not isinstance(ref, VideoScores):
        ref_frames, ref_fps = _load_frames(ref, reference_fps)
        ref = score_video(
            ref_frames,
            ref_fps,
            reference_compiled or compiled,
            window=window,
            features=features,
            fvd_encoder=fvd_encoder,
        )
    out = dict(gen.summary, nrdp_subject=None, nrdp_background=None, fvd=None)
    if ref is not None:
        if len(ref.subject) != len(gen.subject):
            logger.warning(
                "reference has %d frames, the video %d: NRDP assumes equal lengths",
                len(ref.subject) + 1,
                len(gen.subject) + 1,
            )
        out["nrdp_subject"] = nrdp(gen.subject, ref.subject)
        out["nrdp_background"] = nrdp(gen.background, ref.background)
    if fvd_encoder is None or ref is None or ref.fvd_features is None:
        out["skipped"]["fvd"] = FVD_SKIP if fvd_encoder is None else FVD_NO_REFERENCE
    else:
        out["fvd"] = fvd(gen.fvd_features, ref.fvd_features)
    return out
