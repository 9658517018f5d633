"""Convert original-layout Wan2.1 DiT checkpoints (Wan2.1, Self-Forcing, CausVid, LongLive) into a
diffusers-layout transformer folder that ``EgoLCDTransformer3DModel.from_pretrained`` loads.

The original Wan code (``wan/modules/model.py``) names its parameters ``blocks.N.self_attn.q``,
``blocks.N.norm3``, ``blocks.N.ffn.0``, ``blocks.N.modulation``, ``head.head``, ``text_embedding.0``, ...;
diffusers (and egolcd) name the same tensors ``blocks.N.attn1.to_q``, ``blocks.N.norm2``,
``blocks.N.ffn.net.0.proj``, ``blocks.N.scale_shift_table``, ``proj_out``,
``condition_embedder.text_embedder.linear_1``. The table below follows the rename table of diffusers'
``scripts/convert_wan_to_diffusers.py`` (written out per module here, matched exactly rather than by
substring). No tensor changes value or shape; only names change.

Inputs:

* ``wan``: the original Wan2.1 release, ``.safetensors`` (one file, a folder of shards, or a
  ``*.safetensors.index.json``), optionally with the original ``config.json`` (``dim``, ``num_heads``...).
* ``self-forcing`` / ``causvid``: a ``.pt`` holding ``{"generator": {...}, "generator_ema": {...}}`` whose
  keys carry the wrapper's ``model.`` prefix.
* ``longlive``: the same, keys possibly with ``_fsdp_wrapped_module.`` components; its LoRA ships apart
  (``{"generator_lora": {...}}``, peft names on the original modules) and becomes a peft adapter in
  ``DST/lora`` (what ``egolcd.lora.load_lora`` and ``EgoLCDPipeline.from_pretrained`` read).

``.pt`` files are opened with ``torch.load(weights_only=True)`` only: never a full unpickle.
Every key must map; anything else is one error naming the first offending keys.

    egolcd convert self_forcing_dmd.pt models/self-forcing/transformer --from self-forcing --ema
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("wan", "self-forcing", "causvid", "longlive")
FORMATS = ("auto", *SOURCE_FORMATS)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DISTILLATION_NAME = "egolcd_distillation.json"
LORA_DIR = "lora"

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
# The distilled models' own sampling defaults (their inference configs): step list, warp, shift.
DISTILLED_DEFAULTS: dict[str, dict[str, Any]] = {
    "self-forcing": {"denoising_step_list": [1000, 750, 500, 250], "warp_denoising_step": True, "shift": 5.0},
    "longlive": {"denoising_step_list": [1000, 750, 500, 250], "warp_denoising_step": True, "shift": 5.0},
    "causvid": {"denoising_step_list": [1000, 757, 522], "warp_denoising_step": False, "shift": 8.0},
}


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


# --------------------------------------------------------------------------- reading checkpoints


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise ConversionError(f"cannot read {path} with torch.load(weights_only=True): {exc}") from None
    except Exception as exc:  # pickle.UnpicklingError and friends: not a plain weights file
        raise ConversionError(f"cannot read {path} with torch.load(weights_only=True): {exc}") from None
    try:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"cannot read {path} with torch.load(weights_only=True): {exc}") from None


def _load_safetensors(paths: list[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in paths:
        part = load_file(str(path))
        dup = sorted(set(part) & set(state))
        if dup:
            raise ConversionError(f"{path.name} repeats keys of another shard: {_describe(dup)}")
        state.update(part)
    return state


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _select_generator(obj: Any, path: Path, ema: bool) -> tuple[dict[str, Tensor], str]:
    """The DiT state dict of a ``.pt`` object and the name of the entry it came from."""
    if _is_tensor_dict(obj):
        if ema:
            raise ConversionError(f"{path} is a plain state dict with no 'generator_ema' entry; drop --ema")
        return dict(obj), "state dict"
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if ema:
        if "generator_ema" not in obj:
            raise ConversionError(f"{path} has no 'generator_ema' entry (it has {_describe(sorted(map(str, obj)))})")
        name = "generator_ema"
    elif "generator" in obj:
        name = "generator"
    elif "generator_ema" in obj:
        logger.info("%s has only 'generator_ema'; converting it", path)
        name = "generator_ema"
    else:
        name = next((n for n in ("model", "state_dict", "module") if n in obj), "")
        if not name:
            raise ConversionError(
                f"{path} has no 'generator', 'generator_ema' or 'model' entry (it has {_describe(sorted(map(str, obj)))})"
            )
    state = obj[name]
    if not _is_tensor_dict(state):
        raise ConversionError(f"{path}[{name!r}] is not a dict of tensors")
    return dict(state), name


@dataclass
class LoadedCheckpoint:
    state: dict[str, Tensor]  # original names, prefixes not yet stripped
    source_format: str
    entry: str  # which entry of the file (generator, generator_ema, state dict, safetensors)
    original_config: dict[str, Any] | None  # the original Wan config.json, when next to the weights


def load_original(src: str | Path, source_format: str = "auto", ema: bool = False) -> LoadedCheckpoint:
    """Read an original-layout checkpoint: a ``.safetensors`` file, a shard index, a folder of shards,
    or a ``.pt``/``.pth`` file (``torch.load(weights_only=True)``)."""
    if source_format not in FORMATS:
        raise ValueError(f"unknown source format {source_format!r}; choose one of {', '.join(FORMATS)}")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    folder = src if src.is_dir() else src.parent
    original_config = None
    if (folder / "config.json").is_file():
        try:
            original_config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError:
            original_config = None
    if src.is_dir():
        indexes = sorted(src.glob("*.safetensors.index.json"))
        shards = sorted(src.glob("*.safetensors"))
        pts = sorted([*src.glob("*.pt"), *src.glob("*.pth")])
        if indexes:
            src = indexes[0]
        elif shards:
            state, entry = _load_safetensors(shards), "safetensors"
            fmt = "wan" if source_format == "auto" else source_format
            return LoadedCheckpoint(state, fmt, entry, original_config)
        elif len(pts) == 1:
            src = pts[0]
        else:
            raise ConversionError(f"{folder} holds no .safetensors and {len(pts)} .pt files; name the file")
    name = src.name
    if name.endswith(".safetensors.index.json"):
        index = json.loads(src.read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
        if not files:
            raise ConversionError(f"{src} has an empty weight_map")
        state, entry = _load_safetensors([src.parent / f for f in files]), "safetensors"
        fmt = "wan" if source_format == "auto" else source_format
    elif name.endswith(".safetensors"):
        state, entry = _load_safetensors([src]), "safetensors"
        fmt = "wan" if source_format == "auto" else source_format
    elif src.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state, entry = _select_generator(_load_pt(src), src, ema)
        if source_format == "auto":
            fsdp = any("_fsdp_wrapped_module" in k for k in state)
            fmt = "longlive" if fsdp else ("self-forcing" if entry.startswith("generator") else "wan")
        else:
            fmt = source_format
    else:
        raise ConversionError(f"unsupported checkpoint file {src.name}: use .safetensors or .pt/.pth")
    if ema and entry == "safetensors":
        raise ConversionError("--ema applies to .pt training checkpoints (generator_ema), not to .safetensors")
    return LoadedCheckpoint(state, fmt, entry, original_config)


# --------------------------------------------------------------------------- LoRA (LongLive)

_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$")


def convert_lora_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """A peft LoRA on the original module names (LongLive's ``generator_lora``: ``base_model.model.
    blocks.N.self_attn.q.lora_A.weight``, ...) -> the same LoRA on diffusers module names, and its rank."""
    state = strip_prefixes(state)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        m = _LORA_RE.match(key)
        module = _module_name(m.group("module")) if m else None
        if module is None:
            unknown.append(key)
            continue
        out[f"{module}.lora_{m.group('ab')}.weight"] = value
    if unknown:
        raise ConversionError(f"{len(unknown)} LoRA keys are not peft LoRA weights of original Wan modules: {_describe(sorted(unknown))}")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in out})
    ranks = set()
    for mod in modules:
        a, b = out.get(f"{mod}.lora_A.weight"), out.get(f"{mod}.lora_B.weight")
        if a is None or b is None:
            raise ConversionError(f"LoRA module {mod!r} lacks its lora_{'A' if a is None else 'B'} weight")
        if a.shape[0] != b.shape[1]:
            raise ConversionError(f"LoRA module {mod!r}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}")
        ranks.add(int(a.shape[0]))
    if not modules:
        raise ConversionError("the LoRA file holds no LoRA weights")
    if len(ranks) != 1:
        raise ConversionError(f"the LoRA mixes ranks {sorted(ranks)}; one rank is supported")
    return out, ranks.pop()


def load_lora_file(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.name.endswith(".safetensors"):
        return _load_safetensors([path])
    obj = _load_pt(path)
    if isinstance(obj, Mapping) and "generator_lora" in obj:
        obj = obj["generator_lora"]
    if not _is_tensor_dict(obj):
        raise ConversionError(f"{path} is not a LoRA state dict (nor a dict with 'generator_lora')")
    return dict(obj)


def write_lora_adapter(
    state: Mapping[str, Tensor], rank: int, alpha: float, directory: str | Path, state_shapes: Mapping[str, tuple]
) -> Path:
    """Write a converted LoRA as diffusers/peft ``pytorch_lora_weights.safetensors`` with its
    ``LoraConfig`` in the metadata (as ``save_lora_adapter`` does), checking each module exists."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from .lora import LORA_WEIGHT_NAME

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    for mod in modules:
        weight = state_shapes.get(f"{mod}.weight")
        if weight is None:
            raise ConversionError(f"the LoRA targets {mod!r}, which the model lacks")
        a, b = state[f"{mod}.lora_A.weight"].shape, state[f"{mod}.lora_B.weight"].shape
        if (b[0], a[1]) != tuple(weight):
            raise ConversionError(f"LoRA of {mod!r} is {b[0]}x{a[1]}, the weight is {tuple(weight)}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights=True).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True, default=str)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LORA_WEIGHT_NAME
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------- writing


def save_sharded(state: Mapping[str, Tensor], directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """diffusers' weight files: one ``diffusion_pytorch_model.safetensors``, or shards plus an index."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    storages: set[int] = set()
    for key in sorted(state):
        t = state[key].contiguous()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share memory (flat training buffers, tied views): copy those
        if storage.data_ptr() in storages or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


@dataclass
class ConversionResult:
    directory: Path
    source_format: str
    entry: str
    config: dict[str, Any]
    num_parameters: int
    lora_rank: int | None = None
    distillation: dict[str, Any] | None = None


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    source_format: str = "auto",
    ema: bool = False,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    num_heads: int | None = None,
    chunk_frames: int | None = 3,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> ConversionResult:
    """Convert ``src`` (original layout) into the diffusers-layout transformer folder ``dst``:
    ``config.json`` (from the tensor shapes), ``diffusion_pytorch_model*.safetensors``, the LoRA as a peft
    adapter in ``dst/lora`` when given, and for distilled sources ``egolcd_distillation.json`` (their step
    list, warp and shift: the schedule ``egolcd.flow.sample_distilled`` should use).

    Args:
        source_format: ``auto`` or one of ``SOURCE_FORMATS`` (auto: safetensors -> wan; a ``.pt`` with an
            FSDP prefix -> longlive; another ``.pt`` with ``generator`` -> self-forcing).
        ema: take ``generator_ema`` instead of ``generator``.
        lora, lora_alpha: a LoRA checkpoint (LongLive) and its alpha (default: its rank, as LongLive).
        num_heads: heads (default: the original ``config.json``'s ``num_heads``, else ``dim // 128``).
        chunk_frames: latent frames per chunk of the block-causal model (3, as Self-Forcing / CausVid /
            LongLive generate 3 latent frames per block).
        dtype: cast floating tensors (default: keep the checkpoint's).
    """
    from .transformer import EgoLCDTransformer3DModel

    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite to replace it)")
    loaded = load_original(src, source_format, ema)
    state = convert_state_dict(loaded.state)
    if num_heads is None and loaded.original_config and "num_heads" in loaded.original_config:
        num_heads = int(loaded.original_config["num_heads"])
    eps = float((loaded.original_config or {}).get("eps", 1e-6))
    config = derive_config(state, num_heads=num_heads, chunk_frames=chunk_frames, eps=eps)
    orig = loaded.original_config or {}
    for ours, theirs in (("num_layers", "num_layers"), ("ffn_dim", "ffn_dim"), ("in_channels", "in_dim")):
        if theirs in orig and int(orig[theirs]) != config[ours]:
            raise ConversionError(f"config.json says {theirs}={orig[theirs]}, the tensors say {config[ours]}")
    check_against_model(state, config)
    lora_state = None
    lora_rank = None
    if lora is not None:
        lora_state, lora_rank = convert_lora_state_dict(load_lora_file(lora))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    dst.mkdir(parents=True, exist_ok=True)
    for old in [*dst.glob("diffusion_pytorch_model*.safetensors"), dst / WEIGHTS_INDEX_NAME, dst / DISTILLATION_NAME]:
        old.unlink(missing_ok=True)
    if (dst / LORA_DIR).is_dir():  # a stale adapter from an earlier conversion would load with the new weights
        import shutil

        shutil.rmtree(dst / LORA_DIR)
    with torch.device("meta"):
        EgoLCDTransformer3DModel(**config).save_config(str(dst))
    save_sharded(state, dst, max_shard_bytes)
    if lora_state is not None:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        write_lora_adapter(lora_state, lora_rank, alpha, dst / LORA_DIR, shapes)
    distillation = None
    if loaded.source_format in DISTILLED_DEFAULTS:
        from .flow import distilled_sigmas

        distillation = dict(DISTILLED_DEFAULTS[loaded.source_format])
        sig = distilled_sigmas(distillation["denoising_step_list"], distillation["shift"], distillation["warp_denoising_step"])
        distillation.update(source=loaded.source_format, sampler="distilled", sigmas=[round(float(s), 6) for s in sig])
        (dst / DISTILLATION_NAME).write_text(json.dumps(distillation, indent=2))
    n_params = sum(v.numel() for v in state.values())
    logger.info(
        "converted %s (%s, %s) to %s: %d layers, dim %d, %d heads, %d parameters%s",
        src, loaded.source_format, loaded.entry, dst, config["num_layers"],
        config["num_attention_heads"] * config["attention_head_dim"], config["num_attention_heads"], n_params,
        f", LoRA rank {lora_rank}" if lora_rank else "",
    )
    return ConversionResult(dst, loaded.source_format, loaded.entry, config, n_params, lora_rank, distillation)


__all__ = [
    "BLOCK_MODULES",
    "BLOCK_PARAMS",
    "DISTILLED_DEFAULTS",
    "FORMATS",
    "SOURCE_FORMATS",
    "TOP_MODULES",
    "TOP_PARAMS",
    "ConversionError",
    "ConversionResult",
    "convert_checkpoint",
    "convert_lora_state_dict",
    "convert_state_dict",
    "derive_config",
    "load_original",
    "map_key",
    "strip_prefixes",
]
