"""Documented limits on what egolcd accepts, and the checks of generation options and paths.

Everything here runs before any work (no weights loaded, nothing written), so bad input ends in one line
within a second. Each limit can be raised with an environment variable where a real user could need more:

===========================  =========  ==========================================================
limit                        default    environment variable
===========================  =========  ==========================================================
narrative file size          1 MiB      ``EGOLCD_MAX_NARRATIVE_BYTES``
nesting depth (YAML/JSON)    32         ``EGOLCD_MAX_NARRATIVE_DEPTH``
YAML nodes after aliases     100,000    ``EGOLCD_MAX_NARRATIVE_NODES``
segments                     2,000      ``EGOLCD_MAX_SEGMENTS``
seconds (whole narrative)    86,400     ``EGOLCD_MAX_SECONDS``
fps                          240        ``EGOLCD_MAX_FPS``
width, height                4,096      ``EGOLCD_MAX_SIDE``
frames (whole video)         100,000    ``EGOLCD_MAX_FRAMES``
===========================  =========  ==========================================================
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, int] = {
    "narrative_bytes": 1 << 20,
    "narrative_depth": 32,
    "narrative_nodes": 100_000,
    "segments": 2_000,
    "seconds": 86_400,
    "fps": 240,
    "side": 4_096,
    "frames": 100_000,
}
SEED_MAX = 2**32 - 1
STEPS_MAX = 1_000


def limit(name: str) -> int:
    """The limit ``name`` (a key of ``DEFAULTS``), from ``EGOLCD_MAX_<NAME>`` when that is set."""
    env = f"EGOLCD_MAX_{name.upper()}"
    raw = os.environ.get(env)
    if raw is None or not raw.strip():
        return DEFAULTS[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{env} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{env} must be a positive integer, got {raw!r}")
    return value


def over(name: str, what: str, value: Any) -> str:
    """The message for ``value`` above the limit ``name``."""
    return f"{what} {value} is above the limit of {limit(name):,} (set EGOLCD_MAX_{name.upper()} to allow more)"


def beyond(name: str, what: str) -> str:
    """``"<what> the limit of N (set EGOLCD_MAX_<NAME> to allow more)"``."""
    return f"{what} the limit of {limit(name):,} (set EGOLCD_MAX_{name.upper()} to allow more)"


def count_frames(seconds: list[float], fps: int) -> int:
    """The video's pixel frames (as ``compile_narrative`` counts them), refusing more than the frame limit
    before anything is allocated: a narrative of ``1e12`` seconds fails here, not after hours."""
    from .narrative_schema import NarrativeError

    if not isinstance(fps, int) or isinstance(fps, bool) or fps <= 0:
        raise NarrativeError(f"fps must be a positive integer, got {fps!r}")
    if fps > limit("fps"):
        raise NarrativeError(over("fps", "fps", fps))
    if len(seconds) > limit("segments"):
        raise NarrativeError(over("segments", "the number of segments", len(seconds)))
    try:
        total = math.fsum(float(s) for s in seconds)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total) or total * fps > limit("frames") + len(seconds):
        shown = f"{total:.6g}" if math.isfinite(total) else "inf"
        raise NarrativeError(
            f"{shown} s at {fps} fps is more than the limit of {limit('frames'):,} frames "
            "(set EGOLCD_MAX_FRAMES to allow more)"
        )
    frames = sum(max(1, round(float(s) * fps)) for s in seconds)
    if frames > limit("frames"):
        raise NarrativeError(over("frames", "the video's frame count", frames))
    return frames


# ------------------------------------------------------------------------------------ generation options
def check_generation_options(
    steps: Any = None, guidance: Any = None, seed: Any = 0, save_state_every: Any = 8, memory_guidance: Any = None
) -> None:
    """One check of ``generate``'s options (the CLI, the studio and ``EgoLCDPipeline.__call__``).

    Raises:
        ValueError: the first bad option, in one line.
    """
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"steps must be an integer, got {steps!r}")
        if not 1 <= steps <= STEPS_MAX:
            raise ValueError(f"steps must be between 1 and {STEPS_MAX}, got {steps}")
    for name, scale in (("guidance", guidance), ("memory guidance", memory_guidance)):
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"{name} must be a finite number, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    if isinstance(save_state_every, bool) or not isinstance(save_state_every, int) or save_state_every < 1:
        raise ValueError(f"save-state-every must be a positive integer (chunks), got {save_state_every!r}")


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else a one-line ``ValueError`` (no CUDA, a bogus name)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    elif parsed.type != "cpu":
        raise ValueError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    return device


# ------------------------------------------------------------------------------------------------- paths
def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_state_path(path: str | os.PathLike[str]) -> Path:
    """A ``--save-state`` path must be a file in an existing, writable folder (checked before any work)."""
    from .video_io import check_writable_dir

    p = Path(path).expanduser()
    if p.is_dir():
        raise IsADirectoryError(f"cannot save the state to {p}: it is a directory (give a file name)")
    if p.exists() and not p.is_file():
        raise ValueError(f"cannot save the state to {p}: not a regular file")
    try:
        check_writable_dir(p.resolve().parent)
    except OSError as exc:
        raise type(exc)(f"--save-state: {exc}") from None
    return p


def check_distinct_paths(narrative: Any, output: Any, save_state: Any = None, resume: Any = None) -> None:
    """The output video, the state file and the narrative are three different files (an ``-o`` or
    ``--save-state`` naming the narrative, or each other, would destroy it). ``resume`` may equal
    ``save_state`` (continue and keep saving) but not the output or the narrative."""
    named = {"the narrative": narrative, "the output (-o)": output, "--save-state": save_state, "--resume": resume}
    paths = {k: Path(v).expanduser() for k, v in named.items() if isinstance(v, (str, os.PathLike))}
    keys = list(paths)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if {a, b} == {"--save-state", "--resume"}:
                continue
            if _same(paths[a], paths[b]):
                raise ValueError(f"{a} and {b} are the same file ({paths[a]}): it would be overwritten")


# ------------------------------------------------------------------------------------------ weights
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def check_safetensors_folder(folder: Any) -> None:
    """Refuse, in one line, a weights folder without safetensors (pickle only), with an unreadable
    safetensors file, or with non-floating-point weights (int32 weights would load as garbage). Reads
    only the files' headers."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{folder} holds only pickle weights ({pickles[0]}): egolcd loads safetensors only "
                "(a pickle can run code when loaded); re-save the weights as safetensors"
            )
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    if dtype not in FLOAT_DTYPES:
                        raise ValueError(
                            f"{path}: weight {key!r} is {dtype}, not floating point (a corrupt or foreign file?)"
                        )
        except ValueError:
            raise
        except Exception as exc:  # SafetensorError: truncated or not safetensors at all
            raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(exc).split())})") from None
