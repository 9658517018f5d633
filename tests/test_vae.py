"""VideoVAE: loading, shapes, latent normalisation, streaming (tiny AutoencoderKLWan, CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from egolcd.config import PRESETS
from egolcd.vae import (
    EMBEDDED_VAE_CONFIGS,
    StreamingDecoder,
    StreamingEncoder,
    VideoVAE,
    build_vae,
)

MEAN = [0.3, -0.2, 0.1, 0.5]
STD = [2.0, 0.5, 1.5, 3.0]


def _tiny_config(**overrides: object) -> dict:
    cfg = dict(EMBEDDED_VAE_CONFIGS["tiny"])
    cfg.update(latents_mean=MEAN, latents_std=STD)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    return VideoVAE.from_config_dict(_tiny_config(), seed=0)


def _video(t: int = 9, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(MEAN).view(1, 4, 1, 1, 1), torch.tensor(STD).view(1, 4, 1, 1, 1)


def test_embedded_configs_match_presets() -> None:
    for name, cfg in EMBEDDED_VAE_CONFIGS.items():
        assert cfg["z_dim"] == PRESETS[name].latent_channels
        assert cfg["scale_factor_spatial"] == PRESETS[name].vae_spatial
        assert cfg["scale_factor_temporal"] == PRESETS[name].vae_temporal
        # Wan's stages: 8x = three downsamples (time in the last two), 4x = two (both in time, or the first only)
        want = {(8, 4): [False, True, True], (4, 4): [True, True], (4, 2): [True, False]}[
            cfg["scale_factor_spatial"], cfg["scale_factor_temporal"]
        ]
        assert cfg["temperal_downsample"] == want and len(cfg["dim_mult"]) == len(want) + 1
        assert cfg["latents_mean"] == [0.0] * cfg["z_dim"] and cfg["latents_std"] == [1.0] * cfg["z_dim"]


def test_from_pretrained_matches_in_memory(vae: VideoVAE, tmp_path: Path) -> None:
    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "config.json").is_file()
    assert list((tmp_path / "vae").glob("*.safetensors"))
    loaded = VideoVAE.from_pretrained(tmp_path / "vae")
    ref, got = vae.model.state_dict(), loaded.model.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert list(loaded.model.config.latents_std) == STD
    video = _video(5)
    torch.testing.assert_close(loaded.encode(video), vae.encode(video), rtol=0, atol=0)
    # A pipeline root with the VAE in vae/ loads the same way.
    assert VideoVAE.from_pretrained(tmp_path).latent_channels == 4


def test_shapes_and_geometry() -> None:
    vae = build_vae(PRESETS["tiny"], None)
    assert (vae.latent_channels, vae.temporal_factor, vae.spatial_factor) == (4, 4, 8)
    latents = vae.encode(_video(9))
    assert latents.shape == (1, 4, 3, 8, 8)
    video = vae.decode(latents)
    assert video.shape == (1, 3, 9, 64, 64)
    assert video.min() >= -1 and video.max() <= 1
    assert vae.num_latent_frames(17) == 5 and vae.num_pixel_frames(5) == 17


def test_normalisation_matches_wan_pipeline(vae: VideoVAE) -> None:
    video = _video(9, h=32, w=32)
    mean, std = _stats()
    raw = vae.model.encode(video).latent_dist.mode()
    latents = vae.encode(video)
    torch.testing.assert_close(latents, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    # WanPipeline: latents / (1 / std) + mean before vae.decode
    expected = vae.model.decode(latents / (1.0 / std) + mean, return_dict=False)[0]
    torch.testing.assert_close(vae.decode(latents), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(vae.denormalize(vae.normalize(raw)), raw, rtol=1e-5, atol=1e-6)


def test_sampled_encode_is_seeded(vae: VideoVAE) -> None:
    video = _video(5)
    a = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, vae.encode(video))


def test_streaming_decode_equals_full_decode(vae: VideoVAE) -> None:
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 5, 4, 4, generator=g)
    full = vae.decode(latents)
    dec = StreamingDecoder(vae)
    chunks = [dec.decode_chunk(c) for c in latents.split([1, 3, 1], dim=2)]
    assert [c.shape[2] for c in chunks] == [1, 12, 4]
    streamed = torch.cat(chunks, dim=2)
    assert streamed.shape == full.shape == (1, 3, 17, 32, 32)
    assert (streamed - full).abs().max().item() < 1e-4
    # reset() starts a new video; a full decode in between does not disturb the stream.
    dec.reset()
    first = dec.decode_chunk(latents[:, :, :2])
    vae.decode(latents)
    second = dec.decode_chunk(latents[:, :, 2:])
    assert (torch.cat([first, second], dim=2) - full).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="differs"):
        dec.decode_chunk(torch.zeros(1, 4, 1, 8, 8))


def test_streaming_encode_equals_full_encode(vae: VideoVAE) -> None:
    video = _video(17, h=32, w=32, seed=4)
    full = vae.encode(video)
    enc = StreamingEncoder(vae)
    streamed = torch.cat([enc.encode_chunk(c) for c in video.split([5, 8, 4], dim=2)], dim=2)
    assert streamed.shape == full.shape == (1, 4, 5, 4, 4)
    assert (streamed - full).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="multiple of 4"):
        enc.encode_chunk(video[:, :, :3])


def test_two_x_temporal_vae_encodes_any_2k_plus_1_frames_causally() -> None:
    """The demo-t2 VAE (2x in time): 2k + 1 frames encode to 1 + k latents, also when diffusers' own encode (4
    frames at a time) would drop the tail; the pieces path equals diffusers' on 4k + 1 frames; encoding is
    causal; streaming decode equals full decode."""
    vae = VideoVAE.from_config_dict({**EMBEDDED_VAE_CONFIGS["demo-t2"], "base_dim": 8}, seed=0)
    assert vae.temporal_factor == 2 and vae.num_latent_frames(11) == 6
    video = _video(11, h=16, w=16, seed=5)
    z11 = vae.encode(video)  # 4k + 3 frames: encoded in pieces of 2
    z9 = vae.encode(video[:, :, :9])  # 4k + 1 frames: diffusers' encode
    assert z11.shape == (1, 8, 6, 4, 4) and z9.shape == (1, 8, 5, 4, 4)
    assert (z11[:, :, :5] - z9).abs().max().item() < 1e-4
    pieces = StreamingEncoder(vae).encode_chunk(video[:, :, :9])
    assert (pieces - z9).abs().max().item() < 1e-4
    full = vae.decode(z11)
    assert full.shape == (1, 3, 11, 16, 16)
    dec = StreamingDecoder(vae)
    streamed = torch.cat([dec.decode_chunk(c) for c in z11.split([3, 3], dim=2)], dim=2)
    assert (streamed - full).abs().max().item() < 1e-4


def test_bad_frame_count_raises_one_line(vae: VideoVAE) -> None:
    with pytest.raises(ValueError) as err:
        vae.encode(_video(8))
    assert "4k+1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_video(5, h=60))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 3, 2, 8, 8))


def test_missing_or_bad_path_raises(vae: VideoVAE, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        VideoVAE.from_pretrained(tmp_path / "nope")
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        VideoVAE.from_pretrained(tmp_path / "empty")
    # weights that do not fit the config
    vae.save_pretrained(tmp_path / "bad")
    cfg_path = tmp_path / "bad" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_dim"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        VideoVAE.from_pretrained(tmp_path / "bad")
    assert "\n" not in str(err.value)
    cfg["_class_name"] = "AutoencoderKL"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="expected AutoencoderKLWan"):
        VideoVAE.from_pretrained(tmp_path / "bad")


def test_build_vae(vae: VideoVAE, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="path"):
        build_vae(PRESETS["wan2.1-1.3b"], None)
    with caplog.at_level(logging.WARNING, logger="egolcd.vae"):
        a = build_vae(PRESETS["tiny"], None)
    assert "untrained" in caplog.text
    b = build_vae(PRESETS["tiny"], None)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    vae.save_pretrained(tmp_path / "tiny")
    assert build_vae(PRESETS["tiny"], tmp_path / "tiny").latent_channels == 4
    with pytest.raises(ValueError, match="latent channels"):
        build_vae(PRESETS["demo"], tmp_path / "tiny")
    with pytest.raises(ValueError, match="unknown VAE kind"):
        build_vae(PRESETS["tiny"].replace(vae="sdxl"), None)


def test_wraps_only_wan_autoencoder() -> None:
    with pytest.raises(TypeError):
        VideoVAE(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    assert isinstance(VideoVAE.from_config_dict(_tiny_config(), seed=1).model, AutoencoderKLWan)
