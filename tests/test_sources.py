"""Simulated sources (memory-maze, tabletop): EgoVid-format output, narratives, ground-truth revisits.

The source tests need the optional packages of ``egolcd[sim]`` (skipped without them); the helpers
(revisit detection, captions, argument checks) are tested everywhere.
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from egolcd.data import EgoVidDataset, build_from_preset, caption_narrative
from egolcd.data.sources import (
    CSV_COLUMNS,
    SOURCES,
    EpisodeSegment,
    MissingDependencyError,
    RevisitTolerance,
    build_caption,
    detect_revisits,
    episode_rng,
    frame_bounds,
    prepare_data,
)
from egolcd.narrative import compile_narrative, load_narrative
from egolcd.video_io import probe_video, read_video

EGOVID_COLUMNS = ["video_id", "frame_num", "fps", "llava_cap", "name", "noun_cls", "verb_cls"]
FPS, SECONDS, SIZE = 8, 2.0, 64
NUM_FRAMES = round(FPS * SECONDS)
NEEDS = {"memory-maze": ("memory_maze", "dm_control", "mujoco"), "tabletop": ("pybullet", "pybullet_data")}


def _require(source: str) -> None:
    for module in NEEDS[source]:
        pytest.importorskip(module, reason=f"{source} needs egolcd[sim]")


@pytest.fixture(scope="module", params=list(NEEDS))
def generated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One short episode of each source (2 s at 8 fps, 64x64)."""
    source = request.param
    _require(source)
    out = tmp_path_factory.mktemp(source.replace("-", "_"))
    prepare_data(
        source, out, episodes=1, seconds=SECONDS, seed=3, width=SIZE, height=SIZE, fps=FPS, progress=False
    )
    return source, out


def _rows(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "metadata.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ------------------------------------------------------------------------------------------ sources
def test_writes_egovid_layout(generated: tuple[str, Path]) -> None:
    source, out = generated
    columns, rows = _rows(out)
    assert columns[: len(EGOVID_COLUMNS)] == EGOVID_COLUMNS and set(CSV_COLUMNS) <= set(columns)
    assert len(rows) == 1
    row = rows[0]
    video_id = row["video_id"]
    assert video_id.endswith(f"_0_{NUM_FRAMES}") and row["source"] == source
    assert int(row["frame_num"]) == NUM_FRAMES and int(row["fps"]) == FPS
    sentences = [s for s in row["llava_cap"].split(". ") if s]
    assert 2 <= len(sentences) <= 4 and row["name"] and row["noun_cls"] and row["verb_cls"]

    info = probe_video(out / "videos" / f"{video_id}.mp4")
    assert (info.num_frames, info.width, info.height, round(info.fps)) == (NUM_FRAMES, SIZE, SIZE, FPS)
    pose = np.load(out / "poses" / f"{video_id}.npy")
    assert pose.shape == (NUM_FRAMES, 5) and pose.dtype == np.float32 and np.isfinite(pose).all()

    narrative = load_narrative(out / "narratives" / f"{video_id}.yaml")
    assert narrative.scene and narrative.fps == FPS
    compiled = compile_narrative(narrative, fps=FPS, chunk_frames=2)
    assert compiled.num_frames == NUM_FRAMES  # segments cover the video exactly
    revisits = json.loads((out / "revisits.json").read_text())
    assert list(revisits) == [video_id]
    by_id = {s.id: s for s in narrative.segments}
    for entry in revisits[video_id]:
        assert by_id[entry["segment"]].revisit == entry["revisits"]


def test_egovid_dataset_loads_it(generated: tuple[str, Path]) -> None:
    _, out = generated
    dataset = EgoVidDataset(build_from_preset("tiny", out, chunks_per_clip=2))
    assert len(dataset) == 1 and not dataset.skipped
    item = dataset[0]
    T = dataset.config.num_frames
    assert item["video"].shape == (3, T, SIZE, SIZE)
    assert item["pose"].shape == (T, 5)
    assert len(item["prompts"]) == 2 and all("The video begins with" in p for p in item["prompts"])


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_revisit_frames_look_like_first_visit(generated: tuple[str, Path]) -> None:
    _, out = generated
    ((video_id, entries),) = json.loads((out / "revisits.json").read_text()).items()
    assert entries, "a short episode must contain a revisit"
    frames, _ = read_video(out / "videos" / f"{video_id}.mp4")
    for entry in entries:
        a, b = entry["first_visit_frames"]
        c, d = entry["revisit_frames"]
        assert 0 <= a < b <= c < d <= len(frames) and entry["match_fraction"] >= 0.5
        first, again = frames[a:b], frames[c:d]
        best = np.mean([min(_mad(f, g) for g in first) for f in again])
        # the same frame against every other frame of the episode: what "unrelated" costs here
        others = np.mean([np.median([_mad(f, g) for g in frames]) for f in again])
        assert best < 0.5 * others, (best, others)


def test_episode_is_deterministic(generated: tuple[str, Path]) -> None:
    source, out = generated
    module_name, class_name = SOURCES[source]
    cls = getattr(importlib.import_module(module_name), class_name)
    gen = cls(width=SIZE, height=SIZE, fps=FPS)
    (pose_file,) = (out / "poses").glob("*.npy")
    narrative = load_narrative(out / "narratives" / pose_file.name.replace(".npy", ".yaml"))
    with gen.episode(episode_rng(source, 3, 0), NUM_FRAMES) as episode:  # the seed of the fixture
        np.testing.assert_array_equal(episode.poses, np.load(pose_file))
        assert [s.action for s in episode.segments] == [s.action for s in narrative.segments]
    if source == "tabletop":  # another seed, another episode (cheap to check here)
        with gen.episode(episode_rng(source, 4, 0), NUM_FRAMES) as other:
            assert not np.array_equal(other.poses, np.load(pose_file))


def test_rerun_merges_rows(tmp_path: Path) -> None:
    _require("tabletop")
    kw = dict(episodes=1, seconds=SECONDS, width=32, height=32, fps=FPS, progress=False)
    prepare_data("tabletop", tmp_path, seed=0, **kw)
    prepare_data("tabletop", tmp_path, seed=1, **kw)
    prepare_data("tabletop", tmp_path, seed=1, **kw)  # the same episode again replaces its row
    _, rows = _rows(tmp_path)
    assert sorted(r["video_id"] for r in rows) == [f"tabletop-s{s}-e0000_0_{NUM_FRAMES}" for s in (0, 1)]
    assert len(json.loads((tmp_path / "revisits.json").read_text())) == 2
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_workers_write_the_same_dataset(tmp_path: Path) -> None:
    """Episodes rendered in 2 processes: the same index (in episode order), poses and narratives byte for byte;
    the same videos up to renderer noise (the simulators' pixels are not bit-exact from run to run)."""
    _require("tabletop")
    kw = dict(episodes=3, seconds=SECONDS, seed=5, width=32, height=32, fps=FPS, progress=False)
    prepare_data("tabletop", tmp_path / "serial", **kw)
    prepare_data("tabletop", tmp_path / "pool", workers=2, **kw)
    files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file())
    assert len(files) == 2 + 3 * 3  # metadata.csv, revisits.json, and a video, poses and narrative each
    for rel in files:
        a, b = tmp_path / "serial" / rel, tmp_path / "pool" / rel
        if rel.suffix != ".mp4":
            assert a.read_bytes() == b.read_bytes(), rel
            continue
        va, vb = (read_video(v)[0].astype(np.float64) for v in (a, b))
        assert va.shape == vb.shape and va.shape[0] == NUM_FRAMES, rel
        mse = float(((va - vb) ** 2).mean())
        assert mse == 0.0 or 10 * np.log10(255.0**2 / mse) > 30.0, rel  # renderer noise: 39-51 dB seen; another episode: far lower
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        prepare_data("tabletop", tmp_path / "bad", workers=0, **kw)


def test_tabletop_long_episode_moves_objects() -> None:
    _require("tabletop")
    from egolcd.data.sources.tabletop import TabletopSource

    gen = TabletopSource(width=32, height=32, fps=4)
    with gen.episode(episode_rng("tabletop", 0, 0), 4 * 30) as episode:
        actions = [s.action for s in episode.segments]
        found = detect_revisits(episode.poses, episode.segments, episode.tolerance, episode.state)
    assert any("picks up" in a for a in actions) and any(a.startswith("puts the") for a in actions)
    assert len(set(episode.state.tolist())) > 2  # grasps and releases change the arrangement
    assert len(found) >= 2 and all(episode.segments[0].id != r.segment for r in found)


def test_memory_maze_tour_returns_to_a_place() -> None:
    _require("memory-maze")
    from egolcd.data.sources.memory_maze import MemoryMazeSource

    gen = MemoryMazeSource(width=672, height=16, fps=4)  # wider than MuJoCo's default framebuffer (640)
    with gen.episode(episode_rng("memory-maze", 0, 0), 4 * 40) as episode:
        found = detect_revisits(episode.poses, episode.segments, episode.tolerance, episode.state)
        first = next(episode.frames)
    assert first.shape == (16, 672, 3) and first[:, 640:].mean() > 5  # the whole frame is drawn
    actions = {s.id: s.action for s in episode.segments}
    assert any(a.startswith(("walks", "turns around")) for a in actions.values())
    assert any(actions[r.segment].startswith("looks around") and "again" in actions[r.segment] for r in found)


def test_memory_maze_revisit_look_replays_the_first_look() -> None:
    """``replay_revisit_looks``: a revisit's look around has the first look's poses, in the same order."""
    _require("memory-maze")
    import numpy as np

    from egolcd.data.sources.memory_maze import MazeMotion, MemoryMazeSource

    def looks(replay: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        gen = MemoryMazeSource(width=16, height=16, fps=8, motion=MazeMotion(replay_revisit_looks=replay))
        with gen.episode(episode_rng("memory-maze", 0, 1), 8 * 40) as episode:
            found = detect_revisits(episode.poses, episode.segments, episode.tolerance, episode.state)
            spans = {s.id: (s.start, s.end) for s in episode.segments}
            pairs = []
            for r in found:
                (a0, a1), (b0, b1) = spans[r.revisits], spans[r.segment]
                n = min(a1 - a0, b1 - b0)
                pairs.append((episode.poses[a0 : a0 + n], episode.poses[b0 : b0 + n]))
        return pairs

    replayed = looks(True)
    assert replayed
    for first, again in replayed:  # same position and heading frame by frame
        yaw = np.abs((first[:, 3] - again[:, 3] + np.pi) % (2 * np.pi) - np.pi)
        assert np.abs(first[:, :2] - again[:, :2]).max() < 0.05 and yaw.max() < np.radians(2)
    free = looks(False)
    assert any(np.abs((f[:, 3] - a[:, 3] + np.pi) % (2 * np.pi) - np.pi).max() > np.radians(20) for f, a in free)


def test_memory_maze_looks_start_on_chunk_boundaries() -> None:
    """``align_looks``: every look around starts where a demo latent chunk starts (frame 12c - 3: the VAE
    encodes frame 0 alone), so a revisit's chunks hold the first visit's poses chunk for chunk; with 0 they
    do not all."""
    _require("memory-maze")
    from egolcd.data.sources.memory_maze import MazeMotion, MemoryMazeSource

    def look_starts(align: int) -> list[int]:
        gen = MemoryMazeSource(width=16, height=16, fps=8, motion=MazeMotion(align_looks=align))
        with gen.episode(episode_rng("memory-maze", 0, 2), 8 * 40) as episode:
            found = detect_revisits(episode.poses, episode.segments, episode.tolerance, episode.state)
            assert found
            segs = {s.id: s for s in episode.segments}
            for r in found:  # the revisit look starts where its first visit started, modulo a chunk
                assert (segs[r.segment].start - segs[r.revisits].start) % 12 == 0 or align != 12
            assert episode.segments[-1].end == 8 * 40
            return [s.start for s in episode.segments if s.action.startswith("looks around") and s.id != "s1"]

    aligned = look_starts(12)
    assert aligned and all((start + 3) % 12 == 0 for start in aligned)
    assert any((start + 3) % 12 for start in look_starts(0))


# ------------------------------------------------------------------------------------------ helpers
def test_detect_revisits_needs_a_return() -> None:
    # stand still facing 0, turn to 90 degrees, walk 5 m away, come back and face 0 again
    yaw = np.concatenate([np.zeros(4), np.linspace(0, np.pi / 2, 4), np.full(5, np.pi / 2), np.zeros(4)])
    x = np.concatenate([np.zeros(8), np.linspace(0, 5, 5), np.zeros(4)])
    poses = np.stack([x, np.zeros_like(x), np.ones_like(x), yaw, np.zeros_like(x)], axis=1)
    segs = [EpisodeSegment("a", 0, 4, "stands"), EpisodeSegment("b", 4, 8, "turns")]
    segs += [EpisodeSegment("c", 8, 13, "walks"), EpisodeSegment("d", 13, 17, "comes back")]
    found = detect_revisits(poses, segs, RevisitTolerance(radius=0.5, yaw_deg=10))
    assert [(r.segment, r.revisits) for r in found] == [("d", "a")]
    assert found[0].first_visit_frames == (0, 4) and found[0].revisit_frames == (13, 17)
    assert segs[3].revisit == "a" and segs[1].revisit is None
    # a different arrangement of the objects is not the same view
    state = np.array([0] * 13 + [1] * 4)
    assert detect_revisits(poses, segs, RevisitTolerance(radius=0.5, yaw_deg=10), state) == []


def test_frame_bounds_cover_every_frame() -> None:
    assert frame_bounds([1, 1, 2], 16) == [0, 4, 8, 16]
    bounds = frame_bounds([10.0, 0.01, 0.01], 8)
    assert bounds[0] == 0 and bounds[-1] == 8 and all(b > a for a, b in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError):
        frame_bounds([1, 1, 1], 2)


def test_caption_round_trips_through_the_dataset_parser() -> None:
    actions = [
        "looks at the table",
        "turns the head to the left toward the bookshelf",
        "looks back at the table",
    ]
    caption = build_caption("a wooden table with a tray", actions)
    narrative, _ = caption_narrative(caption, num_chunks=3)
    assert narrative.scene == "a wooden table with a tray"
    assert [s.action for s in narrative.segments] == actions
    long_caption = build_caption("a maze", [f"walks {i}" for i in range(7)])
    assert long_caption.count(". ") + 1 == 4  # scene + at most three action sentences


def test_bad_arguments_end_with_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(episodes=1, seconds=2.0, seed=0, width=64, height=64, fps=8)
    with pytest.raises(ValueError, match="unknown source 'carla'; choose one of: memory-maze, tabletop"):
        prepare_data("carla", tmp_path, **kw)
    with pytest.raises(ValueError, match="even"):
        prepare_data("tabletop", tmp_path, **{**kw, "width": 63})
    with pytest.raises(ValueError, match="at least"):
        prepare_data("tabletop", tmp_path, **{**kw, "seconds": 0.5})
    monkeypatch.setitem(SOURCES, "tabletop", ("egolcd_no_such_simulator", "TabletopSource"))
    with pytest.raises(MissingDependencyError, match=r"install egolcd\[sim\]: pip install") as err:
        prepare_data("tabletop", tmp_path, **kw)
    assert "\n" not in str(err.value) and "egolcd_no_such_simulator" in str(err.value)
    assert not (tmp_path / "metadata.csv").exists()
