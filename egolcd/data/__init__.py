"""Training data: the EgoVid-5M-format dataset and the latent cache.

>>> from egolcd.data import EgoVidDataset, build_from_preset, prepare_latents, LatentDataset  # doctest: +SKIP
"""

from __future__ import annotations

from .egovid import (
    ClipError,
    EgoVidConfig,
    EgoVidDataset,
    build_from_preset,
    caption_narrative,
    caption_prompts,
    collate_videos,
    skip_summary,
    split_sentences,
)
from .latents import (
    LatentClip,
    LatentDataset,
    LatentGeometry,
    LatentIndex,
    collate_latents,
    prepare_latents,
)

__all__ = [
    "ClipError",
    "EgoVidConfig",
    "EgoVidDataset",
    "LatentClip",
    "LatentDataset",
    "LatentGeometry",
    "LatentIndex",
    "build_from_preset",
    "caption_narrative",
    "caption_prompts",
    "collate_latents",
    "collate_videos",
    "prepare_latents",
    "skip_summary",
    "split_sentences",
]
