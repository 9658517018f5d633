"""egolcd: long, coherent egocentric video generation with long-context diffusion (EgoLCD).

    >>> from egolcd import EgoLCDPipeline, EgoLCDTransformer3DModel, MemoryPolicy  # doctest: +SKIP

Heavy modules (torch, diffusers) are imported on first use, so ``egolcd --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .config import MEMORY_POLICIES, PRESETS, MemoryConfig, Preset, get_preset  # noqa: E402

_LAZY = {
    "EgoLCDTransformer3DModel": "transformer",
    "LayerKV": "attention",
    "ShortTermWindow": "memory",
    "LongTermSparseKVCache": "memory",
    "MemoryPolicy": "memory",
    "MemoryState": "memory",
    "memory_regulation_loss": "losses",
    "teacher_forcing_loss": "losses",
    "compile_narrative": "narrative",
    "load_narrative": "narrative",
    "EgoLCDPipeline": "pipeline",
    "VideoVAE": "vae",
}

__all__ = ["MEMORY_POLICIES", "PRESETS", "MemoryConfig", "Preset", "get_preset", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'egolcd' has no attribute {name!r}")
