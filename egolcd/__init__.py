"""egolcd: long, coherent egocentric video generation with long-context diffusion (EgoLCD)."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import PRESETS, MemoryConfig, Preset, get_preset  # noqa: E402

__all__ = ["PRESETS", "MemoryConfig", "Preset", "get_preset", "__version__"]
