"""Issue 13, item 12: hostile input never raises out of the studio, and the tab's busy flag is released."""

from __future__ import annotations

import pytest

from egolcd.pipeline import EgoLCDPipeline
from egolcd.studio import Studio, StudioConfig

pytestmark = pytest.mark.usefixtures("one_thread_module")

SHORT = "fps: 8\nsegments:\n  - {id: a, seconds: 1, action: walks}\n"
HOSTILE = [
    "segments:\n  - {seconds: 1.0e+308, action: walks}\n",
    "segments:\n  - {seconds: " + "9" * 400 + ", action: walks}\n",
    "segments:\n  - {? [a, b] : 1, action: walks}\n",
    "segments: " + "[" * 20000 + "]" * 20000 + "\n",
    "segments:\n  - {seconds: 1000000000000, action: walks}\n",
]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    path = tmp_path_factory.mktemp("rel-studio-model") / "tiny"
    EgoLCDPipeline.from_preset("tiny").save_pretrained(path)
    return Studio(StudioConfig(model=path, outputs=tmp_path_factory.mktemp("rel-studio-out")))


@pytest.mark.parametrize("text", HOSTILE, ids=["1e308", "400-digits", "list-key", "deep", "1e12"])
def test_hostile_text_neither_raises_nor_sticks(studio, text):
    message, schedule = studio.validate(text, "yaml")
    assert "egolcd: error:" in message and schedule == ""
    session = studio.new_session()
    updates = list(studio.generate(session, text, "yaml", "egolcd", 1, 0))
    assert len(updates) == 1 and "egolcd: error:" in updates[0][0]
    assert not session.busy
    updates = list(studio.compare(session, text, "yaml", "egolcd", "window", 1, 0))
    assert len(updates) == 1 and not session.busy


@pytest.mark.parametrize("steps,seed", [(float("inf"), 0), (1, float("inf")), (float("nan"), 0), (1, -5), ("four", 0)])
def test_bad_steps_or_seed_leave_the_tab_usable(studio, steps, seed):
    session = studio.new_session()
    updates = list(studio.generate(session, SHORT, "yaml", "egolcd", steps, seed))
    assert len(updates) == 1 and "egolcd: error:" in updates[0][0]
    assert not session.busy
    # the next Generate in the same tab runs
    updates = list(studio.generate(session, SHORT, "yaml", "egolcd", 1, 0, 1))
    assert "already running" not in updates[-1][1] and updates[-1][3] is not None
    assert not session.busy


def test_unexpected_error_while_starting_releases_busy(studio, monkeypatch):
    session = studio.new_session()

    def boom(*args, **kwargs):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(studio, "_start", boom)
    with pytest.raises(RuntimeError):
        list(studio.generate(session, SHORT, "yaml", "egolcd", 1, 0))
    assert not session.busy  # released in finally
