"""A model folder: its ``egolcd_config.json`` (:class:`GenerationConfig`, the generation defaults stored with a
model) and :func:`save_model_dir`, which writes the folder ``EgoLCDPipeline.from_pretrained`` reads."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from . import __version__
from .config import MemoryConfig, Preset
from .flow import make_scheduler

if TYPE_CHECKING:
    from .transformer import EgoLCDTransformer3DModel
    from .vae import VideoVAE

CONFIG_NAME = "egolcd_config.json"
EMBEDDED_MODEL_DIR = Path(__file__).parent / "assets" / "demo"


def _descending(steps: list[int]) -> list[int]:
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError("must be descending")
    return steps


# The value types of egolcd_config.json (pydantic, strict: an int is not a bool, a float is not a string).
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
FiniteFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]
StepList = Annotated[
    list[Annotated[int, Strict(), Field(gt=0, le=1000)]], Strict(), Field(min_length=1), AfterValidator(_descending)
]


@dataclass
class GenerationConfig:
    """Defaults stored with a model (``egolcd_config.json``); every field can be overridden per call.

    Args:
        preset: the size preset the model was built from.
        text_encoder: ``minilm`` or ``umt5``/``t5``; text_encoder_path: local path or hub id for T5 kinds.
        fps, height, width: default video geometry (a narrative may override).
        steps, shift, sampler, guidance, negative_prompt: sampling defaults.
        memory: default memory configuration.
        memory_guidance: guidance scale on the retrieved long-term entries of a revisit's chunks (1 = off;
            ``chunk_loop.chunk_denoiser``).
        denoising_step_list, warp_denoising_step: a distilled model's own schedule (Self-Forcing,
            CausVid, LongLive: e.g. ``[1000, 750, 500, 250]``, warped with ``shift``), used by the
            ``distilled`` sampler at ``len(denoising_step_list)`` steps (``sampling_sigmas``).
    """

    preset: StrictStr = "tiny"
    text_encoder: StrictStr = "minilm"
    text_encoder_path: StrictStr | None = None
    text_max_length: PositiveInt = 128
    fps: PositiveInt = 8
    height: PositiveInt = 64
    width: PositiveInt = 64
    steps: PositiveInt = 4
    shift: FiniteFloat = 5.0
    sampler: StrictStr = "euler"
    guidance: FiniteFloat = 1.0
    memory_guidance: FiniteFloat = 1.0
    negative_prompt: StrictStr = ""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    denoising_step_list: StepList | None = None
    warp_denoising_step: StrictBool = True

    # pydantic (from_dict): unknown keys refused (each field's type is strict)
    __pydantic_config__ = ConfigDict(extra="forbid")

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
        """Validate a parsed ``egolcd_config.json`` (pydantic, strict types: an int is not a bool, a float
        not a string). Raises a one-line ``ValueError`` naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"{CONFIG_NAME} must hold a JSON object, got {type(data).__name__}")
        memory = data.get("memory", {})
        errors: list[dict[str, Any]] = []
        try:
            config = _adapter().validate_python({k: v for k, v in data.items() if k != "memory"})
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        if not isinstance(memory, dict):  # its keys are MemoryConfig's (below)
            errors.append({"loc": ("memory",), "type": "dict_type"})
        if errors:
            raise _config_error(errors, data)
        _check_config_values(data)
        try:
            return replace(config, memory=MemoryConfig(**memory))
        except TypeError as exc:  # an unknown key in "memory"
            raise ValueError(f"{CONFIG_NAME}: memory: {exc}") from None


@functools.cache
def _adapter() -> TypeAdapter[GenerationConfig]:
    return TypeAdapter(GenerationConfig)


_WANT = {
    "int_type": "a positive integer",
    "greater_than": "a positive integer",
    "float_type": "a finite number",
    "finite_number": "a finite number",
    "bool_type": "bool",
    "string_type": "str",
}


def _config_error(errors: list[dict[str, Any]], data: dict[str, Any]) -> ValueError:
    """pydantic's errors as the one line of the first problem: every unknown key, else the first bad value
    in the file's key order."""
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"))
    if unknown:
        return ValueError(f"unknown keys in {CONFIG_NAME}: {', '.join(unknown)}")
    order = list(data)
    first = min(errors, key=lambda e: order.index(e["loc"][0]))
    name = str(first["loc"][0])
    if name == "memory":
        return ValueError(f"{CONFIG_NAME}: memory must be an object, got {type(data[name]).__name__}")
    if name == "denoising_step_list":
        return ValueError(
            f"{CONFIG_NAME}: denoising_step_list must be null or descending integers in 1..1000, got {data[name]!r}"
        )
    want = _WANT.get(first["type"], first["msg"].lower())
    if GenerationConfig.__dataclass_fields__[name].default is None:
        want += " or null"
    return ValueError(f"{CONFIG_NAME}: {name} must be {want}, got {data[name]!r}")


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
    for part in ("transformer", "vae"):
        # diffusers records where the model was loaded from (an absolute local path); loading sets it anew, so a
        # shared folder should not carry it
        path = directory / part / "config.json"
        saved = json.loads(path.read_text())
        saved.pop("_name_or_path", None)
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    make_scheduler("unipc", config.steps, config.shift).save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "EgoLCDPipeline",
        "_egolcd_version": __version__,
        "transformer": ["egolcd", "EgoLCDTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["egolcd", config.text_encoder],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2) + "\n")
