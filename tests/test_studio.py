"""The local web studio's functions, called directly (no server, no browser): validation identical to the
CLI, examples, the memory inspector, streaming generation, cancel, side by side, separate sessions."""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import egolcd
from egolcd.cli import main
from egolcd.narrative import compile_narrative, parse_narrative
from egolcd.pipeline import ChunkReport, EgoLCDPipeline
from egolcd.studio import (
    INSPECTOR_HEADERS,
    INSTALL_HINT,
    RunRecord,
    Studio,
    StudioConfig,
    StudioSession,
    context_summary,
    detect_format,
    error_line,
    frames_for_chunk,
    import_gradio,
    inspector_rows,
    list_examples,
    memory_timeline_plot,
    revisit_frames,
    to_preview_frames,
    validate_text,
)
from egolcd.video_io import probe_video

pytestmark = pytest.mark.usefixtures("one_thread_module")

# 16 + 12 + 18 pixel frames at 8 fps: 7 chunks of the tiny preset (2 latent frames: 5 pixel frames in the first
# chunk, 8 after; the last chunk keeps 1 frame); the revisit segment 'back' owns chunks 4-6
SHORT = (Path(__file__).parent / "narratives" / "short_kitchen.yaml").read_text(encoding="utf-8")

BAD = {
    "revisit.yaml": "segments:\n  - {id: a, action: walks}\n  - {id: b, action: turns, revisit: zzz}\n",
    "malformed.yaml": "segments:\n  - {id: a, action: walks\n  - {id: b}\n",
    "typo.yaml": "scene: a room\nsegmnts:\n  - {id: a, action: walks}\n",
    "seconds.yaml": "segments:\n  - {id: a, seconds: -2, action: walks}\n",
    "empty.json": '{"segments": []}',
    "line.txt": "abc | walks to the door\n",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("studio-model") / "tiny"
    EgoLCDPipeline.from_preset("tiny").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def studio(model_dir, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("studio-outputs")
    return Studio(StudioConfig(model=model_dir, outputs=outputs))


def run_to_end(generator):
    """Iterate a handler generator; return all its updates."""
    return list(generator)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", sorted(BAD))
def test_invalid_narrative_message_equals_cli_line(name, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(BAD[name])
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    ok, message, schedule = validate_text(BAD[name], fmt="auto" if name.endswith(".txt") else Path(name).suffix[1:],
                                          source=str(path))
    assert not ok and schedule == ""
    assert message == err.strip()
    # in the browser the text is named "editor" instead of a file path; otherwise the same line
    _, in_editor, _ = validate_text(BAD[name])
    assert in_editor.startswith("egolcd: error: ") and "\n" not in in_editor


def test_valid_narrative_schedule_equals_cli_output(tmp_path, capsys):
    path = tmp_path / "story.yaml"
    path.write_text(SHORT)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    ok, message, schedule = validate_text(SHORT)
    assert ok and message.startswith("OK: 3 segments, 46 frames")
    assert schedule == out.rstrip("\n")


def test_impossible_size_is_the_generate_line(studio, model_dir, tmp_path, capsys):
    text = SHORT.replace("fps: 8", "fps: 8\nwidth: 60\nheight: 64")
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    assert main(["generate", str(path), "-o", str(tmp_path / "x.mp4"), "--model", str(model_dir), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    ok, message, _ = validate_text(text, studio.pipeline)
    assert not ok and message == err and "impossible size 60x64" in message
    assert not (tmp_path / "x.mp4").exists()


def test_detect_format_and_studio_validate(studio):
    assert detect_format(SHORT) == "yaml"
    assert detect_format('{"segments": [{"action": "walks"}]}') == "json"
    assert detect_format("# comment\n4 | walks\nlooks around: left, then right\n") == "text"
    assert detect_format("scene: a room\nsegmnts: []\n") == "yaml"  # a typo stays YAML: the error names it
    html, schedule = studio.validate(SHORT, "auto")
    assert "egolcd-ok" in html and "OK: 3 segments" in html and "Step 3 of 3" in schedule
    html, schedule = studio.validate(BAD["revisit.yaml"], "yaml")
    assert "egolcd-error" in html and "revisit &#x27;zzz&#x27;" in html and schedule == ""
    assert "write a narrative" in studio.validate("  \n", "auto")[0]
    assert error_line(ValueError("two\n  lines")) == "egolcd: error: two lines"


def test_examples_are_listed_and_valid(studio, monkeypatch, tmp_path):
    examples = list_examples()
    names = [p.name for p in examples]
    assert "maze_revisit.yaml" in names and "simple.txt" in names
    for path in examples:
        text, fmt = studio.load_example(path.name)
        ok, message, _ = validate_text(text, studio.pipeline, fmt)
        assert ok, (path.name, message)
    assert studio.load_example(None) is None and studio.load_example("nope.yaml") is None
    # an installed package without a checkout's examples/ folder: no examples, no error
    monkeypatch.setattr(egolcd, "__file__", str(tmp_path / "site-packages" / "egolcd" / "__init__.py"))
    assert list_examples() == []


# ------------------------------------------------------------------------------------ pure inspector parts
def make_report(chunk: int, segment: int, context: list[dict]) -> ChunkReport:
    return ChunkReport(chunk=chunk, segment=segment, seconds=0.1, context_tokens=sum(c["tokens"] for c in context),
                       memory_tokens=100 + chunk, memory_bytes=1024 * (10 + chunk), context=context)


def test_inspector_rows_summary_and_timeline():
    compiled = compile_narrative(parse_narrative(SHORT, "yaml"), fps=8, chunk_frames=2, vae_temporal=4)
    context = [
        {"kind": "retrieved", "chunk": 1, "segment": 0, "tokens": 8, "score": 0.87654},
        {"kind": "sink", "chunk": 0, "segment": 0, "tokens": 32, "score": None},
        {"kind": "window", "chunk": 4, "segment": 1, "tokens": 32, "score": None},
        {"kind": "window", "chunk": 5, "segment": 2, "tokens": 32, "score": None},
    ]
    report = make_report(6, 2, context)
    rows = inspector_rows(report, compiled)
    assert len(INSPECTOR_HEADERS) == 5
    assert rows == [
        ["retrieved", 1, "sink", "0.877", 8],
        ["sink", 0, "sink", "", 32],
        ["window", 4, "stove", "", 32],
        ["window", 5, "back", "", 32],
    ]
    assert inspector_rows(report)[2][2] == "1"  # no narrative: segment index
    summary = context_summary(report, compiled)
    assert "segment `back` (revisits `sink`)" in summary
    assert "window: chunks 4 (`stove`), 5 (`back`)" in summary and "retrieved: 1 (8 tokens/layer)" in summary
    fig = memory_timeline_plot([make_report(c, 0, context) for c in range(7)], compiled, selected=3)
    ax = fig.axes[0]
    assert [len(line.get_xdata()) for line in ax.get_lines()[:2]] == [7, 7]
    assert list(ax.get_lines()[0].get_ydata()) == [100 + c for c in range(7)]
    assert "16.0 KiB after chunk 6" in ax.get_title()
    assert memory_timeline_plot([]).axes[0].get_title() == "no chunks yet"


def test_run_record_trims_frames_and_revisit_frames():
    compiled = compile_narrative(parse_narrative(SHORT, "yaml"), fps=8, chunk_frames=2, vae_temporal=4)
    assert compiled.num_frames == 46 and compiled.revisits == {2: 0} and compiled.num_chunks == 7
    runs = []
    for policy in ("egolcd", "window"):
        run = RunRecord(policy=policy, compiled=compiled, total_chunks=compiled.num_chunks)
        for c in range(compiled.num_chunks):
            n = 5 if c == 0 else 8
            run.add_chunk(make_report(c, compiled.chunk_segments[c], []), np.full((n, 4, 4, 3), c, np.uint8))
        runs.append(run)
    # 5 + 8 * 6 = 53 decoded, trimmed to the narrative's 46 frames
    assert runs[0].frames_so_far == 46
    assert [len(f) for f in runs[0].frames] == [5, 8, 8, 8, 8, 8, 1]
    frames = frames_for_chunk(runs[0], 1)
    assert len(frames) == 8 and frames[0].shape == (4, 4, 3) and int(frames[0][0, 0, 0]) == 1
    assert frames_for_chunk(runs[0], 99) == [] and frames_for_chunk(None, 0) == []
    pairs = revisit_frames(runs)
    revisit_chunk = compiled.chunk_range(2).start
    assert revisit_chunk == 4
    assert [caption for _, caption in pairs] == [
        "egolcd: first visit 'sink' (chunk 0)", f"egolcd: revisit 'back' (chunk {revisit_chunk})",
        "window: first visit 'sink' (chunk 0)", f"window: revisit 'back' (chunk {revisit_chunk})",
    ]
    assert int(pairs[1][0][0, 0, 0]) == revisit_chunk
    assert revisit_frames([]) == []


def test_preview_frames_are_uint8_and_small():
    import torch

    frames = torch.linspace(-1, 1, 3 * 5 * 16 * 16).reshape(1, 3, 5, 16, 16)
    small = to_preview_frames(frames)
    assert small.dtype == np.uint8 and small.shape == (5, 16, 16, 3)
    assert small[0, 0, 0, 0] == 0 and small[-1, -1, -1, -1] == 255  # [-1, 1] -> [0, 255]
    assert to_preview_frames(torch.zeros(1, 3, 2, 320, 480), max_side=160).shape == (2, 107, 160, 3)


def test_session_copy_is_itself_and_sessions_are_separate(tmp_path):
    a, b = StudioSession(root=tmp_path), StudioSession(root=tmp_path)
    assert copy.deepcopy(a) is a  # gr.State deep-copies: the worker's cancel flag must stay the tab's
    assert a.id != b.id and a.folder != b.folder and a.cancel is not b.cancel
    out = a.next_output("my story!", "egolcd", 3)
    assert out.parent == a.folder and out.name == "001-my_story_-egolcd-seed3.mp4"
    a.close()
    assert a.cancel.is_set() and not b.cancel.is_set()


# ------------------------------------------------------------------------------------------ generation
def test_generate_streams_chunks_then_the_video(studio):
    session = studio.new_session()
    updates = []
    for update in studio.generate(session, SHORT, "auto", "egolcd", 1, 0, 0, "kitchen.yaml"):
        updates.append(update)
        if len(updates) == 1:  # one generation per tab at a time
            (busy,) = run_to_end(studio.generate(session, SHORT, "auto", "egolcd", 1, 0))
            assert "already running in this tab" in busy[1]
    assert not session.busy  # released before the last update: the tab can start its next run at once
    assert len(updates) >= 2
    message, progress, previews, video, _slider, rows, summary, _plot, entry = updates[-1]
    assert "egolcd-ok" in message and "egolcd (1 step, seed 0): 7 chunks, 46 frames" in progress
    info = probe_video(video)
    assert info.num_frames == 46 and (info.width, info.height) == (64, 64)
    assert Path(video).parent == session.folder and "kitchen" in Path(video).name
    assert [c for _, c in previews] == [f"chunk {c}" for c in range(7)] and all(Path(p).is_file() for p, _ in previews)
    run = session.run
    assert run.status == "done" and len(run.reports) == 7 and run.frames_so_far == 46
    assert rows == inspector_rows(run.reports[-1], run.compiled) and rows and "Chunk 6" in summary
    assert entry == []
    # streamed: the previews only grow, and updates came before the end
    counts = [len(u[2]) for u in updates if isinstance(u[2], list)]
    assert counts == sorted(counts) and counts[0] < 7 and counts[-1] == 7
    # the inspector on an earlier chunk and a click on one of its rows
    rows1, summary1, fig, _ = studio.inspect(session, 1)
    assert "Chunk 1" in summary1 and rows1 == inspector_rows(run.reports[1], run.compiled)
    frames = studio.entry_frames(session, 3, 0)
    source = inspector_rows(run.reports[3], run.compiled)[0][1]
    assert len(frames) == len(run.frames[source]) and f"chunk {source}" in frames[0][1]
    assert studio.entry_frames(session, 3, 99) == []


def test_generate_invalid_narrative_shows_the_line_and_starts_nothing(studio):
    session = studio.new_session()
    (update,) = run_to_end(studio.generate(session, BAD["revisit.yaml"], "yaml", "egolcd", 1, 0))
    expected = validate_text(BAD["revisit.yaml"], studio.pipeline, "yaml")[1]
    assert expected.startswith("egolcd: error: ") and expected.replace("'", "&#x27;") in update[0]
    assert "not started" in update[1] and session.run is None and not session.busy
    assert not session.folder.exists()


def test_cancel_stops_after_the_current_chunk_and_writes_no_video(studio):
    session = studio.new_session()
    long = SHORT.replace("seconds: 2,", "seconds: 12,")  # 17 chunks
    updates = []
    for update in studio.generate(session, long, "yaml", "egolcd", 1, 0):
        updates.append(update)
        if "chunk " in update[1] and not session.cancel.is_set():  # the first update once running
            assert "cancelling" in studio.cancel(session)
    final = updates[-1][1]
    assert "cancelled after" in final and "no video written" in final
    assert session.run.status == "cancelled" and session.run.total_chunks == 17
    assert 1 <= len(session.run.reports) < 17 and f"after {len(session.run.reports)} chunk" in final
    assert updates[-1][3] is None
    assert not list(session.folder.glob("*.mp4")) and not list(session.folder.glob(".*partial*"))
    assert not session.busy and "nothing is running" in studio.cancel(session)
    # the tab went away mid-run (gradio closes the handler): the worker is stopped too
    gen = studio.generate(session, long, "yaml", "egolcd", 1, 0)
    while not (session.run is not None and session.run.reports and session.run.total_chunks == 17):
        next(gen)
    flag = session.cancel
    gen.close()
    assert flag.is_set() and not session.busy
    with studio.lock:  # the worker has let go of the model
        pass
    assert not list(session.folder.glob("*.mp4"))
    # cancelled while queued behind another generation: nothing ran
    with studio.lock:
        updates = []
        for update in studio.generate(session, SHORT, "yaml", "egolcd", 1, 0):
            updates.append(update)
            if len(updates) == 1:
                assert "queued" in update[1]
                studio.cancel(session)
    assert "cancelled after 0 chunks" in updates[-1][1] and session.run.reports == []
    # the session works again afterwards
    updates = run_to_end(studio.generate(session, SHORT, "yaml", "none", 1, 0, max_chunks=2))
    assert session.run.status == "done" and len(session.run.reports) == 2 and updates[-1][3] is not None


def test_two_sessions_at_once_do_not_mix(studio):
    a, b = studio.new_session(), studio.new_session()
    results: dict[str, list] = {}

    def drive(name, session, policy, seed):
        results[name] = run_to_end(studio.generate(session, SHORT, "yaml", policy, 1, seed))

    threads = [threading.Thread(target=drive, args=("a", a, "egolcd", 1)),
               threading.Thread(target=drive, args=("b", b, "window", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {"a", "b"}
    va, vb = Path(results["a"][-1][3]), Path(results["b"][-1][3])
    assert va.parent == a.folder and vb.parent == b.folder and a.folder != b.folder
    assert "egolcd-seed1" in va.name and "window-seed2" in vb.name
    assert a.run is not b.run and a.run.policy == "egolcd" and b.run.policy == "window"
    assert len(a.run.reports) == len(b.run.reports) == 7
    # window keeps no long-term entries; egolcd retrieves some by the revisit
    assert not any(s["kind"] == "retrieved" for r in b.run.reports for s in r.context)
    assert any(s["kind"] == "retrieved" for r in a.run.reports for s in r.context)
    assert not np.array_equal(a.run.frames[3], b.run.frames[3])
    assert not studio.lock.locked() and not a.busy and not b.busy


def test_side_by_side_same_seed_two_policies(studio):
    session = studio.new_session()
    updates = run_to_end(studio.compare(session, SHORT, "yaml", "egolcd", "window", 1, 5))
    _, progress, video_a, video_b, revisits = updates[-1]
    assert "egolcd (1 step, seed 5): 7 chunks" in progress and "window (1 step, seed 5): 7 chunks" in progress
    assert probe_video(video_a).num_frames == probe_video(video_b).num_frames == 46
    assert [c for _, c in revisits] == ["egolcd: first visit 'sink' (chunk 0)", "egolcd: revisit 'back' (chunk 4)",
                                        "window: first visit 'sink' (chunk 0)", "window: revisit 'back' (chunk 4)"]
    assert all(img.shape == (64, 64, 3) for img, _ in revisits)
    # same seed: the first chunk (no memory yet) is identical under both policies
    a, b = session.compare
    assert np.array_equal(a.frames[0], b.frames[0])
    assert session.run is None  # the Generate tab's run (and its inspector) is untouched


# ------------------------------------------------------------------------------------------- the app
def test_build_app_has_the_stable_element_ids(studio):
    pytest.importorskip("gradio")
    from egolcd.studio import build_app

    demo = build_app(studio)
    ids = {c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    for elem_id in ("narrative-editor", "validation-message", "example-dropdown", "generate-btn", "cancel-btn",
                    "result-video", "memory-inspector", "memory-timeline", "entry-frames", "inspector-chunk",
                    "chunk-previews", "progress", "compare-btn", "compare-video-a", "compare-video-b",
                    "revisit-frames"):
        assert elem_id in ids, elem_id
    # Generate / Compare accept a click right after a run ends (gradio's default "once" drops a click that
    # lands before the finished run's event closes: the browser test's Generate-after-Cancel timed out in CI)
    modes = {fn.name: fn.trigger_mode for fn in demo.fns.values()}
    assert modes["generate"] == "multiple" and modes["compare"] == "multiple", modes


def test_missing_gradio_is_one_line_with_the_install_command(monkeypatch, model_dir, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match="egolcd\\[studio\\]"):
        import_gradio()
    assert main(["studio", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("egolcd: error: ") and INSTALL_HINT in err
