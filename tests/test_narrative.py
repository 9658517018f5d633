"""Structured Narrative Prompting: parsing, validation, compilation (CPU, no model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from egolcd.narrative import (
    DEFAULT_ACTOR,
    DEFAULT_SECONDS,
    REVISIT_CLAUSE,
    CompiledNarrative,
    Narrative,
    NarrativeError,
    Segment,
    build_prompts,
    compile_narrative,
    format_schedule,
    load_narrative,
    parse_narrative,
    validate_narrative,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

KITCHEN = """
scene: a small kitchen with a white sink and a gas stove
actor: The camera wearer
style: Realistic first-person footage
fps: 8
width: 160
height: 128
segments:
  - id: sink
    seconds: 8
    action: rinses a blue mug under the tap
  - id: stove
    seconds: 6.5
    action: turns to the gas stove and puts the kettle on
  - seconds: 3
    action: Opens a drawer next to the stove.
  - id: back
    seconds: 8
    action: walks back to the white sink
    revisit: sink
"""


def kitchen() -> Narrative:
    return parse_narrative(KITCHEN, "yaml")


# ------------------------------------------------------------------------------------------- parsing


def test_parse_yaml_fields_and_default_ids():
    n = kitchen()
    assert n.scene == "a small kitchen with a white sink and a gas stove"
    assert (n.fps, n.width, n.height) == (8, 160, 128)
    assert [s.id for s in n.segments] == ["sink", "stove", "s3", "back"]
    assert [s.seconds for s in n.segments] == [8.0, 6.5, 3.0, 8.0]
    assert n.segments[3].revisit == "sink"
    assert n.segments[0].revisit is None and n.segments[0].prompt is None
    assert n.seconds == pytest.approx(25.5)


def test_parse_json_matches_yaml():
    import yaml

    data = yaml.safe_load(KITCHEN)
    assert parse_narrative(json.dumps(data), "json") == kitchen()


def test_parse_text_lines_defaults_and_comments():
    text = "# a comment\n\n6 | opens the fridge\nputs the milk back\n  2.5 |  pours | milk  \n"
    n = parse_narrative(text, "text")
    assert [s.id for s in n.segments] == ["s1", "s2", "s3"]
    assert [s.seconds for s in n.segments] == [6.0, DEFAULT_SECONDS, 2.5]
    assert [s.action for s in n.segments] == ["opens the fridge", "puts the milk back", "pours | milk"]
    assert n.actor == DEFAULT_ACTOR and n.scene == "" and n.fps is None


def test_size_alias():
    n = parse_narrative("size: 160x128\nsegments: [{action: walks}]", "yaml")
    assert (n.width, n.height) == (160, 128)
    n = parse_narrative('{"size": [64, 48], "segments": [{"action": "walks"}]}', "json")
    assert (n.width, n.height) == (64, 48)


@pytest.mark.parametrize("name", ["kitchen_revisit.yaml", "workshop.yaml", "simple.txt"])
def test_examples_load_and_compile(name):
    n = load_narrative(EXAMPLES / name)
    c = compile_narrative(n, fps=n.fps or 8, chunk_frames=3)
    assert c.num_segments == len(n.segments) >= 3
    # Every segment of the shipped examples owns at least one chunk, in order.
    assert sorted(set(c.chunk_segments)) == list(range(c.num_segments))
    assert c.chunk_segments == sorted(c.chunk_segments)
    assert "prompts:" in format_schedule(c)


@pytest.mark.parametrize("name", ["kitchen_revisit.yaml", "maze_revisit.yaml"])
def test_examples_match_demo_preset(name):
    from egolcd.config import PRESETS

    demo = PRESETS["demo"]
    n = load_narrative(EXAMPLES / name)
    assert n.fps == demo.fps and n.width is None and n.height is None  # the model's own size
    assert 24 <= n.seconds <= 36 and 4 <= len(n.segments) <= 8  # make demo stays short
    c = compile_narrative(n, fps=n.fps, chunk_frames=demo.chunk_frames, vae_temporal=demo.vae_temporal)
    assert c.revisits and all(k < i for i, k in c.revisits.items())


# ------------------------------------------------------------------------------------------ compiling


def test_prompts_follow_template():
    n = kitchen()
    prompts = compile_narrative(n, fps=8, chunk_frames=3).prompts
    assert len(prompts) == 4
    for j, p in enumerate(prompts):
        assert p.startswith(f"Step {j + 1} of 4. The video begins with a view of {n.scene}")
        assert "The video wraps up with " in p
        assert p.endswith("Realistic first-person footage.")
        assert "\n" not in p
    assert f"with a view of {n.scene}. The camera wearer rinses a blue mug under the tap." in prompts[0]
    # A later segment begins with the previous segment's ending.
    end0 = prompts[0].split("The video wraps up with a view of ")[1].split(". Realistic")[0]
    assert end0 == f"{n.scene}, right after the camera wearer rinses a blue mug under the tap"
    assert f"The video begins with a view of {end0}." in prompts[1]
    # Capitalised action with a trailing period is normalised into the sentence.
    assert "The camera wearer opens a drawer next to the stove. The video" in prompts[2]


def test_revisit_link_recorded_and_mentioned():
    n = kitchen()
    c = compile_narrative(n, fps=8, chunk_frames=3)
    assert c.revisits == {3: 0}
    expected = f"a return to the initial view of {n.scene}, {REVISIT_CLAUSE}"
    assert f"The video wraps up with {expected}." in c.prompts[3]
    assert "return to the initial view" not in " ".join(c.prompts[:3])


def test_after_revisit_next_segment_begins_with_revisited_view():
    text = "scene: a shed\nsegments:\n- {id: a, action: opens the door}\n- {id: b, action: steps out}\n"
    text += "- {id: c, action: comes back, revisit: b}\n- {id: d, action: sits down}\n"
    prompts = build_prompts(parse_narrative(text, "yaml"))
    view_b = "a shed, right after the camera wearer opens the door"
    assert f"a return to the initial view of {view_b}, {REVISIT_CLAUSE}." in prompts[2]
    assert prompts[3].startswith(f"Step 4 of 4. The video begins with a view of {view_b}.")


def test_explicit_prompt_used_verbatim_and_scene_constant():
    text = "scene: a garage\nsegments:\n- {action: opens the hood}\n- {prompt: 'A red car, top view.'}\n"
    text += "- {action: closes the hood}\n"
    prompts = build_prompts(parse_narrative(text, "yaml"))
    assert prompts[1] == "A red car, top view."
    # A prompt-only segment leaves the view unchanged for the next one.
    assert "begins with a view of a garage, right after the camera wearer opens the hood." in prompts[2]
    assert all("a garage" in p for p in (prompts[0], prompts[2]))


def test_custom_actor_and_no_scene():
    n = Narrative(segments=[Segment("a", 2, "waters the plants")], actor="Alice")
    (p,) = build_prompts(n)
    assert p == (
        "Step 1 of 1. The video begins with a view of the surroundings. Alice waters the plants. "
        "The video wraps up with a view of the surroundings, right after Alice waters the plants."
    )


@pytest.mark.parametrize("fps", [1, 7, 8, 16, 30])
@pytest.mark.parametrize("chunk_frames", [1, 2, 3, 5])
@pytest.mark.parametrize("vae_temporal", [1, 4])
def test_frame_counts_and_chunk_schedule(fps, chunk_frames, vae_temporal):
    n = kitchen()
    c = compile_narrative(n, fps=fps, chunk_frames=chunk_frames, vae_temporal=vae_temporal)
    assert isinstance(c, CompiledNarrative)
    assert c.segment_frames == [max(1, round(s.seconds * fps)) for s in n.segments]
    assert c.num_frames == sum(c.segment_frames)
    latent = 1 + math.ceil((c.num_frames - 1) / vae_temporal)
    assert c.num_latent_frames % chunk_frames == 0
    assert latent <= c.num_latent_frames < latent + chunk_frames
    assert c.num_chunks == c.num_latent_frames // chunk_frames == len(c.chunk_segments)
    # Decoding L latent frames covers every pixel frame of the narrative.
    assert 1 + (c.num_latent_frames - 1) * vae_temporal >= c.num_frames
    # Monotone and covering: every chunk has a valid owner (segments shorter than a chunk may own none).
    assert c.chunk_segments == sorted(c.chunk_segments)
    assert all(0 <= s < c.num_segments for s in c.chunk_segments)
    assert c.fps == fps and c.segment_ids == ["sink", "stove", "s3", "back"]
    starts = c.segment_start_frames
    assert starts[0] == 0 and starts[-1] + c.segment_frames[-1] == c.num_frames


def test_chunk_owner_is_segment_at_chunk_centre():
    n = parse_narrative("1 | a\n1 | b\n1 | c", "text")
    c = compile_narrative(n, fps=8, chunk_frames=1, vae_temporal=4)
    # 24 frames -> 1 + ceil(23/4) = 7 latent frames; latent j >= 1 decodes to pixels 4j-3..4j.
    assert (c.num_frames, c.num_latent_frames, c.num_chunks) == (24, 7, 7)
    centres = [0] + [(4 * j - 3 + 4 * j) // 2 for j in range(1, 7)]  # 0, 2, 6, 10, 14, 18, 22
    assert c.chunk_segments == [min(x // 8, 2) for x in centres] == [0, 0, 0, 1, 1, 2, 2]
    assert c.chunk_range(1) == range(3, 5) and c.chunk_prompt(3) == c.prompts[1]


def test_chunk_centre_beyond_video_belongs_to_last_segment():
    n = parse_narrative("1 | a\n0.25 | b", "text")
    c = compile_narrative(n, fps=8, chunk_frames=3, vae_temporal=4)
    # 10 frames -> 4 latent frames -> 6 (2 chunks); chunk 1 decodes pixels 9..20, centre 14 >= 10.
    assert (c.num_frames, c.num_latent_frames, c.chunk_segments) == (10, 6, [0, 1])


def test_rounding_half_to_even_and_minimum_one_frame():
    n = parse_narrative("0.3125 | a\n0.4375 | b\n0.01 | c", "text")
    c = compile_narrative(n, fps=8, chunk_frames=1)
    assert c.segment_frames == [2, 4, 1]  # round(2.5) = 2, round(3.5) = 4, tiny -> 1


def test_short_segment_warns_and_schedule_marks_it(caplog):
    n = parse_narrative("4 | a\n0.25 | b\n4 | c", "text")
    with caplog.at_level("WARNING", logger="egolcd.narrative"):
        c = compile_narrative(n, fps=8, chunk_frames=3)
    assert 1 not in c.chunk_segments and not c.chunk_range(1)
    assert "owns no chunk" in caplog.text
    assert "none" in format_schedule(c)


def test_format_schedule_table():
    c = compile_narrative(kitchen(), fps=8, chunk_frames=3)
    text = format_schedule(c)
    lines = text.splitlines()
    assert lines[0].startswith("4 segments, 204 frames = 25.50 s at 8 fps")
    assert lines[1].split() == ["#", "id", "seconds", "frames", "pixel", "frames", "chunks", "revisit"]
    assert lines[2].split()[:5] == ["1", "sink", "8.00", "64", "0-63"]
    assert lines[5].split()[-1] == "sink" and lines[5].split()[1] == "back"
    assert all(p in text for p in c.prompts)


# ---------------------------------------------------------------------------------------- bad input


def _error(text: str, fmt: str = "yaml", source: str = "<string>") -> str:
    with pytest.raises(NarrativeError) as info:
        parse_narrative(text, fmt, source=source)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


SEG = "segments:\n  - {id: a, seconds: 4, action: walks}\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sceen: a kitchen\n" + SEG, "unknown field 'sceen' at top level (did you mean 'scene'?"),
        ("segments:\n  - {id: a, action: walks, secnds: 3}\n", "unknown field 'secnds' in segment 1 ('a')"),
        (
            "segments:\n  - {action: a}\n  - {id: stove, seconds: -1, action: b}\n",
            "segment 2 ('stove'): seconds must be > 0, got -1",
        ),
        ("segments:\n  - {action: a, seconds: 0}\n", "segment 1 ('s1'): seconds must be > 0, got 0"),
        ("segments:\n  - {action: a, seconds: .inf}\n", "segment 1 ('s1'): seconds must be > 0, got inf"),
        (
            "segments:\n  - {action: a, seconds: four}\n",
            "segment 1 ('s1'): seconds must be a number, got str",
        ),
        ("segments:\n  - {action: a, seconds: true}\n", "seconds must be a number, got bool"),
        (
            "segments:\n  - {id: a, action: x}\n  - {id: a, action: y}\n",
            "segment 2 ('a'): duplicate id (segment 1 has it too)",
        ),
        (
            "segments:\n  - {id: a, action: x}\n  - {id: back, action: y, revisit: nosuch}\n",
            "segment 2 ('back'): revisit 'nosuch' names no earlier segment",
        ),
        (
            "segments:\n  - {id: a, action: x, revisit: b}\n  - {id: b, action: y}\n",
            "revisit 'b' names no earlier segment (it is segment 2, which comes later)",
        ),
        ("segments:\n  - {id: a, action: x, revisit: a}\n", "cannot revisit itself"),
        (
            "segments:\n  - {id: a, seconds: 3}\n",
            "segment 1 ('a'): needs an 'action' (or an explicit 'prompt')",
        ),
        ("segments:\n  - {action: ''}\n", "segment 1 ('s1'): action must be a non-empty string"),
        ("segments:\n  - {action: [a, b]}\n", "action must be a string, got list"),
        ("segments:\n  - {action: a, prompt: 3}\n", "prompt must be a string, got int"),
        ("segments:\n  - {id: [x], action: a}\n", "segment 1: id must be a string, got list"),
        ("segments:\n  - just a string\n", "segment 1: expected a mapping"),
        ("segments: []\n", "no segments"),
        ("segments: {a: 1}\n", "segments must be a list, got dict"),
        ("scene: a kitchen\n", "missing field 'segments' at top level"),
        ("", "the narrative is empty"),
        ("- a\n- b\n", "top level must be a mapping with a 'segments' list, got list"),
        ("fps: 0\n" + SEG, "fps must be a positive integer, got int 0"),
        ("fps: 8.5\n" + SEG, "fps must be a positive integer, got float 8.5"),
        ("width: -160\n" + SEG, "width must be a positive integer"),
        ("height: '128'\n" + SEG, "height must be a positive integer, got str"),
        ("size: big\n" + SEG, "size must be 'WIDTHxHEIGHT' or [width, height]"),
        ("size: 160x128\nwidth: 64\n" + SEG, "size 160x128 contradicts width/height"),
        ("scene: [a, b]\n" + SEG, "scene must be a string, got list"),
        ("actor: ''\n" + SEG, "actor must be a non-empty string"),
        ("scene: a\nscene: b\n" + SEG, "duplicate key 'scene'"),
    ],
)
def test_bad_yaml_raises_one_line(text, expected):
    assert expected in _error(text)


def test_malformed_yaml_names_file_and_line():
    text = "scene: kitchen\nsegments:\n  - id: a\n    action: [unclosed\n"
    message = _error(text, source="kitchen.yaml")
    assert message.startswith("malformed YAML in kitchen.yaml: line ")


def test_malformed_json_names_file_and_line():
    message = _error('{"segments": [\n  {"action": "a",}\n]}', "json", source="n.json")
    assert message.startswith("malformed JSON in n.json: line 2: ")
    assert "duplicate key 'scene'" in _error('{"scene": "a", "scene": "b", "segments": []}', "json")


def test_errors_name_the_file():
    message = _error("segments: []\n", source="my.yaml")
    assert message.startswith("my.yaml: no segments")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4 | a\nfour | b\n", "line 2: seconds 'four' is not a number"),
        ("4 | a\n-1 | b\n", "line 2: seconds must be > 0, got -1"),
        ("4 |   \n", "line 1: missing action after '|'"),
        ("# only a comment\n\n", "no segments"),
    ],
)
def test_bad_text_raises_one_line(text, expected):
    assert expected in _error(text, "text")


def test_unknown_format():
    assert "unknown narrative format 'toml'" in _error("x", "toml")


def test_load_narrative_file_errors(tmp_path):
    with pytest.raises(NarrativeError, match="narrative file not found: .*nosuch.yaml"):
        load_narrative(tmp_path / "nosuch.yaml")
    with pytest.raises(NarrativeError, match="is a directory"):
        load_narrative(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"4 | \xff\xfe caf\xe9\n")
    with pytest.raises(NarrativeError, match="cannot read narrative file .*not UTF-8"):
        load_narrative(bad)
    broken = tmp_path / "broken.yml"
    broken.write_text("segments:\n  - {action: a\n")
    with pytest.raises(NarrativeError) as info:
        load_narrative(broken)
    assert str(info.value).startswith(f"malformed YAML in {broken}: line ")


def test_load_by_extension(tmp_path):
    (tmp_path / "n.json").write_text(json.dumps({"segments": [{"action": "walks", "seconds": 2}]}))
    (tmp_path / "n.narrative").write_text("2 | walks\n")
    assert load_narrative(tmp_path / "n.json").segments == load_narrative(tmp_path / "n.narrative").segments


def test_validate_narrative_built_in_code():
    n = Narrative(segments=[Segment("a", 1, "x"), Segment("b", -2, "y")])
    with pytest.raises(NarrativeError, match=r"segment 2 \('b'\): seconds must be > 0, got -2"):
        validate_narrative(n)
    with pytest.raises(NarrativeError, match="no segments"):
        compile_narrative(Narrative(segments=[]), fps=8, chunk_frames=3)
    with pytest.raises(NarrativeError, match="chunk_frames must be a positive integer"):
        compile_narrative(kitchen(), fps=8, chunk_frames=0)
