"""The training configuration: the ``TrainConfig`` schema of ``configs/train/*.yaml``, its sections and loader.

Values are checked on load; an error is one ``ValueError`` line naming the key (``train config: ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    """AdamW. ``grad_clip``: max global gradient norm (``null``: no clipping)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise _bad(f"'optimizer.lr' must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad(f"'optimizer.betas' must be in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise _bad(f"'optimizer.grad_clip' must be > 0 or null, got {self.grad_clip}")


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
    """Everything a training run needs; loaded from YAML by :func:`load_train_config`.

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
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return f"list of {len(args)} {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _value_name(value: Any) -> str:
    return {"NoneType": "null", "dict": "mapping"}.get(type(value).__name__, type(value).__name__)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (converted where lossless)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail() -> ValueError:
        return _bad(f"'{key}' must be {_type_name(tp)}, got {_value_name(value)}")

    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as exc:
                if "must be" not in str(exc) or f"'{key}'" not in str(exc):
                    raise  # an error deeper inside (nested key), not a type mismatch of this value
        raise fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail()
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes/off/on as a boolean
            raise _bad(f"'{key}' must be str, got bool (quote the value, e.g. \"no\")")
        if not isinstance(value, str):
            raise fail()
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
            raise _bad(f"unknown key '{prefix}{key}'{hint}")
    required = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in data:
            raise _bad(f"missing required key '{prefix}{name}'")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if str(exc).startswith("train config:"):
            raise
        where = prefix.rstrip(".") or cls.__name__
        raise _bad(f"{where}: {exc}") from None


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
    return _build(TrainConfig, data)


def load_train_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read and validate a training YAML (see ``configs/train/``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _bad(f"cannot parse {path}: {first}") from None
    return train_config_from_dict(data if data is not None else {})
