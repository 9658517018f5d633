"""egolcd create-model --from-wan: an egolcd model folder from a diffusers Wan2.1 folder or a converted DiT.

The diffusers Wan2.1 folder is built here at tiny sizes from diffusers' and transformers' own classes
(``WanTransformer3DModel``, ``AutoencoderKLWan``, ``UMT5EncoderModel``, a saved tokenizer, the scheduler,
``model_index.json``), as diffusers' tests do: no network, nothing downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_convert import original_wan_state

from egolcd.cli import main
from egolcd.config import PRESETS

# Tiny Wan2.1: 16 latent channels and the 8x/4x VAE of the real one, so the wan2.1-1.3b preset's
# geometry holds; a 32-d umT5.
T_DIM, T_HEADS, T_TEXT = 24, 2, 32

NARRATIVE = """\
fps: 8
width: 32
height: 32
segments:
  - {id: sink, seconds: 1, action: rinses a mug}
  - {id: stove, seconds: 1, action: turns to the stove}
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


def _tiny_wan_diffusers(root: Path) -> Path:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from egolcd.text import _minilm_dir

    torch.manual_seed(0)
    WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=T_HEADS, attention_head_dim=T_DIM // T_HEADS, in_channels=16,
        out_channels=16, text_dim=T_TEXT, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ).save_pretrained(root / "transformer")
    AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
    ).save_pretrained(root / "vae")
    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_dir()), local_files_only=True)
    UMT5EncoderModel(
        UMT5Config(d_model=T_TEXT, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=tokenizer.vocab_size)
    ).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        root / "scheduler"
    )
    index = {
        "_class_name": "WanPipeline", "_diffusers_version": "0.33.0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def wan_src(tmp_path_factory) -> Path:
    return _tiny_wan_diffusers(tmp_path_factory.mktemp("Wan2.1-T2V-tiny-Diffusers"))


def _config(model: Path) -> dict:
    return json.loads((model / "egolcd_config.json").read_text())


def test_from_wan_diffusers_folder_links_and_generates(wan_src, tmp_path):
    from diffusers import WanTransformer3DModel

    from egolcd.pipeline import EgoLCDPipeline

    model = tmp_path / "model"
    assert main(["create-model", str(model), "--from-wan", str(wan_src), "--preset", "wan2.1-1.3b"]) == 0
    # large files are hard links to the source (same filesystem), not copies
    for part, name in (("transformer", "diffusion_pytorch_model.safetensors"),
                       ("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        assert os.path.samestat(os.stat(model / part / name), os.stat(wan_src / part / name)), part
    assert (model / "tokenizer" / "tokenizer_config.json").is_file()
    cfg = _config(model)
    preset = PRESETS["wan2.1-1.3b"]
    assert cfg["preset"] == "wan2.1-1.3b" and cfg["text_encoder"] == "umt5" and cfg["text_max_length"] == 512
    assert cfg["memory"] == json.loads(json.dumps(preset.memory.__dict__))
    assert (cfg["sampler"], cfg["steps"], cfg["guidance"], cfg["shift"]) == ("unipc", 50, 5.0, 5.0)
    assert cfg["denoising_step_list"] is None
    tcfg = json.loads((model / "transformer" / "config.json").read_text())
    assert tcfg["chunk_frames"] == preset.chunk_frames == 3
    # the weights are Wan's, unchanged, and the pipeline takes its umT5 from the folder
    pipe = EgoLCDPipeline.from_pretrained(model)
    wan = WanTransformer3DModel.from_pretrained(str(wan_src / "transformer"))
    ours = pipe.transformer.state_dict()
    assert set(ours) == set(wan.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in wan.state_dict().items())
    assert pipe.text_encoder.dim == T_TEXT and pipe.vae.latent_channels == 16
    # end to end through the CLI
    narrative = tmp_path / "n.yaml"
    narrative.write_text(NARRATIVE)
    out = tmp_path / "wan.mp4"
    assert main(["generate", str(narrative), "-o", str(out), "--model", str(model), "--steps", "2",
                 "--guidance", "1", "-q"]) == 0
    assert out.stat().st_size > 0


def test_from_wan_copy_and_symlink_modes(wan_src, tmp_path):
    weights = "diffusion_pytorch_model.safetensors"
    assert main(["create-model", str(tmp_path / "c"), "--from-wan", str(wan_src), "--preset", "wan2.1-1.3b",
                 "--link", "copy"]) == 0
    assert not os.path.samestat(os.stat(tmp_path / "c" / "transformer" / weights), os.stat(wan_src / "transformer" / weights))
    assert main(["create-model", str(tmp_path / "s"), "--from-wan", str(wan_src), "--preset", "wan2.1-1.3b",
                 "--link", "symlink"]) == 0
    link = tmp_path / "s" / "vae" / weights
    assert link.is_symlink() and link.resolve() == (wan_src / "vae" / weights).resolve()
    # configs are never links (the transformer's is rewritten with chunk_frames)
    assert not (tmp_path / "s" / "transformer" / "config.json").is_symlink()


def test_converted_self_forcing_samples_distilled_by_default(wan_src, tmp_path, monkeypatch, encoded_frames):
    """A Self-Forcing-style .pt, converted, with Wan's VAE and umT5: the folder's config holds the step list
    and shift, and `egolcd generate --model` (no --sampler, no --steps) samples with the distilled sampler on
    that schedule."""
    from egolcd import flow
    from egolcd.pipeline import EgoLCDPipeline, sampling_sigmas

    sd = original_wan_state(seed=50, in_ch=16, out_ch=16, text_dim=T_TEXT)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "sf.pt")
    conv = tmp_path / "sf-transformer"
    assert main(["convert", str(tmp_path / "sf.pt"), str(conv), "--from", "self-forcing", "--ema",
                 "--num-heads", str(T_HEADS)]) == 0
    model = tmp_path / "sf"
    assert main(["create-model", str(model), "--from-wan", str(wan_src), "--transformer", str(conv),
                 "--preset", "wan2.1-1.3b"]) == 0
    cfg = _config(model)
    assert (cfg["sampler"], cfg["steps"], cfg["shift"], cfg["guidance"]) == ("distilled", 4, 5.0, 1.0)
    assert cfg["denoising_step_list"] == [1000, 750, 500, 250] and cfg["warp_denoising_step"] is True
    assert (model / "transformer" / "egolcd_distillation.json").is_file()
    pipe = EgoLCDPipeline.from_pretrained(model)
    torch.testing.assert_close(sampling_sigmas(pipe.config, "distilled", 4),
                               flow.distilled_sigmas([1000, 750, 500, 250], 5.0, True))

    seen = []
    real = flow.SAMPLERS["distilled"]

    def spy(denoiser, x, sigmas, **kw):
        seen.append(torch.as_tensor(sigmas).clone())
        return real(denoiser, x, sigmas, **kw)

    monkeypatch.setitem(flow.SAMPLERS, "distilled", spy)
    narrative = tmp_path / "n.yaml"
    narrative.write_text(NARRATIVE)
    outs = []
    for name, extra in (("default.mp4", []), ("explicit.mp4", ["--sampler", "distilled", "--steps", "4"])):
        assert main(["generate", str(narrative), "-o", str(tmp_path / name), "--model", str(model), "--seed", "3",
                     "-q", *extra]) == 0
        outs.append(encoded_frames[name])
    assert seen and all(torch.equal(s, seen[0]) for s in seen)
    torch.testing.assert_close(seen[0], flow.distilled_sigmas([1000, 750, 500, 250], 5.0))
    assert len(outs[0]) > 0 and np.array_equal(outs[0], outs[1])  # frames to the encoder (see conftest)
    assert main(["generate", str(narrative), "-o", str(tmp_path / "euler.mp4"), "--model", str(model), "--seed", "3",
                 "-q", "--sampler", "euler"]) == 0
    assert not np.array_equal(encoded_frames["euler.mp4"], outs[0])


def test_causvid_step_list_is_taken_from_the_config(wan_src, tmp_path, monkeypatch):
    """CausVid's unwarped [1000, 757, 522] at shift 8 is not a get_sigmas schedule: the pipeline must take it
    from the config."""
    from egolcd import flow

    sd = original_wan_state(seed=51, in_ch=16, out_ch=16, text_dim=T_TEXT)
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "cv.pt")
    conv = tmp_path / "cv-transformer"
    assert main(["convert", str(tmp_path / "cv.pt"), str(conv), "--from", "causvid", "--num-heads", str(T_HEADS)]) == 0
    # the converted folder itself is the source: VAE and umT5 from the Wan folder
    model = tmp_path / "cv"
    assert main(["create-model", str(model), "--from-wan", str(conv), "--vae", str(wan_src), "--text-encoder",
                 str(wan_src), "--preset", "wan2.1-1.3b"]) == 0
    cfg = _config(model)
    assert (cfg["sampler"], cfg["steps"], cfg["shift"]) == ("distilled", 3, 8.0)
    assert cfg["denoising_step_list"] == [1000, 757, 522] and cfg["warp_denoising_step"] is False
    expected = flow.distilled_sigmas([1000, 757, 522], 8.0, warp=False)
    assert not torch.allclose(expected, flow.get_sigmas(3, 8.0))
    seen = []
    real = flow.SAMPLERS["distilled"]
    monkeypatch.setitem(flow.SAMPLERS, "distilled",
                        lambda d, x, s, **kw: (seen.append(torch.as_tensor(s).clone()), real(d, x, s, **kw))[1])
    narrative = tmp_path / "n.yaml"
    narrative.write_text(NARRATIVE)
    assert main(["generate", str(narrative), "-o", str(tmp_path / "cv.mp4"), "--model", str(model), "-q"]) == 0
    assert seen and all(torch.equal(s, expected) for s in seen)


def test_from_wan_errors_are_one_line(wan_src, tmp_path, capsys):
    def fails(*argv: str, match: str) -> None:
        capsys.readouterr()
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("egolcd: error: ") and match in err, err

    # the tiny transformer matches no Wan preset's sizes: --preset must name the defaults
    fails("create-model", str(tmp_path / "a"), "--from-wan", str(wan_src), match="matches no Wan preset")
    fails("create-model", str(tmp_path / "b"), "--from-wan", str(wan_src), "--preset", "tiny",
          match="needs a preset with a umT5")
    fails("create-model", str(tmp_path / "c"), "--from-wan", str(wan_src / "transformer"), "--preset",
          "wan2.1-1.3b", match="give the VAE")
    fails("create-model", str(tmp_path / "d"), "--from-wan", str(tmp_path / "nowhere"), match="folder not found")
    # a transformer of other latent channels than the VAE
    sd = original_wan_state(seed=52, in_ch=4, out_ch=4, text_dim=T_TEXT)
    torch.save(sd, tmp_path / "four.pt")
    assert main(["convert", str(tmp_path / "four.pt"), str(tmp_path / "four"), "--num-heads", str(T_HEADS)]) == 0
    fails("create-model", str(tmp_path / "e"), "--from-wan", str(wan_src), "--transformer", str(tmp_path / "four"),
          "--preset", "wan2.1-1.3b", match="latent channels")
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.assembling").exists()
    # an existing folder is kept unless --overwrite
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "keep").write_text("x")
    fails("create-model", str(tmp_path / "f"), "--from-wan", str(wan_src), "--preset", "wan2.1-1.3b",
          match="--overwrite")
    assert main(["create-model", str(tmp_path / "f"), "--from-wan", str(wan_src), "--preset", "wan2.1-1.3b",
                 "--overwrite"]) == 0
    assert not (tmp_path / "f" / "keep").exists()
    fails("create-model", str(tmp_path / "g"), "--transformer", str(wan_src), match="applies to --from-wan only")
    # the output never holds, nor sits inside, a source (--overwrite would delete it)
    fails("create-model", str(wan_src / "model"), "--from-wan", str(wan_src), "--preset", "wan2.1-1.3b",
          match="must not hold, or be inside")
    fails("create-model", str(tmp_path), "--from-wan", str(wan_src), "--transformer", str(tmp_path / "four"),
          "--preset", "wan2.1-1.3b", "--overwrite", match="must not hold, or be inside")
    assert (tmp_path / "four" / "config.json").is_file()


def test_match_preset_recognises_the_real_sizes():
    from egolcd.assemble import match_preset

    for name in ("wan2.1-1.3b", "wan2.1-14b"):
        assert match_preset(dict(PRESETS[name].transformer)) == name
    assert match_preset(dict(PRESETS["tiny"].transformer)) is None
