"""The studio's pure parts (no Gradio): narrative validation with the CLI's one-line messages, the
memory inspector's rows, summary and timeline plot, and preview frames. The tests call them directly."""

from __future__ import annotations

import html
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import egolcd

from ..config import PRESETS
from ..errors import error_line
from ..narrative import CompiledNarrative, Narrative, compile_narrative, format_schedule, parse_narrative

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from matplotlib.figure import Figure

    from ..pipeline import ChunkReport, EgoLCDPipeline
    from .session import StudioSession

logger = logging.getLogger(__name__)

INSTALL_HINT = 'install the studio extra: pip install "egolcd[studio]"'
EDITOR_FORMATS = ("auto", "yaml", "json", "text")
NARRATIVE_SUFFIXES = (".yaml", ".yml", ".json", ".txt")
INSPECTOR_HEADERS = ["kind", "source chunk", "segment", "score", "tokens"]
THUMBNAIL_MAX_SIDE = 160
UPDATE_INTERVAL = 0.4  # seconds between streamed UI updates while chunks arrive
WAITING = "queued: waiting for the model (one generation runs at a time)..."
_YAML_LINE = re.compile(r"^(---\s*$|[A-Za-z_][\w-]*\s*:(\s|$))")
EDITOR_SOURCE = "editor"  # how error messages name the editor's text (a file is named by its path)



def detect_format(text: str) -> str:
    """Guess the narrative format of editor text: ``json`` (starts with ``{``), ``yaml`` (a line that
    starts a top-level key, ``name:``, or a document marker ``---``) or ``text`` (one segment per line,
    ``seconds | action``)."""
    stripped = text.lstrip("\ufeff").strip()
    if stripped.startswith("{"):
        return "json"
    if any(_YAML_LINE.match(line) for line in stripped.splitlines()):
        return "yaml"
    return "text"


def format_for_path(path: str | Path) -> str:
    """The editor format of a narrative file (as ``load_narrative`` reads it)."""
    suffix = Path(path).suffix.lower()
    return {".yaml": "yaml", ".yml": "yaml", ".json": "json"}.get(suffix, "text")


def parse_editor(
    text: str, pipeline: EgoLCDPipeline | None = None, fmt: str = "auto", source: str = EDITOR_SOURCE
) -> tuple[Narrative, CompiledNarrative]:
    """Parse, validate and compile editor text.

    With a pipeline, the schedule uses its chunk geometry and default fps and the size is checked as
    ``egolcd generate`` checks it; without, the ``demo`` preset's geometry is used, as ``egolcd validate``
    does by default.

    Raises:
        NarrativeError, ValueError: the first problem, with the CLI's message.
    """
    fmt = detect_format(text) if fmt in (None, "", "auto") else fmt
    narrative = parse_narrative(text, fmt, source=source)
    if pipeline is None:
        from ..limits import count_frames

        preset = PRESETS["demo"]
        count_frames([seg.seconds for seg in narrative.segments], narrative.fps or preset.fps)
        compiled = compile_narrative(
            narrative, fps=narrative.fps or preset.fps, chunk_frames=preset.chunk_frames,
            vae_temporal=preset.vae_temporal,
        )
        return narrative, compiled
    _, compiled = pipeline.compile(narrative)
    pipeline.video_size(narrative)
    return narrative, compiled


def validate_text(
    text: str, pipeline: EgoLCDPipeline | None = None, fmt: str = "auto", source: str = EDITOR_SOURCE
) -> tuple[bool, str, str]:
    """Check editor text.

    Returns:
        ``(ok, message, schedule)``: ``message`` is a one-line summary, or exactly the line ``egolcd
        validate`` (or ``generate``, for the size) prints on stderr for the same text in a file named
        ``source``; ``schedule`` is ``format_schedule``'s table and prompts ("" when invalid).
    """
    try:
        narrative, compiled = parse_editor(text, pipeline, fmt, source)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:  # never out of the tab
        return False, error_line(exc), ""
    size = ""
    if pipeline is not None:
        height, width = pipeline.video_size(narrative)
        size = f", {width}x{height}"
    message = (
        f"OK: {compiled.num_segments} segments, {compiled.num_frames} frames "
        f"({compiled.num_frames / compiled.fps:.2f} s at {compiled.fps} fps{size}), {compiled.num_chunks} chunks"
    )
    return True, message, format_schedule(compiled)


def list_examples() -> list[Path]:
    """Narrative files shipped with egolcd: the package's ``examples/`` (when packaged) and the
    checkout's ``examples/`` folder; none when neither exists. Sorted by name, one per name."""
    package = Path(egolcd.__file__).resolve().parent
    found: dict[str, Path] = {}
    for folder in (package / "examples", package.parent / "examples"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in NARRATIVE_SUFFIXES:
                found.setdefault(path.name, path)
    return [found[name] for name in sorted(found)]


def to_preview_frames(frames: torch.Tensor | np.ndarray, max_side: int = THUMBNAIL_MAX_SIDE) -> np.ndarray:
    """Decoded frames ``(1, 3, n, H, W)`` in [-1, 1] (the pipeline callback's) to uint8 ``(n, h, w, 3)``,
    downscaled so the longer side is at most ``max_side`` (the studio keeps every frame of a run)."""
    from ..video_io import to_uint8_frames

    arr = to_uint8_frames(frames)
    height, width = arr.shape[1:3]
    scale = max_side / max(height, width)
    if scale >= 1:
        return arr
    from PIL import Image

    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in arr])


def middle_frame(frames: np.ndarray) -> np.ndarray:
    """The middle frame of a ``(n, H, W, 3)`` chunk (its most representative single image)."""
    return frames[len(frames) // 2]


def segment_label(compiled: CompiledNarrative | None, segment: int) -> str:
    """A segment's id (its index as text when the narrative is unknown or the index is out of range)."""
    if compiled is not None and 0 <= segment < len(compiled.segment_ids):
        return compiled.segment_ids[segment]
    return str(segment)


def inspector_rows(report: ChunkReport, compiled: CompiledNarrative | None = None) -> list[list[Any]]:
    """One row per memory span a chunk saw: ``[kind, source chunk, segment id, score, tokens]``.

    ``kind`` is ``retrieved`` (a long-term entry, with its prompt-similarity score), ``sink`` or
    ``window`` (short-term); ``tokens`` is the tokens per layer kept from that source chunk.
    """
    rows = []
    for span in report.context:
        score = span.get("score")
        rows.append(
            [
                span["kind"],
                int(span["chunk"]),
                segment_label(compiled, int(span["segment"])),
                "" if score is None else f"{float(score):.3f}",
                int(span["tokens"]),
            ]
        )
    return rows


def context_summary(report: ChunkReport, compiled: CompiledNarrative | None = None) -> str:
    """A short Markdown description of what a chunk saw: window, sink, retrieved entries, totals."""
    by_kind: dict[str, list[dict]] = {"window": [], "sink": [], "retrieved": []}
    for span in report.context:
        by_kind.setdefault(span["kind"], []).append(span)
    seg = segment_label(compiled, report.segment)
    revisit = ""
    if compiled is not None and report.segment in compiled.revisits:
        revisit = f" (revisits `{segment_label(compiled, compiled.revisits[report.segment])}`)"

    def chunks(kind: str) -> str:
        items = by_kind.get(kind) or []
        return ", ".join(f"{s['chunk']} (`{segment_label(compiled, s['segment'])}`)" for s in items) or "none"

    retrieved = by_kind.get("retrieved") or []
    lines = [
        f"**Chunk {report.chunk}** · segment `{seg}`{revisit} · {report.seconds:.2f} s",
        f"- context: {report.context_tokens} tokens/layer; memory held: {report.memory_tokens} tokens/layer "
        f"({report.memory_bytes / 1024:.1f} KiB)",
        f"- short-term window: chunks {chunks('window')}",
        f"- sink: {chunks('sink')}",
        f"- long-term entries retrieved: {len(retrieved)} "
        f"({sum(int(s['tokens']) for s in retrieved)} tokens/layer)",
    ]
    return "\n".join(lines)


def memory_timeline_plot(
    reports: Sequence[ChunkReport], compiled: CompiledNarrative | None = None, selected: int | None = None
) -> Figure:
    """Memory size over the chunks of a run: tokens held (window + sink + long-term) and tokens seen
    (the chunk's context) per layer, segment starts marked, the memory in KiB in the title.

    Built on ``matplotlib.figure.Figure`` (no pyplot state, safe from worker threads).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    xs = [r.chunk for r in reports]
    ax.plot(xs, [r.memory_tokens for r in reports], marker=".", label="memory held (tokens/layer)")
    ax.plot(xs, [r.context_tokens for r in reports], marker=".", label="context seen (tokens/layer)")
    ax.set_xlabel("chunk")
    ax.set_ylabel("tokens per layer")
    ax.set_ylim(bottom=0)
    if compiled is not None:
        for i, sid in enumerate(compiled.segment_ids):
            chunks = compiled.chunk_range(i)
            if chunks:
                ax.axvline(chunks.start - 0.5, color="0.85", linewidth=1)
                ax.annotate(sid, (chunks.start - 0.4, 1.0), xycoords=("data", "axes fraction"),
                            va="top", fontsize=7, color="0.4")
    if selected is not None:
        ax.axvline(selected, color="tab:red", linewidth=1.5, alpha=0.6)
    ax.legend(loc="lower right", fontsize=7)
    if reports:
        peak = max(r.memory_bytes for r in reports) / 1024
        ax.set_title(f"memory held: {reports[-1].memory_bytes / 1024:.1f} KiB after chunk {reports[-1].chunk} "
                     f"(peak {peak:.1f} KiB)", fontsize=9)
    else:
        ax.set_title("no chunks yet", fontsize=9)
    return fig


@dataclass(eq=False)
class RunRecord:
    """One generation in a session: its reports and (downscaled) frames per chunk, as they arrive.

    Args:
        policy: the memory policy.
        compiled: the compiled narrative (segment ids, revisits).
        total_chunks: chunks this run will generate.
        reports: one ``ChunkReport`` per finished chunk.
        frames: uint8 ``(n, h, w, 3)`` per finished chunk (trimmed to the video's frames).
        video: the mp4 once written.
        steps, seed: the sampling steps and noise seed.
        status: ``running``, ``done``, ``cancelled`` or ``failed``; message: its one line.
        previews: ``(GIF path, chunk)`` of every chunk with frames (the streaming preview).
        key: names the run's preview files.
        state: the memory state saved at the end ("Continue this run" resumes from it).
        footage_frames: pixel frames of the footage the run started from (0: none).
    """

    policy: str
    compiled: CompiledNarrative
    total_chunks: int
    reports: list[ChunkReport] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    steps: int = 0
    seed: int = 0
    video: Path | None = None
    status: str = "running"
    message: str = ""
    previews: list[tuple[Path, int]] = field(default_factory=list)
    key: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    state: Path | None = None
    footage_frames: int = 0

    @property
    def frames_so_far(self) -> int:
        return sum(len(f) for f in self.frames)

    def add_chunk(self, report: ChunkReport, frames: np.ndarray) -> None:
        """Record a finished chunk; frames past the narrative's length (the last chunk's padding) are cut.
        A chunk made again (a continued run regenerates from there) replaces it and the chunks after it."""
        if report.chunk < len(self.reports):
            del self.reports[report.chunk :], self.frames[report.chunk :]
        keep = max(0, self.compiled.num_frames - self.frames_so_far)
        self.reports.append(report)
        self.frames.append(frames[:keep])


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def footage_kind(path: str | Path) -> str:
    """``image`` for a photo (by its suffix: png, jpg, jpeg, webp, bmp), else ``video``: how an uploaded
    start is passed to the pipeline (``init_image=`` or ``init_video=``)."""
    return "image" if Path(path).suffix.lower() in IMAGE_SUFFIXES else "video"


def frames_for_chunk(run: RunRecord | StudioSession | None, chunk: int) -> list[np.ndarray]:
    """The frames of one generated chunk (empty when it was not generated yet)."""
    if run is not None and not isinstance(run, RunRecord):  # a session: its current run
        run = run.run
    if run is None or not 0 <= chunk < len(run.frames):
        return []
    return list(run.frames[chunk])


def revisit_frames(runs: Sequence[RunRecord]) -> list[tuple[np.ndarray, str]]:
    """Side-by-side revisit frames: for every ``revisit:`` of the narrative and every run, the middle
    frame of the first chunk of the visited segment, then of the revisiting segment, captioned.

    Chunks not generated yet (or owned by no segment) are left out.
    """
    out: list[tuple[np.ndarray, str]] = []
    if not runs:
        return out
    compiled = runs[0].compiled
    for seg, orig in sorted(compiled.revisits.items()):
        first, again = compiled.chunk_range(orig), compiled.chunk_range(seg)
        if not first or not again:
            continue
        for run in runs:
            for chunk, what, sid in ((first.start, "first visit", orig), (again.start, "revisit", seg)):
                frames = frames_for_chunk(run, chunk)
                if frames:
                    caption = f"{run.policy}: {what} '{compiled.segment_ids[sid]}' (chunk {chunk})"
                    out.append((frames[len(frames) // 2], caption))
    return out


def progress_html(done: int, total: int, text: str) -> str:
    """A progress bar with a line of text (escaped)."""
    total = max(total, 1)
    return (
        f'<div class="egolcd-progress"><progress value="{done}" max="{total}"></progress> '
        f"<span>{html.escape(text)}</span></div>"
    )


def message_html(ok: bool, message: str) -> str:
    """The validation line next to the editor (escaped; a CSS class tells ok from error)."""
    kind = "ok" if ok else "error"
    return f'<div class="egolcd-msg egolcd-{kind}">{html.escape(message)}</div>'


def save_preview_gif(frames: np.ndarray, path: Path, fps: int) -> Path:
    """One chunk's frames as a looping GIF (the streaming preview)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)), loop=0)
    return path


