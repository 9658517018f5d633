"""The :class:`~egolcd.training.trainer.Trainer`'s side duties: periodic samples, the metrics log and
trackers, graceful stop on SIGINT/SIGTERM, the abort message."""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .model import _generation_config

logger = logging.getLogger(__name__)


class MonitorMixin:
    """Samples, logging and stop handling of a :class:`~egolcd.training.trainer.Trainer`."""

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
        from ..pipeline import EgoLCDPipeline
        from ..text import load_text_encoder
        from ..vae import VideoVAE

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
