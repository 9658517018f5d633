"""Starting from real footage and extending a finished run (issue 15), tiny preset on CPU.

* footage written into memory == the memory a teacher-forced clean pass writes over the same latents;
* the output holds the footage's reconstructed frames then the generated ones (or only the generated);
* a photo is a one-chunk still clip; ``revisit:`` can point at an explicit ``footage: true`` segment;
* an extended run (``resume=`` with segments appended) == one run of the whole narrative, frame for frame;
* bad footage ends in one ``egolcd: error:`` line, exit 2, the output untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from egolcd.cli import main
from egolcd.footage import crop_box, whole_chunk_frames
from egolcd.losses import teacher_forcing_loss
from egolcd.memory import MemoryPolicy
from egolcd.narrative import NarrativeError, parse_narrative
from egolcd.pipeline import EgoLCDPipeline
from egolcd.revisits import frame_psnr
from egolcd.video_io import VideoWriter, read_video

FOOTAGE_NARRATIVE = """\
scene: a small kitchen with a white sink
fps: 8
segments:
  - {id: sink, footage: true, action: rinses a mug at the sink}
  - {id: stove, seconds: 1.5, action: turns to the stove}
  - {id: back, seconds: 1, action: walks back to the sink, revisit: sink}
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return EgoLCDPipeline.from_preset("tiny")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 96x64 clip of 20 frames at 8 fps (tiny: chunks of 5 then 8 frames -> 2 whole chunks = 13 frames)."""
    path = tmp_path_factory.mktemp("footage") / "clip.mp4"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(1, 64, 96, 3))
    frames = np.clip(base + rng.integers(-20, 20, size=(20, 64, 96, 3)), 0, 255).astype(np.uint8)
    with VideoWriter(path, fps=8, width=96, height=64) as w:
        w.write(frames)
    return path


def test_crop_rule_and_whole_chunks():
    assert crop_box(96, 64, 64, 64) == (16, 0, 64, 64)  # centre crop to the model's aspect
    assert crop_box(64, 128, 64, 64) == (0, 32, 64, 64)
    with pytest.raises(ValueError, match="impossible aspect"):
        crop_box(400, 64, 64, 64)  # keeps 64 of 400 columns
    # tiny (k = 2, 4x time): chunks are 5 then 8 pixel frames; shorter footage is padded to one chunk
    assert [whole_chunk_frames(n, 2, 4) for n in (1, 5, 12, 13, 20, 21)] == [5, 5, 5, 13, 13, 21]


def test_narrative_footage_segment():
    n = parse_narrative(FOOTAGE_NARRATIVE, "yaml")
    assert n.segments[0].footage and n.segments[0].seconds == 0.0  # seconds: from the footage
    with pytest.raises(NarrativeError, match="only the first segment can be footage"):
        parse_narrative("segments:\n  - {action: a}\n  - {action: b, footage: true}\n", "yaml")
    with pytest.raises(NarrativeError, match="footage must be true or false"):
        parse_narrative("segments:\n  - {action: a, footage: 'yes'}\n", "yaml")
    with pytest.raises(NarrativeError, match="unknown field 'footag'"):
        parse_narrative("segments:\n  - {action: a, footag: true}\n", "yaml")


def test_footage_memory_equals_teacher_forced_clean_pass(pipe, clip, tmp_path):
    """The footage's chunks go through the same clean pass as training's teacher forcing: same memory."""
    narrative = parse_narrative(FOOTAGE_NARRATIVE, "yaml")
    state_path = tmp_path / "state.safetensors"
    result = pipe(narrative, tmp_path / "f.mp4", steps=1, progress=False, init_video=clip, max_chunks=2,
                  save_state=state_path)
    assert [c.footage for c in result.chunks] == [True, True]
    policy = MemoryPolicy(pipe.config.memory, pipe.chunk_frames)
    saved, extra, tensors = policy.load_state(state_path)
    assert extra["footage_frames"] == 13
    latents = tensors["latents"]  # the encoded footage, as written
    _, compiled = pipe.compile(parse_narrative(FOOTAGE_NARRATIVE.replace("footage: true", "footage: true, seconds: 1.625"), "yaml"))
    tokens = pipe.text_encoder.encode(compiled.prompts).tokens
    keys = pipe.text_encoder.encode(compiled.key_texts).pooled
    states = []
    init = policy.init_state
    policy.init_state = lambda: states.append(init()) or states[-1]
    segs = compiled.chunk_segments[:2]
    with torch.no_grad():
        teacher_forcing_loss(pipe.transformer, policy, latents, torch.randn_like(latents), torch.full((1, 2), 0.5),
                             [tokens[s : s + 1] for s in segs], [keys[s : s + 1] for s in segs], segs)
    taught = states[0]
    assert taught.chunk == saved.chunk == 2
    pairs = list(zip(taught.window.chunks, saved.window.chunks, strict=True))
    pairs += [(taught.window.sink_chunk, saved.window.sink_chunk)] if saved.window.sink_chunk is not None else []
    pairs += list(zip(taught.store.entries, saved.store.entries, strict=True))
    assert pairs
    for a, b in pairs:
        assert (a.chunk, a.segment) == (b.chunk, b.segment)
        torch.testing.assert_close(a.embedding, b.embedding)
        for ka, kb, ia, ib in zip(a.kv, b.kv, a.importance, b.importance, strict=True):
            torch.testing.assert_close(ka.key, kb.key, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ka.value, kb.value, rtol=1e-5, atol=1e-6)
            assert torch.equal(ka.pos, kb.pos)
            torch.testing.assert_close(ia, ib, rtol=1e-5, atol=1e-6)


def test_video_output_footage_then_generated_and_revisit_to_footage(pipe, clip, tmp_path):
    narrative = parse_narrative(FOOTAGE_NARRATIVE, "yaml")
    frames: list[torch.Tensor] = []
    result = pipe(narrative, tmp_path / "out.mp4", steps=1, progress=False, init_video=clip,
                  callback=lambda r, f: frames.append(f))
    # 13 footage frames (2 whole chunks of 20) + 12 + 8 generated
    assert result.num_frames == 13 + 12 + 8
    video, _ = read_video(tmp_path / "out.mp4")
    assert video.shape == (33, 64, 64, 3)
    back = [r for r in result.chunks if r.segment == 2]
    assert back and any(s["kind"] == "retrieved" and s["segment"] == 0 for r in back for s in r.context)
    only = pipe(narrative, tmp_path / "only.mp4", steps=1, progress=False, init_video=clip, no_footage_in_output=True)
    assert only.num_frames == 12 + 8
    assert read_video(tmp_path / "only.mp4")[0].shape[0] == 20


def test_image_is_a_one_chunk_still_clip(pipe, tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((48, 80, 3), 200, dtype=np.uint8)).save(photo)
    text = "segments:\n  - {id: a, seconds: 1, action: looks at the table}\n"
    result = pipe(parse_narrative(text, "yaml"), tmp_path / "p.mp4", steps=1, progress=False, init_image=photo)
    assert result.chunks[0].footage and not result.chunks[-1].footage
    assert result.num_frames == 5 + 8  # the photo repeated to one chunk (5 frames), then the segment


def test_extended_run_equals_one_run_of_the_whole_narrative(pipe, tmp_path, encoded_frames):
    """Run 3 segments, then resume with 2 appended: == one run of all 5 (same seed), frame for frame.
    Explicit prompts: compiled prompts say "Step j of J", which an extension changes (see the docs)."""
    segs = [("a", 1.5, "a white sink"), ("b", 1.25, "a red kettle"), ("c", 1.0, "a blue door"),
            ("d", 1.5, "a green chair"), ("e", 1.0, "the white sink again")]
    lines = [f"  - {{id: {i}, seconds: {s}, action: looks at {p}, prompt: A view of {p}.}}" for i, s, p in segs]
    first = "fps: 8\nsegments:\n" + "\n".join(lines[:3]) + "\n"
    whole = "fps: 8\nsegments:\n" + "\n".join(lines) + "\n"
    full: list[torch.Tensor] = []
    pipe(parse_narrative(whole, "yaml"), tmp_path / "whole.mp4", steps=1, seed=3, progress=False,
         callback=lambda r, f: full.append(f.clone()))
    state = tmp_path / "run.safetensors"
    old: list[torch.Tensor] = []
    r1 = pipe(parse_narrative(first, "yaml"), tmp_path / "first.mp4", steps=1, seed=3, progress=False,
              save_state=state, callback=lambda r, f: old.append(f.clone()))
    new: list[torch.Tensor] = []
    r2 = pipe(parse_narrative(whole, "yaml"), tmp_path / "extended.mp4", steps=1, seed=3, progress=False,
              resume=state, save_state=state, callback=lambda r, f: new.append(f.clone()))
    start = r2.chunks[0].chunk
    assert start <= r1.num_chunks and r2.num_chunks == len(full)
    for a, b in zip(full[:start], old[:start], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full[start:], new, strict=True):
        assert torch.equal(a, b)
    # the extended run writes the whole run's frames, the re-decoded old ones included, bit for bit
    assert np.array_equal(encoded_frames["extended.mp4"], encoded_frames["whole.mp4"])
    whole_video, _ = read_video(tmp_path / "whole.mp4")
    extended_video, _ = read_video(tmp_path / "extended.mp4")
    assert extended_video.shape == whole_video.shape  # (the files may differ by x264's run-to-run noise)
    assert frame_psnr(extended_video, whole_video) > 35.0  # frames that differ at all: > 35 dB
    # a changed saved segment is refused, in one line
    changed = whole.replace("looks at a red kettle", "looks at a red pan")
    with pytest.raises(ValueError, match=r"segment 2 \('b'\) differs from the saved run's"):
        pipe(parse_narrative(changed, "yaml"), tmp_path / "x.mp4", steps=1, seed=3, progress=False, resume=state)


def _bad_footage(tmp_path: Path, case: str) -> Path:
    if case == "corrupt":
        path = tmp_path / "corrupt.mp4"
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    elif case == "zero-frames":
        import av

        path = tmp_path / "empty.mp4"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    elif case == "aspect":
        path = tmp_path / "strip.mp4"
        with VideoWriter(path, fps=8, width=512, height=32) as w:
            w.write(np.zeros((3, 32, 512, 3), dtype=np.uint8))
    elif case == "missing":
        path = tmp_path / "no-such-clip.mp4"
    else:
        path = tmp_path / "a-folder.mp4"
        path.mkdir()
    return path


@pytest.mark.parametrize("case", ["corrupt", "zero-frames", "aspect", "folder", "missing"])
def test_bad_footage_is_one_line_and_output_untouched(case, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["create-model", str(model), "--preset", "tiny"]) == 0
    story = tmp_path / "story.yaml"
    story.write_text(FOOTAGE_NARRATIVE)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")
    capsys.readouterr()
    t0 = time.perf_counter()
    code = main(["generate", str(story), "-o", str(out), "--model", str(model), "-q",
                 "--from-video", str(_bad_footage(tmp_path, case))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("egolcd: error: "), err
    assert time.perf_counter() - t0 < 30
    assert out.read_bytes() == b"keep me"


def test_cli_from_image_then_extend_the_run(tmp_path, capsys):
    """`generate --from-image`, then `--resume` with a segment appended: old frames + new ones."""
    from PIL import Image

    model = tmp_path / "model"
    assert main(["create-model", str(model), "--preset", "tiny"]) == 0
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(photo)
    first, longer = tmp_path / "first.yaml", tmp_path / "longer.yaml"
    first.write_text("fps: 8\nsegments:\n  - {id: a, seconds: 1, action: looks at the table}\n")
    longer.write_text(first.read_text() + "  - {id: b, seconds: 1, action: looks back at the photo spot, revisit: a}\n")
    state, out1, out2 = tmp_path / "run.safetensors", tmp_path / "one.mp4", tmp_path / "two.mp4"
    common = ["--model", str(model), "--steps", "1", "-q", "--save-state", str(state)]
    assert main(["generate", str(first), "-o", str(out1), "--from-image", str(photo), *common]) == 0
    assert main(["generate", str(longer), "-o", str(out2), "--resume", str(state), *common]) == 0
    one, _ = read_video(out1)
    two, _ = read_video(out2)
    assert len(one) == 5 + 8 and len(two) == 5 + 8 + 8  # photo chunk, 'a', then the new 'b'
    assert np.abs(one.astype(int) - two[: len(one)].astype(int)).mean() < 2  # the old frames, kept
    capsys.readouterr()
    # the footage belongs to the saved run: --from-* with --resume, or a changed old segment, is one line
    assert main(["generate", str(longer), "-o", str(out2), "--resume", str(state), "--from-image", str(photo),
                 *common]) == 2
    assert "drop --from-video/--from-image" in capsys.readouterr().err
    longer.write_text(longer.read_text().replace("looks at the table", "looks at the chair"))
    assert main(["generate", str(longer), "-o", str(tmp_path / "x.mp4"), "--resume", str(state), *common]) == 2
    assert "differs from the saved run's" in capsys.readouterr().err
