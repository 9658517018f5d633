"""Training checkpoints: atomic writes (``.tmp``, fsync, rename), safetensors + JSON only, exact resume
(optimizer tensors, RNG states, data position), and the newest readable checkpoint as fallback. The tensor,
optimizer and RNG helpers are public: `egolcd.vae_train` checkpoints the VAE with them.

Layout of ``OUTPUT_DIR/checkpoint-000500/``: see :mod:`egolcd.training`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import load_train_config
from .model import _save_lora_quietly

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "egolcd-train-checkpoint/1"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


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


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint; a damaged one is one ``ValueError`` line naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged (not valid JSON: {exc})") from None


def checkpoint_problem(ckpt: Path) -> str | None:
    """``None`` when every file of a checkpoint reads (JSON parses, each safetensors header covers its
    file), else what is wrong, naming the file: a truncated ``optimizer.safetensors`` is found here."""
    try:
        state = read_json(ckpt / "trainer_state.json")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            return f"{ckpt / 'trainer_state.json'} is not an egolcd training checkpoint state"
        read_json(ckpt / "scheduler.json")
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


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
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


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (before the rename that publishes it)."""
    for path in [*root.rglob("*"), root]:
        _fsync_path(path)


def optimizer_to_tensors(state: dict) -> tuple[dict[str, Tensor], dict[str, str]]:
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


def optimizer_from_file(path: Path, device: torch.device) -> dict:
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


def capture_rng(noise: torch.Generator) -> tuple[dict[str, Tensor], dict[str, str]]:
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


def restore_rng(path: Path, noise: torch.Generator) -> None:
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


class CheckpointMixin:
    """The :class:`~egolcd.training.trainer.Trainer`'s checkpoint methods: choosing the checkpoint to resume,
    restoring its state, and saving one (uses the trainer's ``cfg``, ``accelerator``, ``module``,
    ``optimizer``, ``scheduler``, ``ema``, ``noise``, ``data`` and counters)."""

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

        state = optimizer_from_file(ckpt / "optimizer.safetensors", torch.device("cpu"))
        set_optimizer_state_dict(
            self.module,
            self.optimizer.optimizer,
            optim_state_dict=state,
            options=StateDictOptions(full_state_dict=self.fsdp),
        )
        self.scheduler.load_state_dict(read_json(ckpt / "scheduler.json"))
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
            restore_rng(rng, self.noise)
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
        rng, rng_meta = capture_rng(self.noise)
        save_tensors(tmp / f"rng-{acc.process_index:05d}.safetensors", rng, rng_meta)
        if acc.is_main_process:
            save_tensors(tmp / "trainable.safetensors", trainable, {"format": "egolcd-trainable/1"})
            if cfg.lora.enabled and not self.fsdp:
                _save_lora_quietly(self.transformer, tmp / "lora")
            if self.ema is not None:
                save_tensors(tmp / "ema.safetensors", self.ema.state_dict(), {"decay": str(self.ema.decay)})
            tensors, meta = optimizer_to_tensors(optim)
            save_tensors(tmp / "optimizer.safetensors", tensors, meta)
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
            fsync_tree(tmp)
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
