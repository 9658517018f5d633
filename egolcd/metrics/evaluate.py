"""All metrics of one video (``score_video``) and against a reference (``evaluate_video``)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..narrative import CompiledNarrative
from ..video_io import read_video
from .consistency import (
    BORDER,
    DESCRIPTOR_NAME,
    FeatureFn,
    as_uint8,
    consistency_scores,
    drift,
    flicker_scores,
    frame_features,
    nrdp,
    window_curve,
)
from .distribution import ClipScorer, VideoMAEFeatures, fvd
from .revisit import revisit_consistency

logger = logging.getLogger(__name__)

FVD_SKIP = "FVD needs --fvd-model PATH (local weights of a VideoMAE model); skipped"
FVD_NO_REFERENCE = "FVD needs --reference REF (a real video to compare with); skipped"
CLIP_SKIP = "CLIP score needs --clip-model PATH (local weights of a CLIP model); skipped"
CLIP_NO_NARRATIVE = "CLIP score needs --narrative N (the prompts to score against); skipped"
FVD_IMPLEMENTATION = "egolcd frechet_distance (not the cd-fvd package)"


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
        (``None`` when not computable; ``skipped`` maps each skipped metric to its one-line reason); when
        ``fvd`` is computed, ``fvd_by`` names the implementation and the feature model's weights.
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
        weights = getattr(fvd_encoder, "name", type(fvd_encoder).__name__)
        out["fvd_by"] = f"{FVD_IMPLEMENTATION}, features of {weights}"
    return out
