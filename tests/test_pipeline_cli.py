"""EgoLCDPipeline and the `egolcd` command: end to end with the tiny preset, resume, long runs, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egolcd.cli import main
from egolcd.pipeline import EgoLCDPipeline
from egolcd.video_io import probe_video, read_video

NARRATIVE = """\
scene: a small kitchen with a white sink
fps: 8
width: 64
height: 64
segments:
  - {id: sink, seconds: 2, action: rinses a mug}
  - {id: stove, seconds: 1.5, action: turns to the stove}
  - {id: back, seconds: 2.25, action: walks back to the sink, revisit: sink}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    assert main(["create-model", str(path), "--preset", "tiny"]) == 0
    return path


@pytest.fixture(scope="module")
def pipe(model_dir):
    return EgoLCDPipeline.from_pretrained(model_dir)


@pytest.fixture
def narrative(tmp_path):
    path = tmp_path / "story.yaml"
    path.write_text(NARRATIVE)
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- end to end
def test_generate_end_to_end_frame_count_and_fps(model_dir, narrative, tmp_path, capsys):
    out = tmp_path / "video.mp4"
    code, stdout, err = run_cli(capsys, "generate", narrative, "-o", out, "--model", model_dir, "--steps", "2", "-q")
    assert code == 0, err
    info = probe_video(out)
    # exactly round(seconds * fps) frames per segment: 16 + 12 + 18 (2.25 * 8 = 18)
    assert info.num_frames == 16 + 12 + 18
    assert info.fps == 8 and (info.width, info.height) == (64, 64) and info.codec == "h264"
    assert str(out) in stdout


def test_validate_prints_prompts_and_schedule(narrative, capsys):
    code, stdout, _ = run_cli(capsys, "validate", narrative, "--preset", "tiny")
    assert code == 0
    assert "Step 3 of 3" in stdout and "a return to the initial view" in stdout and "sink" in stdout


def test_saved_model_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["transformer"] == ["egolcd", "EgoLCDTransformer3DModel"]
    again = EgoLCDPipeline.from_pretrained(tmp_path / "copy")
    for a, b in zip(pipe.transformer.state_dict().values(), again.transformer.state_dict().values()):
        assert torch.equal(a, b)
    # the folder does not record the machine-local path it was loaded from; loading names its own
    assert str(pipe.transformer.config._name_or_path).startswith(str(tmp_path.parent.parent))
    for part in ("transformer", "vae"):
        assert "_name_or_path" not in json.loads((tmp_path / "copy" / part / "config.json").read_text())
    assert str(again.transformer.config._name_or_path) == str(tmp_path / "copy" / "transformer")


@pytest.mark.parametrize("policy", ["egolcd", "dense", "window", "sink-window", "none"])
def test_every_policy_generates(pipe, narrative, tmp_path, policy):
    result = pipe(narrative, tmp_path / f"{policy}.mp4", memory=policy, steps=1, progress=False)
    assert result.num_frames == 46
    tokens = [c.context_tokens for c in result.chunks]
    per_chunk = 2 * 16  # chunk_frames * tokens per frame at 64x64
    if policy == "none":
        assert max(tokens) == per_chunk
    if policy == "dense":
        assert tokens == [i * per_chunk for i in range(len(tokens))]


def test_resume_equals_uninterrupted(pipe, narrative, tmp_path):
    frames_full: list[torch.Tensor] = []
    pipe(narrative, tmp_path / "full.mp4", steps=2, seed=7, progress=False,
         callback=lambda r, f: frames_full.append(f.clone()))
    state = tmp_path / "state.safetensors"
    # an interrupted run: stops after 3 chunks, state saved
    pipe(narrative, tmp_path / "part.mp4", steps=2, seed=7, progress=False, save_state=state,
         save_state_every=1, max_chunks=3)
    frames_resumed: list[torch.Tensor] = []
    result = pipe(narrative, tmp_path / "resumed.mp4", steps=2, seed=7, progress=False, resume=state,
                  callback=lambda r, f: frames_resumed.append(f.clone()))
    assert [r.chunk for r in result.chunks] == list(range(3, len(frames_full)))
    for a, b in zip(frames_full[3:], frames_resumed):
        assert torch.equal(a, b)  # bit-identical continuation
    full, _ = read_video(tmp_path / "full.mp4")
    resumed, _ = read_video(tmp_path / "resumed.mp4")
    assert full.shape == resumed.shape
    assert abs(full.astype(float) - resumed.astype(float)).mean() < 2.0  # same frames through a lossy codec
    with pytest.raises(ValueError, match="cannot resume"):
        pipe(narrative, tmp_path / "x.mp4", steps=3, seed=7, progress=False, resume=state)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_long_generation_1000_latent_frames_bounded_memory(pipe, tmp_path):
    """>= 1000 latent frames: memory tokens and host memory stay bounded; frames stream to disk."""
    story = tmp_path / "long.yaml"
    # 500 s at 8 fps = 4000 pixel frames -> 1001 latent frames -> 501 chunks of 2
    segments = "\n".join(f"  - {{id: s{i}, seconds: 50, action: walks on to place {i}}}" for i in range(10))
    story.write_text(f"scene: a long corridor\nfps: 8\nwidth: 32\nheight: 32\nsegments:\n{segments}\n")
    rss: list[float] = []
    result = pipe(story, tmp_path / "long.mp4", steps=1, progress=False,
                  callback=lambda r, f: rss.append(_rss_mb()) if r.chunk % 50 == 0 else None)
    assert result.num_chunks * 2 >= 1000
    cfg = pipe.config.memory
    per_chunk = 2 * 4
    k = -(-per_chunk * cfg.keep_ratio // 1)
    budget = (cfg.window_chunks + 1) * per_chunk + cfg.max_entries * k  # window + sink + long-term
    assert max(c.memory_tokens for c in result.chunks) <= budget
    assert max(c.context_tokens for c in result.chunks) <= budget
    late = [c.memory_bytes for c in result.chunks[100:]]
    assert max(late) == min(late)  # flat once the long-term store is full
    assert rss[-1] - rss[2] < 100, rss  # host memory does not grow with the video
    assert probe_video(tmp_path / "long.mp4").num_frames == 4000


# ----------------------------------------------------------------------------- bad input
BAD_NARRATIVES = {
    "malformed": ("segments: [\n  - {id: a", "malformed"),
    "unknown_field": ("sceen: kitchen\nsegments:\n  - {action: a}\n", "unknown field"),
    "empty": ("scene: kitchen\nsegments: []\n", "segment"),
    "non_positive": ("segments:\n  - {id: a, seconds: -1, action: x}\n", "seconds"),
    "unknown_revisit": ("segments:\n  - {id: a, action: x}\n  - {id: b, action: y, revisit: zzz}\n", "revisit"),
    "impossible_size": ("width: 100\nheight: 64\nsegments:\n  - {id: a, action: x}\n", "impossible size"),
}


@pytest.mark.parametrize("case", sorted(BAD_NARRATIVES))
def test_bad_narratives_one_line_error_and_output_untouched(case, model_dir, tmp_path, capsys):
    text, needle = BAD_NARRATIVES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "existing.mp4"
    out.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "generate", path, "-o", out, "--model", model_dir, "-q")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("egolcd: error:") and needle in lines[0].lower(), err
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "existing.mp4"]  # no temp files left


def test_missing_and_mismatched_model_dirs(narrative, model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", narrative, "-o", tmp_path / "o.mp4", "--model", tmp_path / "nope")
    assert code == 2 and "model directory not found" in err
    # a model whose VAE does not match the transformer
    import shutil

    bad = tmp_path / "mismatch"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "vae" / "config.json").read_text())
    cfg["z_dim"] = 8
    cfg["latents_mean"], cfg["latents_std"] = [0.0] * 8, [1.0] * 8
    (bad / "vae" / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "generate", narrative, "-o", tmp_path / "o.mp4", "--model", bad)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_unwritable_output_and_missing_default_model(narrative, model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", narrative, "-o", tmp_path / "no" / "dir" / "o.mp4", "--model", model_dir)
    assert code == 2 and "cannot write to" in err
    code, _, err = run_cli(capsys, "validate", tmp_path / "missing.yaml")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_console_script_exit_status_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("segments: []\n")
    exe = Path(sys.executable).parent / "egolcd"
    proc = subprocess.run([str(exe), "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_evaluate_generated_videos_against_each_other(pipe, narrative, tmp_path, capsys):
    """The evaluation chain on tiny generated videos: two policies, one as the 'reference'."""
    a, b = tmp_path / "egolcd.mp4", tmp_path / "window.mp4"
    pipe(narrative, a, memory="egolcd", steps=1, progress=False)
    pipe(narrative, b, memory="window", steps=1, progress=False)
    report, out_json = tmp_path / "report.html", tmp_path / "metrics.json"
    code, stdout, err = run_cli(capsys, "evaluate", a, b, "--reference", b, "--narrative", narrative,
                                "--report", report, "--json", out_json)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert set(data["videos"]) == {"egolcd", "window"}
    assert "<img" in report.read_text()
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "missing.mp4")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_bench_json_format(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench", "--chunks", "24", "--policies", "egolcd,dense", "--steps", "1",
                                "--threads", "1", "--json", out, "--plot", tmp_path / "bench.png")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["preset"] == "tiny" and set(data["policies"]) == {"egolcd", "dense"}
    for r in data["policies"].values():
        assert len(r["chunk_seconds"]) == len(r["context_tokens"]) == len(r["memory_bytes"]) == 24
        assert r["peak_mb"] > 0
    ego, dense = data["policies"]["egolcd"], data["policies"]["dense"]
    assert max(ego["context_tokens"]) < max(dense["context_tokens"])  # bounded vs growing
    assert dense["context_tokens"][-1] == 23 * dense["context_tokens"][1]
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_embedded_demo_model_generates_by_default(tmp_path, capsys):
    """`egolcd generate` without --model uses the committed, trained demo model."""
    from egolcd.pipeline import EMBEDDED_MODEL_DIR

    assert (EMBEDDED_MODEL_DIR / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size < 50e6
    story = tmp_path / "maze.txt"
    story.write_text("2 | looks around the starting spot\n1 | walks straight to the red ball\n")
    out = tmp_path / "demo.mp4"
    code, stdout, err = run_cli(capsys, "generate", story, "-o", out, "--steps", "2", "-q")
    assert code == 0, err
    info = probe_video(out)
    assert info.num_frames == 24 and (info.width, info.height) == (64, 64)
    frames, _ = read_video(out)
    assert frames.std() > 5  # a trained model draws a scene, not a flat frame
