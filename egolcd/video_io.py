"""mp4 reading and writing with PyAV.

Frame conventions:
    numpy: ``uint8 (T, H, W, 3)`` RGB (what ``read_video`` returns and ``VideoWriter.write`` takes).
    torch: float ``(3, T, H, W)`` (one video of the VAE's ``(B, 3, T, H, W)`` batch; ``(1, 3, T, H, W)`` is
    accepted too) in [-1, 1]; ``layout="TCHW"`` selects ``(T, 3, H, W)`` instead. ``to_uint8_frames``
    converts either to the numpy convention.

``VideoWriter`` streams frames to a temporary file beside the target and renames it onto the target only
when it is closed without error, so an interrupted run never leaves a truncated video or clobbers an
existing one.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "VideoInfo",
    "VideoReadError",
    "VideoWriter",
    "iter_frames",
    "probe_video",
    "read_video",
    "to_uint8_frames",
]

_CRF_CODECS = {"libx264", "libx265", "libvpx-vp9", "libaom-av1", "libsvtav1"}


class VideoReadError(ValueError):
    """A video file is missing, unreadable, corrupt or has no video stream (one-line message)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- frames
def to_uint8_frames(video: torch.Tensor | np.ndarray, layout: str = "CTHW") -> np.ndarray:
    """Convert a video to ``uint8 (T, H, W, 3)`` RGB on the host.

    Args:
        video: one of
            - ``uint8`` numpy/torch ``(T, H, W, 3)`` or ``(H, W, 3)``: returned as is (one frame gets ``T = 1``);
            - float torch/numpy ``(3, T, H, W)`` or ``(1, 3, T, H, W)`` in [-1, 1] (``layout="CTHW"``), or
              ``(T, 3, H, W)`` (``layout="TCHW"``); values are clamped, mapped to [0, 255] and rounded.
        layout: ``"CTHW"`` or ``"TCHW"``, only for float input.

    Returns:
        ``np.ndarray`` uint8, C-contiguous, ``(T, H, W, 3)``.
    """
    if (
        isinstance(video, np.ndarray)
        and video.dtype == np.uint8
        or (isinstance(video, torch.Tensor) and video.dtype == torch.uint8)
    ):
        arr = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else video
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (T, H, W, 3), got shape {arr.shape}")
        return np.ascontiguousarray(arr)
    x = torch.from_numpy(video) if isinstance(video, np.ndarray) else video
    if not x.is_floating_point():
        raise ValueError(f"frames must be uint8 (T, H, W, 3) or float in [-1, 1], got dtype {x.dtype}")
    if layout == "CTHW":
        if x.ndim == 5 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 4 or x.shape[0] != 3:
            raise ValueError(
                f"float frames with layout CTHW must be (3, T, H, W), got shape {tuple(x.shape)}"
            )
        x = x.permute(1, 2, 3, 0)
    elif layout == "TCHW":
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"float frames with layout TCHW must be (T, 3, H, W), got shape {tuple(x.shape)}"
            )
        x = x.permute(0, 2, 3, 1)
    else:
        raise ValueError(f"layout must be 'CTHW' or 'TCHW', got {layout!r}")
    x = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(x.cpu().numpy())


# ---------------------------------------------------------------------------------------------- writing
def check_writable_dir(directory: Path) -> None:
    """Raise a one-line ``OSError`` unless ``directory`` exists, is a directory and is writable."""
    if not directory.exists():
        raise FileNotFoundError(f"cannot write to {directory}: directory does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"cannot write to {directory}: not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {directory}: permission denied")
    try:  # access() trusts the mode bits (root passes them all): a read-only mount or /proc fails only here
        fd, probe = tempfile.mkstemp(prefix=".egolcd-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"cannot write to {directory}: {exc.strerror or _one_line(exc)}") from None


def _remove_stale_partials(path: Path) -> None:
    """Remove hidden partial files of ``path`` left by writers that died without cleaning up (kill -9): those
    whose process id is gone, and those of the older, pid-less naming not touched for an hour."""
    import re
    import time

    pattern = re.compile(
        rf"^\.{re.escape(path.stem)}\.(?:(\d+)-)?[0-9a-f]{{8}}\.partial{re.escape(path.suffix)}$"
    )
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return
    for p in candidates:
        m = pattern.match(p.name)
        if m is None:
            continue
        if m.group(1) is not None:
            pid = int(m.group(1))
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
                continue  # that writer still runs
            except ProcessLookupError:
                pass
            except OSError:
                continue  # exists, owned by someone else
        else:
            try:
                if time.time() - p.stat().st_mtime < 3600:
                    continue
            except OSError:
                continue
        try:
            p.unlink()
            logger.warning("removed %s, left by an interrupted run", p)
        except OSError:
            pass


class VideoWriter:
    """Stream RGB frames into a video file, atomically.

    Frames are encoded as they arrive (host memory does not grow with the video). The file is written to a
    hidden temporary file in the target directory and renamed onto ``path`` by ``close()`` (or on leaving a
    ``with`` block without an exception). On an exception, or ``abort()``, the temporary file is removed and
    whatever was at ``path`` before stays untouched.

    Args:
        path: output file; the container is chosen from its suffix (``.mp4``).
        fps: frames per second (integer).
        width, height: frame size in pixels; both even for ``yuv420p``.
        codec: encoder name (``libx264`` -> H.264).
        crf: constant rate factor for x264/x265/vp9/av1 encoders (lower is better; ``None``: encoder default).
        pix_fmt: pixel format of the stream.
        threads: encoder threads. x264's output depends on its thread count (sliced threads cut each
            frame into one slice per thread) and its automatic count follows the CPUs this process may
            use, so the default, 1, removes that dependence. (Even so, on this project's CI machine x264
            has not always reproduced its bytes from identical frames, in a pixel or two of a frame; the tests
            therefore check the frames handed to the encoder, not the file bytes.) More threads encode faster,
            reproducibly only for the same count.

    A run killed with ``kill -9`` leaves its hidden ``.NAME.PID-XXXX.partial.mp4`` behind; the next writer
    to the same output removes those of processes that no longer exist.

    Raises:
        ValueError: odd size for a 4:2:0 format, non-positive fps/size, unknown codec or container.
        OSError: ``cannot write to DIR: ...`` when the directory is missing, not a directory or not writable.

    Example:
        >>> with VideoWriter("out.mp4", fps=8, width=64, height=64) as w:  # doctest: +SKIP
        ...     for chunk in chunks:  # (3, T, H, W) float in [-1, 1]
        ...         w.write(chunk)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: int,
        width: int,
        height: int,
        codec: str = "libx264",
        crf: int | None = 18,
        pix_fmt: str = "yuv420p",
        threads: int = 1,
    ) -> None:
        self.path = Path(path).expanduser()
        self.fps, self.width, self.height = int(fps), int(width), int(height)
        if self.fps != fps or self.fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        if pix_fmt.startswith(("yuv420", "yuvj420", "nv12", "nv21")) and (self.width % 2 or self.height % 2):
            raise ValueError(f"width and height must be even for {pix_fmt}, got {self.width}x{self.height}")
        if pix_fmt.startswith(("yuv422", "yuvj422")) and self.width % 2:
            raise ValueError(f"width must be even for {pix_fmt}, got {self.width}")
        directory = self.path.parent
        check_writable_dir(directory)
        if self.path.is_dir():
            raise IsADirectoryError(f"cannot write to {self.path}: it is a directory")
        self.frames_written = 0
        self._closed = False
        _remove_stale_partials(self.path)
        self._tmp = directory / f".{self.path.stem}.{os.getpid()}-{secrets.token_hex(4)}.partial{self.path.suffix}"
        try:
            os.close(os.open(self._tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except OSError as exc:
            raise PermissionError(f"cannot write to {directory}: {exc.strerror or _one_line(exc)}") from None
        try:
            self._container = av.open(str(self._tmp), mode="w")
            options = {"crf": str(crf)} if crf is not None and codec in _CRF_CODECS else {}
            self._stream = self._container.add_stream(codec, rate=self.fps, options=options)
            self._stream.width, self._stream.height, self._stream.pix_fmt = self.width, self.height, pix_fmt
            self._stream.codec_context.thread_count = int(threads)
        except Exception as exc:
            self._discard()
            raise ValueError(
                f"cannot open {self.path.name} for writing with codec {codec!r}: {_one_line(exc)}"
            ) from None
        self._time_base = Fraction(1, self.fps)
        self._pix_fmt = pix_fmt

    def write(self, frames: torch.Tensor | np.ndarray, layout: str = "CTHW") -> None:
        """Encode more frames.

        Args:
            frames: uint8 ``(T, H, W, 3)`` / ``(H, W, 3)``, or float torch ``(3, T, H, W)`` in [-1, 1]
                (``layout="TCHW"``: ``(T, 3, H, W)``); see ``to_uint8_frames``.
            layout: layout of float input.
        """
        if self._closed:
            raise ValueError(f"VideoWriter for {self.path} is closed")
        arr = to_uint8_frames(frames, layout)
        if arr.shape[1:3] != (self.height, self.width):
            raise ValueError(
                f"frame size {arr.shape[2]}x{arr.shape[1]} differs from the writer's {self.width}x{self.height}"
            )
        for image in arr:
            # RGB -> the stream pixel format
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=self._pix_fmt)
            frame.pts = self.frames_written
            frame.time_base = self._time_base
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and move the file onto ``path``. Idempotent.

        Raises:
            ValueError: no frame was written (nothing is created, an existing file is kept).
        """
        if self._closed:
            return
        self._closed = True
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            if self.frames_written == 0:
                raise ValueError(f"no frames were written; {self.path} was not created")
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise
        logger.info("wrote %s (%d frames, %d fps)", self.path, self.frames_written, self.fps)

    def abort(self) -> None:
        """Drop everything written so far; ``path`` is left as it was."""
        if self._closed:
            return
        self._closed = True
        self._discard()

    @property
    def closed(self) -> bool:
        return self._closed

    def _discard(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            try:
                container.close()
            except Exception:  # best effort: the file is removed anyway
                pass
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError:
            logger.warning("could not remove temporary file %s", self._tmp)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # Never publish a half-written file: an unclosed writer is aborted, not finalised.
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class VideoInfo:
    """Container metadata of a video's first video stream.

    Args:
        num_frames: number of frames (from the header, or by counting packets when the header lacks it).
        fps: average frame rate.
        width, height: frame size in pixels.
        codec: decoder name, e.g. ``"h264"``.
    """

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str


def _open(path: str | os.PathLike[str]) -> av.container.InputContainer:
    p = Path(path).expanduser()
    if not p.is_file():
        raise VideoReadError(f"cannot read video {p}: file not found")
    try:
        container = av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoReadError(f"cannot read video {p}: {_one_line(exc)}") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"cannot read video {p}: no video stream")
    return container


def _rate(stream: av.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read a video's metadata without decoding pixels.

    Raises:
        VideoReadError: missing, corrupt or without a video stream.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        num_frames = int(stream.frames or 0)
        if num_frames == 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        fps = _rate(stream)
        ctx = stream.codec_context
        if fps is None or not ctx.width or not ctx.height:
            raise VideoReadError(f"cannot read video {path}: incomplete stream header")
        return VideoInfo(num_frames, fps, int(ctx.width), int(ctx.height), str(ctx.name))
    except av.FFmpegError as exc:
        raise VideoReadError(f"cannot read video {path}: {_one_line(exc)}") from None
    finally:
        container.close()


def iter_frames(
    path: str | os.PathLike[str], *, fps: float | None = None, max_frames: int | None = None
) -> Iterator[np.ndarray]:
    """Decode a video frame by frame (constant memory).

    Args:
        path: video file.
        fps: when given, resample to this rate: output frame ``k`` (time ``k / fps`` from the first frame) is
            the latest source frame shown at that time (nearest earlier timestamp).
        max_frames: stop after this many output frames.

    Yields:
        ``uint8 (H, W, 3)`` RGB frames.

    Raises:
        VideoReadError: missing or corrupt file, or a decoding error.
    """
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if max_frames is not None and max_frames <= 0:
        return
    container = _open(path)
    emitted = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_fps = _rate(stream)
        # timestamps within a tenth of a source frame count as equal (containers round them)
        eps = 0.1 / src_fps if src_fps else 1e-3
        start: float | None = None
        prev: np.ndarray | None = None
        prev_t = 0.0
        for index, frame in enumerate(container.decode(stream)):
            image = frame.to_ndarray(format="rgb24")
            if fps is None:
                yield image
                emitted += 1
                if max_frames is not None and emitted >= max_frames:
                    return
                continue
            if frame.pts is not None and stream.time_base is not None:
                t = float(frame.pts * stream.time_base)
            else:
                t = index / (src_fps or fps)
            if start is None:
                start = t
            t -= start
            if prev is not None:
                # prev is shown on [prev_t, t): it serves every target time before t
                while emitted / fps < t - eps:
                    yield prev
                    emitted += 1
                    if max_frames is not None and emitted >= max_frames:
                        return
            prev, prev_t = image, t
        if prev is not None and fps is not None:
            end = prev_t + (1.0 / src_fps if src_fps else 1.0 / fps)
            while emitted / fps < end - eps:
                yield prev
                emitted += 1
                if max_frames is not None and emitted >= max_frames:
                    return
    except av.FFmpegError as exc:
        raise VideoReadError(f"cannot read video {path}: {_one_line(exc)}") from None
    finally:
        container.close()


def read_video(
    path: str | os.PathLike[str], *, fps: float | None = None, max_frames: int | None = None
) -> tuple[np.ndarray, float]:
    """Decode a whole video into memory.

    Args:
        path: video file.
        fps: resample to this rate (see ``iter_frames``); ``None`` keeps every frame.
        max_frames: keep at most this many (output) frames.

    Returns:
        ``(frames, fps)``: ``uint8 (T, H, W, 3)`` RGB and the rate of the returned frames.

    Raises:
        VideoReadError: missing, corrupt or empty video.
    """
    if fps is None:
        container = _open(path)
        try:
            out_fps = _rate(container.streams.video[0])
        finally:
            container.close()
        if out_fps is None:
            raise VideoReadError(f"cannot read video {path}: unknown frame rate")
    else:
        out_fps = float(fps)
    frames = list(iter_frames(path, fps=fps, max_frames=max_frames))
    if not frames:
        raise VideoReadError(f"cannot read video {path}: no decodable frames")
    return np.stack(frames), out_fps
