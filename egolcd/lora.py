"""LoRA on the DiT (peft, through diffusers' ``PeftAdapterMixin``): the paper freezes the DiT blocks and
trains LoRA adapters (figure 1). Adapters save/load in the diffusers/peft safetensors format and can be
merged into the base weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig

from .transformer import EgoLCDTransformer3DModel

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class LoRAConfig:
    """Args: rank, alpha, dropout: LoRA hyper-parameters; target_modules: module names (default: the
    self-attention projections); adapter_name: peft adapter name."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"])
    adapter_name: str = "default"

    def to_peft(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            init_lora_weights=True,
        )


def attach_lora(model: EgoLCDTransformer3DModel, config: LoRAConfig | None = None) -> EgoLCDTransformer3DModel:
    """Freeze the base model and add trainable LoRA adapters (B initialised to zero: output unchanged)."""
    config = config or LoRAConfig()
    model.requires_grad_(False)
    model.add_adapter(config.to_peft(), adapter_name=config.adapter_name)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("LoRA rank %d on %s: %d trainable of %d parameters", config.rank, config.target_modules, n_train, n_all)
    return model


def trainable_parameters(model: EgoLCDTransformer3DModel) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(model: EgoLCDTransformer3DModel, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write the adapter as ``pytorch_lora_weights.safetensors`` (diffusers/peft key names, no prefix)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_lora_adapter(str(directory), adapter_name=adapter_name, weight_name=LORA_WEIGHT_NAME)
    return directory / LORA_WEIGHT_NAME


def load_lora(
    model: EgoLCDTransformer3DModel, directory: str | Path, adapter_name: str = "default"
) -> EgoLCDTransformer3DModel:
    """Load an adapter written by ``save_lora`` (or any diffusers-format transformer LoRA)."""
    directory = Path(directory)
    if not (directory / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"no LoRA adapter at {directory} (expected {LORA_WEIGHT_NAME})")
    from .limits import check_safetensors_folder

    check_safetensors_folder(directory)  # a truncated or garbage adapter: one line, not a SafetensorError
    model.load_lora_adapter(str(directory), prefix=None, weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    return model


def merge_lora(model: EgoLCDTransformer3DModel) -> EgoLCDTransformer3DModel:
    """Fold every adapter into the base weights and remove the LoRA layers (plain Wan weights again)."""
    model.fuse_lora()
    model.unload_lora()
    return model
