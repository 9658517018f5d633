"""Structured Narrative Prompting (SNP): narrative schema, parsing, validation and compilation.

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
import difflib
import json
import logging
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import limits

logger = logging.getLogger(__name__)

DEFAULT_SECONDS = 4.0
DEFAULT_ACTOR = "The camera wearer"
DEFAULT_VIEW = "the surroundings"
REVISIT_CLAUSE = "maintaining the same arrangement of items"
TOP_LEVEL_FIELDS = ("scene", "actor", "style", "fps", "width", "height", "size", "segments")
SEGMENT_FIELDS = ("id", "seconds", "action", "revisit", "prompt", "footage")
_FORMATS = {"yaml": "yaml", "yml": "yaml", "json": "json", "text": "text", "txt": "text"}


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


# --------------------------------------------------------------------------------------- parsing


def load_narrative(path: str | os.PathLike[str]) -> Narrative:
    """Read a narrative file; the format follows the extension (.yaml/.yml, .json, else plain text).

    Args:
        path: the narrative file.

    Raises:
        NarrativeError: the file is missing, unreadable or invalid.
    """
    p = Path(path)
    if not p.exists():
        raise NarrativeError(f"narrative file not found: {p}")
    if p.is_dir():
        raise NarrativeError(f"narrative path is a directory, not a file: {p}")
    if not p.is_file():  # a FIFO, a device: reading could block forever or never end
        raise NarrativeError(f"narrative path is not a regular file: {p}")
    max_bytes = limits.limit("narrative_bytes")
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise NarrativeError(f"{p}: " + limits.over("narrative_bytes", "the file size", f"{size:,} bytes"))
        with p.open("rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:  # it grew while we looked
            raise NarrativeError(f"{p}: " + limits.beyond("narrative_bytes", "the file is larger than"))
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise NarrativeError(
            f"cannot read narrative file {p}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except OSError as e:
        raise NarrativeError(f"cannot read narrative file {p}: {e.strerror or e}") from None
    suffix = p.suffix.lower().lstrip(".")
    fmt = suffix if suffix in ("yaml", "yml", "json") else "text"
    return parse_narrative(text, fmt, source=str(p))


def parse_narrative(text: str, fmt: str, source: str = "<string>") -> Narrative:
    """Parse narrative text.

    Args:
        text: the file contents.
        fmt: ``"yaml"``/``"yml"``, ``"json"`` or ``"text"``/``"txt"``.
        source: name used in error messages (a file path).

    Raises:
        NarrativeError: malformed input or an invalid narrative.
    """
    kind = _FORMATS.get(str(fmt).lower().lstrip("."))
    if kind is None:
        raise NarrativeError(f"unknown narrative format {fmt!r} (use yaml, json or text)")
    text = text.lstrip("\ufeff")
    data: Any = None
    if kind == "yaml":
        data = _load_yaml(text, source)
    elif kind == "json":
        data = _load_json(text, source)
    prefix = "" if source == "<string>" else f"{source}: "
    try:
        narrative = _parse_text(text) if kind == "text" else _from_mapping(data)
        validate_narrative(narrative)
    except NarrativeError as e:
        raise NarrativeError(prefix + str(e)) from None
    return narrative


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe, bounded YAML loader.

    It rejects duplicate keys (a silent last-one-wins hides typos) and keys that are not scalars (a list
    as a key), accepts merge keys (``<<: *base``), and bounds the document while it is composed: nesting
    depth (``EGOLCD_MAX_NARRATIVE_DEPTH``) and the number of nodes once aliases are expanded
    (``EGOLCD_MAX_NARRATIVE_NODES``), so neither a deep document nor an alias bomb costs more than the
    limit before its error.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._max_depth = limits.limit("narrative_depth")

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise yaml.composer.ComposerError(
                    None, None, limits.beyond("narrative_depth", "the document is nested deeper than"),
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_expanded_size(node, limits.limit("narrative_nodes"))
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {key_node.id}", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: Any, max_nodes: int) -> None:
    """Count the nodes of a composed YAML document as if every alias were copied out (memoised per node, so
    a 10-level alias bomb is counted in microseconds), and refuse more than ``max_nodes``."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > max_nodes:
                raise yaml.composer.ComposerError(
                    None, None,
                    limits.beyond("narrative_nodes", "the document, its aliases expanded, has more nodes than"),
                    node.start_mark,
                )
            sizes[id(node)] = total
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except RecursionError:  # pragma: no cover - the depth limit comes first
        raise NarrativeError(f"malformed YAML in {source}: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise NarrativeError(f"malformed YAML in {source}: {where}{problem}") from None


def _load_json(text: str, source: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise NarrativeError(f"malformed JSON in {source}: duplicate key {k!r}")
            out[k] = v
        return out

    depth = _json_depth(text)
    if depth > limits.limit("narrative_depth"):
        raise NarrativeError(
            f"malformed JSON in {source}: " + limits.beyond("narrative_depth", "the document is nested deeper than")
        )
    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise NarrativeError(f"malformed JSON in {source}: line {e.lineno}: {e.msg}") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise NarrativeError(f"malformed JSON in {source}: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise NarrativeError(f"malformed JSON in {source}: {e}") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    for ch in re.sub(_JSON_STRING, "", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _parse_text(text: str) -> Narrative:
    segments: list[Segment] = []
    max_segments = limits.limit("segments")
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(segments) >= max_segments:
            raise NarrativeError(f"line {lineno}: " + limits.beyond("segments", "the narrative has more segments than"))
        seconds, action = DEFAULT_SECONDS, line
        if "|" in line:
            left, action = (part.strip() for part in line.split("|", 1))
            try:
                seconds = float(left)
            except ValueError:
                raise NarrativeError(
                    f"line {lineno}: seconds {left!r} is not a number "
                    "(write 'seconds | action' or just 'action')"
                ) from None
            if not math.isfinite(seconds) or seconds <= 0:
                raise NarrativeError(f"line {lineno}: seconds must be > 0, got {left}")
            if seconds > limits.limit("seconds"):
                raise NarrativeError(f"line {lineno}: " + limits.over("seconds", "seconds", left))
            if not action:
                raise NarrativeError(f"line {lineno}: missing action after '|'")
        segments.append(Segment(id=f"s{len(segments) + 1}", seconds=seconds, action=_clean(action)))
    if not segments:
        raise NarrativeError("no segments: the text has no non-comment lines")
    _check_total_seconds(segments)
    return Narrative(segments=segments)


def _check_total_seconds(segments: list[Segment]) -> None:
    # each is at most the limit (no overflow); nan/inf/<= 0 are left to validate_narrative's message
    total = sum(s.seconds for s in segments if math.isfinite(s.seconds) and s.seconds > 0)
    if total > limits.limit("seconds"):
        raise NarrativeError(limits.over("seconds", "the narrative's length in seconds", f"{total:.6g}"))


def _clean(value: str) -> str:
    return " ".join(value.split())


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 40, 40, 2


def _describe(value: Any) -> str:
    text = _REPR.repr(value)  # bounded: an aliased structure may stand for billions of nodes
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check_keys(mapping: dict[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise NarrativeError(f"unknown field {key!r} {where} ({hint}allowed: {', '.join(allowed)})")


def _string(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise NarrativeError(f"{where}: {name} must be a string, got {_describe(value)}")
    cleaned = _clean(value)
    if not cleaned:
        raise NarrativeError(f"{where}: {name} must be a non-empty string")
    return cleaned


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NarrativeError(f"{where}: {name} must be a positive integer, got {_describe(value)}")
    return value


def _bounded_int(value: Any, name: str, where: str, limit_name: str) -> int:
    value = _positive_int(value, name, where)
    if value > limits.limit(limit_name):
        shown = str(value) if value < 10**12 else f"{str(value)[:6]}... ({len(str(value))} digits)"
        raise NarrativeError(f"{where}: " + limits.over(limit_name, name, shown))
    return value


def _ident(value: Any, name: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise NarrativeError(f"{where}: {name} must be a string, got {_describe(value)}")
    ident = str(value).strip()
    if not ident:
        raise NarrativeError(f"{where}: {name} must be a non-empty string")
    return ident


def _size(value: Any) -> tuple[int, int]:
    parts: Any = value.lower().split("x") if isinstance(value, str) else value
    try:
        width, height = (int(p) if isinstance(p, str) else p for p in parts)
    except (TypeError, ValueError):
        raise NarrativeError(
            f"top level: size must be 'WIDTHxHEIGHT' or [width, height], got {_describe(value)}"
        ) from None
    return _positive_int(width, "size width", "top level"), _positive_int(height, "size height", "top level")


def _from_mapping(data: Any) -> Narrative:
    if data is None:
        raise NarrativeError("the narrative is empty: expected a mapping with a 'segments' list")
    if not isinstance(data, dict):
        raise NarrativeError(f"top level must be a mapping with a 'segments' list, got {type(data).__name__}")
    _check_keys(data, TOP_LEVEL_FIELDS, "at top level")
    top = "top level"
    kw: dict[str, Any] = {}
    for name in ("scene", "style"):
        if data.get(name) is not None:
            if not isinstance(data[name], str):
                raise NarrativeError(f"{top}: {name} must be a string, got {_describe(data[name])}")
            kw[name] = _clean(data[name])
    if data.get("actor") is not None:
        kw["actor"] = _string(data["actor"], "actor", top)
    for name in ("fps", "width", "height"):
        if data.get(name) is not None:
            kw[name] = _bounded_int(data[name], name, top, "fps" if name == "fps" else "side")
    if data.get("size") is not None:
        width, height = _size(data["size"])
        _bounded_int(width, "size width", top, "side"), _bounded_int(height, "size height", top, "side")
        if kw.get("width", width) != width or kw.get("height", height) != height:
            raise NarrativeError(f"top level: size {width}x{height} contradicts width/height")
        kw["width"], kw["height"] = width, height
    if "segments" not in data:
        raise NarrativeError("missing field 'segments' at top level")
    raw = data["segments"]
    if not isinstance(raw, list):
        raise NarrativeError(f"top level: segments must be a list, got {_describe(raw)}")
    if not raw:
        raise NarrativeError("no segments: 'segments' is an empty list")
    if len(raw) > limits.limit("segments"):
        raise NarrativeError(limits.over("segments", "the number of segments", f"{len(raw):,}"))
    segments = [_segment(item, i) for i, item in enumerate(raw, 1)]
    _check_total_seconds(segments)
    return Narrative(segments=segments, **kw)


def _segment(item: Any, index: int) -> Segment:
    if not isinstance(item, dict):
        raise NarrativeError(
            f"segment {index}: expected a mapping (id, seconds, action, ...), got {_describe(item)}"
        )
    sid = f"s{index}" if item.get("id") is None else _ident(item["id"], "id", f"segment {index}")
    where = f"segment {index} ({sid!r})"
    _check_keys(item, SEGMENT_FIELDS, f"in {where}")
    footage = item.get("footage", False)
    if not isinstance(footage, bool):
        raise NarrativeError(f"{where}: footage must be true or false, got {_describe(footage)}")
    seconds = item.get("seconds", 0.0 if footage else DEFAULT_SECONDS)
    if seconds is None and footage:
        seconds = 0.0
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise NarrativeError(f"{where}: seconds must be a number, got {_describe(seconds)}")
    if isinstance(seconds, int) and seconds > limits.limit("seconds"):  # float() of a 400-digit int overflows
        raise NarrativeError(f"{where}: " + limits.over("seconds", "seconds", f"{str(seconds)[:6]}... ({len(str(seconds))} digits)" if seconds > 10**12 else seconds))
    if math.isfinite(seconds) and seconds > limits.limit("seconds"):
        raise NarrativeError(f"{where}: " + limits.over("seconds", "seconds", f"{seconds:g}"))
    action = _string(item["action"], "action", where) if item.get("action") is not None else ""
    prompt = _string(item["prompt"], "prompt", where) if item.get("prompt") is not None else None
    revisit = _ident(item["revisit"], "revisit", where) if item.get("revisit") is not None else None
    return Segment(id=sid, seconds=float(seconds), action=action, revisit=revisit, prompt=prompt, footage=footage)


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
