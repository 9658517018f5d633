"""Issue 13, item 7: values of a model's egolcd_config.json that used to be accepted silently (an unknown
preset, sampler or text encoder, an unknown memory key, a size above the limits) are one-line errors,
before any weights load."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egolcd.pipeline import GenerationConfig

NARRATIVE = Path(__file__).parent / "narratives" / "short_kitchen.yaml"


@pytest.mark.parametrize("data,match", [
    ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"sampler": "nope"}, "unknown sampler 'nope'"),
    ({"text_encoder": "nope"}, "unknown text_encoder 'nope'"),
    ({"memory": {"bogus": 1}}, "memory: .*bogus"),
    ({"width": 100_000}, "EGOLCD_MAX_SIDE"),
    ({"height": 100_000}, "EGOLCD_MAX_SIDE"),
    ({"fps": 100_000}, "EGOLCD_MAX_FPS"),
    ({"steps": "four"}, "steps must be a positive integer"),
    ([], "JSON object"),
])
def test_bad_config_values_are_one_line(data, match):
    with pytest.raises(ValueError, match=match) as info:
        GenerationConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_good_config_values_still_load():
    config = GenerationConfig.from_dict({"preset": "demo", "sampler": "heun", "width": 4096, "fps": 240})
    assert (config.preset, config.sampler, config.width, config.fps) == ("demo", "heun", 4096, 240)


def test_cli_refuses_an_unknown_preset_before_loading_weights(tmp_path):
    model = tmp_path / "model"  # the config is read first: no weights are needed to see the error
    model.mkdir()
    (model / "egolcd_config.json").write_text(json.dumps({"preset": "nope"}))
    out = tmp_path / "v.mp4"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "egolcd", "generate", str(NARRATIVE), "-o", str(out), "--model",
                           str(model), "-q"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "unknown preset 'nope'" in lines[0], proc.stderr
    assert not out.exists()
    assert time.perf_counter() - start < 120  # a hang guard on a shared machine, not a timing claim
