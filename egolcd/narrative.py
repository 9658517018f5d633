"""Structured Narrative Prompting (SNP): the narrative compiler, and the face of the narrative modules.

The schema and its checks live in :mod:`egolcd.narrative_schema`, the file readers in
:mod:`egolcd.narrative_parse`; this module re-exports their names, so ``from egolcd.narrative import ...``
reaches all of them.

A *narrative* is an ordered list of segments (METHOD.md, "SNP compiler"). Each segment compiles to one
full prompt of the form::

    Step j of J. The video begins with a view of <X>. <actor> <action>. The video wraps up with <ending>.

where ``X`` is the scene for the first segment and the previous segment's ending for later ones, so
entity names stay constant across segments. A segment that names an earlier one in ``revisit:`` ends
with "a return to the initial view of <that segment's beginning>, maintaining the same arrangement of
items" and its link is recorded for the memory (retrieval of that segment's entries is forced).

Narrative files are YAML (``.yaml``/``.yml``), JSON (``.json``) or plain text (anything else: one
segment per non-empty line, ``seconds | action`` or just ``action``; ``#`` starts a comment line)::

    scene: a small kitchen with a white sink, a red kettle and a gas stove
    fps: 8
    segments:
      - {id: sink, seconds: 8, action: rinses a blue mug under the tap}
      - {id: stove, seconds: 8, action: turns to the stove and puts the red kettle on}
      - {id: back, seconds: 8, action: walks back to the sink, revisit: sink}

Actions are written in the third person present ("rinses a mug"), since they follow the actor.

A run can start from the user's own footage (``egolcd generate --from-video``/``--from-image``). The first
segment may describe it, ``footage: true``, so a later segment can ``revisit:`` it; its ``seconds`` is
optional (all the footage, trimmed to whole chunks)::

    segments:
      - {id: sink, footage: true, action: rinses a blue mug at the white sink}
      - {id: stove, seconds: 6, action: turns to the stove}
      - {id: back, seconds: 6, action: walks back to the sink, revisit: sink}

Without such a segment the footage gets an implicit leading one with the first segment's action
(:func:`with_footage`).

    >>> n = parse_narrative("4 | rinses a mug\\n2 | turns to the stove", "text")
    >>> c = compile_narrative(n, fps=8, chunk_frames=3)
    >>> c.segment_frames, c.num_frames, c.num_latent_frames, c.num_chunks
    ([32, 16], 48, 15, 5)
"""

from __future__ import annotations

import bisect
import json
import logging

from .narrative_parse import load_narrative, parse_narrative
from .narrative_schema import (
    DEFAULT_ACTOR,
    DEFAULT_SECONDS,
    DEFAULT_VIEW,
    REVISIT_CLAUSE,
    SEGMENT_FIELDS,
    TOP_LEVEL_FIELDS,
    CompiledNarrative,
    Narrative,
    NarrativeError,
    Segment,
    _positive_int,
    validate_narrative,
)

__all__ = [
    "DEFAULT_ACTOR",
    "DEFAULT_SECONDS",
    "DEFAULT_VIEW",
    "IMPLICIT_FOOTAGE_ID",
    "REVISIT_CLAUSE",
    "SEGMENT_FIELDS",
    "TOP_LEVEL_FIELDS",
    "CompiledNarrative",
    "Narrative",
    "NarrativeError",
    "Segment",
    "build_key_texts",
    "build_prompts",
    "compile_narrative",
    "footage_segment_index",
    "format_schedule",
    "load_narrative",
    "parse_narrative",
    "segment_fingerprints",
    "validate_narrative",
    "with_footage",
]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- compiling


def _actor_mid_sentence(actor: str) -> str:
    first, _, rest = actor.partition(" ")
    return f"{first.lower()} {rest}".strip() if first in ("The", "A", "An") else actor


def _action_clause(action: str, actor: str) -> str:
    clause = action.strip().rstrip(".").strip()
    if clause.lower().startswith(actor.lower() + " "):
        clause = clause[len(actor) + 1 :]
    if len(clause) > 1 and clause[0].isupper() and clause[1].islower():
        clause = clause[0].lower() + clause[1:]
    return clause


def build_prompts(narrative: Narrative) -> list[str]:
    """The full prompt of every segment (METHOD.md template; explicit ``prompt`` fields verbatim).

    The view a segment begins with is the scene for the first segment and the previous ending for later
    ones: ``"<scene>, right after <actor> <previous action>"``, or, after a revisit, the revisited
    segment's beginning verbatim (the same view again). An ending is ``"a view of <that state>"`` or,
    for a revisit, ``"a return to the initial view of <revisited beginning>, maintaining the same
    arrangement of items"``.

    Args:
        narrative: a valid narrative.
    """
    actor = narrative.actor.strip()
    actor_start, actor_mid = actor[0].upper() + actor[1:], _actor_mid_sentence(actor)
    place = narrative.scene.strip().rstrip(".").strip() or DEFAULT_VIEW
    style = narrative.style.strip()
    if style and style[-1] not in ".!?":
        style += "."
    index_of = {s.id: i for i, s in enumerate(narrative.segments)}
    total = len(narrative.segments)
    views = [place]
    prompts = []
    for j, seg in enumerate(narrative.segments):
        clause = _action_clause(seg.action, actor) if (seg.action or "").strip() else ""
        k = index_of[seg.revisit] if seg.revisit is not None else None
        if k is not None:
            ending, next_view = f"a return to the initial view of {views[k]}, {REVISIT_CLAUSE}", views[k]
        elif clause:
            next_view = f"{place}, right after {actor_mid} {clause}"
            ending = f"a view of {next_view}"
        else:
            next_view = views[j]
            ending = f"a view of {next_view}"
        if seg.prompt:
            prompts.append(seg.prompt)
        else:
            parts = [f"Step {j + 1} of {total}.", f"The video begins with a view of {views[j]}."]
            parts.append(f"{actor_start} {clause}.")
            parts.append(f"The video wraps up with {ending}.")
            if style:
                parts.append(style)
            prompts.append(" ".join(parts))
        views.append(next_view)
    return prompts


def build_key_texts(narrative: Narrative) -> list[str]:
    """The memory-key text of every segment: its action clause, plus, for a revisit, the revisited
    segment's clause ("<clause>; a return to <earlier clause>").

    The full prompt repeats the scene sentence in every segment, so pooled prompt embeddings of different
    places are nearly identical (cosine 0.93-0.98 on the demo narratives); the clause names the place
    ("looks around next to the red ball"), so keys of the same place are close and of other places far.
    Segments with an explicit ``prompt`` and no action use the prompt.

    Args:
        narrative: a valid narrative.
    """
    actor = narrative.actor.strip()
    clauses = [
        _action_clause(s.action, actor) if (s.action or "").strip() else (s.prompt or "").strip()
        for s in narrative.segments
    ]
    index_of = {s.id: i for i, s in enumerate(narrative.segments)}
    keys = []
    for j, seg in enumerate(narrative.segments):
        key = clauses[j] or narrative.scene.strip() or DEFAULT_VIEW
        if seg.revisit is not None:
            key = f"{key}; a return to {clauses[index_of[seg.revisit]] or 'the earlier view'}"
        keys.append(key)
    return keys


IMPLICIT_FOOTAGE_ID = "footage"


def footage_segment_index(narrative: Narrative) -> int | None:
    """0 when the narrative's first segment describes footage (``footage: true``), else ``None``."""
    return 0 if narrative.segments and narrative.segments[0].footage else None


def with_footage(narrative: Narrative, frames: int, fps: int) -> Narrative:
    """The narrative whose first segment is ``frames`` pixel frames of footage (a copy; the input is
    untouched): its ``footage: true`` segment with ``seconds = frames / fps``, or, without one, an implicit
    leading segment (id ``footage``, or ``_footage`` when that id is taken) with the first segment's action
    and prompt, so the footage's memory key is the first segment's."""
    from dataclasses import replace

    seconds = frames / fps
    segments = list(narrative.segments)
    if segments[0].footage:
        segments[0] = replace(segments[0], seconds=seconds)
    else:
        first = segments[0]
        sid = IMPLICIT_FOOTAGE_ID if all(s.id != IMPLICIT_FOOTAGE_ID for s in segments) else f"_{IMPLICIT_FOOTAGE_ID}"
        segments.insert(0, Segment(id=sid, seconds=seconds, action=first.action, prompt=first.prompt, footage=True))
    return replace(narrative, segments=segments)


def segment_fingerprints(narrative: Narrative, compiled: CompiledNarrative) -> list[str]:
    """One short hash per segment of what makes its chunks what they are: its fields (id, frames, action,
    revisit, prompt, footage), its position, and the narrative's global fields (scene, actor, style, fps).
    Not the number of segments: appending segments leaves the earlier fingerprints unchanged, which is how
    ``--resume`` recognises an extended narrative."""
    import hashlib

    common = [narrative.scene, narrative.actor, narrative.style, compiled.fps]
    out = []
    for j, seg in enumerate(narrative.segments):
        fields = [j, seg.id, compiled.segment_frames[j], seg.action, seg.revisit, seg.prompt, seg.footage]
        text = json.dumps([common, fields], sort_keys=True)
        out.append(hashlib.sha256(text.encode()).hexdigest()[:16])
    return out


def _pixel_span(latent: int, vae_temporal: int) -> tuple[int, int]:
    """First and last pixel frame decoded from latent frame ``latent`` (latent 0 is pixel 0 alone)."""
    if latent == 0:
        return 0, 0
    return 1 + (latent - 1) * vae_temporal, latent * vae_temporal


def compile_narrative(
    narrative: Narrative, *, fps: int, chunk_frames: int, vae_temporal: int = 4
) -> CompiledNarrative:
    """Compile a narrative into prompts and a frame/chunk schedule.

    Frame counts: segment i gets ``max(1, round(seconds_i * fps))`` pixel frames with Python's ``round``
    (ties go to the even integer: 2.5 -> 2, 3.5 -> 4). The video has ``num_frames = sum`` of them; it is
    decoded from ``L = 1 + ceil((num_frames - 1) / vae_temporal)`` latent frames rounded up to a multiple of
    ``chunk_frames`` and trimmed back to exactly ``num_frames``, so per-segment counts are exact.

    Chunk ownership: latent frame 0 decodes to pixel frame 0 and latent frame j >= 1 to pixel frames
    ``1 + (j-1)*vae_temporal .. j*vae_temporal``. Chunk c is owned by the segment holding the centre pixel
    frame ``(first + last) // 2`` of its span; a centre beyond the video belongs to the last segment. A
    segment shorter than a chunk may own no chunk (logged as a warning).

    Args:
        narrative: the narrative (validated again here).
        fps: frames per second (use ``narrative.fps or preset.fps``).
        chunk_frames: latent frames per chunk.
        vae_temporal: VAE temporal compression.
    """
    validate_narrative(narrative)
    for name, value in (("fps", fps), ("chunk_frames", chunk_frames), ("vae_temporal", vae_temporal)):
        _positive_int(value, name, "compile_narrative")
    frames = [max(1, round(seg.seconds * fps)) for seg in narrative.segments]
    num_frames = sum(frames)
    latent = 1 + -(-(num_frames - 1) // vae_temporal)
    num_latent = -(-latent // chunk_frames) * chunk_frames
    num_chunks = num_latent // chunk_frames
    ends = []
    for n in frames:
        ends.append((ends[-1] if ends else 0) + n)
    chunk_segments = []
    for c in range(num_chunks):
        first, _ = _pixel_span(c * chunk_frames, vae_temporal)
        _, last = _pixel_span((c + 1) * chunk_frames - 1, vae_temporal)
        centre = (first + last) // 2
        chunk_segments.append(min(bisect.bisect_right(ends, centre), len(frames) - 1))
    index_of = {s.id: i for i, s in enumerate(narrative.segments)}
    revisits = {i: index_of[s.revisit] for i, s in enumerate(narrative.segments) if s.revisit is not None}
    compiled = CompiledNarrative(
        prompts=build_prompts(narrative),
        segment_ids=[s.id for s in narrative.segments],
        segment_frames=frames,
        num_frames=num_frames,
        num_latent_frames=num_latent,
        num_chunks=num_chunks,
        chunk_segments=chunk_segments,
        revisits=revisits,
        fps=fps,
        chunk_frames=chunk_frames,
        vae_temporal=vae_temporal,
        key_texts=build_key_texts(narrative),
    )
    for i, sid in enumerate(compiled.segment_ids):
        if not compiled.chunk_range(i):
            logger.warning(
                "segment %r (%d frames) is shorter than a chunk (%d pixel frames) and owns no chunk; "
                "its prompt is not used",
                sid,
                frames[i],
                chunk_frames * vae_temporal,
            )
    return compiled


def format_schedule(compiled: CompiledNarrative) -> str:
    """A human-readable table of the schedule and the prompts (for ``egolcd validate``).

    Args:
        compiled: the compiled narrative.
    """
    c = compiled
    lines = [
        f"{c.num_segments} segments, {c.num_frames} frames = {c.num_frames / c.fps:.2f} s at {c.fps} fps; "
        f"{c.num_latent_frames} latent frames = {c.num_chunks} chunks of {c.chunk_frames}"
    ]
    header = ("#", "id", "seconds", "frames", "pixel frames", "chunks", "revisit")
    rows = []
    for i, (sid, start) in enumerate(zip(c.segment_ids, c.segment_start_frames, strict=True)):
        n = c.segment_frames[i]
        chunks = c.chunk_range(i)
        rows.append(
            (
                str(i + 1),
                sid,
                f"{n / c.fps:.2f}",
                str(n),
                f"{start}-{start + n - 1}",
                f"{chunks.start}-{chunks.stop - 1}" if chunks else "none",
                c.segment_ids[c.revisits[i]] if i in c.revisits else "-",
            )
        )
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    lines.append("prompts:")
    lines.extend(
        f"  {i + 1} [{sid}] {p}" for i, (sid, p) in enumerate(zip(c.segment_ids, c.prompts, strict=True))
    )
    for i, sid in enumerate(c.segment_ids):
        if not c.chunk_range(i):
            lines.append(
                f"warning: segment {sid!r} is shorter than a chunk and owns no chunk; its prompt is unused"
            )
    return "\n".join(lines)
