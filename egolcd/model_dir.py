"""A model folder: its ``egolcd_config.json`` (:class:`GenerationConfig`, the generation defaults stored with a
model) and :func:`save_model_dir`, which writes the folder ``EgoLCDPipeline.from_pretrained`` reads."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import MemoryConfig, Preset
from .flow import make_scheduler

if TYPE_CHECKING:
    from .transformer import EgoLCDTransformer3DModel
    from .vae import VideoVAE

CONFIG_NAME = "egolcd_config.json"
EMBEDDED_MODEL_DIR = Path(__file__).parent / "assets" / "demo"


@dataclass
class GenerationConfig:
    """Defaults stored with a model (``egolcd_config.json``); every field can be overridden per call.

    Args:
        preset: the size preset the model was built from.
        text_encoder: ``minilm`` or ``umt5``/``t5``; text_encoder_path: local path or hub id for T5 kinds.
        fps, height, width: default video geometry (a narrative may override).
        steps, shift, sampler, guidance, negative_prompt: sampling defaults.
        memory: default memory configuration.
        denoising_step_list, warp_denoising_step: a distilled model's own schedule (Self-Forcing,
            CausVid, LongLive: e.g. ``[1000, 750, 500, 250]``, warped with ``shift``), used by the
            ``distilled`` sampler at ``len(denoising_step_list)`` steps (``sampling_sigmas``).
    """

    preset: str = "tiny"
    text_encoder: str = "minilm"
    text_encoder_path: str | None = None
    text_max_length: int = 128
    fps: int = 8
    height: int = 64
    width: int = 64
    steps: int = 4
    shift: float = 5.0
    sampler: str = "euler"
    guidance: float = 1.0
    negative_prompt: str = ""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    denoising_step_list: list[int] | None = None
    warp_denoising_step: bool = True

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: Any) -> GenerationConfig:
        base = dict(
            preset=preset.name, text_encoder=preset.text_encoder, fps=preset.fps,
            height=preset.height, width=preset.width, memory=preset.memory,
            text_max_length=preset.text_max_length,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{CONFIG_NAME} must hold a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys in {CONFIG_NAME}: {', '.join(unknown)}")
        data = dict(data)
        for name, value in data.items():  # each value has its default's type ("steps": "four" fails here)
            default = cls.__dataclass_fields__[name].default
            if name == "memory":
                if not isinstance(value, dict):
                    raise ValueError(f"{CONFIG_NAME}: memory must be an object, got {type(value).__name__}")
                continue
            if name == "text_encoder_path":
                ok = value is None or isinstance(value, str)
            elif name == "denoising_step_list":
                ok = value is None or (
                    isinstance(value, list) and bool(value)
                    and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1000 for v in value)
                    and all(a > b for a, b in zip(value, value[1:]))
                )
                if not ok:
                    raise ValueError(
                        f"{CONFIG_NAME}: denoising_step_list must be null or descending integers in 1..1000, got {value!r}"
                    )
            elif isinstance(default, bool) or isinstance(default, str):
                ok = isinstance(value, type(default))
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = True
            if not ok:
                want = "a positive integer" if isinstance(default, int) else type(default).__name__
                raise ValueError(f"{CONFIG_NAME}: {name} must be {want}, got {value!r}")
        _check_config_values(data)
        try:
            data["memory"] = MemoryConfig(**data.get("memory", {}))
        except TypeError as exc:  # an unknown key in "memory"
            raise ValueError(f"{CONFIG_NAME}: memory: {exc}") from None
        return cls(**data)


def _check_config_values(data: dict[str, Any]) -> None:
    """Names and sizes in ``egolcd_config.json`` that its types alone do not catch: an unknown preset,
    sampler or text encoder, and a default size or rate above the documented limits (``egolcd.limits``)."""
    from .config import PRESETS
    from .flow import SAMPLERS
    from .limits import limit, over
    from .text import TEXT_ENCODERS

    for key, known in (("preset", PRESETS), ("sampler", SAMPLERS), ("text_encoder", TEXT_ENCODERS)):
        if key in data and data[key] not in known:
            raise ValueError(f"{CONFIG_NAME}: unknown {key} {data[key]!r}; one of {', '.join(sorted(known))}")
    for key, name in (("width", "side"), ("height", "side"), ("fps", "fps")):
        if key in data and data[key] > limit(name):
            raise ValueError(f"{CONFIG_NAME}: " + over(name, key, data[key]))


def save_model_dir(
    directory: str | Path, transformer: EgoLCDTransformer3DModel, vae: VideoVAE, config: GenerationConfig
) -> None:
    """Write a model folder (``transformer/``, ``vae/``, ``scheduler/``, ``model_index.json``,
    ``egolcd_config.json``); the text encoder is named in the config, not saved."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(directory / "transformer")
    vae.save_pretrained(directory / "vae")
    make_scheduler("unipc", config.steps, config.shift).save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "EgoLCDPipeline",
        "_egolcd_version": __version__,
        "transformer": ["egolcd", "EgoLCDTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["egolcd", config.text_encoder],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    (directory / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2))
