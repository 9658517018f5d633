"""The local web studio (``egolcd studio``): write a narrative, watch the video stream in, inspect memory.

A Gradio app bound to localhost by default. The left column is the narrative editor (YAML, JSON or
plain text; validated on every edit with the same one-line message as ``egolcd validate``), the
examples and the sampling controls; the right column generates (chunks appear as they finish, with a
progress bar; the final mp4 plays and downloads) or compares two memory policies side by side on the
same narrative and seed, with the revisit frames next to each other. Below, the **memory inspector**
shows, for each chunk, what it saw: the long-term entries it retrieved (segment id, similarity score,
tokens kept), the short-term window and sink, a timeline of memory size, and - on clicking an entry -
the frames that entry came from.

The package splits by concept: ``views`` (pure functions, no Gradio: validation, inspector rows, plots,
frames) that the tests call directly, ``session`` (per-tab state and the generation worker) and
``app`` (:class:`Studio` + :func:`build_app`, the Gradio wiring). Gradio is imported
lazily, only to build or launch the app (``pip install "egolcd[studio]"``).

Concurrency: the pipeline (the model weights) is loaded once and shared read-only; generations run in
worker threads, one at a time behind a lock (others wait, shown as "waiting"). Each browser tab has
its own :class:`StudioSession` (``gr.State``): its outputs folder, its runs and its cancel flag.
"""

from .app import Studio, build_app, import_gradio, launch_kwargs, launch_studio
from .session import GenerationCancelled, JobSpec, StudioConfig, StudioSession, drain, load_pipeline, run_jobs
from .views import (
    EDITOR_FORMATS,
    EDITOR_SOURCE,
    INSPECTOR_HEADERS,
    INSTALL_HINT,
    RunRecord,
    context_summary,
    detect_format,
    error_line,
    footage_kind,
    format_for_path,
    frames_for_chunk,
    inspector_rows,
    list_examples,
    memory_timeline_plot,
    message_html,
    middle_frame,
    parse_editor,
    progress_html,
    revisit_frames,
    save_preview_gif,
    segment_label,
    to_preview_frames,
    validate_text,
)

__all__ = [
    "EDITOR_FORMATS", "EDITOR_SOURCE", "INSPECTOR_HEADERS", "INSTALL_HINT", "GenerationCancelled", "JobSpec",
    "RunRecord", "Studio", "StudioConfig", "StudioSession", "build_app", "context_summary", "detect_format",
    "drain", "error_line", "footage_kind", "format_for_path", "frames_for_chunk", "import_gradio", "inspector_rows",
    "launch_kwargs", "launch_studio", "list_examples", "load_pipeline", "memory_timeline_plot", "message_html",
    "middle_frame", "parse_editor", "progress_html", "revisit_frames", "run_jobs", "save_preview_gif",
    "segment_label", "to_preview_frames", "validate_text",
]
