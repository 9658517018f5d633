"""EgoLCDTransformer3DModel: Wan weight compatibility, Wan equivalence, block causality,
chunk-by-chunk == full forward, unbounded positions, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from egolcd.attention import LayerKV
from egolcd.config import PRESETS
from egolcd.transformer import EgoLCDTransformer3DModel

TINY = PRESETS["tiny"].transformer


def get_init_dict(**overrides):
    """Tiny random config (diffusers' test convention)."""
    return {**TINY, **overrides}


def wan_init_dict():
    cfg = dict(TINY)
    cfg.pop("chunk_frames")
    return cfg


def inputs(batch=2, frames=6, size=8, seed=0, per_frame=False, temporal_patch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], frames, size, size, generator=g)
    if per_frame:  # one level per token frame (the model reads the first of each temporal patch)
        t = (torch.rand(batch, frames // temporal_patch, generator=g) * 1000).repeat_interleave(temporal_patch, 1)
    else:
        t = torch.tensor([700.0, 150.0][:batch])
    text = torch.randn(batch, 5, TINY["text_dim"], generator=g)
    return x, t, text


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**wan_init_dict()).eval()
    path = tmp_path_factory.mktemp("wan")
    wan.save_pretrained(path)
    return path, wan


def test_loads_diffusers_wan_checkpoint_without_missing_or_unexpected_keys(wan_dir):
    path, wan = wan_dir
    model, info = EgoLCDTransformer3DModel.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert set(model.state_dict()) == set(wan.state_dict())
    assert model.config.chunk_frames is None
    # chunk_frames can be overridden at load time
    chunked = EgoLCDTransformer3DModel.from_pretrained(path, chunk_frames=3)
    assert chunked.config.chunk_frames == 3


def test_same_function_as_wan_without_chunking(wan_dir):
    path, wan = wan_dir
    model = EgoLCDTransformer3DModel.from_pretrained(path).eval()
    x, t, text = inputs()
    with torch.no_grad():
        ref = wan(x, t, text, return_dict=False)[0]
        out = model(x, t, text, return_dict=False)[0]
    assert out.shape == ref.shape == x.shape
    assert (out - ref).abs().max().item() < 1e-4
    # chunk_frames >= F is one chunk: the same function too
    model.register_to_config(chunk_frames=x.shape[2])
    with torch.no_grad():
        out = model(x, t, text, return_dict=False)[0]
    assert (out - ref).abs().max().item() < 1e-4


def test_per_frame_timesteps_match_wan_sequence_timesteps(wan_dir):
    """A (B, F) timestep equals Wan's per-token (B, seq_len) timestep path."""
    path, wan = wan_dir
    model = EgoLCDTransformer3DModel.from_pretrained(path).eval()
    x, t, text = inputs(per_frame=True)
    tokens_per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
    with torch.no_grad():
        ref = wan(x, t.repeat_interleave(tokens_per_frame, dim=1), text, return_dict=False)[0]
        out = model(x, t, text, return_dict=False)[0]
    assert (out - ref).abs().max().item() < 1e-4


def test_block_causal_future_chunks_do_not_change_the_past():
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=2)).eval()
    x, t, text = inputs(frames=6, per_frame=True)
    x2 = x.clone()
    x2[:, :, 4:] = torch.randn_like(x2[:, :, 4:])  # change the last chunk only
    t2 = t.clone()
    t2[:, 4:] = 3.0
    with torch.no_grad():
        a = model(x, t, text, return_dict=False)[0]
        b = model(x2, t2, text, return_dict=False)[0]
    assert torch.equal(a[:, :, :4], b[:, :, :4]) or (a[:, :, :4] - b[:, :, :4]).abs().max() < 1e-6
    assert (a[:, :, 4:] - b[:, :, 4:]).abs().max() > 1e-3  # the changed chunk itself does change
    # inside a chunk attention is bidirectional: changing frame 5 changes frame 4
    x3 = x.clone()
    x3[:, :, 5] += 1.0
    with torch.no_grad():
        c = model(x3, t, text, return_dict=False)[0]
    assert (a[:, :, 4] - c[:, :, 4]).abs().max() > 1e-4


@pytest.mark.parametrize("patch_size, k", [((1, 2, 2), 2), ((2, 2, 2), 4)])
def test_chunk_by_chunk_with_dense_context_equals_full_block_causal_forward(patch_size, k):
    """Also with a temporal patch of 2 (the demo-t2 geometry: a chunk of 4 latent frames is 2 token frames)."""
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=k, patch_size=patch_size)).eval()
    x, t, text = inputs(frames=3 * k, per_frame=True, temporal_patch=patch_size[0])
    with torch.no_grad():
        full = model(x, t, text, return_dict=False)[0]
        history: list[list[LayerKV]] = []
        outs = []
        for start in range(0, x.shape[2], k):
            context = [LayerKV.cat([h[i] for h in history]) for i in range(model.num_layers)] if history else None
            res = model.forward_chunk(
                x[:, :, start : start + k], t[:, start : start + k], text, context, frame_start=start, return_kv=True
            )
            history.append(res.kv)
            outs.append(res.sample)
    chunked = torch.cat(outs, dim=2)
    diff = (chunked - full).abs().max().item()
    assert diff < 1e-4, diff


def test_temporal_patch_2_is_block_causal_with_positions_in_latent_frames():
    """p_t = 2: a chunk of 4 latent frames is 2 token frames; the past does not see the future; a chunk's keys
    sit at latent-frame positions (frame_start, frame_start + 2); chunk_frames must be a multiple of p_t."""
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=4, patch_size=(2, 2, 2))).eval()
    x, t, text = inputs(frames=8, per_frame=True, temporal_patch=2)
    x2 = x.clone()
    x2[:, :, 4:] = torch.randn_like(x2[:, :, 4:])
    with torch.no_grad():
        a = model(x, t, text, return_dict=False)[0]
        b = model(x2, t, text, return_dict=False)[0]
        kv = model.forward_chunk(x[:, :, 4:], t[:, 4:], text, frame_start=4, return_kv=True).kv
    assert a.shape == x.shape
    assert (a[:, :, :4] - b[:, :, :4]).abs().max() < 1e-6 and (a[:, :, 4:] - b[:, :, 4:]).abs().max() > 1e-3
    assert sorted(set(kv[0].pos[0, :, 0].tolist())) == [4, 6]
    assert model.tokens_per_chunk(8, 8) == 2 * 16
    with pytest.raises(ValueError, match="multiple of the temporal patch"):
        EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=3, patch_size=(2, 2, 2)))


def test_positions_are_relative_shifting_all_frames_changes_nothing():
    """RoPE at read time: only relative frame offsets matter, so memory can be re-indexed."""
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=2)).eval()
    x, t, text = inputs(frames=4, per_frame=True)
    with torch.no_grad():
        first = model.forward_chunk(x[:, :, :2], t[:, :2], text, return_kv=True)
        a = model.forward_chunk(x[:, :, 2:], t[:, 2:], text, first.kv, frame_start=2).sample
        shifted = [kv.shift_frames(5000) for kv in first.kv]
        b = model.forward_chunk(x[:, :, 2:], t[:, 2:], text, shifted, frame_start=5002).sample
    assert (a - b).abs().max().item() < 1e-3


def test_unbounded_length_3000_latent_frames_with_bounded_window():
    """>= 3000 latent frames chunk by chunk with a sliding context: no crash, no position overflow."""
    torch.manual_seed(0)
    k = 3
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=k)).eval()
    text = torch.randn(1, 4, TINY["text_dim"])
    window: list[list[LayerKV]] = []
    n_chunks = 1000  # 3000 latent frames
    last = None
    with torch.no_grad():
        for c in range(n_chunks):
            x = torch.randn(1, TINY["in_channels"], k, 4, 4)
            ctx = [LayerKV.cat([w[i] for w in window]) for i in range(model.num_layers)] if window else None
            # absolute frame positions grow without bound: c * k reaches 2997
            res = model.forward_chunk(x, torch.tensor([500.0]), text, ctx, frame_start=c * k, return_kv=True)
            window = (window + [res.kv])[-2:]
            last = res.sample
    assert last is not None and torch.isfinite(last).all()
    assert int(window[-1][0].pos[..., 0].max()) == n_chunks * k - 1 >= 2999


def test_attention_mass_and_memory_outputs():
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=2)).eval()
    x, t, text = inputs(frames=4, per_frame=True)
    with torch.no_grad():
        first = model.forward_chunk(x[:, :, :2], t[:, :2], text, return_kv=True)
        res = model.forward_chunk(
            x[:, :, 2:], t[:, 2:], text, first.kv, frame_start=2, return_attention_mass=True,
            reference_context=first.kv,
        )
    n_ctx = len(first.kv[0])
    for mass in res.attention_mass:
        assert mass.shape == (2, n_ctx)
        assert (mass >= 0).all() and (mass.sum(-1) <= 1 + 1e-5).all() and (mass.sum(-1) > 0).all()
    for o_mem, o_full in res.memory_outputs:
        assert torch.allclose(o_mem, o_full, atol=1e-6)  # same context -> same output


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=2))
    x, t, text = inputs(frames=4, per_frame=True)
    out = model(x, t, text, return_dict=False)[0]
    out.square().mean().backward()
    g1 = model.proj_out.weight.grad.clone()
    model.zero_grad()
    model.enable_gradient_checkpointing()
    out2 = model(x, t, text, return_dict=False)[0]
    out2.square().mean().backward()
    assert torch.allclose(out, out2, atol=1e-6)
    assert torch.allclose(g1, model.proj_out.weight.grad, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=2)).eval()
    x, t, text = inputs(frames=4)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(x[..., :7], t, text)
    with pytest.raises(ValueError, match="timestep must be"):
        model(x, torch.zeros(2, 3), text)
    with pytest.raises(ValueError, match="chunk_frames"):
        EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=0))


def test_presets_have_published_wan_sizes():
    cfg = PRESETS["wan2.1-1.3b"].transformer
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == (30, 12, 128)
    assert (cfg["ffn_dim"], cfg["text_dim"]) == (8960, 4096)
    cfg14 = PRESETS["wan2.1-14b"].transformer
    assert (cfg14["num_layers"], cfg14["num_attention_heads"], cfg14["ffn_dim"]) == (40, 40, 13824)
    with torch.device("meta"):
        m = EgoLCDTransformer3DModel.from_preset("wan2.1-1.3b")
    n = sum(p.numel() for p in m.parameters())
    assert 1.2e9 < n < 1.5e9, n


def test_lora_attach_save_load(tmp_path):
    from peft import LoraConfig

    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=2)).eval()
    x, t, text = inputs(frames=4)
    with torch.no_grad():
        base = model(x, t, text, return_dict=False)[0]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        adapted = model(x, t, text, return_dict=False)[0]
    assert (adapted - base).abs().max() > 1e-4
    model.save_lora_adapter(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "pytorch_lora_weights.safetensors" in files or any(f.endswith(".safetensors") for f in files)
    fresh = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=2)).eval()
    fresh.load_state_dict(base_state)
    fresh.load_lora_adapter(tmp_path, prefix=None, weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        reloaded = fresh(x, t, text, return_dict=False)[0]
    assert (reloaded - adapted).abs().max() < 1e-5


def test_save_pretrained_round_trip_is_diffusers_layout(tmp_path):
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**get_init_dict(chunk_frames=2)).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["chunk_frames"] == 2 and cfg["_class_name"] == "EgoLCDTransformer3DModel"
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = EgoLCDTransformer3DModel.from_pretrained(tmp_path).eval()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_top_level_names():
    import egolcd

    assert egolcd.EgoLCDTransformer3DModel is EgoLCDTransformer3DModel
    assert {"MemoryPolicy", "LongTermSparseKVCache", "EgoLCDPipeline", "memory_regulation_loss"} <= set(egolcd.__all__)
    with pytest.raises(AttributeError):
        egolcd.nothing_here  # noqa: B018
