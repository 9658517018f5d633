"""Reading narrative files: YAML (a safe, bounded loader), JSON and plain text, into a checked :class:`Narrative`.

:func:`load_narrative` reads a file (the format follows the extension), :func:`parse_narrative` reads text.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from . import limits
from .narrative_schema import (
    DEFAULT_SECONDS,
    SEGMENT_FIELDS,
    TOP_LEVEL_FIELDS,
    Narrative,
    NarrativeError,
    Segment,
    _describe,
    _positive_int,
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
