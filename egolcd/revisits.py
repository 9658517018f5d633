"""Pose-paired revisit scores: does a revisited place look the way it did on the first visit?

A held-out simulated episode (``egolcd prepare-data``) has ground-truth camera poses and revisits
(``revisits.json``: segment ``j`` returns to the place of segment ``k``). For each frame of the revisit we
take the first-visit frame with the nearest camera pose (same place and heading, within the source's
tolerance) and compare the two frames *of the same video* (generated, or real footage through the VAE).
Beside it, the **chance** score pairs the same revisit frame with the frame of a look-around at a
*different* place with the nearest heading: a video that recalls this place scores well above chance; a
video whose places all look alike (or are all grey) scores the same on both. METHOD.md, "Revisions".

    >>> pairs = revisit_pairs(poses, revisit, tolerance)  # doctest: +SKIP
    >>> revisit_psnr(frames, pairs)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .metrics import psnr

__all__ = ["RevisitPairs", "bootstrap_mean_ci", "chance_pairs", "paired_psnr", "revisit_pairs"]


@dataclass
class RevisitPairs:
    """Frame pairs ``(revisit frame, paired frame)`` of one revisit.

    Args:
        segment: the revisiting segment id. target: the revisited segment id.
        pairs: ``(P, 2)`` int frame indices.
    """

    segment: str
    target: str
    pairs: np.ndarray


def _yaw_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs((a[:, None] - b[None, :] + np.pi) % (2 * np.pi) - np.pi)


def revisit_pairs(
    poses: np.ndarray,
    revisit_frames: Sequence[int],
    first_visit_frames: Sequence[int],
    radius: float = 0.5,
    yaw_deg: float = 20.0,
) -> np.ndarray:
    """For each frame of ``[c, d)`` the first-visit frame in ``[a, b)`` with the nearest pose.

    Distance: metres plus yaw in radians (a 0.1 rad heading error weighs like 10 cm). Frames with no
    first-visit frame within ``radius`` and ``yaw_deg`` are left out.

    Args:
        poses: ``(T, 5)`` (x, y, z, yaw, pitch).
        revisit_frames: ``(c, d)``. first_visit_frames: ``(a, b)``.

    Returns:
        ``(P, 2)`` int array of ``(revisit frame, first-visit frame)``.
    """
    c, d = revisit_frames
    a, b = first_visit_frames
    pj, pk = poses[c:d], poses[a:b]
    dist = np.linalg.norm(pj[:, None, :3] - pk[None, :, :3], axis=-1)
    yaw = _yaw_diff(pj[:, 3], pk[:, 3])
    ok = (dist <= radius) & (yaw <= math.radians(yaw_deg))
    score = np.where(ok, dist + yaw, np.inf)
    best = score.argmin(axis=1)
    keep = np.isfinite(score[np.arange(len(pj)), best])
    return np.stack([np.arange(c, d)[keep], (a + best)[keep]], axis=1).astype(np.int64)


def chance_pairs(
    poses: np.ndarray,
    revisit_frames: Sequence[int],
    other_places: Sequence[tuple[int, int]],
    min_distance: float = 1.5,
) -> np.ndarray:
    """For each revisit frame, the frame of a look-around at another place with the nearest heading.

    Args:
        poses: ``(T, 5)``.
        revisit_frames: ``(c, d)``.
        other_places: frame ranges of look-around segments at other places.
        min_distance: a candidate frame must be at least this far (metres) from the revisit frame.

    Returns:
        ``(P, 2)`` int array (empty when no other place exists).
    """
    c, d = revisit_frames
    cands = np.concatenate([np.arange(a, b) for a, b in other_places]) if other_places else np.zeros(0, int)
    if not len(cands):
        return np.zeros((0, 2), dtype=np.int64)
    pj, pk = poses[c:d], poses[cands]
    far = np.linalg.norm(pj[:, None, :3] - pk[None, :, :3], axis=-1) >= min_distance
    score = np.where(far, _yaw_diff(pj[:, 3], pk[:, 3]), np.inf)
    best = score.argmin(axis=1)
    keep = np.isfinite(score[np.arange(len(pj)), best])
    return np.stack([np.arange(c, d)[keep], cands[best][keep]], axis=1).astype(np.int64)


def paired_psnr(frames: np.ndarray, pairs: np.ndarray, other: np.ndarray | None = None) -> float:
    """Mean PSNR (dB) over frame pairs; each pair's MSE is floored at 1e-3 (identical frames: 78 dB).

    Args:
        frames: uint8 ``(T, H, W, 3)`` of the video holding the first element of each pair.
        pairs: ``(P, 2)`` frame indices.
        other: the video holding the second elements (default: ``frames``).
    """
    if not len(pairs):
        return float("nan")
    other = frames if other is None else other
    a = frames[pairs[:, 0]].astype(np.float64)
    b = other[pairs[:, 1]].astype(np.float64)
    mse = np.maximum(((a - b) ** 2).mean(axis=(1, 2, 3)), 1e-3)
    return float(np.mean(10.0 * np.log10(255.0**2 / mse)))


def frame_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-frame PSNR of two equally long uint8 videos ``(T, H, W, 3)`` (egolcd.metrics.psnr)."""
    n = min(len(a), len(b))
    values = psnr(a[:n], b[:n]).numpy()
    return float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float("inf")


def bootstrap_mean_ci(
    values: Sequence[float], n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap confidence interval ``(mean, low, high)``.

    Used on paired differences (e.g. egolcd - window per (episode, seed)), so the interval is that of the
    mean difference.
    """
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)
