"""egolcd convert: original-layout Wan2.1 / Self-Forcing / CausVid / LongLive checkpoints -> diffusers folder.

The source checkpoints are written here with the *original* Wan2.1 parameter names spelled out (as in
``wan/modules/model.py``), never by inverting the converter's table, and every converted model is checked
against a reference forward computed directly from those original tensors (a functional reimplementation
of the original WanModel: its sinusoidal time embedding, complex-valued RoPE, modulation and head).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from egolcd.cli import main
from egolcd.convert import ConversionError, convert_checkpoint, load_original, map_key
from egolcd.transformer import EgoLCDTransformer3DModel

# The tiny preset's sizes (MiniLM text width 384), so a converted model also runs in a tiny pipeline.
DIM, HEADS, FFN, LAYERS, IN_CH, OUT_CH, TEXT_DIM, FREQ_DIM = 24, 2, 48, 2, 4, 4, 384, 32
PATCH = (1, 2, 2)
EPS = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


# --------------------------------------------------------------------------- original-layout checkpoints


def original_wan_state(
    seed: int = 0, cross_attn_norm: bool = True, layers: int = LAYERS, in_ch: int = IN_CH, out_ch: int = OUT_CH,
    text_dim: int = TEXT_DIM,
) -> dict[str, torch.Tensor]:
    """A random Wan2.1 T2V DiT state dict with the original release's key names."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def lin(name: str, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": rnd(out_f, in_f, scale=1 / math.sqrt(in_f)), f"{name}.bias": rnd(out_f, scale=0.05)}

    sd: dict[str, torch.Tensor] = {
        "patch_embedding.weight": rnd(DIM, in_ch, *PATCH, scale=0.3),
        "patch_embedding.bias": rnd(DIM, scale=0.05),
        **lin("text_embedding.0", DIM, text_dim),
        **lin("text_embedding.2", DIM, DIM),
        **lin("time_embedding.0", DIM, FREQ_DIM),
        **lin("time_embedding.2", DIM, DIM),
        **lin("time_projection.1", 6 * DIM, DIM),
        **lin("head.head", out_ch * math.prod(PATCH), DIM),
        "head.modulation": rnd(1, 2, DIM, scale=0.1),
    }
    for i in range(layers):
        b = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                sd.update(lin(f"{b}.{attn}.{proj}", DIM, DIM))
            sd[f"{b}.{attn}.norm_q.weight"] = 1 + rnd(DIM, scale=0.1)
            sd[f"{b}.{attn}.norm_k.weight"] = 1 + rnd(DIM, scale=0.1)
        if cross_attn_norm:
            sd[f"{b}.norm3.weight"] = 1 + rnd(DIM, scale=0.1)
            sd[f"{b}.norm3.bias"] = rnd(DIM, scale=0.05)
        sd.update(lin(f"{b}.ffn.0", FFN, DIM))
        sd.update(lin(f"{b}.ffn.2", DIM, FFN))
        sd[f"{b}.modulation"] = rnd(1, 6, DIM, scale=0.1)
    return sd


LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def original_lora_state(base: dict[str, torch.Tensor], rank: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A LongLive-style peft LoRA (``get_peft_model_state_dict`` names) on every Linear of every block."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        for target in LORA_TARGETS:
            w = base[f"blocks.{i}.{target}.weight"]
            out[f"base_model.model.blocks.{i}.{target}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
            out[f"base_model.model.blocks.{i}.{target}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
    return out


def merge_lora(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    merged = dict(base)
    for i in range(LAYERS):
        for target in LORA_TARGETS:
            a = lora[f"base_model.model.blocks.{i}.{target}.lora_A.weight"]
            b = lora[f"base_model.model.blocks.{i}.{target}.lora_B.weight"]
            merged[f"blocks.{i}.{target}.weight"] = base[f"blocks.{i}.{target}.weight"] + scale * b @ a
    return merged


# --------------------------------------------------------------------------- reference: the original WanModel


def _rope_freqs(head_dim: int) -> torch.Tensor:
    def params(dim: int) -> torch.Tensor:
        angles = torch.outer(
            torch.arange(1024, dtype=torch.float64),
            1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim),
        )
        return torch.polar(torch.ones_like(angles), angles)

    d = head_dim
    return torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1)


def _rope_apply(x: torch.Tensor, grid: tuple[int, int, int], freqs: torch.Tensor) -> torch.Tensor:
    b, n, h, d = x.shape
    f, hh, ww = grid
    c = d // 2
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    table = torch.cat(
        [
            ft[:f].view(f, 1, 1, -1).expand(f, hh, ww, -1),
            fh[:hh].view(1, hh, 1, -1).expand(f, hh, ww, -1),
            fw[:ww].view(1, 1, ww, -1).expand(f, hh, ww, -1),
        ],
        dim=-1,
    ).reshape(n, 1, -1)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, n, h, -1, 2))
    return torch.view_as_real(xc * table).flatten(3).float()


def wan_reference(
    sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, heads: int = HEADS
) -> torch.Tensor:
    """The original Wan2.1 T2V forward, written against the original parameter names."""
    sd = {k: v.float() for k, v in sd.items()}

    def linear(v: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(v, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def rms(v: torch.Tensor, name: str) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS) * sd[f"{name}.weight"]

    def attention(q, k, v):  # (B, N, h, d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)

    h = F.conv3d(x, sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=PATCH)
    b, dim, f, hh, ww = h.shape
    grid = (f, hh, ww)
    h = h.flatten(2).transpose(1, 2)
    head_dim = dim // heads
    freqs = _rope_freqs(head_dim)
    # time: sinusoidal_embedding_1d (cos, sin), time_embedding, time_projection
    half = FREQ_DIM // 2
    angles = t.to(torch.float64)[:, None] * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    sinus = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()
    e = linear(F.silu(linear(sinus, "time_embedding.0")), "time_embedding.2")
    e0 = linear(F.silu(e), "time_projection.1").unflatten(1, (6, dim))
    ctx = linear(F.gelu(linear(context, "text_embedding.0"), approximate="tanh"), "text_embedding.2")
    n = h.shape[1]
    for i in range(sum(1 for k in sd if k.startswith("blocks.") and k.endswith(".modulation"))):
        p = f"blocks.{i}"
        mod = (sd[f"{p}.modulation"] + e0).chunk(6, dim=1)
        y = F.layer_norm(h, (dim,), eps=EPS) * (1 + mod[1]) + mod[0]
        q = rms(linear(y, f"{p}.self_attn.q"), f"{p}.self_attn.norm_q").view(b, n, heads, head_dim)
        k = rms(linear(y, f"{p}.self_attn.k"), f"{p}.self_attn.norm_k").view(b, n, heads, head_dim)
        v = linear(y, f"{p}.self_attn.v").view(b, n, heads, head_dim)
        y = linear(attention(_rope_apply(q, grid, freqs), _rope_apply(k, grid, freqs), v), f"{p}.self_attn.o")
        h = h + y * mod[2]
        if f"{p}.norm3.weight" in sd:
            y = F.layer_norm(h, (dim,), sd[f"{p}.norm3.weight"], sd[f"{p}.norm3.bias"], eps=EPS)
        else:
            y = h
        q = rms(linear(y, f"{p}.cross_attn.q"), f"{p}.cross_attn.norm_q").view(b, n, heads, head_dim)
        k = rms(linear(ctx, f"{p}.cross_attn.k"), f"{p}.cross_attn.norm_k").view(b, -1, heads, head_dim)
        v = linear(ctx, f"{p}.cross_attn.v").view(b, -1, heads, head_dim)
        h = h + linear(attention(q, k, v), f"{p}.cross_attn.o")
        y = F.layer_norm(h, (dim,), eps=EPS) * (1 + mod[4]) + mod[3]
        y = linear(F.gelu(linear(y, f"{p}.ffn.0"), approximate="tanh"), f"{p}.ffn.2")
        h = h + y * mod[5]
    eh = (sd["head.modulation"] + e[:, None]).chunk(2, dim=1)
    out = linear(F.layer_norm(h, (dim,), eps=EPS) * (1 + eh[1]) + eh[0], "head.head")
    pt, ph, pw = PATCH
    out = out.view(b, f, hh, ww, pt, ph, pw, -1)
    out = torch.einsum("bfhwpqrc->bcfphqwr", out)
    return out.reshape(b, -1, f * pt, hh * ph, ww * pw)


def _inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, IN_CH, 3, 8, 6, generator=g)  # 3 latent frames, 4x3 patches
    t = torch.tensor([637.5])
    context = torch.randn(1, 7, TEXT_DIM, generator=g)
    return x, t, context


def _forward(model: EgoLCDTransformer3DModel, x, t, context) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, context).sample


def _assert_matches_reference(dst: Path, original: dict[str, torch.Tensor], lora: bool = False) -> float:
    model = EgoLCDTransformer3DModel.from_pretrained(dst).eval()
    if lora:
        from egolcd.lora import load_lora

        load_lora(model, dst / "lora")
    x, t, context = _inputs()
    ours = _forward(model, x, t, context)
    with torch.no_grad():
        ref = wan_reference(original, x, t, context)
    err = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape == (1, OUT_CH, 3, 8, 6)
    assert err < 2e-5, err
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    return err


# --------------------------------------------------------------------------- tests


def test_reference_is_sensitive_to_every_block_parameter():
    """The reference forward uses each original tensor (a reference that ignored one could not catch a
    mis-mapped key)."""
    sd = original_wan_state()
    x, t, context = _inputs()
    base = wan_reference(sd, x, t, context)
    for key in ("blocks.1.norm3.weight", "blocks.0.self_attn.norm_k.weight", "blocks.1.ffn.2.bias", "head.modulation"):
        other = dict(sd)
        other[key] = sd[key] + 0.5
        assert (wan_reference(other, x, t, context) - base).abs().max() > 1e-4, key


def test_key_table_spot_checks():
    assert map_key("blocks.0.self_attn.o.weight") == "blocks.0.attn1.to_out.0.weight"
    assert map_key("blocks.7.cross_attn.norm_k.weight") == "blocks.7.attn2.norm_k.weight"
    assert map_key("blocks.2.norm3.weight") == "blocks.2.norm2.weight"  # the cross-attention norm
    assert map_key("blocks.2.ffn.0.bias") == "blocks.2.ffn.net.0.proj.bias"
    assert map_key("blocks.2.modulation") == "blocks.2.scale_shift_table"
    assert map_key("time_projection.1.weight") == "condition_embedder.time_proj.weight"
    assert map_key("text_embedding.2.bias") == "condition_embedder.text_embedder.linear_2.bias"
    assert map_key("head.head.weight") == "proj_out.weight"
    assert map_key("blocks.0.norm2.weight") is None  # the parameter-free ffn norm has no weights
    assert map_key("blocks.0.self_attn.q.lora_A.weight") is None


def test_wan_safetensors_converts_and_matches_original_forward(tmp_path):
    sd = original_wan_state()
    save_file(sd, str(tmp_path / "wan.safetensors"))
    result = convert_checkpoint(tmp_path / "wan.safetensors", tmp_path / "out", num_heads=HEADS)
    assert result.source_format == "wan" and result.distillation is None
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["_class_name"] == "EgoLCDTransformer3DModel"
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["ffn_dim"]) == (2, 2, 12, 48)
    assert (cfg["in_channels"], cfg["out_channels"], cfg["text_dim"], cfg["freq_dim"]) == (4, 4, 384, 32)
    assert cfg["cross_attn_norm"] is True and cfg["chunk_frames"] == 3 and list(cfg["patch_size"]) == [1, 2, 2]
    assert result.num_parameters == sum(v.numel() for v in sd.values())
    _assert_matches_reference(tmp_path / "out", sd)


def test_wan_without_cross_attn_norm(tmp_path):
    sd = original_wan_state(cross_attn_norm=False)
    save_file(sd, str(tmp_path / "wan.safetensors"))
    result = convert_checkpoint(tmp_path / "wan.safetensors", tmp_path / "out", num_heads=HEADS)
    assert result.config["cross_attn_norm"] is False
    _assert_matches_reference(tmp_path / "out", sd)


def test_sharded_wan_folder_with_original_config_gives_heads(tmp_path):
    """The Wan release layout: shards + index + the original config.json (dim/num_heads, not diffusers')."""
    sd = original_wan_state(seed=5)
    src = tmp_path / "Wan2.1-T2V-tiny"
    src.mkdir()
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(src / name))
        weight_map.update({k: name for k in part})
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": DIM, "eps": EPS, "ffn_dim": FFN, "freq_dim": FREQ_DIM, "in_dim": IN_CH,
        "model_type": "t2v", "num_heads": HEADS, "num_layers": LAYERS, "out_dim": OUT_CH, "text_len": 512,
    }))
    # small shards in the output too, to cover the sharded writer and its index
    result = convert_checkpoint(src, tmp_path / "out", max_shard_bytes=40_000)
    assert result.config["num_attention_heads"] == HEADS  # from config.json: dim 24 is not a multiple of 128
    assert len(list((tmp_path / "out").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _assert_matches_reference(tmp_path / "out", sd)


def test_self_forcing_pt_generator_vs_ema(tmp_path):
    """Self-Forcing / CausVid: {'generator': {'model.<key>': ...}, 'generator_ema': {...}} in a .pt."""
    gen, ema = original_wan_state(seed=10), original_wan_state(seed=11)
    ckpt = {
        "generator": {f"model.{k}": v for k, v in gen.items()},
        "generator_ema": {f"model.{k}": v.to(torch.bfloat16) for k, v in ema.items()},
        "critic": {"model.blocks.0.something": torch.zeros(1)},  # other entries are ignored
    }
    torch.save(ckpt, tmp_path / "self_forcing_dmd.pt")
    r_gen = convert_checkpoint(tmp_path / "self_forcing_dmd.pt", tmp_path / "gen", num_heads=HEADS)
    r_ema = convert_checkpoint(tmp_path / "self_forcing_dmd.pt", tmp_path / "ema", ema=True, num_heads=HEADS)
    assert (r_gen.source_format, r_gen.entry) == ("self-forcing", "generator")
    assert (r_ema.source_format, r_ema.entry) == ("self-forcing", "generator_ema")
    _assert_matches_reference(tmp_path / "gen", gen)
    _assert_matches_reference(tmp_path / "ema", {k: v.to(torch.bfloat16) for k, v in ema.items()})
    dist = json.loads((tmp_path / "ema" / "egolcd_distillation.json").read_text())
    assert dist["denoising_step_list"] == [1000, 750, 500, 250] and dist["sampler"] == "distilled"
    assert dist["warp_denoising_step"] is True and dist["shift"] == 5.0
    # a CausVid checkpoint has the same layout; --from causvid records its own step list
    r_cv = convert_checkpoint(tmp_path / "self_forcing_dmd.pt", tmp_path / "cv", source_format="causvid", num_heads=HEADS)
    assert r_cv.distillation["denoising_step_list"] == [1000, 757, 522]
    assert r_cv.distillation["sigmas"] == pytest.approx([1.0, 0.757, 0.522, 0.0])


def test_longlive_fsdp_prefix_and_lora(tmp_path):
    """LongLive: FSDP path components in the generator keys, and a separate peft LoRA ('generator_lora')."""
    base = original_wan_state(seed=20)
    fsdp = {}
    for k, v in base.items():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            fsdp[f"model._fsdp_wrapped_module.blocks.{i}._fsdp_wrapped_module.{rest}"] = v
        else:
            fsdp[f"model._fsdp_wrapped_module.{k}"] = v
    torch.save({"generator_ema": fsdp}, tmp_path / "longlive_base.pt")
    rank = 4
    lora = original_lora_state(base, rank)
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")

    plain = convert_checkpoint(tmp_path / "longlive_base.pt", tmp_path / "plain", ema=True, num_heads=HEADS)
    assert plain.source_format == "longlive"  # detected from the FSDP prefix
    _assert_matches_reference(tmp_path / "plain", base)

    # default alpha = rank (LongLive's): scale 1
    result = convert_checkpoint(tmp_path / "longlive_base.pt", tmp_path / "out", ema=True,
                                lora=tmp_path / "lora.pt", num_heads=HEADS)
    assert result.lora_rank == rank
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    _assert_matches_reference(tmp_path / "out", merge_lora(base, lora, 1.0), lora=True)
    # an explicit alpha changes the scale (alpha / rank)
    convert_checkpoint(tmp_path / "longlive_base.pt", tmp_path / "a8", ema=True, lora=tmp_path / "lora.pt",
                       lora_alpha=8.0, num_heads=HEADS)
    _assert_matches_reference(tmp_path / "a8", merge_lora(base, lora, 2.0), lora=True)


def test_converted_lora_loads_through_the_pipeline_folder(tmp_path):
    """DST/lora is where EgoLCDPipeline.from_pretrained looks (transformer/lora)."""
    from egolcd.pipeline import EgoLCDPipeline

    base = original_wan_state(seed=21)
    torch.save({"generator": {f"model.{k}": v for k, v in base.items()}}, tmp_path / "base.pt")
    torch.save({"generator_lora": original_lora_state(base, 2)}, tmp_path / "lora.pt")
    EgoLCDPipeline.from_preset("tiny").save_pretrained(tmp_path / "model")
    import shutil

    shutil.rmtree(tmp_path / "model" / "transformer")
    convert_checkpoint(tmp_path / "base.pt", tmp_path / "model" / "transformer", lora=tmp_path / "lora.pt",
                       num_heads=HEADS, chunk_frames=2)
    pipe = EgoLCDPipeline.from_pretrained(tmp_path / "model")
    assert pipe.transformer.peft_config  # the adapter is attached


def test_unknown_key_is_one_clear_error(tmp_path, capsys):
    sd = original_wan_state()
    sd["blocks.0.self_attn.extra_proj.weight"] = torch.zeros(DIM, DIM)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError, match=r"1 of \d+ keys are not in the Wan2.1 original layout: 'blocks.0.self_attn.extra_proj.weight'"):
        convert_checkpoint(tmp_path / "bad.safetensors", tmp_path / "out", num_heads=HEADS)
    assert main(["convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "out2"), "--num-heads", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("egolcd: error: ") and "extra_proj" in err
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def test_missing_and_mismatched_keys_are_one_error(tmp_path):
    sd = original_wan_state()
    del sd["blocks.1.ffn.2.bias"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConversionError, match=r"missing 'blocks.1.ffn.net.2.bias'"):
        convert_checkpoint(tmp_path / "missing.safetensors", tmp_path / "o1", num_heads=HEADS)
    sd = original_wan_state()
    sd["blocks.1.ffn.0.weight"] = torch.zeros(FFN + 8, DIM)  # another block's ffn width differs
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ConversionError, match=r"shape mismatch at 'blocks.1.ffn.net.0.proj.weight'"):
        convert_checkpoint(tmp_path / "shape.safetensors", tmp_path / "o2", num_heads=HEADS)


def test_diffusers_layout_input_gets_a_hint(tmp_path):
    model = EgoLCDTransformer3DModel.from_preset("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "d.safetensors"))
    with pytest.raises(ConversionError, match="diffusers layout already"):
        convert_checkpoint(tmp_path / "d.safetensors", tmp_path / "out", num_heads=HEADS)


class _NotWeights:  # an arbitrary class: a full unpickle would rebuild it, weights_only refuses
    def __init__(self) -> None:
        self.payload = 1


def test_pt_is_read_with_weights_only(tmp_path):
    torch.save({"generator": {"model.patch_embedding.weight": torch.zeros(1)}, "extra": _NotWeights()},
               tmp_path / "pickled.pt")
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_checkpoint(tmp_path / "pickled.pt", tmp_path / "out")


def test_ema_requires_generator_ema(tmp_path):
    torch.save({"generator": {f"model.{k}": v for k, v in original_wan_state().items()}}, tmp_path / "g.pt")
    with pytest.raises(ConversionError, match="no 'generator_ema' entry"):
        convert_checkpoint(tmp_path / "g.pt", tmp_path / "out", ema=True, num_heads=HEADS)


def test_heads_default_to_128_wide(tmp_path):
    save_file(original_wan_state(), str(tmp_path / "wan.safetensors"))
    with pytest.raises(ConversionError, match="not a multiple of the head width 128; pass num_heads"):
        convert_checkpoint(tmp_path / "wan.safetensors", tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path):
    save_file(original_wan_state(), str(tmp_path / "wan.safetensors"))
    convert_checkpoint(tmp_path / "wan.safetensors", tmp_path / "out", num_heads=HEADS)
    with pytest.raises(FileExistsError):
        convert_checkpoint(tmp_path / "wan.safetensors", tmp_path / "out", num_heads=HEADS)
    convert_checkpoint(tmp_path / "wan.safetensors", tmp_path / "out", num_heads=HEADS, overwrite=True)


def test_overwrite_drops_a_stale_adapter_and_shared_storage_is_saved(tmp_path):
    base = original_wan_state(seed=40)
    torch.save({"generator": {f"model.{k}": v for k, v in base.items()}}, tmp_path / "b.pt")
    torch.save({"generator_lora": original_lora_state(base, 2)}, tmp_path / "lora.pt")
    convert_checkpoint(tmp_path / "b.pt", tmp_path / "out", lora=tmp_path / "lora.pt", num_heads=HEADS)
    assert (tmp_path / "out" / "lora").is_dir()
    convert_checkpoint(tmp_path / "b.pt", tmp_path / "out", num_heads=HEADS, overwrite=True)
    assert not (tmp_path / "out" / "lora").exists()
    # tensors sharing one storage (tied, or views of a flat training buffer) are written apart
    from safetensors.torch import load_file

    from egolcd.convert import save_sharded

    flat = torch.randn(10)
    (tmp_path / "tied").mkdir()
    save_sharded({"a": flat, "b": flat, "c": flat[2:6]}, tmp_path / "tied")
    back = load_file(str(tmp_path / "tied" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(back["a"], flat) and torch.equal(back["b"], flat) and torch.equal(back["c"], flat[2:6])


def test_load_original_auto_detection(tmp_path):
    sd = original_wan_state()
    torch.save(sd, tmp_path / "plain.pt")
    assert load_original(tmp_path / "plain.pt").source_format == "wan"
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "sf.pt")
    assert load_original(tmp_path / "sf.pt").source_format == "self-forcing"


def test_cli_convert_and_generate_with_distilled_sampler(tmp_path, encoded_frames):
    """A converted (Self-Forcing-style) checkpoint as the transformer of a tiny model folder generates
    through `egolcd generate --sampler distilled`; the same seed gives the same video."""
    import shutil

    sd = original_wan_state(seed=30)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "sf.pt")
    model = tmp_path / "model"
    assert main(["create-model", str(model), "--preset", "tiny"]) == 0
    shutil.rmtree(model / "transformer")
    assert main(["convert", str(tmp_path / "sf.pt"), str(model / "transformer"), "--from", "self-forcing",
                 "--ema", "--num-heads", "2", "--chunk-frames", "2"]) == 0
    narrative = tmp_path / "n.txt"
    narrative.write_text("1 | walks to the sink\n1 | opens the tap\n")
    outs = []
    for name in ("a.mp4", "b.mp4"):
        out = tmp_path / name
        assert main(["generate", str(narrative), "-o", str(out), "--model", str(model), "--sampler", "distilled",
                     "--steps", "4", "--seed", "1", "-q"]) == 0
        outs.append(encoded_frames[name])
    assert len(outs[0]) > 0 and np.array_equal(outs[0], outs[1])  # frames to the encoder (see conftest)


@pytest.mark.parametrize("option", ["--text-encoder", "--text-encoder-path"])
def test_create_model_passes_text_encoder_path(tmp_path, monkeypatch, option):
    """`--text-encoder` (and its older spelling `--text-encoder-path`) reach the random-weights path."""
    from egolcd import pipeline

    seen = {}

    class Stop(Exception):
        pass

    def fake_from_preset(name, seed=0, vae_path=None, **overrides):
        seen.update(name=name, vae_path=vae_path, **overrides)
        raise Stop

    monkeypatch.setattr(pipeline.EgoLCDPipeline, "from_preset", staticmethod(fake_from_preset))
    with pytest.raises(Stop):
        main(["create-model", str(tmp_path / "m"), "--preset", "wan2.1-1.3b", "--vae", "V", option, "T"])
    assert seen == {"name": "wan2.1-1.3b", "vae_path": "V", "text_encoder_path": "T"}


def test_wan_presets_pad_text_to_512():
    from egolcd.config import PRESETS
    from egolcd.pipeline import GenerationConfig

    for name in ("wan2.1-1.3b", "wan2.1-14b"):
        assert PRESETS[name].text_max_length == 512
        assert GenerationConfig.from_preset(PRESETS[name]).text_max_length == 512
    for name in ("tiny", "demo"):
        assert GenerationConfig.from_preset(PRESETS[name]).text_max_length == 128


def _original_shapes(dim: int, ffn: int, layers: int, text_dim: int = 4096, freq_dim: int = 256) -> dict[str, tuple]:
    """Parameter shapes of the original Wan2.1 T2V release (names as in wan/modules/model.py)."""
    shapes: dict[str, tuple] = {
        "patch_embedding.weight": (dim, 16, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (64, dim), "head.head.bias": (64,), "head.modulation": (1, 2, dim),
    }
    for i in range(layers):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"blocks.{i}.{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"blocks.{i}.{attn}.{proj}.bias"] = (dim,)
            shapes[f"blocks.{i}.{attn}.norm_q.weight"] = (dim,)
            shapes[f"blocks.{i}.{attn}.norm_k.weight"] = (dim,)
        shapes.update({
            f"blocks.{i}.norm3.weight": (dim,), f"blocks.{i}.norm3.bias": (dim,),
            f"blocks.{i}.ffn.0.weight": (ffn, dim), f"blocks.{i}.ffn.0.bias": (ffn,),
            f"blocks.{i}.ffn.2.weight": (dim, ffn), f"blocks.{i}.ffn.2.bias": (dim,),
            f"blocks.{i}.modulation": (1, 6, dim),
        })
    return shapes


@pytest.mark.parametrize("preset,dim,ffn,layers,params", [
    ("wan2.1-1.3b", 1536, 8960, 30, 1_418_996_800),
    ("wan2.1-14b", 5120, 13824, 40, None),
])
def test_real_sizes_map_onto_the_presets(preset, dim, ffn, layers, params):
    """At the released sizes (meta tensors, no memory): every original key maps, the derived config is the
    preset's (12 / 40 heads of 128), and the key set and shapes equal the model's."""
    from egolcd.config import PRESETS
    from egolcd.convert import check_against_model, convert_state_dict, derive_config

    shapes = _original_shapes(dim, ffn, layers)
    state = convert_state_dict({f"model.{k}": torch.empty(s, device="meta") for k, s in shapes.items()})
    config = derive_config(state)
    check_against_model(state, config)
    expected = {**PRESETS[preset].transformer, "pos_embed_seq_len": None}
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()} == expected
    if params is not None:
        assert sum(v.numel() for v in state.values()) == params
    assert len(state) == len(shapes)
