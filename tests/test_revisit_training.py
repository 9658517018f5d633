"""Training exercises retrieval exactly as inference does (the "memory works" changes).

* narrative clips: per-chunk prompts, memory keys and revisits from ``compile_narrative``, stored in the
  latent cache; windows at every offset, filtered to those whose revisits need long-term memory;
* the context layout of a training clip equals the layout of a generation of the same narrative;
* memory keys tell places apart better than full prompts;
* the policy mix is deterministic per step; the pose-paired revisit scores.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from egolcd.config import PRESETS
from egolcd.data import EgoVidDataset, build_from_preset, prepare_latents
from egolcd.data.latents import LatentDataset
from egolcd.losses import teacher_forcing_loss
from egolcd.memory import MemoryPolicy
from egolcd.narrative import compile_narrative, load_narrative
from egolcd.pipeline import EgoLCDPipeline
from egolcd.revisits import bootstrap_mean_ci, chance_pairs, paired_psnr, revisit_pairs
from egolcd.text import load_text_encoder
from egolcd.training import train_config_from_dict
from egolcd.vae import build_vae
from egolcd.video_io import VideoWriter

# tiny preset: 2 latent frames per chunk = 8 pixel frames per chunk (after the first); 8 fps -> 1 s/chunk
TOUR = dict(
    scene="a maze with coloured balls",
    actor="The camera wearer",
    fps=8,
    segments=[
        dict(id="s1", seconds=2.0, action="looks around the starting spot"),
        dict(id="s2", seconds=2.0, action="looks around next to the red ball"),
        dict(id="s3", seconds=2.0, action="walks to the junction"),
        dict(id="s4", seconds=2.0, action="looks around at the junction"),
        dict(id="s5", seconds=2.0, action="walks back to the red ball"),
        dict(id="s6", seconds=2.125, action="looks around next to the red ball again", revisit="s2"),
    ],
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


@pytest.fixture(scope="module")
def narrative_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tours")
    (root / "videos").mkdir()
    (root / "narratives").mkdir()
    rows = []
    for e in range(2):
        vid = f"tour{e}_0_97"
        rng = np.random.default_rng(e)
        frames = rng.integers(0, 255, size=(97, 64, 64, 3), dtype=np.uint8)
        with VideoWriter(root / "videos" / f"{vid}.mp4", fps=8, width=64, height=64) as w:
            w.write(frames)
        (root / "narratives" / f"{vid}.yaml").write_text(yaml.safe_dump(TOUR, sort_keys=False))
        rows.append(dict(video_id=vid, frame_num=97, fps=8, llava_cap="A maze. The camera wearer walks.",
                         narrative=f"narratives/{vid}.yaml"))
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def cache(narrative_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    dataset = EgoVidDataset(build_from_preset("tiny", narrative_root, chunks_per_clip=12))
    prepare_latents(dataset, build_vae(PRESETS["tiny"], None), load_text_encoder("minilm"), out, progress=False)
    return out


def test_narrative_clips_carry_the_inference_schedule(narrative_root: Path) -> None:
    dataset = EgoVidDataset(build_from_preset("tiny", narrative_root, chunks_per_clip=12))
    item = dataset[0]
    compiled = compile_narrative(load_narrative(narrative_root / "narratives" / "tour0_0_97.yaml"), fps=8,
                                 chunk_frames=2, vae_temporal=4)
    assert item["segments"].tolist() == compiled.chunk_segments[:12]
    assert item["prompts"] == [compiled.prompts[s] for s in compiled.chunk_segments[:12]]
    assert item["keys"] == [compiled.key_texts[s] for s in compiled.chunk_segments[:12]]
    revisit_chunks = [c for c, r in enumerate(item["revisits"].tolist()) if r >= 0]
    assert revisit_chunks and all(compiled.chunk_segments[c] == 5 for c in revisit_chunks)
    assert set(item["revisits"][revisit_chunks].tolist()) == {1}


def test_latent_windows_keep_only_clips_that_need_long_term_memory(cache: Path) -> None:
    whole = LatentDataset(cache)
    assert len(whole) == 2 and whole[0]["latents"].shape[1] == 24
    # chunks 2-3 are s2, chunks 10-11 are s6 (revisits s2): a 10-chunk window needs chunk 10 and chunk 2
    windows = LatentDataset(cache, clip_chunks=10, min_revisit_chunks=1, window_chunks=2)
    assert windows.windows == [(0, 1), (0, 2), (1, 1), (1, 2)]
    item = windows[0]
    assert item["first_chunk"] == 1 and item["latents"].shape[1] == 20
    rows = item["segments"].tolist()
    revisits = item["revisits"].tolist()
    assert revisits[-1] == rows[1] and revisits[:-1] == [-1] * 9  # chunk 10 revisits chunk 2's segment
    assert LatentDataset(cache, clip_chunks=10, min_revisit_chunks=2, window_chunks=2).windows == [(0, 2), (1, 2)]
    # a window from chunk 3 holds s2's second chunk but not its first: the revisit would read the wrong
    # first-visit chunk (generation always starts at chunk 0), so it is not a training window
    assert LatentDataset(cache, clip_chunks=9, min_revisit_chunks=1, window_chunks=2).windows == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="no window"):  # s2 has not left a 9-chunk window by chunk 11
        LatentDataset(cache, clip_chunks=10, min_revisit_chunks=1, window_chunks=9)
    # memory keys are the key texts' embeddings, not the full prompts'
    text = load_text_encoder("minilm")
    compiled = compile_narrative(_tour(), fps=8, chunk_frames=2, vae_temporal=4)
    want = text.encode(compiled.key_texts[:1]).pooled[0]
    assert torch.allclose(whole[0]["pooled"][0], want, atol=1e-5)


def test_a_window_cuts_a_segment_only_when_it_starts_inside_it() -> None:
    from egolcd.data.latent_dataset import window_cuts_segment

    segments = [0, 0, 1, 1, 1, 2, 2, 3, 1]  # chunk 8 revisits segment 1 (chunks 2-4)
    assert not window_cuts_segment(segments, 0, (1, 3))
    assert not window_cuts_segment(segments, 2, (1, 3))  # starts at segment 1's first chunk
    assert window_cuts_segment(segments, 3, (1, 3))  # inside it: the revisit would read the wrong chunk
    assert window_cuts_segment(segments, 4, (1, 3))
    assert not window_cuts_segment(segments, 5, (1, 3))  # segment 1 ended just before: not in the window
    assert not window_cuts_segment(segments, 6, (1, 3))  # inside segment 2, which is neither


def _tour():
    from egolcd.narrative import parse_narrative

    return parse_narrative(yaml.safe_dump(TOUR), "yaml")


def test_training_and_generation_see_the_same_context_layout(tmp_path: Path) -> None:
    """A clip's teacher-forced contexts == the contexts of generating the same narrative (slots, offsets,
    forced revisit entries counted inside top_m, current segment skipped)."""
    pipe = EgoLCDPipeline.from_preset("tiny")
    narrative = _tour()
    result = pipe(narrative, tmp_path / "v.mp4", steps=1, progress=False)
    compiled = compile_narrative(narrative, fps=8, chunk_frames=pipe.chunk_frames, vae_temporal=4)
    n = compiled.num_chunks
    emb = pipe.text_encoder.encode(compiled.prompts)
    keys = pipe.text_encoder.encode(compiled.key_texts).pooled
    segs = compiled.chunk_segments
    k = pipe.chunk_frames
    x0 = torch.randn(1, pipe.vae.latent_channels, n * k, 8, 8)
    policy = MemoryPolicy(pipe.config.memory, k)
    with torch.no_grad():
        out = teacher_forcing_loss(pipe.transformer, policy, x0, torch.randn_like(x0), torch.full((1, n), 0.5),
                                   [emb.tokens[s : s + 1] for s in segs], [keys[s : s + 1] for s in segs], segs,
                                   compiled.revisits)

    def layout(spans):
        return [(s["kind"], s["chunk"], s["segment"], s["tokens"]) for s in spans]

    train_layouts = [layout(c.describe()) for c in out.contexts]
    infer_layouts = [layout(c.context) for c in result.chunks]
    assert train_layouts == infer_layouts
    top_m = pipe.config.memory.top_m
    revisit_chunk = next(c for c, s in enumerate(segs) if s in compiled.revisits)
    retrieved = [s for s in result.chunks[revisit_chunk].context if s["kind"] == "retrieved"]
    assert 0 < len(retrieved) <= top_m
    assert any(s["segment"] == compiled.revisits[segs[revisit_chunk]] for s in retrieved)  # forced in
    for c, report in enumerate(result.chunks):  # top-m never spends a slot on the chunk's own segment
        assert all(s["segment"] != segs[c] for s in report.context if s["kind"] == "retrieved")


def test_memory_keys_tell_places_apart_better_than_prompts() -> None:
    compiled = compile_narrative(_tour(), fps=8, chunk_frames=2, vae_temporal=4)
    text = load_text_encoder("minilm")

    def cos(pooled, i, j):
        return float(torch.nn.functional.cosine_similarity(pooled[i], pooled[j], dim=0))

    keys = text.encode(compiled.key_texts).pooled
    prompts = text.encode(compiled.prompts).pooled
    # s6 (revisit of the red ball, index 5) vs s2 (the red ball, 1) and vs s4 (the junction, 3)
    assert cos(keys, 5, 1) - cos(keys, 5, 3) > cos(prompts, 5, 1) - cos(prompts, 5, 3)
    assert cos(keys, 5, 1) > cos(keys, 5, 3)
    assert "a maze" not in compiled.key_texts[1]  # no scene sentence in the key


def test_policy_mix_is_deterministic_per_step_and_validated() -> None:
    cfg = train_config_from_dict(dict(output_dir="x", preset="tiny", policy_mix={"egolcd": 0.6, "dense": 0.2,
                                                                                 "window": 0.2}))
    draws = [cfg.policy_for_step(s) for s in range(400)]
    assert draws == [cfg.policy_for_step(s) for s in range(400)]
    assert set(draws) == {"egolcd", "dense", "window"} and 0.5 < draws.count("egolcd") / 400 < 0.7
    with pytest.raises(ValueError, match="policy_mix.bogus"):
        train_config_from_dict(dict(output_dir="x", policy_mix={"bogus": 1.0}))
    with pytest.raises(ValueError, match="clip_chunks"):
        train_config_from_dict(dict(output_dir="x", clip_chunks=0))
    assert train_config_from_dict(dict(output_dir="x", preset="tiny")).policy_for_step(3) == "egolcd"


def test_pose_paired_revisit_scores() -> None:
    # a camera turning on the spot at place A (frames 0-9), then at place B (10-19), then at A again (20-29)
    yaw = np.tile(np.linspace(-np.pi, np.pi, 10, endpoint=False), 3)
    pos = np.repeat([[0.0, 0.0], [5.0, 0.0], [0.0, 0.0]], 10, axis=0)
    poses = np.concatenate([pos, np.zeros((30, 1)), yaw[:, None], np.zeros((30, 1))], axis=1)
    pairs = revisit_pairs(poses, (20, 30), (0, 10))
    assert pairs.tolist() == [[20 + i, i] for i in range(10)]
    chance = chance_pairs(poses, (20, 30), [(10, 20)])
    assert chance.tolist() == [[20 + i, 10 + i] for i in range(10)]
    rng = np.random.default_rng(0)
    place_a, place_b = rng.integers(0, 255, (10, 8, 8, 3)), rng.integers(0, 255, (10, 8, 8, 3))
    frames = np.concatenate([place_a, place_b, place_a]).astype(np.uint8)
    assert paired_psnr(frames, pairs) > 70 and paired_psnr(frames, chance) < 15
    mean, lo, hi = bootstrap_mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and 1.0 <= lo < mean < hi <= 4.0


def test_scored_chunks_put_recall_first_and_leave_memory_writes_unchanged() -> None:
    """``loss.scored_chunks``: revisit chunks are always scored, the rest drawn; unscored chunks still
    write memory, so every context (and the scored chunks' losses) equal those of a fully scored clip."""
    import random

    from egolcd.losses import scored_chunks

    segs, revisits = [0, 0, 1, 1, 2, 2, 3, 3], {3: 1}
    picks = scored_chunks(segs, revisits, 4, random.Random(0))
    assert picks is not None and len(picks) == 4 and {6, 7} <= set(picks)
    assert scored_chunks(segs, revisits, None, random.Random(0)) is None
    assert scored_chunks(segs, revisits, 8, random.Random(0)) is None
    assert scored_chunks(segs, revisits, 1, random.Random(0)) in ([6], [7])
    with pytest.raises(ValueError, match="scored_chunks"):
        train_config_from_dict(dict(output_dir="x", loss={"scored_chunks": 0}))

    torch.manual_seed(0)
    pipe = EgoLCDPipeline.from_preset("tiny")
    k, n = pipe.chunk_frames, len(segs)
    x0 = torch.randn(1, pipe.vae.latent_channels, n * k, 8, 8)
    eps, t = torch.randn_like(x0), torch.rand(1, n)
    text = [torch.randn(1, 4, pipe.transformer.config.text_dim) for _ in range(n)]
    keys = [torch.randn(1, 8) for _ in range(n)]
    policy = MemoryPolicy(pipe.config.memory, k)
    with torch.no_grad():
        full = teacher_forcing_loss(pipe.transformer, policy, x0, eps, t, text, keys, segs, revisits)
        part = teacher_forcing_loss(pipe.transformer, policy, x0, eps, t, text, keys, segs, revisits, scored=picks)
    assert [c.describe() for c in part.contexts] == [c.describe() for c in full.contexts]
    for i in range(n):
        if i in picks:
            torch.testing.assert_close(part.predictions[i], full.predictions[i])
        else:
            assert part.predictions[i] is None
    expected = torch.stack([(full.predictions[i] - (eps - x0)[:, :, i * k : (i + 1) * k]).square().mean()
                            for i in picks]).mean()
    torch.testing.assert_close(part.flow, expected)


def _copy_probe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "copy_probe.py"
    spec = importlib.util.spec_from_file_location("copy_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copy_probe_baseline_is_the_no_information_optimum():
    """The probe's baseline is the loss of the best estimate of v from x_t alone: check it by regression."""
    import torch

    probe = _copy_probe()
    g = torch.Generator().manual_seed(0)
    t = 0.5 + 0.5 * torch.rand(200_000, generator=g, dtype=torch.float64)
    x0, eps = torch.randn(2, 200_000, generator=g, dtype=torch.float64)
    x_t, v = (1 - t) * x0 + t * eps, eps - x0
    coef = (2 * t - 1) / ((1 - t) ** 2 + t**2)  # E[v | x_t] = coef * x_t for Gaussian x0, eps
    assert abs(((v - coef * x_t) ** 2).mean().item() - probe.no_info_loss(0.5)) < 0.02
    assert abs(probe.no_info_loss(0.999) - 1.0) < 0.01


def test_copy_probe_runs_the_training_path(tmp_path):
    import argparse

    probe = _copy_probe()
    args = argparse.Namespace(preset="tiny", source="memory", revisit_position="current", steps=3, lr=1e-3, latent=8,
                              t_min=0.5, qk_norm_init=1.0, positional_init=1.0, positional_heads=1, seed=0, threads=1, out=None)
    result = probe.run(args)
    assert len(result["losses"]) == 3 and all(x == x for x in result["losses"])
    assert result["copy_fraction"] == 1 - result["final_loss"] / result["no_info_loss"]


def test_create_model_position_heads_peak_at_relative_position_zero(tmp_path, capsys):
    """`create-model --position-heads 1`: head 0 of every block starts attending to its own frame and place."""
    import torch

    from egolcd.attention import rope_cos_sin
    from egolcd.cli import main
    from egolcd.transformer import EgoLCDTransformer3DModel

    assert main(["create-model", str(tmp_path / "m"), "--preset", "tiny", "--position-heads", "1"]) == 0
    model = EgoLCDTransformer3DModel.from_pretrained(str(tmp_path / "m" / "transformer"))
    d = model.config.attention_head_dim
    attn = model.blocks[0].attn1
    q, k = attn.norm_q(attn.to_q.bias[None])[0, :d], attn.norm_k(attn.to_k.bias[None])[0, :d]
    grid = torch.tensor([[(f, h, w) for f in range(-6, 7) for h in range(-3, 4) for w in range(-3, 4)]])
    cos, sin = rope_cos_sin(grid, d)
    pairs = lambda x: x.view(-1, 2)  # noqa: E731
    qc = torch.view_as_complex(pairs(q).contiguous())
    kc = torch.view_as_complex(pairs(k).contiguous())
    rot = torch.complex(cos[0, :, 0, ::2], sin[0, :, 0, ::2])  # (T, d/2)
    logits = (qc * (kc * rot).conj()).real.sum(-1)  # q . R(delta) k for every relative position delta
    best = grid[0, logits.argmax()].tolist()
    assert best == [0, 0, 0]
    assert logits.max() - logits.topk(2).values[1] > 0.5  # a clear peak, not a plateau
    # --init-from: a trained model keeps every weight but the chosen heads' q/k
    assert main(["create-model", str(tmp_path / "r"), "--preset", "tiny", "--seed", "3"]) == 0
    assert main(["create-model", str(tmp_path / "s"), "--init-from", str(tmp_path / "r"), "--position-heads", "1"]) == 0
    before = EgoLCDTransformer3DModel.from_pretrained(str(tmp_path / "r" / "transformer")).state_dict()
    after = EgoLCDTransformer3DModel.from_pretrained(str(tmp_path / "s" / "transformer")).state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".attn1.to_q." in n or ".attn1.to_k." in n or ".attn1.norm_" in n for n in changed)
    assert torch.equal(before["blocks.0.attn1.to_q.weight"][d:], after["blocks.0.attn1.to_q.weight"][d:])
    assert main(["create-model", str(tmp_path / "t"), "--init-from", str(tmp_path / "r")]) != 0
    # hostile: not with released weights, and never more heads than the model has
    assert main(["create-model", str(tmp_path / "w"), "--from-wan", str(tmp_path), "--position-heads", "1"]) != 0
    assert main(["create-model", str(tmp_path / "x"), "--preset", "tiny", "--position-heads", "9"]) != 0
    assert "position heads" in capsys.readouterr().err
