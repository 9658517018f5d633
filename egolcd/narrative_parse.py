"""Reading narrative files: YAML (a safe, bounded loader), JSON and plain text, into a checked :class:`Narrative`.

:func:`load_narrative` reads a file (the format follows the extension), :func:`parse_narrative` reads text.
A YAML/JSON mapping is checked by pydantic models (``_NarrativeFile``, ``_SegmentFile``) whose first error
becomes one line naming where it is (``_narrative_error``).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from . import limits
from .narrative_schema import (
    DEFAULT_SECONDS,
    SEGMENT_FIELDS,
    TOP_LEVEL_FIELDS,
    Narrative,
    NarrativeError,
    Segment,
    _describe,
    validate_narrative,
)

_FORMATS = {"yaml": "yaml", "yml": "yaml", "json": "json", "text": "text", "txt": "text"}

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


# --------------------------------------------------------------------------------------- the mapping (pydantic)
# A YAML/JSON narrative is checked by the pydantic models below; ``_narrative_error`` turns pydantic's errors
# into the one line of the first problem, in the order a reader meets them: unknown top-level keys, then the
# top-level fields in the models' order, then each segment (not a mapping, id, unknown keys, footage,
# seconds, action, prompt, revisit). YAML 1.1 reads bare ``no`` as false and ``1e-4`` as a string: strict
# types refuse both where a string or a number is wanted.
_OVER_LIMIT = "over_limit"  # a number above an ``egolcd.limits`` limit; ctx: the limit's name and the shown value
_MESSAGE = "narrative"  # a message of its own; ctx: the text after "<where>: ", or the whole line if bare


def _message(text: str, bare: bool = False) -> PydanticCustomError:
    return PydanticCustomError(_MESSAGE, "{text}", {"text": text, "bare": bare})


def _non_empty(value: str, info: ValidationInfo) -> str:
    if not value:
        raise _message(f"{info.field_name} must be a non-empty string")
    return value


def _ident(value: str | int, info: ValidationInfo) -> str:
    ident = str(value).strip()
    return _non_empty(ident, info)


def _shown(value: int | float, limit_name: str) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    short = value <= 10**12 if limit_name == "seconds" else value < 10**12  # as the messages always were
    return str(value) if short else f"{str(value)[:6]}... ({len(str(value))} digits)"


def _within(limit_name: str) -> AfterValidator:
    def check(value: int | float) -> int | float:
        # an int is compared as an int (float() of a 400-digit one overflows); the limit is read when checked
        if (isinstance(value, int) or math.isfinite(value)) and value > limits.limit(limit_name):
            raise PydanticCustomError(_OVER_LIMIT, "over limit", {"limit": limit_name, "value": _shown(value, limit_name)})
        return value

    return AfterValidator(check)


def _size_parts(value: Any) -> Any:
    """``'WIDTHxHEIGHT'`` (and digit strings in a list) as numbers; anything else is left to the tuple type."""
    parts = value.lower().split("x") if isinstance(value, str) else value
    if isinstance(parts, list):
        try:
            return [int(p) if isinstance(p, str) else p for p in parts]
        except ValueError:
            raise PydanticCustomError("tuple_type", "not a size") from None
    return parts


def _segment_count(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise _message("no segments: 'segments' is an empty list", bare=True)
    if isinstance(value, list) and len(value) > limits.limit("segments"):
        raise _message(limits.over("segments", "the number of segments", f"{len(value):,}"), bare=True)
    return value


_Strict = Field(strict=True)
_Text = Annotated[StrictStr, AfterValidator(_clean)]
_NonEmptyText = Annotated[_Text, AfterValidator(_non_empty)]
_Ident = Annotated[StrictStr | StrictInt, Field(union_mode="left_to_right"), AfterValidator(_ident)]
_PositiveInt = Annotated[int, _Strict, Field(gt=0)]
_Side = Annotated[_PositiveInt, _within("side")]
_Seconds = Annotated[StrictInt | StrictFloat, Field(union_mode="left_to_right"), _within("seconds")]


class _SegmentFile(BaseModel):
    """One item of ``segments``; ``None`` means "not given" (``seconds: null`` too, for footage)."""

    model_config = ConfigDict(extra="forbid")
    id: _Ident | None = None
    footage: StrictBool = False
    seconds: _Seconds | None = None
    action: _NonEmptyText | None = None
    prompt: _NonEmptyText | None = None
    revisit: _Ident | None = None

    @field_validator("seconds")
    @classmethod
    def _seconds_given(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None and not info.data.get("footage", False):
            raise PydanticCustomError("float_type", "seconds: null")  # worded by _narrative_error
        return value

    def segment(self, index: int) -> Segment:
        seconds = self.seconds if self.seconds is not None else (0.0 if self.footage else DEFAULT_SECONDS)
        return Segment(
            id=f"s{index}" if self.id is None else self.id, seconds=float(seconds), action=self.action or "",
            revisit=self.revisit, prompt=self.prompt, footage=self.footage,
        )


class _NarrativeFile(BaseModel):
    """The top level of a YAML/JSON narrative (``None`` = not given)."""

    model_config = ConfigDict(extra="forbid")
    scene: _Text | None = None
    style: _Text | None = None
    actor: _NonEmptyText | None = None
    fps: Annotated[_PositiveInt, _within("fps")] | None = None
    width: _Side | None = None
    height: _Side | None = None
    size: Annotated[tuple[_Side, _Side], BeforeValidator(_size_parts)] | None = None
    segments: Annotated[list[_SegmentFile], _Strict, BeforeValidator(_segment_count)]

    @field_validator("size")
    @classmethod
    def _size_agrees(cls, size: tuple[int, int] | None, info: ValidationInfo) -> tuple[int, int] | None:
        given = (info.data.get("width"), info.data.get("height"))
        if size is not None and any(g is not None and g != s for g, s in zip(given, size)):
            raise _message(f"size {size[0]}x{size[1]} contradicts width/height")
        return size

    def narrative(self) -> Narrative:
        given = {k: getattr(self, k) for k in ("scene", "style", "actor", "fps")}
        kw: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        width, height = self.size or (self.width, self.height)
        segments = [s.segment(i) for i, s in enumerate(self.segments, 1)]
        _check_total_seconds(segments)
        return Narrative(segments=segments, width=width, height=height, **kw)


_TOP = tuple(_NarrativeFile.model_fields)
_SEGMENT = ("id", "<unknown>", *(f for f in _SegmentFile.model_fields if f != "id"))
_WANT = {"fps": "a positive integer", "width": "a positive integer", "height": "a positive integer",
         "size width": "a positive integer", "size height": "a positive integer", "seconds": "a number",
         "footage": "true or false", "segments": "a list"}  # else "a string"
_UNKNOWN = ("extra_forbidden", "invalid_key")


def _from_mapping(data: Any) -> Narrative:
    if data is None:
        raise NarrativeError("the narrative is empty: expected a mapping with a 'segments' list")
    if not isinstance(data, dict):
        raise NarrativeError(f"top level must be a mapping with a 'segments' list, got {type(data).__name__}")
    try:
        return _NarrativeFile.model_validate(data).narrative()
    except ValidationError as exc:
        raise _narrative_error(exc.errors(include_url=False), data) from None


def _rank(error: dict[str, Any]) -> tuple[Any, ...]:
    loc, kind = error["loc"], error["type"]
    if kind in _UNKNOWN and len(loc) == 1:
        return (0,)
    if loc[0] == "segments" and len(loc) > 1:  # a segment: (index, field) in the order they are checked
        field = "<unknown>" if kind in _UNKNOWN else loc[2] if len(loc) > 2 else "id"
        return (1, _TOP.index("segments"), loc[1], -1 if len(loc) == 2 else _SEGMENT.index(field))
    return (1, _TOP.index(loc[0]), -1, kind == _OVER_LIMIT, *loc[1:2])  # size: both parts' types first


def _unknown_field(mapping: dict[Any, Any], allowed: tuple[str, ...], where: str) -> str:
    key = next(k for k in mapping if k not in allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field {key!r} {where} ({hint}allowed: {', '.join(allowed)})"


def _narrative_error(errors: list[dict[str, Any]], data: dict[str, Any]) -> NarrativeError:
    """The first of pydantic's ``errors`` (see ``_rank``) as one line naming where it is."""
    error = min(errors, key=_rank)
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx", {})
    if kind in _UNKNOWN and len(loc) == 1:
        return NarrativeError(_unknown_field(data, TOP_LEVEL_FIELDS, "at top level"))
    if kind == "missing" and len(loc) == 1:
        return NarrativeError(f"missing field {loc[0]!r} at top level")
    where, name, value = "top level", str(loc[0]), data[loc[0]]
    if loc[0] == "segments" and len(loc) > 1:
        index, item = loc[1] + 1, value[loc[1]]
        if len(loc) == 2:
            return NarrativeError(
                f"segment {index}: expected a mapping (id, seconds, action, ...), got {_describe(item)}"
            )
        sid = f"s{index}" if item.get("id") is None else str(item["id"]).strip()
        where = f"segment {index}" if loc[2] == "id" else f"segment {index} ({sid!r})"
        if kind in _UNKNOWN:
            return NarrativeError(_unknown_field(item, SEGMENT_FIELDS, f"in {where}"))
        name, value = str(loc[2]), item[loc[2]]
    elif loc[0] == "size" and len(loc) > 1 and kind != "missing":  # a part; a missing part: the shape
        name, value = ("size width", "size height")[loc[1]], error["input"]
    if kind == _MESSAGE:
        return NarrativeError(ctx["text"] if ctx["bare"] else f"{where}: {ctx['text']}")
    if kind == _OVER_LIMIT:
        return NarrativeError(f"{where}: " + limits.over(ctx["limit"], name, ctx["value"]))
    if name == "size":
        return NarrativeError(f"{where}: size must be 'WIDTHxHEIGHT' or [width, height], got {_describe(value)}")
    return NarrativeError(f"{where}: {name} must be {_WANT.get(name, 'a string')}, got {_describe(value)}")
