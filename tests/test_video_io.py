"""mp4 writing/reading with PyAV: round trip, resampling, atomic writes, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from egolcd.video_io import (
    VideoInfo,
    VideoReadError,
    VideoWriter,
    iter_frames,
    probe_video,
    read_video,
    to_uint8_frames,
)


def _frames(t: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth, moving content (compresses well, so the lossy round trip is close)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i, ..., 0] = 40 + 150 * x / w
        out[i, ..., 1] = 40 + 150 * y / h
        out[i, ..., 2] = 60 + 8 * i
        out[i, 8 : 8 + 16, 4 + 2 * i : 20 + 2 * i] = 230
    return out


def _write(path: Path, frames: np.ndarray, fps: int) -> None:
    with VideoWriter(path, fps=fps, width=frames.shape[2], height=frames.shape[1]) as writer:
        writer.write(frames)
    assert writer.frames_written == len(frames)


def test_round_trip(tmp_path: Path) -> None:
    frames = _frames(17)
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, fps=8, width=64, height=48) as writer:
        writer.write(frames[:5])
        writer.write(frames[5])  # a single (H, W, 3) frame
        writer.write(frames[6:])
        assert writer.frames_written == 17
        assert not path.exists()  # published only on close
    assert path.is_file()
    assert probe_video(path) == VideoInfo(num_frames=17, fps=8.0, width=64, height=48, codec="h264")
    video, fps = read_video(path)
    assert video.shape == (17, 48, 64, 3) and video.dtype == np.uint8
    assert fps == 8.0
    assert np.abs(video.astype(np.float32) - frames).mean() < 3.0
    assert read_video(path, max_frames=4)[0].shape[0] == 4
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_torch_float_frames(tmp_path: Path) -> None:
    frames = _frames(5)
    cthw = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    np.testing.assert_array_equal(to_uint8_frames(cthw), frames)
    np.testing.assert_array_equal(to_uint8_frames(cthw[None]), frames)
    np.testing.assert_array_equal(to_uint8_frames(cthw.permute(1, 0, 2, 3), layout="TCHW"), frames)
    edge = to_uint8_frames(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(3, 1, 1, 5))
    assert edge[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="CTHW"):
        to_uint8_frames(cthw.permute(1, 0, 2, 3))
    with VideoWriter(tmp_path / "b.mp4", fps=8, width=64, height=48) as writer:
        writer.write(cthw[:, :2])
        writer.write(cthw[None, :, 2:])
    # (libx264 output bytes are not bit-reproducible across runs; compare within the lossy tolerance)
    back, _ = read_video(tmp_path / "b.mp4")
    assert back.shape == frames.shape
    assert np.abs(back.astype(np.float32) - frames).mean() < 3.0


def test_resample_halves_frame_count(tmp_path: Path) -> None:
    path = tmp_path / "fast.mp4"
    _write(path, _frames(16), fps=16)
    full, fps = read_video(path)
    assert (full.shape[0], fps) == (16, 16.0)
    half, fps = read_video(path, fps=8)
    assert (half.shape[0], fps) == (8, 8.0)
    np.testing.assert_array_equal(half, full[::2])  # nearest earlier frame by timestamp
    double, _ = read_video(path, fps=32)
    assert double.shape[0] == 32
    np.testing.assert_array_equal(double[1::2], full)
    assert len(list(iter_frames(path, fps=8, max_frames=3))) == 3


def test_exception_keeps_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(path, fps=8, width=64, height=48) as writer:
            writer.write(_frames(3))
            raise RuntimeError("boom")
    assert path.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["out.mp4"]
    # a successful write replaces it
    _write(path, _frames(3), fps=8)
    assert read_video(path)[0].shape[0] == 3
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_abort_and_empty_writer_create_nothing(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "x.mp4", fps=8, width=64, height=48)
    writer.write(_frames(2))
    writer.abort()
    assert writer.closed and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        writer.write(_frames(1))
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "y.mp4", fps=8, width=64, height=48):
            pass
    assert os.listdir(tmp_path) == []


def test_bad_sizes_and_destinations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even") as err:
        VideoWriter(tmp_path / "odd.mp4", fps=8, width=63, height=48)
    assert "\n" not in str(err.value)
    with VideoWriter(tmp_path / "ok.mp4", fps=8, width=64, height=48) as writer:
        with pytest.raises(ValueError, match="differs"):
            writer.write(_frames(1, h=32))
        writer.write(_frames(1))
    with pytest.raises(OSError, match="cannot write to"):
        VideoWriter(tmp_path / "missing" / "a.mp4", fps=8, width=64, height=48)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write to"):
        VideoWriter(tmp_path / "file" / "a.mp4", fps=8, width=64, height=48)
    assert sorted(os.listdir(tmp_path)) == ["file", "ok.mp4"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write to"):
            VideoWriter(locked / "a.mp4", fps=8, width=64, height=48)
    finally:
        locked.chmod(0o700)


def test_corrupt_or_missing_file_raises(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = tmp_path / "good.mp4"
    _write(good, _frames(9), fps=8)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for bad in (junk, truncated, tmp_path / "missing.mp4"):
        for fn in (read_video, probe_video):
            with pytest.raises(VideoReadError) as err:
                fn(bad)
            assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert issubclass(VideoReadError, ValueError)


def test_unwritable_directory_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates a read-only directory even when the tests run as root.
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(PermissionError, match=f"cannot write to {tmp_path}: permission denied"):
        VideoWriter(tmp_path / "a.mp4", fps=8, width=64, height=48)
    assert os.listdir(tmp_path) == []
