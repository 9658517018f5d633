"""The model being trained: base weights (+ LoRA), the initial model folder, the loss module, EMA, LR schedule."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Preset, get_preset
from ..lora import attach_lora, load_lora, merge_lora, save_lora
from ..losses import LossWeights, teacher_forcing_loss
from ..memory import MemoryPolicy
from ..transformer import EgoLCDTransformer3DModel
from .config import TrainConfig, _bad

logger = logging.getLogger(__name__)


def _resolve_init_dir(init_model: str) -> Path:
    path = Path(init_model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or init_model.startswith(("/", ".", "~")) or init_model.count("/") != 1:
        raise FileNotFoundError(f"init_model not found: {init_model}")
    from huggingface_hub import snapshot_download

    try:  # a hub id already in the local cache; never downloads
        return Path(snapshot_download(init_model, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several error types
        raise FileNotFoundError(
            f"init_model {init_model!r} is neither a folder nor a cached hub id ({exc})"
        ) from None


_CHECKED_FIELDS = (
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "ffn_dim",
    "chunk_frames",
)


def load_base_transformer(init_dir: str | os.PathLike[str], preset: Preset) -> EgoLCDTransformer3DModel:
    """The frozen starting weights: ``init_dir/transformer`` (``chunk_frames`` from the preset when the
    checkpoint has none, e.g. a Wan2.1 checkpoint); a ``transformer/lora`` adapter is merged in."""
    tdir = Path(init_dir) / "transformer"
    if not (tdir / "config.json").is_file():
        raise FileNotFoundError(f"init_model {init_dir} has no transformer/ folder")
    config = EgoLCDTransformer3DModel.load_config(str(tdir))
    extra = {} if config.get("chunk_frames") else {"chunk_frames": preset.chunk_frames}
    model = EgoLCDTransformer3DModel.from_pretrained(str(tdir), torch_dtype=torch.float32, **extra)
    for name in _CHECKED_FIELDS:
        have, want = model.config.get(name), preset.transformer.get(name)
        if want is not None and have != want:
            raise ValueError(
                f"init_model transformer does not match preset {preset.name!r}: {name}={have} "
                f"(preset: {want})"
            )
    if (tdir / "lora").is_dir():
        logger.info("merging the LoRA adapter of %s into the base weights", tdir)
        merge_lora(load_lora(model, tdir / "lora"))
    return model


@torch.no_grad()
def init_position_heads(model: EgoLCDTransformer3DModel, heads: int, bias: float = 3.0, norm: float = 3.0) -> None:
    """Start the first ``heads`` self-attention heads of every block as *position-matching* heads.

    Their q/k weights are scaled by 0.1 and their q/k biases put ``bias`` on the highest-frequency rotary pair
    of each axis (and on the second temporal pair, which breaks the first one's 6-frame alias); their q/k
    RMSNorm weights are set to ``norm``. So each query's logits peak at relative position (0, 0, 0) and fall
    off within one frame or one token: a token meets itself and whatever sits on its own frame and place,
    such as an aligned revisit entry on the current chunk's positions (``MemoryConfig.revisit_position =
    "current"``). Without it the demo DiT never learned to copy from its context (``benchmarks/copy_probe.py``,
    METHOD.md "Position-matching heads"); the other heads keep their initialisation.
    """
    from ..attention import rope_split

    d, n_heads = model.config.attention_head_dim, model.config.num_attention_heads
    if not 0 <= heads <= n_heads:
        raise ValueError(f"position heads must be in [0, {n_heads}], got {heads}")
    t_dim, h_dim, _ = rope_split(d)
    dims = [0, 2, t_dim, t_dim + h_dim]  # first components of temporal pairs 0-1, row pair 0, column pair 0
    for block in model.blocks:
        attn = block.attn1
        for proj, norm_layer in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
            for h in range(heads):
                rows = slice(h * d, (h + 1) * d)
                proj.weight[rows].mul_(0.1)
                proj.bias[rows] = 0.0
                proj.bias[[h * d + i for i in dims]] = bias
                norm_layer.weight[rows] = norm


def build_model(cfg: TrainConfig, init_dir: Path) -> EgoLCDTransformer3DModel:
    """Base weights + LoRA (base frozen) or all weights trainable; gradient checkpointing if asked."""
    model = load_base_transformer(init_dir, get_preset(cfg.preset))
    if cfg.lora.enabled:
        attach_lora(model, cfg.lora.to_lora_config())
    else:
        model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _save_model_dir(directory: Path, transformer: EgoLCDTransformer3DModel, vae: Any, config: Any) -> None:
    """A model folder without loading a text encoder."""
    from ..pipeline import save_model_dir

    save_model_dir(directory, transformer, vae, config)


def _generation_config(cfg: TrainConfig, init_dir: Path) -> Any:
    """The model's ``GenerationConfig`` (from ``init_dir`` when it has one) with the training memory."""
    from ..pipeline import CONFIG_NAME, GenerationConfig

    path = init_dir / CONFIG_NAME
    if path.is_file():
        gen = GenerationConfig.from_dict(json.loads(path.read_text()))
    else:
        text_path = str(init_dir) if (init_dir / "text_encoder").is_dir() else None
        gen = GenerationConfig.from_preset(get_preset(cfg.preset), text_encoder_path=text_path)
    gen.memory = dataclasses.replace(cfg.policy_config)
    return gen


def _materialize_init_model(cfg: TrainConfig, directory: Path) -> None:
    """Random weights of the preset (seeded), saved once as a model folder every later step starts from."""
    from ..vae import build_vae

    preset = get_preset(cfg.preset)
    if preset.vae != "embedded":
        raise _bad(f"preset {cfg.preset!r} needs 'init_model' (a Wan2.1 diffusers folder with vae/)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        transformer = EgoLCDTransformer3DModel.from_preset(cfg.preset)
    vae = build_vae(preset, None)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_model_dir(tmp, transformer, vae, _generation_config(cfg, tmp))
    os.replace(tmp, directory)
    logger.info("random %s weights saved to %s", cfg.preset, directory)


class TrainingModule(nn.Module):
    """The transformer plus the policy-driven clip loss, as one module whose ``forward`` is the loss (so
    DDP/FSDP and mixed precision wrap the whole teacher-forcing pass)."""

    def __init__(
        self,
        transformer: EgoLCDTransformer3DModel,
        policy: MemoryPolicy,
        weights: LossWeights,
        policies: dict[str, MemoryPolicy] | None = None,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.policy = policy
        self.policies = policies or {policy.name: policy}
        self.weights = weights

    def forward(
        self,
        x0: Tensor,
        eps: Tensor,
        t: Tensor,
        text: list[Tensor],
        embeddings: list[Tensor],
        segments: list[int],
        revisits: dict[int, int] | None = None,
        policy: str | None = None,
        scored: list[int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        out = teacher_forcing_loss(
            self.transformer,
            self.policies[policy] if policy is not None else self.policy,
            x0,
            eps,
            t,
            text=text,
            embeddings=embeddings,
            segments=segments,
            revisits=revisits,
            weights=self.weights,
            scored=scored,
        )
        return out.loss, out.flow, out.memory


class EMA:
    """Exponential moving average of the trainable weights (float32 shadow copies)."""

    def __init__(self, params: dict[str, Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor]) -> None:
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not match the trainable parameters")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextmanager
    def applied(self, params: dict[str, Tensor]) -> Iterator[None]:
        """Temporarily put the EMA weights into ``params``."""
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warmup, total, floor = cfg.scheduler.warmup_steps, cfg.max_steps, cfg.scheduler.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _clean_name(name: str) -> str:
    """A parameter name without the wrapper prefixes FSDP / activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _save_lora_quietly(model: EgoLCDTransformer3DModel, directory: Path) -> None:
    """``save_lora`` without diffusers' warning about its internal ``model.to(dtype=None)``."""
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        save_lora(model, directory)
    finally:
        diffusers_logger.setLevel(level)
