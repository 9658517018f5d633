"""The rename table from the original Wan2.1 layout to diffusers' (module docstring of :mod:`egolcd.convert`),
applied strictly (:func:`convert_state_dict`), and the transformer config read off the tensors' shapes
(:func:`derive_config`, :func:`check_against_model`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------- the key table

# Modules (parameters ``.weight`` / ``.bias``) outside the blocks: original -> diffusers.
TOP_MODULES: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    # image-to-video checkpoints (CLIP image tokens)
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
# Bare parameters outside the blocks.
TOP_PARAMS: dict[str, str] = {
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
# Modules inside ``blocks.N.``. The original applies its norms in the order norm1 (self-attention),
# norm3 (cross-attention, the only one with parameters), norm2 (feed-forward); diffusers numbers them in
# order, so the original ``norm3`` is diffusers' ``norm2`` (the parameter-free norms have no keys).
BLOCK_MODULES: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
BLOCK_PARAMS: dict[str, str] = {"modulation": "scale_shift_table"}

_LEAVES = ("weight", "bias")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Path components that training wrappers insert (FSDP, activation checkpointing, torch.compile).
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# Prefixes of whole state dicts: Self-Forcing / CausVid / LongLive's WanDiffusionWrapper keeps the DiT as
# ``model``; ComfyUI-style files use ``model.diffusion_model.``; peft wraps as ``base_model.model.``.
_PREFIXES = ("base_model.model.", "model.", "diffusion_model.")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (unknown/missing keys, shapes, container); one line."""


def _module_name(name: str) -> str | None:
    """Diffusers name of an original *module* path (no ``.weight``), or None."""
    if name in TOP_MODULES:
        return TOP_MODULES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in BLOCK_MODULES:
        return f"blocks.{m.group(1)}.{BLOCK_MODULES[m.group(2)]}"
    return None


def map_key(key: str) -> str | None:
    """Diffusers name of one original parameter name (after prefix stripping), or None if unknown.

    >>> map_key("blocks.3.self_attn.q.weight"), map_key("blocks.0.norm3.bias"), map_key("head.modulation")
    ('blocks.3.attn1.to_q.weight', 'blocks.0.norm2.bias', 'scale_shift_table')
    """
    if key in TOP_PARAMS:
        return TOP_PARAMS[key]
    m = _BLOCK_RE.match(key)
    if m and m.group(2) in BLOCK_PARAMS:
        return f"blocks.{m.group(1)}.{BLOCK_PARAMS[m.group(2)]}"
    module, _, leaf = key.rpartition(".")
    if leaf not in _LEAVES:
        return None
    mapped = _module_name(module)
    return None if mapped is None else f"{mapped}.{leaf}"


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop wrapper path components anywhere (``_fsdp_wrapped_module.``, ...) and a prefix that every key
    shares (``model.``, ``base_model.model.``, ``diffusion_model.``), repeatedly."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        clean = ".".join(p for p in key.split(".") if p not in _WRAPPER_PARTS)
        if clean in out:
            raise ConversionError(f"two keys become {clean!r} once wrapper prefixes are removed")
        out[clean] = value
    changed = True
    while changed and out:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def convert_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original-layout parameters -> diffusers names. Strict: every key maps, or one ``ConversionError``."""
    state = strip_prefixes(state)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        new = map_key(key)
        if new is None:
            unknown.append(key)
            continue
        out[new] = value
    if unknown:
        hint = ""
        if any(".attn1." in k or "condition_embedder." in k for k in unknown):
            hint = " (it looks like diffusers layout already: load it with from_pretrained, no conversion)"
        raise ConversionError(
            f"{len(unknown)} of {len(state)} keys are not in the Wan2.1 original layout: {_describe(sorted(unknown))}{hint}"
        )
    return out


# --------------------------------------------------------------------------- config from shapes


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"missing {key!r}: not a Wan2.1 DiT checkpoint")
    return tuple(state[key].shape)


def derive_config(
    state: Mapping[str, Tensor],
    num_heads: int | None = None,
    head_dim: int = 128,
    chunk_frames: int | None = 3,
    eps: float = 1e-6,
) -> dict[str, Any]:
    """``EgoLCDTransformer3DModel`` keyword arguments read off the tensor shapes of a converted (diffusers
    names) state dict. The number of heads has no tensor of its own (the q/k norms span all heads): it is
    ``num_heads`` when given (e.g. from the original ``config.json``), else ``dim // head_dim`` (Wan2.1
    uses 128-wide heads: 12 heads for 1.3B, 40 for 14B)."""
    dim, in_channels, *patch = _shape(state, "patch_embedding.weight")
    if len(patch) != 3:
        raise ConversionError(f"patch_embedding.weight must be 5-D (Conv3d), got {len(patch) + 2}-D")
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ConversionError(f"blocks must be numbered 0..L-1, got {blocks[:8]}")
    if num_heads is None:
        if dim % head_dim:
            raise ConversionError(f"dim {dim} is not a multiple of the head width {head_dim}; pass num_heads")
        num_heads = dim // head_dim
    if dim % num_heads:
        raise ConversionError(f"dim {dim} is not divisible by {num_heads} heads")
    out_features = _shape(state, "proj_out.weight")[0]
    if out_features % math.prod(patch):
        raise ConversionError(f"proj_out has {out_features} outputs, not a multiple of the patch {tuple(patch)}")
    image_dim = added_kv = pos_len = None
    if "condition_embedder.image_embedder.norm1.weight" in state:
        image_dim = _shape(state, "condition_embedder.image_embedder.norm1.weight")[0]
    if "blocks.0.attn2.add_k_proj.weight" in state:
        added_kv = _shape(state, "blocks.0.attn2.add_k_proj.weight")[1]
    if "condition_embedder.image_embedder.pos_embed" in state:
        pos_len = _shape(state, "condition_embedder.image_embedder.pos_embed")[1]
    config: dict[str, Any] = dict(
        patch_size=tuple(patch),
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        in_channels=in_channels,
        out_channels=out_features // math.prod(patch),
        text_dim=_shape(state, "condition_embedder.text_embedder.linear_1.weight")[1],
        freq_dim=_shape(state, "condition_embedder.time_embedder.linear_1.weight")[1],
        ffn_dim=_shape(state, "blocks.0.ffn.net.0.proj.weight")[0],
        num_layers=len(blocks),
        cross_attn_norm="blocks.0.norm2.weight" in state,
        qk_norm="rms_norm_across_heads",
        eps=eps,
        image_dim=image_dim,
        added_kv_proj_dim=added_kv,
        rope_max_seq_len=1024,
        pos_embed_seq_len=pos_len,
        chunk_frames=chunk_frames,
    )
    return config


def check_against_model(state: Mapping[str, Tensor], config: dict[str, Any]) -> None:
    """Build the model of ``config`` on the meta device and compare key sets and shapes (one error)."""
    from .transformer import EgoLCDTransformer3DModel

    with torch.device("meta"):
        model = EgoLCDTransformer3DModel(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {_describe(unexpected)}")
        raise ConversionError(f"the checkpoint does not match a Wan2.1 DiT of the derived config: {'; '.join(parts)}")
    wrong = [k for k in sorted(expected) if tuple(state[k].shape) != expected[k]]
    if wrong:
        k = wrong[0]
        raise ConversionError(
            f"shape mismatch at {k!r}: checkpoint {tuple(state[k].shape)}, model {expected[k]}"
            + (f" ({len(wrong) - 1} more)" if len(wrong) > 1 else "")
        )
