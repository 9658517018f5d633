"""Export: a training checkpoint -> a model folder that ``EgoLCDPipeline.from_pretrained`` loads."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..lora import merge_lora
from .checkpoint import CHECKPOINT_FORMAT, latest_checkpoint
from .config import load_train_config
from .model import _generation_config, _resolve_init_dir, _save_lora_quietly, _save_model_dir, build_model

logger = logging.getLogger(__name__)


def export_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    merge: bool = False,
    use_ema: bool = True,
    overwrite: bool = False,
    memory_guidance: float | None = None,
) -> Path:
    """Write a model folder that ``EgoLCDPipeline.from_pretrained(out_dir)`` loads.

    Args:
        ckpt_dir: a checkpoint folder, or a training output folder (its latest checkpoint).
        out_dir: the model folder to write (``transformer/``, ``vae/``, ``scheduler/``,
            ``egolcd_config.json``; ``text_encoder/`` and ``tokenizer/`` are copied from the init model
            when it has them).
        merge: fold a LoRA into the base weights (plain transformer) instead of ``transformer/lora/``.
        use_ema: take the EMA weights when the checkpoint has them.
        overwrite: replace an existing non-empty ``out_dir``.
        memory_guidance: the model's default memory guidance (``GenerationConfig.memory_guidance``); ``None``
            keeps the init model's.
    """
    from ..vae import VideoVAE

    ckpt = Path(ckpt_dir)
    if not (ckpt / "trainer_state.json").is_file():
        latest = latest_checkpoint(ckpt)
        if latest is None:
            raise FileNotFoundError(f"no training checkpoint at {ckpt}")
        ckpt = latest
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt} is not an egolcd training checkpoint")
    cfg = load_train_config(ckpt / "config.yaml")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    init_dir = Path(state["init_model"])
    if not (init_dir / "transformer").is_dir():  # moved output folder, or another machine
        if cfg.init_model is not None:
            init_dir = _resolve_init_dir(cfg.init_model)
        elif (ckpt.parent / "init_model" / "transformer").is_dir():
            init_dir = ckpt.parent / "init_model"
        else:
            raise FileNotFoundError(f"the checkpoint's init model {state['init_model']} is gone")

    # 1. The trained transformer: base + trained weights (EMA when present and wanted)
    model = build_model(dataclasses.replace(cfg, gradient_checkpointing=False), init_dir)
    source = ckpt / (
        "ema.safetensors" if use_ema and (ckpt / "ema.safetensors").is_file() else "trainable.safetensors"
    )
    tensors = load_file(str(source))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trainable:
        raise ValueError(f"{source} does not match the model built from its config")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    model.requires_grad_(False).eval()
    logger.info(
        "exporting %s (%s)%s", ckpt, source.name, ", LoRA merged" if merge and cfg.lora.enabled else ""
    )

    # 2. Write next to the target, then rename
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae = VideoVAE.from_pretrained(init_dir / "vae")
    gen = _generation_config(cfg, init_dir)
    if memory_guidance is not None:
        gen.memory_guidance = float(memory_guidance)
    adapter = tmp / "lora-adapter"
    if cfg.lora.enabled and not merge:
        _save_lora_quietly(model, adapter)
        model.unload_lora()
    elif cfg.lora.enabled:
        merge_lora(model)
    _save_model_dir(tmp, model, vae, gen)
    if adapter.is_dir():
        os.replace(adapter, tmp / "transformer" / "lora")
    for part in ("text_encoder", "tokenizer"):
        if (init_dir / part).is_dir():
            _copy_tree(init_dir / part, tmp / part)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    logger.info("model written to %s", out)
    return out


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where the filesystem allows (text encoders are large)."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)
