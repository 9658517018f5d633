"""The studio's start from an uploaded clip or photo and its "Continue this run" (issue 15), called directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from egolcd.pipeline import ChunkReport, EgoLCDPipeline
from egolcd.studio import RunRecord, Studio, StudioConfig, footage_kind
from egolcd.studio.views import parse_editor
from egolcd.video_io import VideoWriter, probe_video

pytestmark = pytest.mark.usefixtures("one_thread_module")

FIRST = """\
fps: 8
segments:
  - {id: sink, footage: true, action: rinses a mug at the sink}
  - {id: stove, seconds: 2, action: turns to the stove}
"""
EXTENDED = FIRST + "  - {id: back, seconds: 1, action: walks back to the sink, revisit: sink}\n"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    model = tmp_path_factory.mktemp("studio-footage-model") / "tiny"
    EgoLCDPipeline.from_preset("tiny").save_pretrained(model)
    return Studio(StudioConfig(model=model, outputs=tmp_path_factory.mktemp("studio-footage-outputs")))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("studio-clip") / "kitchen.mp4"
    with VideoWriter(path, fps=8, width=64, height=64) as w:
        w.write(np.random.default_rng(1).integers(0, 255, size=(13, 64, 64, 3), dtype=np.uint8))
    return path


def test_footage_kind_by_suffix():
    assert [footage_kind(p) for p in ("a.PNG", "b.jpg", "c.jpeg", "d.webp", "e.mp4", "f.mov")] == [
        "image", "image", "image", "image", "video", "video"]


def test_a_chunk_made_again_replaces_it_and_later_ones():
    _, compiled = parse_editor(EXTENDED.replace("footage: true, ", "seconds: 2, "))
    run = RunRecord(policy="egolcd", compiled=compiled, total_chunks=compiled.num_chunks)

    def report(c: int) -> ChunkReport:
        return ChunkReport(c, 0, 0.0, 0, 0, 0, [])

    for c in range(3):
        run.add_chunk(report(c), np.zeros((4, 8, 8, 3), np.uint8))
    run.add_chunk(report(1), np.ones((4, 8, 8, 3), np.uint8))
    assert [r.chunk for r in run.reports] == [0, 1] and run.frames[1].max() == 1


def test_upload_a_clip_then_continue_the_run(studio, clip):
    session = studio.new_session()
    updates = list(studio.generate(session, FIRST, "yaml", "egolcd", 1, 0, footage=str(clip)))
    first = session.run
    assert first.status == "done", updates[-1][1]
    assert first.footage_frames == 13 and first.reports[0].footage
    assert probe_video(first.video).num_frames == 13 + 16 and first.state.is_file()
    # nothing new in the editor: refused in one line, nothing started
    (refused,) = list(studio.continue_run(session, FIRST, "yaml"))
    assert "nothing to continue" in refused[0] and session.run is first
    updates = list(studio.continue_run(session, EXTENDED, "yaml"))
    run = session.run
    assert run is not first and run.status == "done", updates[-1][1]
    assert probe_video(run.video).num_frames == 13 + 16 + 8
    assert [r.chunk for r in run.reports] == list(range(run.compiled.num_chunks))
    assert run.reports[0] is first.reports[0]  # the old chunks are kept, not generated again
    revisit = [r for r in run.reports if r.segment == 2]  # chunk 4: chunk 1 (footage) has left the window
    assert any(s["kind"] == "retrieved" and s["segment"] == 0 for r in revisit for s in r.context)
