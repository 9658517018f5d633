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
  one-line message otherwise; nothing is ever downloaded. The FVD is egolcd's own (``fvd_by`` in the result
  names it and the weights); it is *not* the paper's CD-FVD reference package ``cd-fvd`` (0.1.1), which
  cannot be installed beside our CPU torch 2.13.0: it requires ``torchvision``, imported by ``cdfvd.fvd`` even
  with ``--no-deps``; PyPI's torchvision 0.28.0 fails to import beside the CPU torch ("operator
  torchvision::nms does not exist") and 0.29 pulls a CUDA torch 2.14.1. Our numbers are therefore not
  comparable with published CD-FVD values (see ``egolcd.metrics.distribution.fvd``).

Modules: :mod:`.consistency` (frame consistency, flicker, drift, NRDP), :mod:`.revisit` (PSNR/SSIM of
revisits), :mod:`.distribution` (FVD, CLIP score, local encoders), :mod:`.evaluate` (one video, a reference).
"""

from .consistency import (
    BORDER,
    DESCRIPTOR_NAME,
    FeatureFn,
    as_float,
    as_uint8,
    background_consistency,
    consistency_scores,
    descriptor_features,
    drift,
    flicker_scores,
    frame_features,
    nrdp,
    subject_consistency,
    temporal_flicker,
    window_curve,
)
from .distribution import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipScorer,
    ImageEncoder,
    VideoMAEFeatures,
    _load_local,  # noqa: F401  (tests/test_safetensors_only.py imports it from egolcd.metrics)
    feature_stats,
    frechet_distance,
    fvd,
)
from .evaluate import (
    CLIP_NO_NARRATIVE,
    CLIP_SKIP,
    FVD_IMPLEMENTATION,
    FVD_NO_REFERENCE,
    FVD_SKIP,
    VideoScores,
    evaluate_video,
    score_video,
)
from .revisit import PSNR_CAP, RevisitScore, psnr, revisit_consistency, ssim

__all__ = [
    "BORDER",
    "CLIP_MEAN",
    "CLIP_NO_NARRATIVE",
    "CLIP_SKIP",
    "CLIP_STD",
    "DESCRIPTOR_NAME",
    "FVD_IMPLEMENTATION",
    "FVD_NO_REFERENCE",
    "FVD_SKIP",
    "FeatureFn",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PSNR_CAP",
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
