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

The key table and the config derived from shapes live in :mod:`egolcd.convert_keys` (re-exported here).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .convert_keys import (
    BLOCK_MODULES,
    BLOCK_PARAMS,
    TOP_MODULES,
    TOP_PARAMS,
    ConversionError,
    _describe,
    _module_name,
    check_against_model,
    convert_state_dict,
    derive_config,
    map_key,
    strip_prefixes,
)

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("wan", "self-forcing", "causvid", "longlive")
FORMATS = ("auto", *SOURCE_FORMATS)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DISTILLATION_NAME = "egolcd_distillation.json"
LORA_DIR = "lora"

# The distilled models' own sampling defaults (their inference configs): step list, warp, shift.
DISTILLED_DEFAULTS: dict[str, dict[str, Any]] = {
    "self-forcing": {"denoising_step_list": [1000, 750, 500, 250], "warp_denoising_step": True, "shift": 5.0},
    "longlive": {"denoising_step_list": [1000, 750, 500, 250], "warp_denoising_step": True, "shift": 5.0},
    "causvid": {"denoising_step_list": [1000, 757, 522], "warp_denoising_step": False, "shift": 8.0},
}


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
