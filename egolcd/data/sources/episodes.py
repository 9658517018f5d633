"""The episode model of the simulated sources: scripted segments, revisits detected from the ground-truth
pose, captions (see :mod:`egolcd.data.sources`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...narrative import DEFAULT_ACTOR

logger = logging.getLogger(__name__)

POSE_COLUMNS = ("x", "y", "z", "yaw", "pitch")


# ------------------------------------------------------------------------------------------- episodes
@dataclass
class EpisodeSegment:
    """One scripted segment: frames ``[start, end)`` of the video and what happens in them.

    Args:
        id: unique segment id (``s1``, ``s2``, ...).
        start: first frame.
        end: end frame (exclusive).
        action: third-person present clause ("walks back to the red ball").
        revisit: id of the earlier segment this one revisits (filled by :func:`detect_revisits`).
    """

    id: str
    start: int
    end: int
    action: str
    revisit: str | None = None

    @property
    def num_frames(self) -> int:
        return self.end - self.start


@dataclass
class RevisitTolerance:
    """When two frames show the same place (see :func:`detect_revisits`).

    Args:
        radius: max distance between camera positions (metres).
        yaw_deg: max heading difference (degrees).
        pitch_deg: max pitch difference (degrees).
        min_fraction: min fraction of a segment's frames matching an earlier segment for a revisit.
    """

    radius: float = 0.5
    yaw_deg: float = 20.0
    pitch_deg: float = 10.0
    min_fraction: float = 0.5


@dataclass
class Episode:
    """A planned episode: annotations known up front, frames rendered lazily.

    Args:
        scene: the place as a noun phrase (narrative ``scene``; caption "The video shows <scene>.").
        name: short summary (CSV ``name``).
        nouns, verbs: CSV ``noun_cls`` / ``verb_cls`` (joined with ``;``).
        segments: the segments, covering ``[0, T)`` in order.
        poses: float32 ``(T, 5)`` camera poses (``POSE_COLUMNS``).
        state: int ``(T,)`` arrangement of the movable objects (frames with different states never match).
        frames: iterator of ``T`` uint8 ``(H, W, 3)`` frames.
        tolerance: revisit matching tolerance.
        close: releases the simulator.
    """

    scene: str
    name: str
    nouns: list[str]
    verbs: list[str]
    segments: list[EpisodeSegment]
    poses: np.ndarray
    state: np.ndarray
    frames: Iterator[np.ndarray]
    tolerance: RevisitTolerance = field(default_factory=RevisitTolerance)
    close: Callable[[], None] = lambda: None

    @property
    def num_frames(self) -> int:
        return int(self.poses.shape[0])

    def __enter__(self) -> Episode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def episode_rng(source: str, seed: int, index: int) -> np.random.Generator:
    """The random generator of episode ``index``: independent of how many episodes are generated.

    Args:
        source: source name.
        seed: dataset seed.
        index: episode number.
    """
    key = int.from_bytes(source.encode(), "little") % (2**32)
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (2**32), int(index), key]))


def frame_bounds(durations: list[float], num_frames: int) -> list[int]:
    """Boundaries ``[0, ..., num_frames]`` splitting ``num_frames`` in proportion to ``durations``.

    Every part gets at least one frame (``len(durations) <= num_frames`` is required).

    Args:
        durations: relative lengths (> 0).
        num_frames: total frames.
    """
    n = len(durations)
    if n > num_frames:
        raise ValueError(f"{n} segments do not fit in {num_frames} frames")
    total = float(sum(durations))
    cum, bounds = 0.0, [0]
    for d in durations[:-1]:
        cum += d
        bounds.append(round(cum / total * num_frames))
    bounds.append(num_frames)
    for i in range(1, n):  # at least one frame each, keeping the end fixed
        bounds[i] = max(bounds[i], bounds[i - 1] + 1)
    for i in range(n - 1, 0, -1):
        bounds[i] = min(bounds[i], bounds[i + 1] - 1)
    return bounds


# ------------------------------------------------------------------------------------------- revisits
@dataclass
class Revisit:
    """A ground-truth revisit (one ``revisits.json`` entry).

    Args:
        segment: id of the revisiting segment.
        revisits: id of the earlier segment.
        first_visit_frames: ``[a, b)`` frames of the earlier segment matched.
        revisit_frames: ``[c, d)`` frames of the revisiting segment that match.
        match_fraction: fraction of the revisiting segment's frames that match.
    """

    segment: str
    revisits: str
    first_visit_frames: tuple[int, int]
    revisit_frames: tuple[int, int]
    match_fraction: float

    def to_json(self) -> dict[str, Any]:
        return dict(
            segment=self.segment,
            revisits=self.revisits,
            first_visit_frames=list(self.first_visit_frames),
            revisit_frames=list(self.revisit_frames),
            match_fraction=round(self.match_fraction, 4),
        )


def _angle_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs((a[:, None] - b[None, :] + np.pi) % (2 * np.pi) - np.pi)


def detect_revisits(
    poses: np.ndarray,
    segments: list[EpisodeSegment],
    tolerance: RevisitTolerance,
    state: np.ndarray | None = None,
) -> list[Revisit]:
    """Find, for each segment, the earlier segment whose place it returns to, from the poses.

    Frames ``i`` and ``j`` match when their camera positions are within ``tolerance.radius``, their yaw and
    pitch within ``tolerance.yaw_deg`` / ``pitch_deg``, and their ``state`` (object arrangement) is equal.
    Segment ``j`` revisits the earlier segment ``k`` matching the largest fraction of ``j``'s frames (ties:
    the earliest) when that fraction is at least ``tolerance.min_fraction`` and ``j``'s last frame matches
    a frame of ``k`` (``j`` ends where ``k`` was). Sets ``segment.revisit``.

    Args:
        poses: ``(T, 5)`` poses (``POSE_COLUMNS``).
        segments: segments in order.
        tolerance: matching thresholds.
        state: ``(T,)`` arrangement ids (``None``: one arrangement).

    Returns:
        the revisits, in segment order.
    """
    poses = np.asarray(poses, dtype=np.float64)
    st = np.zeros(len(poses), dtype=np.int64) if state is None else np.asarray(state)
    yaw_tol, pitch_tol = math.radians(tolerance.yaw_deg), math.radians(tolerance.pitch_deg)
    out: list[Revisit] = []
    for j, seg in enumerate(segments):
        seg.revisit = None
        rj = slice(seg.start, seg.end)
        best: tuple[float, int, np.ndarray, np.ndarray] | None = None
        for k in range(j):
            rk = slice(segments[k].start, segments[k].end)
            pj, pk = poses[rj], poses[rk]
            close = np.linalg.norm(pj[:, None, :3] - pk[None, :, :3], axis=-1) <= tolerance.radius
            close &= _angle_diff(pj[:, 3], pk[:, 3]) <= yaw_tol
            close &= np.abs(pj[:, None, 4] - pk[None, :, 4]) <= pitch_tol
            close &= st[rj][:, None] == st[rk][None, :]
            hit_j = close.any(axis=1)
            fraction = float(hit_j.mean()) if len(hit_j) else 0.0
            if not hit_j[-1] or fraction < tolerance.min_fraction:
                continue  # a revisit ends at the earlier place (the narrative's "return to the view of")
            if best is None or fraction > best[0] + 1e-9:
                best = (fraction, k, hit_j, close.any(axis=0))
        if best is None:
            continue
        fraction, k, hit_j, hit_k = best
        seg.revisit = segments[k].id
        jj, kk = np.flatnonzero(hit_j), np.flatnonzero(hit_k)
        out.append(
            Revisit(
                segment=seg.id,
                revisits=segments[k].id,
                first_visit_frames=(segments[k].start + int(kk[0]), segments[k].start + int(kk[-1]) + 1),
                revisit_frames=(seg.start + int(jj[0]), seg.start + int(jj[-1]) + 1),
                match_fraction=fraction,
            )
        )
    return out


# ------------------------------------------------------------------------------------------- captions
def build_caption(scene: str, actions: list[str], max_sentences: int = 3) -> str:
    """A caption of 2-4 sentences: "The video shows <scene>." and up to ``max_sentences`` action sentences.

    Consecutive actions are grouped (``", then "``) into at most ``max_sentences`` sentences, each starting
    with the default actor, so ``egolcd.data.caption_narrative`` recovers the scene and the actions.

    Args:
        scene: the place (noun phrase).
        actions: segment actions in order.
        max_sentences: most action sentences.
    """
    n = len(actions)
    s = max(1, min(n, max_sentences))
    groups = [actions[i * n // s : (i + 1) * n // s] for i in range(s)]
    sentences = [f"The video shows {scene}."]
    sentences += [f"{DEFAULT_ACTOR} {', then '.join(g)}." for g in groups if g]
    return " ".join(sentences)
