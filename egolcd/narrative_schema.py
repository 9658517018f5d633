"""The narrative schema: :class:`Segment`, :class:`Narrative`, :class:`CompiledNarrative`, their error type and
:func:`validate_narrative` (the checks a narrative built in code passes too).

The file formats are read by :mod:`egolcd.narrative_parse`, the compiler is :mod:`egolcd.narrative`.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SECONDS = 4.0
DEFAULT_ACTOR = "The camera wearer"
DEFAULT_VIEW = "the surroundings"
REVISIT_CLAUSE = "maintaining the same arrangement of items"
TOP_LEVEL_FIELDS = ("scene", "actor", "style", "fps", "width", "height", "size", "segments")
SEGMENT_FIELDS = ("id", "seconds", "action", "revisit", "prompt", "footage")


class NarrativeError(ValueError):
    """A problem with a narrative; the message is always one line naming the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


@dataclass
class Segment:
    """One narrative segment.

    Args:
        id: unique name, referenced by a later segment's ``revisit``.
        seconds: duration in seconds (> 0).
        action: what the actor does, third person present ("rinses a mug under the tap").
        revisit: id of an earlier segment whose view this segment returns to.
        prompt: explicit prompt used verbatim instead of the compiled one.
        footage: this (first) segment is the user's own footage (``--from-video``/``--from-image``): its
            chunks are encoded and written into memory, not generated; ``action`` describes what it shows
            (the memory key), so a later ``revisit:`` can return to it. ``seconds`` is at most that much
            of the footage; 0 (or omitted) means all of it. The pipeline sets it to the footage's length.
    """

    id: str
    seconds: float
    action: str
    revisit: str | None = None
    prompt: str | None = None
    footage: bool = False


@dataclass
class Narrative:
    """An ordered list of segments plus global fields.

    Args:
        segments: the segments, in order.
        scene: the place, repeated verbatim in every compiled prompt.
        actor: who acts (sentence case, e.g. "The camera wearer").
        style: an optional sentence appended to every compiled prompt.
        fps, width, height: optional video geometry overriding the preset's.
    """

    segments: list[Segment]
    scene: str = ""
    actor: str = DEFAULT_ACTOR
    style: str = ""
    fps: int | None = None
    width: int | None = None
    height: int | None = None

    @property
    def seconds(self) -> float:
        return float(sum(s.seconds for s in self.segments))


@dataclass
class CompiledNarrative:
    """A narrative compiled to prompts and a frame/chunk schedule.

    Args:
        prompts: one full prompt per segment.
        segment_ids: segment ids, in order.
        segment_frames: pixel frames per segment.
        num_frames: total pixel frames (the decoded video is trimmed to exactly this).
        num_latent_frames: L, a multiple of ``chunk_frames``.
        num_chunks: L // chunk_frames.
        chunk_segments: for each latent chunk, the index of the segment owning its centre pixel frame.
        revisits: segment index -> index of the earlier segment it revisits.
        fps: frames per second the schedule was computed for.
        chunk_frames: latent frames per chunk.
        vae_temporal: pixel frames per latent frame (after the first).
        key_texts: one memory-key text per segment (:func:`build_key_texts`): what tells the segment's
            place apart, without the scene sentence every prompt repeats.
    """

    prompts: list[str]
    segment_ids: list[str]
    segment_frames: list[int]
    num_frames: int
    num_latent_frames: int
    num_chunks: int
    chunk_segments: list[int]
    revisits: dict[int, int] = field(default_factory=dict)
    fps: int = 16
    chunk_frames: int = 1
    vae_temporal: int = 4
    key_texts: list[str] = field(default_factory=list)

    @property
    def num_segments(self) -> int:
        return len(self.prompts)

    @property
    def segment_start_frames(self) -> list[int]:
        """First pixel frame of each segment."""
        starts, total = [], 0
        for n in self.segment_frames:
            starts.append(total)
            total += n
        return starts

    def chunk_range(self, segment: int) -> range:
        """The chunks owned by segment index ``segment`` (empty if it is shorter than a chunk)."""
        owned = [c for c, s in enumerate(self.chunk_segments) if s == segment]
        return range(owned[0], owned[-1] + 1) if owned else range(0)

    def chunk_prompt(self, chunk: int) -> str:
        """The prompt that conditions latent chunk ``chunk``."""
        return self.prompts[self.chunk_segments[chunk]]

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 40, 40, 2


def _describe(value: Any) -> str:
    text = _REPR.repr(value)  # bounded: an aliased structure may stand for billions of nodes
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NarrativeError(f"{where}: {name} must be a positive integer, got {_describe(value)}")
    return value


def validate_narrative(narrative: Narrative) -> None:
    """Check a narrative (also one built in code) and raise ``NarrativeError`` for the first problem.

    Args:
        narrative: the narrative to check.
    """
    if not narrative.segments:
        raise NarrativeError("no segments: a narrative needs at least one segment")
    for name in ("fps", "width", "height"):
        value = getattr(narrative, name)
        if value is not None:
            _positive_int(value, name, "top level")
    if not isinstance(narrative.actor, str) or not narrative.actor.strip():
        raise NarrativeError("top level: actor must be a non-empty string")
    index_of: dict[str, int] = {}
    for i, seg in enumerate(narrative.segments):
        where = f"segment {i + 1} ({seg.id!r})"
        if not isinstance(seg.id, str) or not seg.id.strip():
            raise NarrativeError(f"segment {i + 1}: id must be a non-empty string, got {_describe(seg.id)}")
        if seg.id in index_of:
            raise NarrativeError(f"{where}: duplicate id (segment {index_of[seg.id] + 1} has it too)")
        if seg.footage and i > 0:
            raise NarrativeError(f"{where}: only the first segment can be footage (it describes the clip the run starts from)")
        sec = seg.seconds
        if seg.footage and isinstance(sec, (int, float)) and not isinstance(sec, bool) and sec == 0:
            pass  # as long as the footage
        elif isinstance(sec, bool) or not isinstance(sec, (int, float)) or not math.isfinite(sec) or sec <= 0:
            raise NarrativeError(
                f"{where}: seconds must be > 0, got {sec:g}"
                if isinstance(sec, (int, float))
                else f"{where}: seconds must be a number, got {_describe(sec)}"
            )
        if not (seg.action or "").strip() and not (seg.prompt or "").strip():
            raise NarrativeError(f"{where}: needs an 'action' (or an explicit 'prompt')")
        if seg.revisit is not None and seg.revisit not in index_of:
            ids = [s.id for s in narrative.segments]
            if seg.revisit == seg.id:
                hint = " (a segment cannot revisit itself)"
            elif seg.revisit in ids:
                hint = f" (it is segment {ids.index(seg.revisit) + 1}, which comes later)"
            else:
                hint = f" (earlier ids: {', '.join(index_of)})" if index_of else ""
            raise NarrativeError(f"{where}: revisit {seg.revisit!r} names no earlier segment{hint}")
        index_of[seg.id] = i
