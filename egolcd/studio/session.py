"""Per-tab state and the generation worker: ``StudioSession`` (outputs folder, runs, cancel flag),
``run_jobs`` (the pipeline in a thread, chunks streamed through a queue) and the shared model loader."""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..narrative import Narrative

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from ..pipeline import ChunkReport, EgoLCDPipeline

from .views import RunRecord, error_line, to_preview_frames

logger = logging.getLogger(__name__)

INSTALL_HINT = 'install the studio extra: pip install "egolcd[studio]"'
EDITOR_FORMATS = ("auto", "yaml", "json", "text")
NARRATIVE_SUFFIXES = (".yaml", ".yml", ".json", ".txt")

class GenerationCancelled(Exception):
    """Raised inside the pipeline's chunk callback when the session asked to stop."""


@dataclass
class StudioConfig:
    """How ``egolcd studio`` runs.

    Args:
        model: the model directory (diffusers layout; default in the CLI: the embedded demo model).
        host: address to bind; ``127.0.0.1`` keeps the studio local to this machine.
        port: TCP port.
        device: ``cpu`` or ``cuda``.
        outputs: folder for the generated videos (one sub-folder per browser session).
    """

    model: Path
    host: str = "127.0.0.1"
    port: int = 7860
    device: str = "cpu"
    outputs: Path = Path("outputs/studio")


@dataclass(eq=False)
class StudioSession:
    """What one browser tab owns: its outputs sub-folder, its runs and its cancel flag.

    Nothing here is shared with another session. Gradio deep-copies ``gr.State`` values; a session holds
    live threading objects that must stay the ones its worker sees, so a (deep) copy is the session
    itself (each tab gets a fresh one from the state's factory).
    """

    root: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancel: threading.Event = field(default_factory=threading.Event)
    run: RunRecord | None = None
    compare: list[RunRecord] = field(default_factory=list)
    busy: bool = False
    counter: int = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> StudioSession:
        return self

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.id

    def next_output(self, stem: str, policy: str, seed: int) -> Path:
        """A new mp4 path in the session's folder (created on first use)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.counter += 1
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem) or "narrative"
        return self.folder / f"{self.counter:03d}-{safe}-{policy}-seed{seed}.mp4"

    def close(self) -> None:
        """Stop a running generation and drop the frames and previews (the tab went away; its videos stay)."""
        self.cancel.set()
        self.run, self.compare = None, []
        shutil.rmtree(self.folder / "chunks", ignore_errors=True)


@dataclass
class JobSpec:
    """One pipeline call of a worker."""

    narrative: Narrative
    output: Path
    policy: str
    steps: int
    seed: int
    max_chunks: int | None = None
    init_video: Path | None = None
    init_image: Path | None = None
    no_footage_in_output: bool = False
    save_state: Path | None = None
    resume: Path | None = None


def run_jobs(
    pipeline: EgoLCDPipeline,
    lock: threading.Lock,
    jobs: Sequence[JobSpec],
    cancel: threading.Event,
    events: queue.Queue,
) -> None:
    """Worker thread body: run ``jobs`` one after another while holding ``lock``, reporting on ``events``.

    Events: ``("started", i)``, ``("chunk", i, report, frames)`` with uint8 preview frames,
    ``("done", i, result)``, then at most one of ``("cancelled", i)`` / ``("error", i, line)``, and
    ``("finished",)`` last. A cancel (the event set) stops at the next chunk; the mp4 being written is
    discarded (the writer is atomic).
    """
    index = 0
    try:
        while not lock.acquire(timeout=0.2):
            if cancel.is_set():
                events.put(("cancelled", 0))
                return
        try:
            for index, job in enumerate(jobs):
                if cancel.is_set():
                    raise GenerationCancelled()
                events.put(("started", index))

                def callback(report: ChunkReport, frames: torch.Tensor, i: int = index) -> None:
                    events.put(("chunk", i, report, to_preview_frames(frames)))
                    if cancel.is_set():
                        raise GenerationCancelled()

                result = pipeline(
                    job.narrative, job.output, memory=job.policy, steps=job.steps, seed=job.seed,
                    max_chunks=job.max_chunks, progress=False, callback=callback, init_video=job.init_video,
                    init_image=job.init_image, no_footage_in_output=job.no_footage_in_output,
                    save_state=job.save_state, save_state_every=1_000_000, resume=job.resume,
                )
                events.put(("done", index, result))
        finally:
            lock.release()
    except GenerationCancelled:
        events.put(("cancelled", index))
    except Exception as exc:  # reported in the browser as one line; the server keeps running
        if not isinstance(exc, (ValueError, OSError, KeyError)):
            logger.exception("generation failed")
        events.put(("error", index, error_line(exc)))
    finally:
        events.put(("finished",))


def drain(events: queue.Queue, wait: float = 0.25) -> list[tuple]:
    """All events available now (waiting up to ``wait`` seconds for the first one)."""
    out = []
    try:
        out.append(events.get(timeout=wait))
        while True:
            out.append(events.get_nowait())
    except queue.Empty:
        pass
    return out


def load_pipeline(config: StudioConfig) -> EgoLCDPipeline:
    """Load the model once for all sessions (``from_pretrained`` reports a missing or broken folder)."""
    from ..pipeline import EgoLCDPipeline

    return EgoLCDPipeline.from_pretrained(config.model, device=config.device)


