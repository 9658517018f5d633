"""The training configuration: the ``TrainConfig`` schema of ``configs/train/*.yaml``, its sections and loader.

Values are checked on load; an error is one ``ValueError`` line naming the key (``train config: ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import random
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from ..config import MEMORY_POLICIES, PRESETS, MemoryConfig, get_preset
from ..lora import LoRAConfig
from ..losses import LOSS_VARIANTS

MIXED_PRECISION = ("no", "bf16", "fp16")
TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")
REPORT_TO = ("auto", "tensorboard", "none")


def _bad(message: str) -> ValueError:
    return ValueError(f"train config: {message}")


@dataclass
class LossConfig:
    """Args: memory_weight: lambda of the memory term; variant: ``mr`` | ``anchor`` | ``none``;
    scored_chunks: score this many chunks per clip, the chunks that revisit a place first, the rest drawn
    at random (``null``: every chunk). Unscored chunks still run their clean pass and write memory."""

    memory_weight: float = 0.1
    variant: str = "mr"
    scored_chunks: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in LOSS_VARIANTS:
            raise _bad(f"'loss.variant' must be one of {', '.join(LOSS_VARIANTS)}, got {self.variant!r}")
        if self.memory_weight < 0:
            raise _bad(f"'loss.memory_weight' must be >= 0, got {self.memory_weight}")
        if self.scored_chunks is not None and (isinstance(self.scored_chunks, bool) or self.scored_chunks < 1):
            raise _bad(f"'loss.scored_chunks' must be >= 1 or null, got {self.scored_chunks}")


@dataclass
class LoRASection:
    """LoRA (base frozen) when ``enabled``, else full fine-tuning of every transformer weight."""

    enabled: bool = True
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LoRAConfig().target_modules))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise _bad(f"'lora.rank' must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise _bad(f"'lora.dropout' must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise _bad("'lora.target_modules' must name at least one module")

    def to_lora_config(self) -> LoRAConfig:
        return LoRAConfig(
            rank=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=list(self.target_modules)
        )


@dataclass
class OptimizerConfig:
    """AdamW. ``grad_clip``: max global gradient norm (``null``: no clipping). ``qk_norm_lr_scale``:
    learning-rate multiplier of the self-attention q/k RMSNorm weights, which set the attention temperature
    (with Wan's qk-norm at weight 1 a logit is at most sqrt(head_dim); a short run at the base rate leaves
    attention near uniform)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    qk_norm_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise _bad(f"'optimizer.lr' must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad(f"'optimizer.betas' must be in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise _bad(f"'optimizer.grad_clip' must be > 0 or null, got {self.grad_clip}")
        if not self.qk_norm_lr_scale > 0:
            raise _bad(f"'optimizer.qk_norm_lr_scale' must be > 0, got {self.qk_norm_lr_scale}")


@dataclass
class SchedulerConfig:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""

    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise _bad(f"'scheduler.warmup_steps' must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _bad(f"'scheduler.min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise _bad(f"'ema.decay' must be in [0, 1), got {self.decay}")


@dataclass
class TimestepConfig:
    """Training noise levels: ``distribution`` (uniform | logit_normal) then Wan's ``shift``."""

    shift: float = 5.0
    distribution: str = "uniform"

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise _bad(f"'timesteps.shift' must be > 0, got {self.shift}")
        if self.distribution not in TIMESTEP_DISTRIBUTIONS:
            raise _bad(
                f"'timesteps.distribution' must be one of {', '.join(TIMESTEP_DISTRIBUTIONS)}, "
                f"got {self.distribution!r}"
            )


@dataclass
class TrainConfig:
    """Everything a training run needs; loaded from YAML by :func:`load_train_config` (pydantic checks the
    types of every section: strict, unknown keys refused).

    Args:
        output_dir: checkpoints, logs, samples (and ``init_model/`` when starting from random weights).
        data: latent-cache directory (``index.json``; ``egolcd.data.latents.LatentDataset``).
        preset: size preset (``egolcd.config.PRESETS``).
        init_model: model folder to start from (egolcd or Wan2.1 diffusers layout, or a hub id in the local
            cache); ``null``: random weights of ``preset``, saved once to ``OUTPUT_DIR/init_model``.
        memory: the memory policy (same in training and inference); YAML keys override the preset's.
        loss, lora, optimizer, scheduler, ema, timesteps: see their classes.
        max_steps: optimizer steps. batch_size: clips per process per micro-batch. grad_accum: micro-batches
            per optimizer step. mixed_precision: no | bf16 | fp16. gradient_checkpointing: per DiT block.
        seed: everything (init, data order, noise) derives from it.
        log_every: steps between log lines / tracker points. checkpoint_every: steps between checkpoints.
        keep_checkpoints: how many recent checkpoints to keep (``null``: all). num_workers: data loading.
        max_bad_steps: abort after this many non-finite losses in a row.
        sample_every: steps between sample videos (0: never) of ``sample_narrative`` with ``sample_steps``.
        report_to: auto (tensorboard when installed) | tensorboard | none.
        clip_chunks: chunks per training clip, cut at every offset of the cached clips (``null``: whole
            cached clips). min_revisit_chunks: keep only clips with this many chunks that revisit a
            segment which has left the short-term window (long-term memory must serve them).
        policy_mix: ``{policy: weight}``; each step trains one policy drawn from it (e.g. mostly ``egolcd``,
            some ``dense`` and ``window``, so ``dense`` stays an upper bound). ``null``: ``memory.policy``.
    """

    output_dir: str
    data: str | None = None
    preset: str = "tiny"
    init_model: str | None = None
    memory: MemoryConfig | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema: EMAConfig = field(default_factory=EMAConfig)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 3
    num_workers: int = 0
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    max_bad_steps: int = 5
    sample_every: int = 0
    sample_narrative: str | None = None
    sample_steps: int | None = None
    report_to: str = "auto"
    clip_chunks: int | None = None
    min_revisit_chunks: int = 0
    policy_mix: dict[str, float] | None = None

    # pydantic (see _validate): also applies to the nested sections and the MemoryConfig
    __pydantic_config__ = {"strict": True, "extra": "forbid"}

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise _bad(f"'preset' must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.memory is None:
            self.memory = dataclasses.replace(get_preset(self.preset).memory)
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise _bad(f"'{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "sample_every"):
            if getattr(self, name) < 0:
                raise _bad(f"'{name}' must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise _bad(f"'keep_checkpoints' must be >= 1 or null, got {self.keep_checkpoints}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise _bad(
                f"'mixed_precision' must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.report_to not in REPORT_TO:
            raise _bad(f"'report_to' must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise _bad(f"'sample_steps' must be >= 1 or null, got {self.sample_steps}")
        if self.clip_chunks is not None and (isinstance(self.clip_chunks, bool) or self.clip_chunks < 1):
            raise _bad(f"'clip_chunks' must be >= 1 or null, got {self.clip_chunks}")
        if isinstance(self.min_revisit_chunks, bool) or self.min_revisit_chunks < 0:
            raise _bad(f"'min_revisit_chunks' must be >= 0, got {self.min_revisit_chunks}")
        if self.policy_mix is not None:
            if not isinstance(self.policy_mix, dict) or not self.policy_mix:
                raise _bad(f"'policy_mix' must be a mapping of policy name to weight, got {self.policy_mix!r}")
            for name, weight in self.policy_mix.items():
                if name not in MEMORY_POLICIES:
                    raise _bad(f"'policy_mix.{name}': unknown policy; choose from {', '.join(MEMORY_POLICIES)}")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                    raise _bad(f"'policy_mix.{name}' must be a number >= 0, got {weight!r}")
            if not sum(self.policy_mix.values()) > 0:
                raise _bad("'policy_mix' weights must not all be 0")

    def policy_for_step(self, step: int) -> str:
        """The memory policy of optimizer step ``step``: ``memory.policy``, or drawn from ``policy_mix``
        by a generator seeded with ``(seed, step)`` alone (the same on every process and after a resume)."""
        if not self.policy_mix:
            return self.policy_config.policy
        names = sorted(self.policy_mix)
        weights = [float(self.policy_mix[n]) for n in names]
        return random.Random(f"{self.seed}:{step}").choices(names, weights)[0]

    @property
    def policy_config(self) -> MemoryConfig:
        assert self.memory is not None
        return self.memory

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    """An annotation as the error messages say it (``int or null``, ``list of 2 float``, ``mapping``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return f"list of {len(args)} {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _value_name(value: Any) -> str:
    return {"NoneType": "null", "dict": "mapping"}.get(type(value).__name__, type(value).__name__)


def _annotation_at(loc: tuple[Any, ...]) -> Any:
    """The annotation of the value at ``loc`` (a pydantic error location) in :class:`TrainConfig`."""
    tp: Any = TrainConfig
    for part in loc:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]  # X | None: the path goes through X
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(str(part), Any)
        elif origin is list or origin is dict:
            tp = args[-1]
        elif origin is tuple and isinstance(part, int) and part < len(args):
            tp = args[part]
        else:
            return Any
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]  # a section that may be null: its keys
    return tp


def _key(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _error_line(err: dict[str, Any]) -> ValueError:
    """One pydantic error as the one-line ``train config: ...`` message that names the key path."""
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    if kind == "value_error":  # raised by a section's __post_init__
        message = str(err["ctx"]["error"])
        if message.startswith("train config:"):
            return ValueError(message)
        return _bad(f"{_key(loc) or 'TrainConfig'}: {message}")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        parent = _annotation_at(loc[:-1])
        fields = [f.name for f in dataclasses.fields(parent) if f.init] if dataclasses.is_dataclass(parent) else []
        prefix = _key(loc[:-1]) + "." if loc[:-1] else ""
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
        return _bad(f"unknown key '{_key(loc)}'{hint}")
    if kind == "missing" and loc and typing.get_origin(_annotation_at(loc[:-1])) is tuple:
        loc, kind = loc[:-1], "too_short"  # a list one item short of the tuple
        value = list(err["input"]) if isinstance(err["input"], (list, tuple)) else err["input"]
    if kind == "missing":
        return _bad(f"missing required key '{_key(loc)}'")
    tp = _annotation_at(loc)
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads a bare no/yes/off/on as a boolean
        return _bad(f"'{_key(loc)}' must be str, got bool (quote the value, e.g. \"no\")")
    return _bad(f"'{_key(loc)}' must be {_type_name(tp)}, got {_value_name(value)}")


_PRIORITY = {"unexpected_keyword_argument": 0, "extra_forbidden": 0, "missing": 1}


@functools.cache
def _adapter() -> TypeAdapter[TrainConfig]:
    return TypeAdapter(TrainConfig)


def _set(data: Any, loc: tuple[Any, ...], value: Any) -> None:
    for part in loc[:-1]:
        data = data[part]
    data[loc[-1]] = value


def _validate(data: dict[str, Any]) -> TrainConfig:
    """pydantic validation of the parsed YAML, in JSON mode with strict types (an int is not a bool or a
    float, a str is not a bool; mappings become the dataclasses). A string pydantic rejects as a float is
    read as one when it is a number: YAML 1.1 reads ``1e-4`` (no dot) as a string."""
    data = json.loads(json.dumps(data, default=str))
    while True:
        try:
            return _adapter().validate_json(json.dumps(data))
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        numbers = [
            e for e in errors
            if e["type"] == "float_type" and isinstance(e["input"], str) and _FLOAT_RE.match(e["input"].strip())
        ]
        if not numbers:
            first = min(errors, key=lambda e: _PRIORITY.get(e["type"], 2))
            raise _error_line(first) from None
        for e in numbers:
            _set(data, tuple(e["loc"]), float(e["input"]))


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validate a mapping (e.g. parsed YAML) into a :class:`TrainConfig`; ``memory`` keys override the
    preset's memory configuration. Raises a one-line ``ValueError`` naming the offending key."""
    if not isinstance(data, dict):
        raise _bad(f"expected a mapping at the top level, got {_value_name(data)}")
    data = dict(data)
    preset = data.get("preset", "tiny")
    if isinstance(preset, str) and preset in PRESETS:
        memory = data.get("memory", {})
        if memory is None:
            memory = {}
        if not isinstance(memory, dict):
            raise _bad(f"'memory' must be mapping, got {_value_name(memory)}")
        data["memory"] = {**asdict(get_preset(preset).memory), **memory}
    return _validate(data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with ``KEY=VALUE`` settings (``egolcd train --set``) written in: a dotted key reaches into
    mappings (``optimizer.lr=5e-4``), a value is read as YAML (``grad_accum=2``, ``ema.enabled=false``).
    Unknown keys are left to the validation, which names them."""
    data = json.loads(json.dumps(data, default=str))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise _bad(f"--set takes KEY=VALUE (dotted keys for nested settings), got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise _bad(f"--set {key}: cannot read {text!r} as a value") from None
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise _bad(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def load_train_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read and validate a training YAML (see ``configs/train/``), with ``KEY=VALUE`` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _bad(f"cannot parse {path}: {first}") from None
    data = data if data is not None else {}
    if not isinstance(data, dict):
        return train_config_from_dict(data)  # its error names the wrong type
    return train_config_from_dict(apply_overrides(data, overrides) if overrides else data)
