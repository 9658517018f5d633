"""``prepare_data``: render a source's episodes and write them as an EgoVid-5M-format dataset (layout: see
:mod:`egolcd.data.sources`); reruns replace their own episodes and keep other rows."""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import logging
import math
import multiprocessing
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from ...errors import MissingDependencyError
from ...narrative import DEFAULT_ACTOR, Narrative, Segment, validate_narrative
from ...video_io import VideoWriter
from .episodes import (
    Episode,
    build_caption,
    detect_revisits,
    episode_rng,
)

logger = logging.getLogger(__name__)

#: source name -> (module, class) of its generator.
SOURCES: dict[str, tuple[str, str]] = {
    "memory-maze": ("egolcd.data.sources.memory_maze", "MemoryMazeSource"),
    "tabletop": ("egolcd.data.sources.tabletop", "TabletopSource"),
}
#: What ``pip install egolcd[sim]`` installs (headless rendering also needs ``scripts/install_system_deps.sh``).
SIM_INSTALL = (
    'pip install "memory-maze==1.0.3" "dm-control==1.0.50" "mujoco==3.17.0" "gym==0.26.2" "pybullet==3.2.7"'
)
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
    workers: int = 1,
) -> Path:
    """Render ``episodes`` episodes of a simulated source into an EgoVid-5M-format dataset (module doc).

    Episodes are deterministic for ``(source, seed, episode index, seconds, size, fps)``; episode ``i``
    does not depend on how many episodes are generated, nor on ``workers``. Poses, narratives, captions and
    revisits are identical from run to run; the rendered pixels are not bit-exact (a few frames of an episode
    differ by renderer noise, about 50 dB PSNR between two memory-maze runs, serial or not).

    Args:
        source: ``"memory-maze"`` or ``"tabletop"``.
        out_dir: dataset folder (created; existing rows of other episodes are kept).
        episodes: number of episodes.
        seconds: length of each episode.
        seed: dataset seed.
        width, height: frame size (even).
        fps: frames per second.
        progress: show progress bars.
        workers: processes rendering episodes side by side (each with its own simulator); the index
            (``metadata.csv``, ``revisits.json``) is written in episode order as they finish.

    Returns:
        the dataset folder.

    Raises:
        ValueError: unknown source or bad sizes.
        MissingDependencyError: the source's optional packages are not installed.
    """
    num_frames = _check_args(episodes, seconds, seed, width, height, fps)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    cls = _load_source(source)
    out = Path(out_dir).expanduser()
    for sub in ("videos", "poses", "narratives"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows, columns, revisits_all = _read_existing(out)
    columns = list(CSV_COLUMNS) + [c for c in columns if c not in CSV_COLUMNS]
    job = _EpisodeJob(source, seed, num_frames, str(out), int(width), int(height), int(fps))
    bar = tqdm(total=episodes, desc=f"{source} episodes", unit="episode", disable=not progress)
    with contextlib.ExitStack() as stack:
        stack.enter_context(bar)
        if workers == 1:
            generator = cls(width=job.width, height=job.height, fps=job.fps)
            if hasattr(generator, "close"):
                stack.callback(generator.close)
            results: Any = (_render_episode(generator, job, index, progress) for index in range(episodes))
        else:
            pool = ProcessPoolExecutor(
                max_workers=min(int(workers), episodes), mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(job,),
            )
            stack.callback(pool.shutdown, cancel_futures=True)  # on an error or Ctrl-C: no episodes after it
            results = pool.map(_render_in_worker, range(episodes))  # in episode order
        for video_id, row, found, n_segments in results:
            rows = [r for r in rows if r.get("video_id") != video_id] + [row]
            revisits_all[video_id] = found
            _write_index(out, rows, columns, revisits_all)
            logger.info("episode %s: %d segments, %d revisits", video_id, n_segments, len(found))
            bar.update(1)
    return out


@dataclass(frozen=True)
class _EpisodeJob:
    """What every episode of one ``prepare_data`` call shares (sent once to each worker)."""

    source: str
    seed: int
    num_frames: int
    out: str
    width: int
    height: int
    fps: int


def _render_episode(
    generator: Any, job: _EpisodeJob, index: int, progress: bool
) -> tuple[str, dict[str, str], list[Any], int]:
    """Render episode ``index`` and write its video, poses and narrative: (video_id, CSV row, revisits, segments)."""
    out = Path(job.out)
    video_id = f"{job.source.replace('_', '-')}-s{job.seed}-e{index:04d}_0_{job.num_frames}"
    rng = episode_rng(job.source, job.seed, index)
    with generator.episode(rng, job.num_frames) as episode:
        found = detect_revisits(episode.poses, episode.segments, episode.tolerance, episode.state)
        _write_episode(out, video_id, episode, job.fps, job.width, job.height, progress)
        _write_npy(out / "poses" / f"{video_id}.npy", episode.poses.astype(np.float32))
        _write_text(out / "narratives" / f"{video_id}.yaml", _narrative_yaml(episode, job.fps))
        row = dict(
            video_id=video_id,
            frame_num=str(job.num_frames),
            fps=str(job.fps),
            llava_cap=build_caption(episode.scene, [s.action for s in episode.segments]),
            name=episode.name,
            noun_cls=";".join(episode.nouns),
            verb_cls=";".join(episode.verbs),
            source=job.source,
            narrative=f"narratives/{video_id}.yaml",
            pose=f"poses/{video_id}.npy",
        )
        return video_id, row, [r.to_json() for r in found], len(episode.segments)


_WORKER: dict[str, Any] = {}  # in a worker process: its job and its own simulator


def _init_worker(job: _EpisodeJob) -> None:
    cls = _load_source(job.source)
    _WORKER.update(job=job, generator=cls(width=job.width, height=job.height, fps=job.fps))


def _render_in_worker(index: int) -> tuple[str, dict[str, str], list[Any], int]:
    return _render_episode(_WORKER["generator"], _WORKER["job"], index, progress=False)


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
