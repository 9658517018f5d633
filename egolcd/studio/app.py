"""The Gradio wiring: ``Studio`` (shared pipeline, lock and event handlers), ``build_app`` and
``launch_studio``."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import MEMORY_POLICIES
from ..limits import check_generation_options

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure

    from ..pipeline import EgoLCDPipeline

from .session import JobSpec, StudioConfig, StudioSession, drain, load_pipeline, run_jobs
from .views import (
    IMAGE_SUFFIXES,
    INSPECTOR_HEADERS,
    UPDATE_INTERVAL,
    WAITING,
    RunRecord,
    context_summary,
    error_line,
    footage_kind,
    format_for_path,
    frames_for_chunk,
    inspector_rows,
    list_examples,
    memory_timeline_plot,
    message_html,
    parse_editor,
    progress_html,
    revisit_frames,
    save_preview_gif,
    segment_label,
    validate_text,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = 'install the studio extra: pip install "egolcd[studio]"'
EDITOR_FORMATS = ("auto", "yaml", "json", "text")
NARRATIVE_SUFFIXES = (".yaml", ".yml", ".json", ".txt")

# What a bad narrative or option can raise while a run starts; reported in the tab, which stays usable.
START_ERRORS = (ValueError, KeyError, OSError, TypeError, OverflowError, RecursionError)


def _whole(value: Any, name: str) -> int:
    """A whole number from a form field (``4``, ``4.0``, ``"4"``); ``inf``, ``nan``, ``4.5``: ``ValueError``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def import_gradio() -> Any:
    """Gradio, imported lazily with its telemetry off; a one-line error when it is not installed."""
    from ..errors import MissingDependencyError

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gradio
    except ImportError as exc:
        raise MissingDependencyError(f"egolcd studio needs gradio ({exc}); {INSTALL_HINT}") from None
    return gradio


class Studio:
    """The app's state shared by all sessions (config, the loaded pipeline, the generation lock) and
    its event handlers. Handlers take the session first and never touch another session.

    Args:
        config: the studio configuration.
        pipeline: an already loaded pipeline (default: load ``config.model``).
    """

    def __init__(self, config: StudioConfig, pipeline: EgoLCDPipeline | None = None) -> None:
        self.config = config
        self.pipeline = pipeline if pipeline is not None else load_pipeline(config)
        self.lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self.examples = {path.name: path for path in list_examples()}

    def new_session(self) -> StudioSession:
        return StudioSession(root=Path(self.config.outputs))

    @property
    def model_summary(self) -> str:
        cfg, pipe = self.pipeline.config, self.pipeline
        return (
            f"model `{self.config.model}` (preset `{cfg.preset}`, {cfg.width}x{cfg.height} at {cfg.fps} fps, "
            f"{pipe.chunk_frames} latent frames per chunk, default memory `{cfg.memory.policy}`, "
            f"{cfg.steps} steps) on `{pipe.device}`"
        )

    # ------------------------------------------------------------------ editor
    def load_example(self, name: str | None) -> tuple[str, str] | None:
        """The text and format of an example (``None`` for no or an unknown name)."""
        path = self.examples.get(name or "")
        if path is None:
            return None
        return path.read_text(encoding="utf-8"), format_for_path(path)

    def validate(self, text: str, fmt: str) -> tuple[str, str]:
        """Validation line (HTML) and schedule for the editor's text."""
        if not (text or "").strip():
            return message_html(False, "write a narrative or load an example"), ""
        ok, message, schedule = validate_text(text, self.pipeline, fmt)
        return message_html(ok, message), schedule

    def cancel(self, session: StudioSession) -> str:
        """Ask the session's running generation to stop after its current chunk (returns what happened)."""
        if not session.busy:
            return progress_html(0, 1, "nothing is running")
        session.cancel.set()
        return progress_html(0, 1, "cancelling after the current chunk...")

    # ------------------------------------------------------------------ generation
    def _claim(self, session: StudioSession) -> bool:
        """Mark the session busy unless it already is (one generation per tab at a time)."""
        with self._claim_lock:
            if session.busy:
                return False
            session.busy = True
            return True

    def _start(
        self, session: StudioSession, text: str, fmt: str, policies: Sequence[str], steps: Any, seed: Any,
        max_chunks: Any, stem: str, footage: Any = None, no_footage: bool = False,
    ) -> tuple[list[RunRecord], queue.Queue]:
        narrative, compiled = parse_editor(text, self.pipeline, fmt)
        steps = _whole(steps, "steps") if steps not in (None, "", 0) else self.pipeline.config.steps
        seed = _whole(seed, "seed") if seed not in (None, "") else 0
        check_generation_options(steps, None, seed)
        max_chunks = _whole(max_chunks, "chunk limit") if max_chunks not in (None, "") else 0
        limit = max_chunks if max_chunks > 0 else None
        start: dict[str, Any] = {}
        frames = 0
        if footage:  # an uploaded clip or photo: the run's first segment (``footage: true`` or implicit)
            start = {f"init_{footage_kind(footage)}": Path(footage), "no_footage_in_output": bool(no_footage)}
            narrative = self.pipeline.footage_narrative(narrative, start.get("init_video"), start.get("init_image"))
            _, compiled = self.pipeline.compile(narrative)
            frames = compiled.segment_frames[0]
        elif narrative.segments[0].footage:
            raise ValueError(
                f"segment 1 ({narrative.segments[0].id!r}) is footage (footage: true): upload a clip or a photo"
            )
        total = compiled.num_chunks if limit is None else min(limit, compiled.num_chunks)
        jobs, runs = [], []
        for p in policies:
            out = session.next_output(stem, p, seed)
            state = out.with_name(out.stem + ".state.safetensors")
            jobs.append(JobSpec(narrative, out, p, steps, seed, limit, save_state=state, **start))
            runs.append(RunRecord(policy=p, compiled=compiled, total_chunks=total, steps=steps, seed=seed,
                                  state=state, footage_frames=frames))
        return runs, self._launch(session, jobs, runs)

    def _continue(self, session: StudioSession, text: str, fmt: str) -> tuple[list[RunRecord], queue.Queue]:
        """Extend the session's last finished run with the editor's narrative (its segments + new ones)."""
        last = session.run
        if last is None or last.status != "done" or last.state is None or not Path(last.state).is_file():
            raise ValueError("nothing to continue: generate a run first (Continue extends the last finished run)")
        narrative, compiled = parse_editor(text, self.pipeline, fmt)
        if last.footage_frames:
            from ..narrative import with_footage

            fps = narrative.fps or self.pipeline.config.fps
            _, compiled = self.pipeline.compile(with_footage(narrative, last.footage_frames, fps))
        if compiled.num_chunks <= len(last.reports):
            raise ValueError("nothing to continue: add segments after the run's last one in the editor")
        out = session.next_output(Path(last.video).stem.split("-", 1)[-1] + "-continued", last.policy, last.seed)
        state = out.with_name(out.stem + ".state.safetensors")
        job = JobSpec(narrative, out, last.policy, last.steps, last.seed, save_state=state, resume=Path(last.state))
        run = RunRecord(policy=last.policy, compiled=compiled, total_chunks=compiled.num_chunks, steps=last.steps,
                        seed=last.seed, reports=list(last.reports), frames=list(last.frames),
                        previews=list(last.previews), state=state, footage_frames=last.footage_frames)
        return [run], self._launch(session, [job], [run])

    def _launch(self, session: StudioSession, jobs: list[JobSpec], runs: list[RunRecord]) -> queue.Queue:
        events: queue.Queue = queue.Queue()
        session.cancel = threading.Event()  # a fresh flag per run: a stopping old worker keeps its own
        logger.info("session %s: %s, %d chunks, %d steps, seed %d -> %s", session.id,
                    " vs ".join(r.policy for r in runs), runs[0].total_chunks, runs[0].steps, runs[0].seed,
                    session.folder)
        worker = threading.Thread(
            target=run_jobs, args=(self.pipeline, self.lock, jobs, session.cancel, events),
            name=f"egolcd-studio-{session.id}", daemon=True,
        )
        worker.start()
        return events

    def _events(
        self, session: StudioSession, runs: list[RunRecord], events: queue.Queue
    ) -> Iterator[tuple[str, int]]:
        """Apply worker events to ``runs`` and yield ``(phase, run index)`` when something changed (at most
        every ``UPDATE_INTERVAL`` seconds, and always on a phase change); phases: ``waiting``, ``running``,
        ``done``, ``cancelled``, ``error``."""
        phase, current, finished = "waiting", 0, False
        started: dict[int, float] = {}
        try:
            yield phase, current
            pending, shown, last = False, phase, time.perf_counter()
            while not finished:
                for event in drain(events):
                    pending = True
                    kind = event[0]
                    if kind == "started":
                        phase, current = "running", event[1]
                        started[current] = time.perf_counter()
                    elif kind == "chunk":
                        run = runs[event[1]]
                        run.add_chunk(event[2], event[3])
                        chunk = event[2].chunk
                        if len(run.frames[-1]):
                            preview = session.folder / "chunks" / f"{run.key}-{chunk:04d}.gif"
                            run.previews.append((save_preview_gif(run.frames[-1], preview, run.compiled.fps), chunk))
                    elif kind == "done":
                        run = runs[event[1]]
                        result = event[2]
                        run.video, run.status = Path(result.path), "done"
                        run.message = (
                            f"{run.policy} ({run.steps} step{'' if run.steps == 1 else 's'}, seed {run.seed}): "
                            f"{result.num_chunks} chunks, {result.num_frames} frames in "
                            f"{time.perf_counter() - started.get(event[1], 0.0):.1f} s -> {result.path}"
                        )
                    elif kind == "cancelled":
                        phase = "cancelled"
                        for run in runs[event[1]:]:
                            run.status = "cancelled"
                            n = len(run.reports)
                            run.message = f"cancelled after {n} chunk{'' if n == 1 else 's'} (no video written)"
                    elif kind == "error":
                        phase = "error"
                        runs[event[1]].status, runs[event[1]].message = "failed", event[2]
                        for run in runs[event[1] + 1:]:
                            run.status, run.message = "failed", f"{run.policy}: not run"
                    elif kind == "finished":
                        finished = True
                if finished:
                    phase = "done" if phase not in ("cancelled", "error") else phase
                    session.busy = False  # before the last update: the tab may start the next run at once
                now = time.perf_counter()
                if pending and (finished or phase != shown or now - last >= UPDATE_INTERVAL):
                    pending, shown, last = False, phase, now
                    yield phase, current
        finally:
            if not finished:  # the browser went away or the event was stopped: stop the worker too
                session.cancel.set()
                session.busy = False

    def generate(
        self, session: StudioSession, text: str, fmt: str, policy: str, steps: Any, seed: Any,
        max_chunks: Any = 0, example: str | None = None, footage: Any = None, no_footage: bool = False,
    ) -> Iterator[tuple[Any, ...]]:
        """The Generate button: stream ``(message, progress, previews, video, chunk slider, inspector rows,
        window summary, timeline)`` as chunks finish. ``footage``: an uploaded clip or photo to start from
        (``no_footage``: leave its frames out of the video)."""
        stem = Path(example).stem if example else "narrative"
        yield from self._run_updates(session, text, fmt, lambda: self._start(
            session, text, fmt, [policy], steps, seed, max_chunks, stem, footage, no_footage))

    def continue_run(self, session: StudioSession, text: str, fmt: str) -> Iterator[tuple[Any, ...]]:
        """The "Continue this run" button: resume the tab's last finished run with the editor's narrative,
        which keeps that run's segments and adds new ones after them; the new video holds the old frames and
        the new ones (same policy, steps and seed). Streams as Generate does."""
        yield from self._run_updates(session, text, fmt, lambda: self._continue(session, text, fmt))

    def _run_updates(self, session: StudioSession, text: str, fmt: str, start: Any) -> Iterator[tuple[Any, ...]]:
        gr = import_gradio()
        no_change = gr.skip()
        if not self._claim(session):
            yield (no_change, progress_html(0, 1, "a generation is already running in this tab"),
                   *([no_change] * 7))
            return
        owned = True  # this call releases the busy flag until the worker's events take it over
        try:
            try:
                ok_line = message_html(True, validate_text(text, self.pipeline, fmt)[1])
                runs, events = start()
            except START_ERRORS as exc:
                yield (message_html(False, error_line(exc)), progress_html(0, 1, "not started (see the message under the editor)"),
                       *([no_change] * 7))
                return
            run = session.run = runs[0]
            owned = False
            yield from self._generate_updates(session, run, runs, events, ok_line, gr)
        finally:
            if owned:
                session.busy = False

    def _generate_updates(self, session: StudioSession, run: RunRecord, runs: list[RunRecord], events: queue.Queue,
                          ok_line: str, gr: Any) -> Iterator[tuple[Any, ...]]:
        for phase, _ in self._events(session, runs, events):
            done = len(run.reports)
            if phase == "waiting":
                status = WAITING
            elif phase == "running":
                last = run.reports[-1] if run.reports else None
                where = f" · segment '{segment_label(run.compiled, last.segment)}'" if last else ""
                status = f"chunk {done}/{run.total_chunks}{where}"
                if session.cancel.is_set():
                    status += " · cancelling after this chunk..."
            else:
                status = run.message or phase
            latest = max(done - 1, 0)
            yield (
                ok_line,
                progress_html(done, run.total_chunks, status),
                [(str(path), f"chunk {chunk}") for path, chunk in run.previews],
                str(run.video) if run.video is not None else None,
                gr.Slider(minimum=0, maximum=max(done - 1, 1), value=latest, step=1),
                *self.inspect(session, latest),
            )

    def compare(
        self, session: StudioSession, text: str, fmt: str, policy_a: str, policy_b: str, steps: Any, seed: Any,
        max_chunks: Any = 0, example: str | None = None, footage: Any = None, no_footage: bool = False,
    ) -> Iterator[tuple[Any, ...]]:
        """Side by side: the same narrative and seed under two policies; streams ``(message, progress,
        video A, video B, revisit frames)``."""
        gr = import_gradio()
        no_change = gr.skip()
        if not self._claim(session):
            yield no_change, progress_html(0, 1, "a generation is already running in this tab"), *([no_change] * 3)
            return
        owned = True
        try:
            try:
                ok_line = message_html(True, validate_text(text, self.pipeline, fmt)[1])
                runs, events = self._start(
                    session, text, fmt, [policy_a, policy_b], steps, seed, max_chunks,
                    Path(example).stem if example else "narrative", footage, no_footage,
                )
            except START_ERRORS as exc:
                yield (message_html(False, error_line(exc)), progress_html(0, 1, "not started (see the message under the editor)"),
                       *([no_change] * 3))
                return
            session.compare = runs
            owned = False
            yield from self._compare_updates(session, runs, events, ok_line)
        finally:
            if owned:
                session.busy = False

    def _compare_updates(self, session: StudioSession, runs: list[RunRecord], events: queue.Queue,
                         ok_line: str) -> Iterator[tuple[Any, ...]]:
        total = sum(r.total_chunks for r in runs)
        for phase, current in self._events(session, runs, events):
            done = sum(len(r.reports) for r in runs)
            if phase == "waiting":
                status = WAITING
            elif phase == "running":
                run = runs[current]
                status = f"{run.policy}: chunk {len(run.reports)}/{run.total_chunks}"
                if session.cancel.is_set():
                    status += " · cancelling after this chunk..."
            else:
                status = " | ".join(r.message for r in runs if r.message) or phase
            revisits = revisit_frames(runs)
            if not runs[0].compiled.revisits:
                status += " (this narrative has no revisit: add `revisit: <id>` to a segment)"
            yield (
                ok_line,
                progress_html(done, total, status),
                str(runs[0].video) if runs[0].video else None,
                str(runs[1].video) if runs[1].video else None,
                revisits,
            )

    # ------------------------------------------------------------------ inspector
    def inspect(self, session: StudioSession, chunk: Any) -> tuple[list[list[Any]], str, Figure, list]:
        """Inspector outputs for one chunk of the session's run: rows, summary, timeline, (no) frames."""
        run = session.run
        if run is None or not run.reports:
            return [], "Generate a video to inspect its memory chunk by chunk.", memory_timeline_plot([]), []
        index = min(max(int(chunk or 0), 0), len(run.reports) - 1)
        report = run.reports[index]
        return (
            inspector_rows(report, run.compiled),
            context_summary(report, run.compiled),
            memory_timeline_plot(run.reports, run.compiled, selected=index),
            [],
        )

    def entry_frames(self, session: StudioSession, chunk: Any, row: int | None) -> list[tuple[np.ndarray, str]]:
        """The frames of the source chunk of inspector row ``row`` (captioned)."""
        run = session.run
        if run is None or not run.reports or row is None:
            return []
        index = min(max(int(chunk or 0), 0), len(run.reports) - 1)
        rows = inspector_rows(run.reports[index], run.compiled)
        if not 0 <= row < len(rows):
            return []
        kind, source, seg, score, _ = rows[row]
        what = f"{kind}, score {score}" if score else kind
        frames = frames_for_chunk(run, source)
        return [(f, f"chunk {source} · '{seg}' · frame {i} ({what})") for i, f in enumerate(frames)]


CSS = """
.egolcd-msg { font-family: ui-monospace, monospace; font-size: 0.9em; padding: 6px 8px; border-radius: 4px; }
.egolcd-ok { color: #14532d; background: #dcfce7; }
.egolcd-error { color: #7f1d1d; background: #fee2e2; }
.egolcd-progress progress { width: 60%; vertical-align: middle; }
#chunk-previews img, #entry-frames img, #revisit-frames img { image-rendering: pixelated; }
"""


def build_app(studio: Studio) -> Any:
    """The Gradio Blocks of the studio (call ``.queue().launch(**launch_kwargs(config))``)."""
    gr = import_gradio()
    outputs_root = Path(studio.config.outputs)

    def make_session() -> StudioSession:  # a plain function: gr.State deep-copies its factory
        return StudioSession(root=outputs_root)

    cfg = studio.pipeline.config
    with gr.Blocks(title="egolcd studio", analytics_enabled=False) as demo:
        session = gr.State(make_session, delete_callback=StudioSession.close)
        gr.Markdown(f"## egolcd studio\n{studio.model_summary}")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    example = gr.Dropdown(
                        choices=list(studio.examples), value=None, label="Load an example",
                        elem_id="example-dropdown",
                    )
                    fmt = gr.Radio(list(EDITOR_FORMATS), value="auto", label="Format", elem_id="narrative-format")
                editor = gr.Code(
                    value="", language="yaml", lines=18, max_lines=40, label="Narrative", interactive=True,
                    elem_id="narrative-editor",
                )
                validation = gr.HTML(message_html(False, "write a narrative or load an example"),
                                     elem_id="validation-message")
                with gr.Accordion("Schedule and compiled prompts", open=False):
                    schedule = gr.Textbox(lines=12, max_lines=30, show_label=False, interactive=False,
                                          elem_id="schedule")
                with gr.Row():
                    policy = gr.Dropdown(list(MEMORY_POLICIES), value=cfg.memory.policy, label="Memory policy",
                                         elem_id="memory-policy")
                    steps = gr.Slider(1, 50, value=cfg.steps, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    footage = gr.File(label="Start from a clip or photo (optional)", type="filepath",
                                      file_types=["video", *IMAGE_SUFFIXES], elem_id="footage-file")
                    no_footage = gr.Checkbox(False, label="Leave the footage out of the video",
                                             elem_id="no-footage")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    max_chunks = gr.Number(value=0, precision=0, minimum=0, label="Max chunks (0 = all)",
                                           elem_id="max-chunks")
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate-tab"):
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                            continue_btn = gr.Button("Continue this run", elem_id="continue-btn")
                        progress = gr.HTML(progress_html(0, 1, "idle"), elem_id="progress")
                        previews = gr.Gallery(label="Chunks as they finish", columns=6, height=220,
                                              elem_id="chunk-previews", allow_preview=True)
                        video = gr.Video(label="Video", interactive=False, elem_id="result-video", height=360,
                                         buttons=["download"])
                    with gr.Tab("Side by side", id="compare-tab"):
                        with gr.Row():
                            policy_a = gr.Dropdown(list(MEMORY_POLICIES), value="egolcd", label="Policy A",
                                                   elem_id="policy-a")
                            policy_b = gr.Dropdown(list(MEMORY_POLICIES), value="window", label="Policy B",
                                                   elem_id="policy-b")
                        with gr.Row():
                            compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                            compare_cancel = gr.Button("Cancel", variant="stop", elem_id="compare-cancel-btn")
                        compare_progress = gr.HTML(progress_html(0, 1, "idle"), elem_id="compare-progress")
                        with gr.Row():
                            video_a = gr.Video(label="Policy A", interactive=False, elem_id="compare-video-a",
                                               buttons=["download"])
                            video_b = gr.Video(label="Policy B", interactive=False, elem_id="compare-video-b",
                                               buttons=["download"])
                        revisits = gr.Gallery(label="Revisits: first visit and return, per policy", columns=4,
                                              height=240, elem_id="revisit-frames")
        with gr.Group(elem_id="memory-inspector-panel"):
            gr.Markdown("### Memory inspector")
            with gr.Row():
                chunk = gr.Slider(0, 1, value=0, step=1, label="Chunk", elem_id="inspector-chunk")
                summary = gr.Markdown("Generate a video to inspect its memory chunk by chunk.",
                                      elem_id="inspector-summary")
            with gr.Row():
                table = gr.Dataframe(
                    headers=INSPECTOR_HEADERS, datatype=["str", "number", "str", "str", "number"],
                    interactive=False, label="What this chunk saw (click a row for its source frames)",
                    elem_id="memory-inspector", scale=3,
                )
                entry = gr.Gallery(label="Frames of the selected entry", columns=4, height=240,
                                   elem_id="entry-frames", scale=2)
            timeline = gr.Plot(label="Memory over the run", elem_id="memory-timeline", format="png")

        def on_example(name: str | None) -> tuple[Any, Any]:
            loaded = studio.load_example(name)
            return loaded if loaded is not None else (gr.skip(), gr.skip())

        example.change(on_example, [example], [editor, fmt])
        editor.change(studio.validate, [editor, fmt], [validation, schedule], trigger_mode="always_last",
                      show_progress="hidden")
        fmt.change(studio.validate, [editor, fmt], [validation, schedule], show_progress="hidden")
        # trigger_mode="multiple": gradio's default ("once") drops a click that lands between a run's last
        # update ("cancelled after ...") and the end of its event, so Generate right after Cancel did nothing.
        # A click during a run is answered by _claim ("already running in this tab") instead.
        generate_btn.click(
            studio.generate, [session, editor, fmt, policy, steps, seed, max_chunks, example, footage, no_footage],
            [validation, progress, previews, video, chunk, table, summary, timeline, entry],
            concurrency_limit=8, show_progress="hidden", trigger_mode="multiple",
        )
        # "Continue this run": the editor keeps the run's segments and adds new ones after them
        continue_btn.click(
            studio.continue_run, [session, editor, fmt],
            [validation, progress, previews, video, chunk, table, summary, timeline, entry],
            concurrency_limit=8, show_progress="hidden", trigger_mode="multiple",
        )
        compare_btn.click(
            studio.compare, [session, editor, fmt, policy_a, policy_b, steps, seed, max_chunks, example, footage,
                             no_footage],
            [validation, compare_progress, video_a, video_b, revisits],
            concurrency_limit=8, show_progress="hidden", trigger_mode="multiple",
        )
        # Cancel only sets the session's flag: the running handler itself reports "cancelled after N chunks"
        # (an output here could arrive after that final update and overwrite it).
        def on_cancel(sess: StudioSession) -> None:
            studio.cancel(sess)

        cancel_btn.click(on_cancel, [session], None, concurrency_limit=None, queue=False)
        compare_cancel.click(on_cancel, [session], None, concurrency_limit=None, queue=False)
        chunk.input(studio.inspect, [session, chunk], [table, summary, timeline, entry], show_progress="hidden",
                    trigger_mode="always_last")

        def on_select(sess: StudioSession, index: Any, evt: Any) -> list:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            return studio.entry_frames(sess, index, row)

        on_select.__annotations__["evt"] = gr.SelectData  # resolved here: gradio injects the event by type

        table.select(on_select, [session, chunk], [entry], show_progress="hidden")
    return demo


def launch_kwargs(config: StudioConfig) -> dict[str, Any]:
    """Keyword arguments of ``Blocks.launch`` for a local, offline studio."""
    outputs = Path(config.outputs)
    return dict(
        server_name=config.host, server_port=config.port, share=False, inbrowser=False, ssr_mode=False,
        allowed_paths=[str(outputs.resolve())], footer_links=[], css=CSS, quiet=True,
    )


def launch_studio(config: StudioConfig) -> None:
    """Load the model, build the app and serve it until interrupted (blocking)."""
    import_gradio()
    Path(config.outputs).mkdir(parents=True, exist_ok=True)
    studio = Studio(config)
    demo = build_app(studio)
    try:
        demo.queue(default_concurrency_limit=8).launch(**launch_kwargs(config), prevent_thread_lock=True)
    except OSError as exc:
        if "empty port" in str(exc):
            message = f"cannot serve on {config.host}:{config.port}: the port is in use (pick another with --port)"
            raise OSError(message) from None
        raise
    logger.info("egolcd studio on http://%s:%d (model %s, videos in %s); Ctrl+C stops it", config.host,
                demo.server_port, config.model, config.outputs)
    try:
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl+C is how a local server stops: not an error
        logger.info("egolcd studio stopped")
    finally:
        demo.close(verbose=False)
