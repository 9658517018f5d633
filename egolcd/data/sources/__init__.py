"""Simulated egocentric sources with ground-truth revisits, written as an EgoVid-5M-format dataset.

``prepare_data("memory-maze" | "tabletop", out_dir, ...)`` renders scripted first-person episodes and
writes, per episode ``<video_id>`` (``VideoID_StartFrame_EndFrame``, e.g. ``tabletop-s0-e0003_0_96``)::

    OUT/metadata.csv                 video_id,frame_num,fps,llava_cap,name,noun_cls,verb_cls,source,narrative,pose
    OUT/videos/<video_id>.mp4        H.264, width x height, fps
    OUT/poses/<video_id>.npy         float32 (T, 5): x, y, z (metres, world frame), yaw, pitch (radians)
    OUT/narratives/<video_id>.yaml   egolcd narrative: scene, fps, segments (id, seconds, action, revisit)
    OUT/revisits.json                {video_id: [{segment, revisits, first_visit_frames, revisit_frames,
                                                   match_fraction}, ...]}

Frame ranges are 0-based video frame indices, end exclusive (``[a, b)``), like the ``video_id`` range.
Narrative segments cover the video exactly: segment ``j`` has ``round(seconds_j * fps)`` frames.

Revisits come from the ground-truth pose, not from the script (:func:`detect_revisits`): a segment
revisits the earlier segment that holds a matching pose (position within a radius, heading within a
tolerance, and the same arrangement of objects) for the largest fraction of its frames, when that
fraction is at least ``min_fraction`` and the segment ends at a matching pose (so the narrative's "returns
to the view of" holds). ``revisit_frames`` spans the matching frames of the revisiting
segment and ``first_visit_frames`` the frames of the earlier one that they match.

Rerunning into the same folder replaces the episodes it generates and keeps other rows, so two sources
can share one dataset. The optional packages (``egolcd[sim]``) are imported only by the chosen source.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from ...errors import MissingDependencyError
from ...narrative import DEFAULT_ACTOR, Narrative, Segment, validate_narrative
from ...video_io import VideoWriter

logger = logging.getLogger(__name__)

__all__ = [
    "CSV_COLUMNS",
    "Episode",
    "EpisodeSegment",
    "MissingDependencyError",
    "POSE_COLUMNS",
    "RevisitTolerance",
    "Revisit",
    "SOURCES",
    "SIM_INSTALL",
    "build_caption",
    "detect_revisits",
    "episode_rng",
    "frame_bounds",
    "prepare_data",
]

#: source name -> (module, class) of its generator.
SOURCES: dict[str, tuple[str, str]] = {
    "memory-maze": ("egolcd.data.sources.memory_maze", "MemoryMazeSource"),
    "tabletop": ("egolcd.data.sources.tabletop", "TabletopSource"),
}
#: What ``pip install egolcd[sim]`` installs (headless rendering also needs ``scripts/install_system_deps.sh``).
SIM_INSTALL = (
    'pip install "memory-maze==1.0.3" "dm-control==1.0.50" "mujoco==3.17.0" "gym==0.26.2" "pybullet==3.2.7"'
)
POSE_COLUMNS = ("x", "y", "z", "yaw", "pitch")
CSV_COLUMNS = (
    "video_id",
    "frame_num",
    "fps",
    "llava_cap",
    "name",
    "noun_cls",
    "verb_cls",
    "source",
    "narrative",
    "pose",
)
MIN_FRAMES = 8


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


# ------------------------------------------------------------------------------------------- writing
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array, allow_pickle=False)

    _atomic_write(path, write)


def _read_existing(out: Path) -> tuple[list[dict[str, str]], list[str], dict[str, Any]]:
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    csv_path = out / "metadata.csv"
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [dict(r) for r in reader]
    revisits: dict[str, Any] = {}
    json_path = out / "revisits.json"
    if json_path.is_file():
        try:
            revisits = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("ignoring unreadable %s", json_path)
    return rows, columns, revisits if isinstance(revisits, dict) else {}


def _write_index(out: Path, rows: list[dict[str, str]], columns: list[str], revisits: dict[str, Any]) -> None:
    def write_csv(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(out / "metadata.csv", write_csv)
    _write_text(out / "revisits.json", json.dumps(revisits, indent=1) + "\n")


def _narrative_yaml(episode: Episode, fps: int) -> str:
    segments = [
        Segment(id=s.id, seconds=s.num_frames / fps, action=s.action, revisit=s.revisit)
        for s in episode.segments
    ]
    validate_narrative(Narrative(segments=segments, scene=episode.scene, fps=fps))
    data: dict[str, Any] = dict(scene=episode.scene, actor=DEFAULT_ACTOR, fps=fps, segments=[])
    for s in segments:
        item: dict[str, Any] = dict(id=s.id, seconds=s.seconds, action=s.action)
        if s.revisit is not None:
            item["revisit"] = s.revisit
        data["segments"].append(item)
    return yaml.safe_dump(data, sort_keys=False, width=1000, allow_unicode=True)


def _check_args(episodes: int, seconds: float, seed: int, width: int, height: int, fps: int) -> int:
    for name, value in (("episodes", episodes), ("width", width), ("height", height), ("fps", fps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for H.264, got {width}x{height}")
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    num_frames = round(seconds * fps)
    if num_frames < MIN_FRAMES:
        raise ValueError(
            f"an episode of {seconds:g} s at {fps} fps has {num_frames} frames; at least {MIN_FRAMES} needed"
        )
    return num_frames


def _load_source(source: str) -> type:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    module_name, class_name = SOURCES[source]
    try:
        module = importlib.import_module(module_name)
    except MissingDependencyError:
        raise
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc).strip().splitlines()[0]
        raise MissingDependencyError(
            f"source {source!r} needs an optional package that is missing ({missing}); "
            f"install egolcd[sim]: {SIM_INSTALL}"
        ) from None
    return getattr(module, class_name)


def prepare_data(
    source: str,
    out_dir: str | os.PathLike[str],
    *,
    episodes: int,
    seconds: float,
    seed: int,
    width: int,
    height: int,
    fps: int,
    progress: bool = True,
) -> Path:
    """Render ``episodes`` episodes of a simulated source into an EgoVid-5M-format dataset (module doc).

    Episodes are deterministic for ``(source, seed, episode index, seconds, size, fps)``; episode ``i``
    does not depend on how many episodes are generated.

    Args:
        source: ``"memory-maze"`` or ``"tabletop"``.
        out_dir: dataset folder (created; existing rows of other episodes are kept).
        episodes: number of episodes.
        seconds: length of each episode.
        seed: dataset seed.
        width, height: frame size (even).
        fps: frames per second.
        progress: show progress bars.

    Returns:
        the dataset folder.

    Raises:
        ValueError: unknown source or bad sizes.
        MissingDependencyError: the source's optional packages are not installed.
    """
    num_frames = _check_args(episodes, seconds, seed, width, height, fps)
    cls = _load_source(source)
    out = Path(out_dir).expanduser()
    for sub in ("videos", "poses", "narratives"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows, columns, revisits_all = _read_existing(out)
    columns = list(CSV_COLUMNS) + [c for c in columns if c not in CSV_COLUMNS]
    generator = cls(width=int(width), height=int(height), fps=int(fps))
    slug = source.replace("_", "-")
    with contextlib.ExitStack() as stack:
        if hasattr(generator, "close"):
            stack.callback(generator.close)
        bar = tqdm(range(episodes), desc=f"{source} episodes", unit="episode", disable=not progress)
        for index in bar:
            video_id = f"{slug}-s{seed}-e{index:04d}_0_{num_frames}"
            rng = episode_rng(source, seed, index)
            with generator.episode(rng, num_frames) as episode:
                found = detect_revisits(episode.poses, episode.segments, episode.tolerance, episode.state)
                _write_episode(out, video_id, episode, fps, width, height, progress)
                _write_npy(out / "poses" / f"{video_id}.npy", episode.poses.astype(np.float32))
                _write_text(out / "narratives" / f"{video_id}.yaml", _narrative_yaml(episode, fps))
                row = dict(
                    video_id=video_id,
                    frame_num=str(num_frames),
                    fps=str(fps),
                    llava_cap=build_caption(episode.scene, [s.action for s in episode.segments]),
                    name=episode.name,
                    noun_cls=";".join(episode.nouns),
                    verb_cls=";".join(episode.verbs),
                    source=source,
                    narrative=f"narratives/{video_id}.yaml",
                    pose=f"poses/{video_id}.npy",
                )
            rows = [r for r in rows if r.get("video_id") != video_id] + [row]
            revisits_all[video_id] = [r.to_json() for r in found]
            _write_index(out, rows, columns, revisits_all)
            logger.info("episode %s: %d segments, %d revisits", video_id, len(episode.segments), len(found))
    return out


def _write_episode(
    out: Path, video_id: str, episode: Episode, fps: int, width: int, height: int, progress: bool
) -> None:
    if episode.segments[0].start != 0 or episode.segments[-1].end != episode.num_frames:
        raise RuntimeError(f"episode {video_id}: segments do not cover the video")
    bar = tqdm(total=episode.num_frames, desc=video_id, unit="frame", leave=False, disable=not progress)
    with bar, VideoWriter(out / "videos" / f"{video_id}.mp4", fps=fps, width=width, height=height) as writer:
        for frame in episode.frames:
            writer.write(np.ascontiguousarray(frame))
            bar.update(1)
            if writer.frames_written > episode.num_frames:
                break
        if writer.frames_written != episode.num_frames:
            writer.abort()
            raise RuntimeError(
                f"episode {video_id}: rendered {writer.frames_written} frames, expected {episode.num_frames}"
            )
