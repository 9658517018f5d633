"""Malformed and hostile narratives: each ends in one NarrativeError line, fast (issue 13, items 8, 10, 11)."""

from __future__ import annotations

import time

import pytest

from egolcd.narrative import NarrativeError, load_narrative, parse_narrative

SEG = "segments:\n  - {id: a, seconds: 2, action: walks}\n"
BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefghi", "bcdefghij"))
    + "segments: *j\n"
)

HOSTILE: list[tuple[str, str, str]] = [
    # (id, format, text)
    ("yaml-seconds-1e308", "yaml", "segments:\n  - {seconds: 1.0e+308, action: walks}\n"),
    ("text-seconds-1e308", "text", "1e308 | walks\n"),
    ("yaml-400-digit-int", "yaml", "segments:\n  - {seconds: " + "9" * 400 + ", action: walks}\n"),
    ("json-400-digit-int", "json", '{"segments": [{"seconds": ' + "9" * 400 + ', "action": "walks"}]}'),
    ("yaml-list-key", "yaml", "segments:\n  - {? [a, b] : 1, action: walks}\n"),
    ("yaml-map-key", "yaml", "segments:\n  - {? {a: 1} : 1, action: walks}\n"),
    ("yaml-top-list-key", "yaml", "? [x]\n: 1\n" + SEG),
    ("yaml-20k-deep", "yaml", "segments: " + "[" * 20000 + "]" * 20000 + "\n"),
    ("yaml-deep-maps", "yaml", "segments: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"),
    ("json-100k-deep", "json", "[" * 100000 + "]" * 100000),
    ("json-deep-objects", "json", '{"a": ' * 5000 + "1" + "}" * 5000),
    ("yaml-alias-bomb", "yaml", BOMB),
    ("yaml-seconds-1e12", "yaml", "segments:\n  - {seconds: 1000000000000, action: walks}\n"),
    ("yaml-seconds-1e6", "yaml", "segments:\n  - {seconds: 1000000, action: walks}\n"),
    ("yaml-total-seconds", "yaml", "segments:\n" + "".join(f"  - {{seconds: 80000, action: w{i}}}\n" for i in range(3))),
    ("yaml-fps-1e8", "yaml", "fps: 100000000\n" + SEG),
    ("yaml-8192", "yaml", "width: 8192\nheight: 8192\n" + SEG),
    ("yaml-size-8192", "yaml", "size: 8192x8192\n" + SEG),
    ("yaml-width-400-digits", "yaml", "width: " + "9" * 400 + "\n" + SEG),
    ("text-too-many-segments", "text", "walks\n" * 2001),
    ("yaml-too-many-segments", "yaml", "segments:\n" + "  - {action: walks}\n" * 2001),
    ("text-seconds-nan", "text", "nan | walks\n"),
    ("text-seconds-inf", "text", "inf | walks\n"),
    ("text-seconds-negative", "text", "-1 | walks\n"),
    ("text-seconds-zero", "text", "0 | walks\n"),
    ("text-seconds-word", "text", "four | walks\n"),
    ("text-missing-action", "text", "4 |\n"),
    ("text-empty", "text", "# only a comment\n"),
    ("yaml-empty", "yaml", ""),
    ("yaml-scalar", "yaml", "just a string\n"),
    ("yaml-list-top", "yaml", "- a\n- b\n"),
    ("yaml-segments-not-list", "yaml", "segments: walks\n"),
    ("yaml-segments-empty", "yaml", "segments: []\n"),
    ("yaml-segment-scalar", "yaml", "segments:\n  - walks\n"),
    ("yaml-seconds-string", "yaml", "segments:\n  - {seconds: '4', action: walks}\n"),
    ("yaml-seconds-bool", "yaml", "segments:\n  - {seconds: true, action: walks}\n"),
    ("yaml-seconds-nan", "yaml", "segments:\n  - {seconds: .nan, action: walks}\n"),
    ("yaml-seconds-inf", "yaml", "segments:\n  - {seconds: .inf, action: walks}\n"),
    ("yaml-fps-float", "yaml", "fps: 8.5\n" + SEG),
    ("yaml-fps-zero", "yaml", "fps: 0\n" + SEG),
    ("yaml-duplicate-key", "yaml", "fps: 8\nfps: 9\n" + SEG),
    ("yaml-unknown-field", "yaml", "scene: x\nsecnds: 3\n" + SEG),
    ("yaml-revisit-unknown", "yaml", "segments:\n  - {id: a, action: walks}\n  - {id: b, action: turns, revisit: zz}\n"),
    ("yaml-revisit-self", "yaml", "segments:\n  - {id: a, action: walks, revisit: a}\n"),
    ("yaml-duplicate-id", "yaml", "segments:\n  - {id: a, action: walks}\n  - {id: a, action: turns}\n"),
    ("yaml-action-list", "yaml", "segments:\n  - {action: [walks]}\n"),
    ("yaml-bad-syntax", "yaml", "segments: [\n"),
    ("yaml-python-tag", "yaml", "segments: !!python/object/apply:os.system ['true']\n"),
    ("yaml-bad-size", "yaml", "size: big\n" + SEG),
    ("json-trailing-comma", "json", '{"segments": [{"action": "walks"},]}'),
    ("json-duplicate-key", "json", '{"fps": 8, "fps": 9, "segments": [{"action": "walks"}]}'),
    ("json-list-top", "json", "[1, 2]"),
    ("json-huge-seconds", "json", '{"segments": [{"seconds": 1e308, "action": "walks"}]}'),
    ("json-aliased-depth-strings", "json", '{"scene": "' + "[" * 100 + '", "segments": ' + "[" * 50 + "]" * 50 + "}"),
]


@pytest.mark.parametrize("name,fmt,text", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_narrative_is_one_line_error_fast(name, fmt, text):
    start = time.perf_counter()
    with pytest.raises(NarrativeError) as info:
        parse_narrative(text, fmt)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert elapsed < 30, f"{name} took {elapsed:.1f} s"  # a hang guard (a loaded CI machine is slow), not a timing claim


def test_at_least_40_hostile_cases():
    assert len(HOSTILE) >= 40


def test_yaml_merge_key_is_accepted():
    text = "segments:\n  - &s {id: a, seconds: 2, action: walks}\n  - {<<: *s, id: b}\n"
    narrative = parse_narrative(text, "yaml")
    assert [s.id for s in narrative.segments] == ["a", "b"]
    assert narrative.segments[1].action == "walks"


def test_small_aliases_still_work():
    text = "segments:\n  - &s {id: a, seconds: 2, action: walks}\n  - {id: b, seconds: 2, action: turns}\n"
    assert len(parse_narrative(text, "yaml").segments) == 2


def test_limits_can_be_raised(monkeypatch):
    text = "fps: 480\n" + SEG
    with pytest.raises(NarrativeError, match="EGOLCD_MAX_FPS"):
        parse_narrative(text, "yaml")
    monkeypatch.setenv("EGOLCD_MAX_FPS", "1000")
    assert parse_narrative(text, "yaml").fps == 480


def test_fifo_and_huge_file_are_refused(tmp_path):
    import os

    fifo = tmp_path / "n.yaml"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(NarrativeError, match="not a regular file"):
        load_narrative(fifo)
    assert time.perf_counter() - start < 2
    big = tmp_path / "big.txt"
    big.write_text("2 | walks on\n" * 1_000_000)  # 12 MB, ~1M segments
    start = time.perf_counter()
    with pytest.raises(NarrativeError, match="EGOLCD_MAX_NARRATIVE_BYTES"):
        load_narrative(big)
    assert time.perf_counter() - start < 2


def test_frame_limit_checked_before_compiling():
    from egolcd.limits import count_frames

    with pytest.raises(NarrativeError, match="EGOLCD_MAX_FRAMES"):
        count_frames([80_000.0], 240)
    with pytest.raises(NarrativeError, match="EGOLCD_MAX_FRAMES"):
        count_frames([1e308, 1e308], 8)
    assert count_frames([2.0, 1.5], 8) == 28
