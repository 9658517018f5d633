"""Training the embedded VAE: reconstruction improves, latent statistics are written, the result loads."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from egolcd.cli import main
from egolcd.pipeline import EgoLCDPipeline
from egolcd.vae import VideoVAE
from egolcd.vae_train import VAETrainConfig, _batch, _load_clips, train_vae
from egolcd.video_io import VideoWriter


def make_dataset(root, n=3, frames=13, size=64):
    (root / "videos").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        vid = f"clip{i}_0_{frames}"
        base = rng.integers(0, 255, 3)
        with VideoWriter(root / "videos" / f"{vid}.mp4", fps=8, width=size, height=size) as w:
            for t in range(frames):
                img = np.zeros((size, size, 3), np.uint8) + base.astype(np.uint8)
                img[16 + t : 32 + t, 10:30] = 255 - base
                w.write(img[None])
        rows.append({"video_id": vid, "frame_num": frames, "fps": 8, "llava_cap": "A room. The camera moves.",
                     "name": "room", "noun_cls": "room", "verb_cls": "move"})
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_train_vae_improves_reconstruction_and_sets_statistics(tmp_path):
    torch.manual_seed(0)
    data = make_dataset(tmp_path / "data")
    cfg = VAETrainConfig(data=str(data), out=str(tmp_path / "vae"), preset="tiny", steps=40, lr=2e-3,
                         batch_size=1, log_every=100, chunks_per_clip=2)
    clips = _load_clips(cfg)
    x = _batch(clips, 2, 5, torch.Generator().manual_seed(1))
    from egolcd.config import PRESETS
    from egolcd.vae import embedded_vae_config

    before = VideoVAE.from_config_dict(embedded_vae_config(PRESETS["tiny"]), seed=0)
    err_before = (before.decode(before.encode(x)) - x).abs().mean().item()
    out = train_vae(cfg)
    after = VideoVAE.from_pretrained(out)
    err_after = (after.decode(after.encode(x)) - x).abs().mean().item()
    assert err_after < 0.7 * err_before, (err_before, err_after)
    std = torch.tensor(after.model.config.latents_std)
    assert std.shape == (4,) and not torch.allclose(std, torch.ones(4))
    # normalised latents of the data are roughly unit scale
    z = after.encode(x)
    assert 0.3 < z.std().item() < 3.0
    # a model built around the trained VAE loads through the pipeline
    assert main(["create-model", str(tmp_path / "model"), "--preset", "tiny", "--vae", str(out)]) == 0
    pipe = EgoLCDPipeline.from_pretrained(tmp_path / "model")
    assert pipe.vae.model.config.latents_std == after.model.config.latents_std


def test_train_vae_with_more_latent_channels(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    out = train_vae(VAETrainConfig(data=str(data), out=str(tmp_path / "vae"), preset="tiny", steps=2, batch_size=1,
                                   log_every=100, chunks_per_clip=2, latent_channels=6, base_dim=8))
    vae = VideoVAE.from_pretrained(out)
    assert vae.model.config.z_dim == 6 and vae.model.config.base_dim == 8 and len(vae.model.config.latents_std) == 6
    assert vae.latent_channels == 6
    assert main(["train-vae", str(data), "--out", str(tmp_path / "bad"), "--preset", "tiny", "--init", str(out),
                 "--latent-channels", "8"]) == 2  # a new width, not a continued VAE: one clear error
    assert not (tmp_path / "bad").exists()


def _train_cut_off(monkeypatch, config: VAETrainConfig, at_batch: int = 5) -> None:
    """Run ``train_vae(config)`` and interrupt it (as Ctrl-C would) when it draws its ``at_batch``-th batch."""
    import egolcd.vae_train as vt

    real_batch, calls = vt._batch, {"n": 0}

    def cut_off(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_batch:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(vt, "_batch", cut_off)
    with pytest.raises(KeyboardInterrupt):
        train_vae(config)
    monkeypatch.setattr(vt, "_batch", real_batch)


def test_train_vae_resumes_bit_for_bit(tmp_path, monkeypatch):
    """A run cut off after its step-3 checkpoint and resumed ends with the weights of an uninterrupted run."""
    data = make_dataset(tmp_path / "data", n=2)

    def config(out, **kw):
        return VAETrainConfig(data=str(data), out=str(out), preset="tiny", steps=6, batch_size=1, lr=2e-3,
                              log_every=100, chunks_per_clip=2, checkpoint_every=3, lr_schedule="cosine",
                              loss="mse", **kw)

    whole = VideoVAE.from_pretrained(train_vae(config(tmp_path / "whole")))
    _train_cut_off(monkeypatch, config(tmp_path / "cut"))
    assert (tmp_path / "cut" / "checkpoint" / "vae_train_state.json").is_file()
    # resuming with other settings than the checkpoint's is one clear error, and the checkpoint stays
    assert main(["train-vae", str(data), "--out", str(tmp_path / "cut"), "--preset", "tiny", "--resume",
                 "--loss", "l1"]) == 2
    assert (tmp_path / "cut" / "checkpoint" / "vae_train_state.json").is_file()
    resumed = VideoVAE.from_pretrained(train_vae(config(tmp_path / "cut", resume=True)))
    assert not (tmp_path / "cut" / "checkpoint").exists()  # removed once the VAE is saved
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.model.config.latents_std == resumed.model.config.latents_std


def test_decoder_only_resumes_bit_for_bit_and_keeps_the_encoder(tmp_path, monkeypatch):
    """A decoder-only run (`--decoder-only`): continued from a trained VAE, cut off, resumed (with init given again)
    to the weights of an uninterrupted run; encoder, quant_conv and latent statistics stay the init's."""
    data = make_dataset(tmp_path / "data", n=2)
    base = train_vae(VAETrainConfig(data=str(data), out=str(tmp_path / "base"), preset="tiny", steps=2,
                                    batch_size=1, log_every=100, chunks_per_clip=2))

    def config(out, **kw):
        return VAETrainConfig(data=str(data), out=str(out), preset="tiny", steps=6, batch_size=1, lr=2e-3,
                              log_every=100, chunks_per_clip=2, checkpoint_every=3, init=str(base),
                              decoder_only=True, **kw)

    whole = VideoVAE.from_pretrained(train_vae(config(tmp_path / "whole")))
    _train_cut_off(monkeypatch, config(tmp_path / "cut"))
    resumed = VideoVAE.from_pretrained(train_vae(config(tmp_path / "cut", resume=True)))
    base_vae = VideoVAE.from_pretrained(base)
    init = base_vae.model.state_dict()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        if not key.startswith(("decoder.", "post_quant_conv.")):
            assert torch.equal(a[key], init[key]), key  # the encoder side, hence the latents, unchanged
    assert any(not torch.equal(a[k], init[k]) for k in a if k.startswith("decoder."))
    assert whole.model.config.latents_std == base_vae.model.config.latents_std


def test_train_vae_rejects_unknown_choices(tmp_path):
    data = make_dataset(tmp_path / "data", n=1)
    with pytest.raises(ValueError, match="posterior must be one of"):
        train_vae(VAETrainConfig(data=str(data), out=str(tmp_path / "v"), preset="tiny", posterior="mean"))
    with pytest.raises(ValueError, match="fewer than crop_frames=17"):  # 13-frame clips
        train_vae(VAETrainConfig(data=str(data), out=str(tmp_path / "v"), preset="tiny", crop_frames=17,
                                 chunks_per_clip=2))
    # a 2x VAE's 11 frames are whole latent frames, but diffusers' encode reads 4 at a time: refused up front
    with pytest.raises(ValueError, match="crop_frames must be 4k \\+ 1, got 11"):
        train_vae(VAETrainConfig(data=str(data), out=str(tmp_path / "v"), preset="demo-t2", crop_frames=11))
    assert not (tmp_path / "v").exists()


def test_train_vae_cli_defaults_are_the_config_defaults():
    """The parser repeats the defaults (it must not import torch); they may not drift apart. Its choices are
    config.VAE_TRAIN_CHOICES, which VAETrainConfig checks."""
    from dataclasses import MISSING, fields

    from egolcd.cli import build_parser
    from egolcd.config import VAE_TRAIN_CHOICES

    args = build_parser().parse_args(["train-vae", "data", "--out", "out"])
    compared = 0
    for f in fields(VAETrainConfig):
        if f.default is not MISSING and hasattr(args, f.name) and f.name not in ("data", "out"):
            assert getattr(args, f.name) == f.default, f.name
            compared += 1
    assert compared >= 12
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["train-vae"]._actions}
    for name, choices in VAE_TRAIN_CHOICES.items():
        assert tuple(actions[name].choices) == choices, name


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_two_processes_take_the_steps_of_one_and_resume_a_one_process_checkpoint(tmp_path, monkeypatch,
                                                                                  egolcd_processes):
    """Two processes split every global batch of 2 crops: a run cut off after its step-3 checkpoint in one
    process and finished in two ends with (up to float summation order) the weights of an uninterrupted
    one-process run, and with its latent statistics."""
    data = make_dataset(tmp_path / "data", n=2)

    def config(out, **kw):
        return VAETrainConfig(data=str(data), out=str(out), preset="tiny", steps=6, batch_size=2, lr=2e-3,
                              log_every=100, chunks_per_clip=2, checkpoint_every=3, crop_frames=5, **kw)

    whole = VideoVAE.from_pretrained(train_vae(config(tmp_path / "whole")))
    _train_cut_off(monkeypatch, config(tmp_path / "cut"))
    egolcd_processes(2, "train-vae", str(data), "--out", str(tmp_path / "cut"), "--preset", "tiny", "--steps", "6",
                     "--batch-size", "2", "--lr", "2e-3", "--chunks-per-clip", "2", "--checkpoint-every", "3",
                     "--crop-frames", "5", "--threads", "1", "--resume")
    assert not (tmp_path / "cut" / "checkpoint").exists()
    resumed = VideoVAE.from_pretrained(tmp_path / "cut")
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    moved = 0
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
        moved += not torch.equal(a[key], b[key])
    assert moved, "two processes gave bit-identical weights: the gradients were not computed in halves"
    assert resumed.model.config.latents_std == pytest.approx(whole.model.config.latents_std, rel=1e-3)
    # a global batch the processes cannot split is one clear error
    with pytest.raises(AssertionError, match="batch_size must be a positive multiple of the 2 processes"):
        egolcd_processes(2, "train-vae", str(data), "--out", str(tmp_path / "odd"), "--preset", "tiny",
                         "--batch-size", "3")
    assert not (tmp_path / "odd").exists()


def test_bf16_autocast_trains_and_is_part_of_the_checkpoint(tmp_path, monkeypatch):
    """``precision="bf16"``: the encoder and decoder run in bf16 (the saved weights stay float32), the
    reconstruction improves, and a bf16 checkpoint refuses to resume in fp32."""
    data = make_dataset(tmp_path / "data", n=2)

    def config(out, **kw):
        return VAETrainConfig(data=str(data), out=str(out), preset="tiny", steps=40, batch_size=1, lr=2e-3,
                              log_every=100, chunks_per_clip=2, checkpoint_every=3, crop_size=32, **kw)

    clips = _load_clips(config(tmp_path / "x"))
    x = _batch(clips, 2, 5, torch.Generator().manual_seed(1))
    from egolcd.config import PRESETS
    from egolcd.vae import embedded_vae_config

    before = VideoVAE.from_config_dict(embedded_vae_config(PRESETS["tiny"]), seed=0)
    err_before = (before.decode(before.encode(x)) - x).abs().mean().item()
    fp32 = VideoVAE.from_pretrained(train_vae(config(tmp_path / "fp32")))
    bf16 = VideoVAE.from_pretrained(train_vae(config(tmp_path / "bf16", precision="bf16")))
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    err = {n: (v.decode(v.encode(x)) - x).abs().mean().item() for n, v in (("fp32", fp32), ("bf16", bf16))}
    assert err["bf16"] < 0.9 * err_before, (err_before, err)
    assert abs(err["bf16"] - err["fp32"]) < 0.1 * err["fp32"], err  # as good as fp32 at equal steps
    assert any(not torch.equal(p, q) for p, q in zip(fp32.model.parameters(), bf16.model.parameters()))
    _train_cut_off(monkeypatch, config(tmp_path / "cut", precision="bf16"), at_batch=4)
    with pytest.raises(ValueError, match="precision 'bf16' -> 'fp32'"):
        train_vae(config(tmp_path / "cut", resume=True))
