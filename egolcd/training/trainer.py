"""The training loop: :class:`Trainer` (one run; checkpoint and monitoring duties in
:mod:`.checkpoint` and :mod:`.monitor`), :func:`train` and the CLI entry :func:`train_main`."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import TrainingAborted
from ..flow import sample_training_timesteps
from ..losses import LossWeights, scored_chunks
from ..memory import MemoryPolicy
from ..transformer import EgoLCDTransformer3DModel
from .checkpoint import CheckpointMixin, read_json
from .config import TrainConfig, _bad, load_train_config
from .data import _DataStream, open_dataset
from .model import (
    EMA,
    TrainingModule,
    _clean_name,
    _lr_lambda,
    _materialize_init_model,
    _resolve_init_dir,
    build_model,
)
from .monitor import MonitorMixin, _flat

logger = logging.getLogger(__name__)


def _micro_seed(seed: int, step: int, place: int) -> int:
    """The noise seed of the micro-batch at ``place`` of the global batch of optimizer step ``step``."""
    return ((seed * 1_000_003 + step) * 65_537 + place) % (2**63)


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


def _is_qk_norm(name: str) -> bool:
    """The self-attention q/k RMSNorm weights (``optimizer.qk_norm_lr_scale``)."""
    return ".attn1.norm_q." in name or ".attn1.norm_k." in name


class Trainer(CheckpointMixin, MonitorMixin):
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
            saved = read_json(self.resume_from / "trainer_state.json")
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
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        qk_norm = [p for n, p in named if _is_qk_norm(n)]
        groups = [{"params": [p for n, p in named if not _is_qk_norm(n)]}]
        if qk_norm:  # the attention temperature, optionally at a higher rate
            groups.append({"params": qk_norm, "lr": cfg.optimizer.lr * cfg.optimizer.qk_norm_lr_scale})
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.optimizer.lr,
            betas=cfg.optimizer.betas,
            eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
        self.module, self.optimizer = acc.prepare(module, optimizer)
        self.transformer: EgoLCDTransformer3DModel = acc.unwrap_model(self.module).transformer
        self.ema = EMA(self._named_trainable(), cfg.ema.decay) if cfg.ema.enabled else None
        self.noise = torch.Generator()  # re-seeded per micro-batch from (seed, step, place): _train_step
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
            # The micro-batch's place in the step's global batch (the data position it was drawn from):
            # its noise, t and scored chunks come from (seed, step, place) alone, so W processes x
            # grad_accum G draw what one process x grad_accum G*W draws (and a resume what the run drew).
            place = micro * acc.num_processes + acc.process_index
            self.noise.manual_seed(_micro_seed(cfg.seed, self.step, place))
            scored = scored_chunks(
                segments, revisits, cfg.loss.scored_chunks, random.Random(f"{cfg.seed}:{self.step}:{place}")
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


def train_main(
    config_path: str | os.PathLike[str], resume: str | None = None, overrides: Sequence[str] = ()
) -> Path:
    """``egolcd train CONFIG.yaml [--resume latest|CKPT] [--set KEY=VALUE ...]``: returns the output directory."""
    return train(load_train_config(config_path, overrides), resume=resume).output_dir
