"""Training: teacher forcing through the one ``MemoryPolicy`` (METHOD.md), with accelerate.

``egolcd train CONFIG.yaml`` (or ``accelerate launch -m egolcd train CONFIG.yaml`` for many GPUs) runs
:func:`train_main`. Each optimizer step draws per-chunk noise levels ``t`` (B, N) and noise ``eps``, and
minimises ``L_flow + lambda * L_memory`` of :func:`egolcd.losses.teacher_forcing_loss` over the clip of N
chunks, with exactly the memory the model will have at inference. LoRA (base frozen) or full fine-tuning,
AdamW with warm-up + cosine decay, optional EMA of the trainable weights.

Checkpoints (``OUTPUT_DIR/checkpoint-000500/``) are written atomically (``.tmp`` then rename), hold only
safetensors and JSON/YAML (never pickle) and resume *exactly*: on CPU in float32 an interrupted and resumed
run gives the same per-step losses and bit-identical weights as an uninterrupted one::

    checkpoint-000500/
      trainer_state.json          step, epoch, batch position, bad-step counter, init model, format
      config.yaml                 the resolved TrainConfig
      trainable.safetensors       trainable weights by parameter name (the source of truth for resume/export)
      lora/                       LoRA runs: the peft adapter (diffusers format, ``save_lora``)
      ema.safetensors             EMA of the trainable weights (when enabled)
      optimizer.safetensors       AdamW state tensors; param groups as JSON in the metadata
      scheduler.json              LambdaLR state
      rng-00000.safetensors       per process: torch (+cuda) and noise-generator states; python and
                                  numpy states in the metadata

:func:`export_checkpoint` turns a checkpoint into a model folder that ``EgoLCDPipeline.from_pretrained``
loads (``transformer/`` + ``transformer/lora/`` adapter, or the LoRA merged into the base weights).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import MEMORY_POLICIES, PRESETS, MemoryConfig, Preset, get_preset
from .flow import sample_training_timesteps
from .lora import LoRAConfig, attach_lora, load_lora, merge_lora, save_lora
from .losses import LOSS_VARIANTS, LossWeights, scored_chunks, teacher_forcing_loss
from .memory import MemoryPolicy
from .transformer import EgoLCDTransformer3DModel

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "egolcd-train-checkpoint/1"
MIXED_PRECISION = ("no", "bf16", "fp16")
TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")
REPORT_TO = ("auto", "tensorboard", "none")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")

__all__ = [
    "EMA",
    "EMAConfig",
    "LoRASection",
    "LossConfig",
    "OptimizerConfig",
    "ResumableSampler",
    "SchedulerConfig",
    "TimestepConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingAborted",
    "TrainingModule",
    "build_model",
    "export_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_base_transformer",
    "load_train_config",
    "open_dataset",
    "train",
    "train_config_from_dict",
    "train_main",
]


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. ``max_bad_steps`` non-finite losses in a row); checkpoints
    already written are untouched."""


# =========================================================================== configuration


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


# =========================================================================== data


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded shuffle per epoch, sharded over processes (equal shares), resumable mid-epoch.

    Epoch ``e`` uses ``randperm(n, seed + e)``; process ``r`` of ``w`` takes positions ``r, r + w, ...`` of
    the first ``(n // w) * w``. ``set_position(epoch, start)`` skips the first ``start`` indices.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.num_samples, self.seed, self.rank, self.world_size, self.shuffle = (
            num_samples,
            seed,
            rank,
            world_size,
            shuffle,
        )
        self.per_rank = num_samples // world_size
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def _collate_fn() -> Callable[[list[dict]], dict]:
    try:
        from .data.latents import collate_latents
    except ImportError:
        from torch.utils.data import default_collate

        return default_collate
    return collate_latents


class _DataStream:
    """Endless batches over epochs; its position (epoch, batch in epoch) is saved and restored."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int,
        world: int,
        pin_memory: bool,
    ) -> None:
        self.dataset, self.batch_size, self.num_workers, self.pin_memory = (
            dataset,
            batch_size,
            num_workers,
            pin_memory,
        )
        self.sampler = ResumableSampler(len(dataset), seed, rank, world)
        self.batches_per_epoch = self.sampler.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset too small: {len(dataset)} clips cannot fill one batch of {batch_size} on each of "
                f"{world} process(es)"
            )
        self.seed = seed
        self.collate = _collate_fn()
        self.epoch, self.batch = 0, 0
        self._iter: Iterator[dict] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._iter = int(state["epoch"]), int(state["batch_in_epoch"]), None
        if self.batch > self.batches_per_epoch:
            raise ValueError(
                f"saved data position {self.batch} is past the epoch ({self.batches_per_epoch} batches)"
            )

    def next(self) -> dict:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._iter = self.epoch + 1, 0, None
        if self._iter is None:
            self.sampler.set_position(self.epoch, self.batch * self.batch_size)
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self.sampler,
                drop_last=True,
                collate_fn=self.collate,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                # its own generator: creating an iterator must not draw from the global RNG
                generator=torch.Generator().manual_seed(self.seed + self.epoch),
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        self.batch += 1
        return batch


def open_dataset(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """The latent cache at ``path`` (``egolcd.data.latents.LatentDataset``, imported lazily; ``kwargs``:
    its windowing options)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"latent cache not found: {path}")
    from .data.latents import LatentDataset

    return LatentDataset(path, **kwargs)


# =========================================================================== model


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
    from .pipeline import save_model_dir

    save_model_dir(directory, transformer, vae, config)


def _generation_config(cfg: TrainConfig, init_dir: Path) -> Any:
    """The model's ``GenerationConfig`` (from ``init_dir`` when it has one) with the training memory."""
    from .pipeline import CONFIG_NAME, GenerationConfig

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
    from .vae import build_vae

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


# =========================================================================== checkpoint files


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (``checkpoint-NNNNNN/`` with ``trainer_state.json``), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CKPT_RE.match(p.name)) and (p / "trainer_state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def _read_json(path: Path) -> Any:
    """A JSON file of a checkpoint; a damaged one is one ``ValueError`` line naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged (not valid JSON: {exc})") from None


def checkpoint_problem(ckpt: Path) -> str | None:
    """``None`` when every file of a checkpoint reads (JSON parses, each safetensors header covers its
    file), else what is wrong, naming the file: a truncated ``optimizer.safetensors`` is found here."""
    try:
        state = _read_json(ckpt / "trainer_state.json")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            return f"{ckpt / 'trainer_state.json'} is not an egolcd training checkpoint state"
        _read_json(ckpt / "scheduler.json")
    except (OSError, ValueError) as exc:
        return " ".join(str(exc).split())
    for name in ("trainable.safetensors", "optimizer.safetensors", "config.yaml"):
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
    for path in sorted(ckpt.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.metadata()
        except Exception as exc:  # SafetensorError: truncated, or not safetensors at all
            return f"{path} is damaged ({' '.join(str(exc).split())})"
    return None


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (before the rename that publishes it)."""
    for path in [*root.rglob("*"), root]:
        _fsync_path(path)


def _optimizer_to_tensors(state: dict) -> tuple[dict[str, Tensor], dict[str, str]]:
    keys = list(state["state"])
    tensors: dict[str, Tensor] = {}
    other: dict[str, dict] = {}
    for i, key in enumerate(keys):
        for name, value in state["state"][key].items():
            if isinstance(value, Tensor):
                tensors[f"state/{i}/{name}"] = value
            else:
                other.setdefault(str(i), {})[name] = value
    meta = {
        "keys": json.dumps(keys),
        "param_groups": json.dumps(state["param_groups"]),
        "other": json.dumps(other),
    }
    return tensors, meta


def _optimizer_from_file(path: Path, device: torch.device) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path), device=str(device))
    keys, other = json.loads(meta["keys"]), json.loads(meta["other"])
    state: dict[Any, dict] = {}
    for i, key in enumerate(keys):
        entry = dict(other.get(str(i), {}))
        prefix = f"state/{i}/"
        entry.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        state[key] = entry
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def _capture_rng(noise: torch.Generator) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors = {"torch": torch.get_rng_state(), "noise": noise.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "python": json.dumps([version, list(internal), gauss]),
    }
    return tensors, meta


def _restore_rng(path: Path, noise: torch.Generator) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    noise.set_state(tensors["noise"])
    cuda = [
        tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    ]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))


# =========================================================================== trainer


@dataclass
class TrainResult:
    """What :func:`train` returns. ``history``: one metrics dict per step run in this call."""

    output_dir: Path
    step: int
    history: list[dict[str, Any]]
    last_checkpoint: Path | None
    model: EgoLCDTransformer3DModel
    interrupted: bool = False


StepCallback = Callable[[int, dict[str, Any]], None]


class Trainer:
    """One training run (see :func:`train`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        dataset: Any = None,
        resume: str | os.PathLike[str] | None = None,
        callback: StepCallback | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

        self.cfg, self.callback = cfg, callback
        self.out = Path(cfg.output_dir).resolve()
        report = cfg.report_to
        if report != "none":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                if report == "tensorboard":
                    raise _bad("report_to: tensorboard is not installed (pip install tensorboard)") from None
                report = "none"
            else:
                report = "tensorboard"
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=None if report == "none" else report,
            project_config=ProjectConfiguration(
                project_dir=str(self.out), logging_dir=str(self.out / "logs")
            ),
        )
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        if self.fsdp and cfg.ema.enabled:
            raise _bad("'ema.enabled' is not supported with FSDP yet")

        # 1. Where to start: a checkpoint to resume, or fresh
        self.resume_from = self._resolve_resume(resume)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob("checkpoint-*.tmp"):
                logger.warning("removing unfinished checkpoint %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        if self.resume_from is not None:
            saved = _read_json(self.resume_from / "trainer_state.json")
            self._check_compatible(self.resume_from)
        self.init_dir = self._init_dir()

        # 2. Data
        self.dataset = dataset if dataset is not None else self._open_data()
        self.data = _DataStream(
            self.dataset,
            cfg.batch_size,
            cfg.num_workers,
            cfg.seed,
            acc.process_index,
            acc.num_processes,
            pin_memory=acc.device.type == "cuda",
        )

        # 3. Model, optimizer, schedule (identical on every process)
        set_seed(cfg.seed)
        transformer = build_model(cfg, self.init_dir)
        self.trainable_names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
        if not self.trainable_names:
            raise _bad("nothing to train (no parameter requires a gradient)")
        self._check_data(transformer)
        if self.resume_from is not None:
            self._load_trainable(transformer, load_file(str(self.resume_from / "trainable.safetensors")))
        self.policy = MemoryPolicy(cfg.policy_config, int(transformer.config.chunk_frames))
        policies = {
            name: MemoryPolicy.from_name(name, int(transformer.config.chunk_frames), cfg.policy_config)
            for name in (cfg.policy_mix or {})
        }
        policies[self.policy.name] = self.policy
        module = TrainingModule(
            transformer,
            self.policy,
            LossWeights(memory=cfg.loss.memory_weight, variant=cfg.loss.variant),
            policies,
        )
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optimizer.lr,
            betas=cfg.optimizer.betas,
            eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
        self.module, self.optimizer = acc.prepare(module, optimizer)
        self.transformer: EgoLCDTransformer3DModel = acc.unwrap_model(self.module).transformer
        self.ema = EMA(self._named_trainable(), cfg.ema.decay) if cfg.ema.enabled else None
        self.noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (acc.process_index + 1))
        set_seed(cfg.seed, device_specific=True)  # dropout may differ across processes

        # 4. Counters, then the checkpoint's state on top
        self.step, self.bad_steps, self.last_checkpoint = 0, 0, None
        self.bad_since: int | None = None
        self.history: list[dict[str, Any]] = []
        if self.resume_from is not None:
            self._load_state(self.resume_from, saved)
        self._stop = threading.Event()
        self._sample_pipe: Any = None

    # ------------------------------------------------------------------ setup helpers
    def _resolve_resume(self, resume: str | os.PathLike[str] | None) -> Path | None:
        if resume is None:
            existing = latest_checkpoint(self.out)
            if existing is not None:
                raise ValueError(
                    f"{self.out} already holds checkpoints (latest: {existing.name}); "
                    "resume with resume='latest' or choose another output_dir"
                )
            return None
        if str(resume) == "latest":
            ckpts = list_checkpoints(self.out)
            if not ckpts:
                logger.warning("no checkpoint in %s: starting from scratch", self.out)
                return None
            for ckpt in reversed(ckpts):  # the newest readable one (a full disk may have cut the latest)
                problem = checkpoint_problem(ckpt)
                if problem is None:
                    return ckpt
                logger.warning("skipping %s: %s", ckpt.name, problem)
            raise ValueError(f"no readable checkpoint in {self.out} (the newest: {checkpoint_problem(ckpts[-1])})")
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"not a training checkpoint: {path} (no trainer_state.json)")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f"cannot resume from {path}: {problem}")
        return path.resolve()

    def _check_compatible(self, ckpt: Path) -> None:
        old = load_train_config(ckpt / "config.yaml")
        cfg = self.cfg
        for key in ("preset", "lora.enabled", "lora.rank", "lora.alpha", "lora.target_modules"):
            a, b = old.to_dict(), cfg.to_dict()
            for part in key.split("."):
                a, b = a[part], b[part]
            if a != b:
                raise ValueError(
                    f"cannot resume from {ckpt}: it was trained with {key}={a!r}, this config has {b!r}"
                )
        if old.init_model != cfg.init_model:
            logger.warning(
                "init_model changed since %s (%s -> %s): the trained weights sit on another base",
                ckpt.name,
                old.init_model,
                cfg.init_model,
            )
        if (old.batch_size, old.grad_accum) != (cfg.batch_size, cfg.grad_accum):
            logger.warning(
                "batch_size/grad_accum changed since %s: the data order will not match the original run",
                ckpt.name,
            )

    def _init_dir(self) -> Path:
        if self.cfg.init_model is not None:
            return _resolve_init_dir(self.cfg.init_model)
        directory = self.out / "init_model"
        acc = self.accelerator
        if acc.is_main_process and not (directory / "transformer" / "config.json").is_file():
            _materialize_init_model(self.cfg, directory)
        acc.wait_for_everyone()
        return directory

    def _check_data(self, transformer: EgoLCDTransformer3DModel) -> None:
        """A latent cache made for another geometry fails here, in one line, not at the first batch."""
        geo = getattr(self.dataset, "geometry", None)
        if geo is None:
            return
        want = {
            "chunk_frames": transformer.config.chunk_frames,
            "latent_channels": transformer.config.in_channels,
            "text_dim": transformer.config.text_dim,
        }
        for name, value in want.items():
            have = getattr(geo, name, value)
            if have != value:
                raise ValueError(
                    f"latent cache {self.cfg.data} has {name}={have}, the model needs {value} "
                    f"(preset {self.cfg.preset!r})"
                )

    def _open_data(self) -> Any:
        if self.cfg.data is None:
            raise _bad("'data' is required (a latent-cache directory with index.json)")
        cfg = self.cfg
        return open_dataset(
            cfg.data,
            clip_chunks=cfg.clip_chunks,
            min_revisit_chunks=cfg.min_revisit_chunks,
            window_chunks=int(cfg.policy_config.window_chunks or 0),
        )

    def _named_trainable(self) -> dict[str, Tensor]:
        params = {_clean_name(n): p for n, p in self.transformer.named_parameters()}
        return {n: params[n] for n in self.trainable_names}

    def _load_trainable(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in self.trainable_names if n not in tensors]
        unexpected = [n for n in tensors if n not in params]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def _load_state(self, ckpt: Path, saved: dict) -> None:
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt} is not an egolcd training checkpoint ({saved.get('format')!r})")
        acc = self.accelerator
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = _optimizer_from_file(ckpt / "optimizer.safetensors", torch.device("cpu"))
        set_optimizer_state_dict(
            self.module,
            self.optimizer.optimizer,
            optim_state_dict=state,
            options=StateDictOptions(full_state_dict=self.fsdp),
        )
        self.scheduler.load_state_dict(_read_json(ckpt / "scheduler.json"))
        if self.ema is not None:
            if (ckpt / "ema.safetensors").is_file():
                self.ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
            else:
                logger.warning("%s has no EMA: starting the EMA from its weights", ckpt.name)
        rng = ckpt / f"rng-{acc.process_index:05d}.safetensors"
        if saved.get("num_processes") != acc.num_processes:
            logger.warning(
                "process count changed since %s (%s -> %d): RNG streams restart (resume is not exact)",
                ckpt.name, saved.get("num_processes"), acc.num_processes,
            )
        elif not rng.is_file():
            logger.warning("%s is missing: RNG streams restart (resume is not exact)", rng)
        else:
            _restore_rng(rng, self.noise)
        if saved.get("num_processes") == acc.num_processes:
            self.data.load_state(saved["data"])
        else:
            seen = saved["data"]["batch_in_epoch"] * saved["num_processes"]
            self.data.load_state(
                {
                    "epoch": saved["data"]["epoch"],
                    "batch_in_epoch": min(seen // acc.num_processes, self.data.batches_per_epoch),
                }
            )
        self.step, self.bad_steps = int(saved["step"]), int(saved["bad_steps"])
        self.last_checkpoint = ckpt
        if acc.is_main_process:  # drop log lines of steps the resumed run will redo
            _trim_metrics_log(self.out / "logs" / "metrics.jsonl", self.step)
        logger.info("resumed from %s at step %d (epoch %d)", ckpt, self.step, self.data.epoch)

    # ------------------------------------------------------------------ one step
    def _prepare_batch(
        self, batch: dict
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[int], dict[int, int]]:
        dev = self.accelerator.device
        x0 = batch["latents"].to(dev, torch.float32)
        text = batch["text"]
        if "text_mask" in batch:
            text = text * batch["text_mask"][..., None].to(text.dtype)
        n, k = text.shape[1], self.policy.chunk_frames
        if x0.shape[2] != n * k:
            raise ValueError(
                f"clip has {x0.shape[2]} latent frames but {n} chunk prompts of {k} frames "
                f"(was the latent cache made for another chunk size?)"
            )
        if x0.shape[1] != self.transformer.config.in_channels:
            raise ValueError(
                f"clip has {x0.shape[1]} latent channels, the model expects "
                f"{self.transformer.config.in_channels}"
            )
        texts = [text[:, i].to(dev) for i in range(n)]
        pooled = [batch["pooled"][:, i].to(dev, torch.float32) for i in range(n)]
        if not bool((batch["segments"] == batch["segments"][:1]).all()):
            raise ValueError(
                "the clips of a batch have different segment layouts (windows of narrative clips); "
                "use batch_size: 1 and grad_accum for larger batches"
            )
        segments = [int(s) for s in batch["segments"][0]]
        revisits: dict[int, int] = {}
        if "revisits" in batch:
            for seg, rev in zip(segments, batch["revisits"][0].tolist()):
                if rev >= 0 and rev != seg:
                    revisits[seg] = int(rev)
        return x0, texts, pooled, segments, revisits

    def _train_step(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        self.module.train()
        lr = float(self.scheduler.get_last_lr()[0])
        sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # loss, flow, memory, bad micro-batches
        policy = cfg.policy_for_step(self.step)
        for micro in range(cfg.grad_accum):
            x0, texts, pooled, segments, revisits = self._prepare_batch(self.data.next())
            scored = scored_chunks(  # seeded by (seed, step, micro-batch, process): the same after a resume
                segments, revisits, cfg.loss.scored_chunks,
                random.Random(f"{cfg.seed}:{self.step}:{micro}:{acc.process_index}"),
            )
            t = sample_training_timesteps(
                (x0.shape[0], len(texts)),
                shift=cfg.timesteps.shift,
                generator=self.noise,
                distribution=cfg.timesteps.distribution,
            )  # type: ignore[arg-type]
            eps = torch.randn(x0.shape, generator=self.noise)
            with acc.accumulate(self.module):
                loss, flow, memory = self.module(
                    x0, eps.to(acc.device), t.to(acc.device), texts, pooled, segments, revisits, policy, scored
                )
                acc.backward(loss)
            values = torch.stack([loss.detach(), flow.detach(), memory.detach()]).double()
            if bool(torch.isfinite(values).all()):
                sums[:3] += values
            else:
                sums[3] += 1
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation out of step (accelerate's counter was reset?)")
        sums = acc.reduce(sums, reduction="sum")
        n_micro = cfg.grad_accum * acc.num_processes
        bad = bool(sums[3] > 0)
        grad_norm: float | None = None
        if not bad:  # clip (or, without grad_clip, just measure) the global gradient norm
            max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip is not None else float("inf")
            norm = acc.clip_grad_norm_(self.module.parameters(), max_norm)
            grad_norm = float(norm) if norm is not None else None
            if grad_norm is not None and not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16":
                bad = True  # fp16: the grad scaler skips overflowing steps itself
        if bad:
            self.bad_steps += 1
            self.bad_since = self.step + 1 if self.bad_since is None else self.bad_since
        else:
            self.optimizer.step()
            self.bad_steps, self.bad_since = 0, None
            if self.ema is not None:
                self.ema.update(self._named_trainable())
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        good = n_micro - float(sums[3])
        seconds = time.perf_counter() - t0
        return {
            "step": self.step,
            "loss": float(sums[0]) / good if not bad else float("nan"),
            "flow": float(sums[1]) / good if not bad else float("nan"),
            "memory": float(sums[2]) / good if not bad else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": cfg.batch_size * n_micro / max(seconds, 1e-9),
            "epoch": self.data.epoch,
            "policy": policy,
            "skipped": bad,
        }

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, Tensor]:
        if self.fsdp:  # gathers the full weights (collective: every process calls it)
            full = self.accelerator.get_state_dict(self.module)
            if not self.accelerator.is_main_process:
                return {}
            return {n: full[f"transformer.{n}"] for n in self.trainable_names}
        return {n: p.detach() for n, p in self._named_trainable().items()}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-{step}`` atomically (every process must call this)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        acc, cfg = self.accelerator, self.cfg
        final = self.out / f"checkpoint-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        trainable = self._trainable_state()
        optim = get_optimizer_state_dict(
            self.module,
            self.optimizer.optimizer,
            options=StateDictOptions(full_state_dict=self.fsdp, cpu_offload=self.fsdp),
        )
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng, rng_meta = _capture_rng(self.noise)
        _save_tensors(tmp / f"rng-{acc.process_index:05d}.safetensors", rng, rng_meta)
        if acc.is_main_process:
            _save_tensors(tmp / "trainable.safetensors", trainable, {"format": "egolcd-trainable/1"})
            if cfg.lora.enabled and not self.fsdp:
                _save_lora_quietly(self.transformer, tmp / "lora")
            if self.ema is not None:
                _save_tensors(tmp / "ema.safetensors", self.ema.state_dict(), {"decay": str(self.ema.decay)})
            tensors, meta = _optimizer_to_tensors(optim)
            _save_tensors(tmp / "optimizer.safetensors", tensors, meta)
            (tmp / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
            (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": self.step,
                "bad_steps": self.bad_steps,
                "data": self.data.state(),
                "num_processes": acc.num_processes,
                "init_model": str(self.init_dir),
                "lora": cfg.lora.enabled,
                "ema": self.ema is not None,
                "time": time.time(),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # written last
        acc.wait_for_everyone()
        if acc.is_main_process:
            _fsync_tree(tmp)
            old = final.with_name(final.name + ".old")
            if final.exists():  # the same step saved before (resumed from an older checkpoint)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            _fsync_path(self.out)
            self._prune()
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def _prune(self) -> None:
        keep = self.cfg.keep_checkpoints
        if keep is None:
            return
        for old in list_checkpoints(self.out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ samples, logging
    def _maybe_sample(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if not cfg.sample_every or self.step % cfg.sample_every or not acc.is_main_process:
            return
        if cfg.sample_narrative is None:
            if self.step == cfg.sample_every:
                logger.info("sample_every is set but no sample_narrative: no samples")
            return
        if self.fsdp:
            logger.warning("periodic samples are not supported with FSDP: skipped")
            return
        from .pipeline import EgoLCDPipeline
        from .text import load_text_encoder
        from .vae import VideoVAE

        if self._sample_pipe is None:
            gen = _generation_config(cfg, self.init_dir)
            vae = VideoVAE.from_pretrained(self.init_dir / "vae", device=acc.device)
            text = load_text_encoder(
                gen.text_encoder, gen.text_encoder_path, max_length=gen.text_max_length, device=acc.device
            )
            self._sample_pipe = EgoLCDPipeline(self.transformer, vae, text, gen)
        path = self.out / "samples" / f"step-{self.step:06d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        ema = self.ema.applied(self._named_trainable()) if self.ema is not None else _null()
        self.transformer.eval()  # no dropout while sampling
        try:
            with (
                torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []),
                ema,
                acc.autocast(),
            ):
                self._sample_pipe(
                    cfg.sample_narrative,
                    path,
                    memory=cfg.policy_config,
                    steps=cfg.sample_steps,
                    seed=cfg.seed,
                    progress=False,
                )
            logger.info("sample written to %s", path)
        finally:
            self.transformer.train()

    def _log(self, metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        log = self.out / "logs" / "metrics.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        with log.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if metrics["skipped"]:
            logger.warning(
                "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                metrics["step"],
                self.bad_steps,
            )
        if metrics["step"] % self.cfg.log_every == 0 or metrics["step"] == self.cfg.max_steps:
            scalars = {
                k: v
                for k, v in clean.items()
                if isinstance(v, (int, float)) and v is not None and not isinstance(v, bool) and k != "step"
            }
            acc.log(scalars, step=metrics["step"])
            logger.info(
                "step %d/%d loss %.4f (flow %.4f, memory %.4f) lr %.3g, %.2f samples/s",
                metrics["step"],
                self.cfg.max_steps,
                metrics["loss"],
                metrics["flow"],
                metrics["memory"],
                metrics["lr"],
                metrics["samples_per_s"],
            )

    @contextmanager
    def _graceful_stop(self) -> Iterator[None]:
        """First SIGINT/SIGTERM: finish the step, save a checkpoint, stop. A second SIGINT: stop now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop.set()
            logger.warning(
                "stop requested: finishing step %d and saving a checkpoint (Ctrl-C again to abort)",
                self.step + 1,
            )

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop.is_set() else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _abort_message(self) -> str:
        last = self.last_checkpoint.name if self.last_checkpoint else "none"
        return (
            f"training aborted at step {self.step}: {self.bad_steps} non-finite losses in a row "
            f"(steps {self.bad_since}-{self.step}, max_bad_steps={self.cfg.max_bad_steps}); "
            f"last good checkpoint: {last} (untouched)"
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            log = self.out / "logs" / "metrics.jsonl"
            if (
                self.step == 0 and log.is_file()
            ):  # a fresh start: lines of an earlier, checkpoint-less attempt
                log.unlink()
        acc.init_trackers("egolcd", config=_flat(cfg.to_dict()))
        logger.info(
            "training %s (%s, %d trainable parameters) for %d steps on %d process(es), from step %d",
            cfg.preset,
            "LoRA" if cfg.lora.enabled else "full",
            self.num_trainable,
            cfg.max_steps,
            acc.num_processes,
            self.step,
        )
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not acc.is_local_main_process,
        )
        due = False
        interrupted = False
        try:
            with self._graceful_stop():
                while self.step < cfg.max_steps:
                    metrics = self._train_step()
                    self.history.append(metrics)
                    self._log(metrics)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                    if self.bad_steps >= cfg.max_bad_steps:
                        raise TrainingAborted(self._abort_message())
                    due = due or self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps
                    stop = self._stop_requested()
                    if (due or stop) and self.bad_steps == 0:
                        self.save_checkpoint()
                        due = False
                    elif due and self.step == cfg.max_steps:
                        logger.warning("the last step was skipped: no final checkpoint written")
                    self._maybe_sample()
                    if self.callback is not None:
                        self.callback(self.step, metrics)
                    if stop:
                        interrupted = True
                        logger.warning("stopped at step %d", self.step)
                        break
        finally:
            bar.close()
            acc.end_training()
        return TrainResult(
            self.out, self.step, self.history, self.last_checkpoint, self.transformer, interrupted
        )


def _trim_metrics_log(log: Path, step: int) -> None:
    """Keep the lines of steps up to ``step`` (a resumed run redoes the later ones). A line that does not
    parse (a run stopped by a full disk ends mid-line) is dropped with a warning naming the file and line."""
    if not log.is_file():
        return
    kept: list[str] = []
    for lineno, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            line_step = int(entry["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s line %d is damaged (cut off?): dropped", log, lineno)
            continue
        if line_step <= step:
            kept.append(line)
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, log)


def _clean_name(name: str) -> str:
    """A parameter name without the wrapper prefixes FSDP / activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


@contextmanager
def _null() -> Iterator[None]:
    yield


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def train(
    cfg: TrainConfig,
    dataset: Any = None,
    resume: str | os.PathLike[str] | None = None,
    callback: StepCallback | None = None,
) -> TrainResult:
    """Run training.

    Args:
        cfg: the configuration.
        dataset: a map-style dataset of clip dicts (``latents`` (C, L, h, w), ``text`` (N, Lt, D),
            ``text_mask`` (N, Lt), ``pooled`` (N, E), ``segments`` (N,));
            default: ``LatentDataset(cfg.data)``.
        resume: ``None`` (fresh; refused when ``output_dir`` has checkpoints), ``"latest"`` (the newest
            complete checkpoint in ``output_dir``, or fresh when there is none) or a checkpoint folder.
        callback: ``callback(step, metrics)`` after every step (and its checkpoint).

    Raises:
        TrainingAborted: ``max_bad_steps`` non-finite losses in a row (checkpoints untouched).
    """
    return Trainer(cfg, dataset=dataset, resume=resume, callback=callback).run()


def train_main(config_path: str | os.PathLike[str], resume: str | None = None) -> Path:
    """``egolcd train CONFIG.yaml [--resume latest|CKPT]``: returns the output directory."""
    return train(load_train_config(config_path), resume=resume).output_dir


# =========================================================================== export


def export_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    merge: bool = False,
    use_ema: bool = True,
    overwrite: bool = False,
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
    """
    from .vae import VideoVAE

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


def _save_lora_quietly(model: EgoLCDTransformer3DModel, directory: Path) -> None:
    """``save_lora`` without diffusers' warning about its internal ``model.to(dtype=None)``."""
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        save_lora(model, directory)
    finally:
        diffusers_logger.setLevel(level)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where the filesystem allows (text encoders are large)."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)
