"""``egolcd evaluate``: metrics of several videos against a reference, as JSON and a self-contained HTML report.

The HTML file embeds its plots as base64 PNG (matplotlib, Agg canvas; no pyplot global state): the drift
curves of every video (and the reference) on shared axes, a metrics table, and for each revisit of the
narrative a frame strip with each video's first-visit frame beside its best-matching revisit frame.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import (
    ClipScorer,
    ImageEncoder,
    VideoMAEFeatures,
    VideoScores,
    evaluate_video,
    score_video,
)
from .narrative import CompiledNarrative, Narrative, compile_narrative, load_narrative
from .video_io import VideoReadError, check_writable_dir, probe_video, read_video

logger = logging.getLogger(__name__)

REFERENCE_LABEL = "reference"
THUMB_WIDTH = 192
# (column title, key, format) of the metrics table
COLUMNS: list[tuple[str, str, str]] = [
    ("frames", "frames", "{:d}"),
    ("subject cons.", "subject_consistency", "{:.4f}"),
    ("background cons.", "background_consistency", "{:.4f}"),
    ("drift subject", "drift_subject", "{:.4f}"),
    ("NRDP-Subject", "nrdp_subject", "{:.4f}"),
    ("NRDP-Background", "nrdp_background", "{:.4f}"),
    ("flicker", "flicker", "{:.4f}"),
    ("revisit PSNR (dB)", "revisit_psnr", "{:.2f}"),
    ("revisit SSIM", "revisit_ssim", "{:.4f}"),
    ("FVD", "fvd", "{:.2f}"),
    ("CLIP score", "clip_score", "{:.4f}"),
]


# --------------------------------------------------------------------------------------- entry point
def evaluate_main(
    videos: list[str],
    reference: str | None,
    narrative: str | None,
    report: str | None,
    json_path: str | None,
    clip_model: str | None = None,
    fvd_model: str | None = None,
    labels: list[str] | None = None,
    feature_model: str | None = None,
) -> dict[str, Any]:
    """Evaluate generated videos (``egolcd evaluate``) and write the JSON and HTML reports.

    Args:
        videos: generated mp4 files.
        reference: a real video (enables NRDP and FVD), or ``None``.
        narrative: the narrative file the videos were generated from (revisits, CLIP prompts), or ``None``.
            It is compiled at each video's own frame rate.
        report: HTML report path, or ``None``.
        json_path: JSON path, or ``None``.
        clip_model: local CLIP folder for the CLIP score (skipped with a message without it).
        fvd_model: local VideoMAE folder for FVD (skipped with a message without it).
        labels: one label per video (e.g. the memory policy); default: file stems.
        feature_model: local DINO/CLIP folder for the consistency features (default: the fixed descriptor).

    Returns:
        ``{"videos": {label: metrics}, "reference": metrics | None, "narrative", "revisits", "models",
        "notes"}`` (what the JSON file holds).

    Raises:
        ValueError: bad arguments, or a model folder that does not load (one line).
        VideoReadError: a missing or corrupt video (one line).
        OSError: an output directory that is missing or not writable.
    """
    if not videos:
        raise ValueError("evaluate needs at least one video")
    labels = _labels(videos, labels)
    for out in (report, json_path):
        if out is not None:
            _check_writable(Path(out))
    for path in [*videos, *([reference] if reference else [])]:
        probe_video(path)  # fail fast, before any model is loaded
    narr = load_narrative(narrative) if narrative else None
    fvd_encoder = VideoMAEFeatures(fvd_model) if fvd_model else None
    clip_scorer = ClipScorer(clip_model) if clip_model else None
    features = ImageEncoder(feature_model) if feature_model else None
    kw: dict[str, Any] = {"features": features, "fvd_encoder": fvd_encoder}
    strips: dict[str, dict[str, Any]] = {}

    ref_scores: VideoScores | None = None
    ref_summary = None
    if reference:
        frames, fps = read_video(reference)
        compiled = _compile(narr, fps)
        with _evaluating(reference):
            ref_scores = score_video(frames, fps, compiled, clip_scorer=clip_scorer, **kw)
        ref_summary = dict(ref_scores.summary, path=str(reference))
        strips[REFERENCE_LABEL] = _strip_frames(frames, ref_summary)
    results: dict[str, dict[str, Any]] = {}
    for label, path in zip(labels, videos):
        logger.info("evaluating %s (%s)", path, label)
        frames, fps = read_video(path)
        compiled = _compile(narr, fps)
        with _evaluating(path):
            metrics = evaluate_video(frames, ref_scores, compiled, fps=fps, clip_scorer=clip_scorer, **kw)
        results[label] = dict(metrics, path=str(path))
        strips[label] = _strip_frames(frames, metrics)
    notes = sorted({m for r in [*results.values(), ref_summary or {}] for m in r.get("skipped", {}).values()})
    result = {
        "videos": results,
        "reference": ref_summary,
        "narrative": str(narrative) if narrative else None,
        "revisits": [[s.id, s.revisit] for s in narr.segments if s.revisit] if narr else [],
        "models": {"clip": clip_model, "fvd": fvd_model, "features": feature_model},
        "notes": notes,
    }
    if json_path is not None:
        _write_text(Path(json_path), json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")
        logger.info("wrote %s", json_path)
    if report is not None:
        _write_text(Path(report), render_html(result, strips))
        logger.info("wrote %s", report)
    return result


def _labels(videos: list[str], labels: list[str] | None) -> list[str]:
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"got {len(labels)} labels for {len(videos)} videos")
    names = list(labels) if labels is not None else [Path(v).stem for v in videos]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    if REFERENCE_LABEL in out:
        out = [f"{n} (video)" if n == REFERENCE_LABEL else n for n in out]
    return out


def _compile(narr: Narrative | None, fps: float) -> CompiledNarrative | None:
    if narr is None:
        return None
    # segment frame counts at the video's own rate; chunking does not matter for evaluation
    return compile_narrative(narr, fps=max(1, round(fps)), chunk_frames=1, vae_temporal=1)


@contextmanager
def _evaluating(path: str) -> Iterator[None]:
    """Turn a metric's ``ValueError`` into one line naming the video."""
    try:
        yield
    except VideoReadError:
        raise
    except ValueError as exc:
        raise ValueError(
            f"cannot evaluate {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None


def _check_writable(path: Path) -> None:
    check_writable_dir(path.expanduser().resolve().parent)


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file so an existing report is replaced only by a complete one."""
    path = path.expanduser()
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _strip_frames(frames: np.ndarray, metrics: dict[str, Any]) -> dict[str, Any]:
    """Small copies of the first-visit / revisit frame pair of each revisit, keyed by "segment->revisited"."""
    out = {}
    for r in metrics.get("revisits", []):
        out[f"{r['segment']}->{r['revisited']}"] = {
            "first": _thumb(frames[r["first_visit_frame"]]),
            "revisit": _thumb(frames[r["revisit_frame"]]),
            **r,
        }
    return out


def _thumb(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    step = max(1, w // THUMB_WIDTH)
    return np.ascontiguousarray(image[::step, ::step])


# --------------------------------------------------------------------------------------- rendering
def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def drift_figure(result: dict[str, Any]) -> str:
    """Drift curves (subject, background consistency and flicker per window over time) as base64 PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    series = [(label, m) for label, m in result["videos"].items()]
    if result.get("reference"):
        series.append((REFERENCE_LABEL, result["reference"]))
    for ax, key, title in zip(
        axes,
        ("subject", "background", "flicker"),
        ("subject consistency", "background consistency", "temporal flicker"),
    ):
        for label, m in series:
            curve = m["curves"]
            style = {"color": "black", "linestyle": "--"} if label == REFERENCE_LABEL else {}
            ax.plot(curve["seconds"], curve[key], marker=".", label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _png(fig)


def strip_figure(key: str, strips: dict[str, dict[str, Any]]) -> str | None:
    """Side-by-side first-visit / revisit frames of one revisit for every video, as base64 PNG."""
    from matplotlib.figure import Figure

    rows = [(label, s[key]) for label, s in strips.items() if key in s]
    if not rows:
        return None
    fig = Figure(figsize=(6, 2.4 * len(rows)))
    axes = np.atleast_2d(fig.subplots(len(rows), 2, squeeze=False))
    for (label, item), (a, b) in zip(rows, axes):
        a.imshow(item["first"])
        a.set_title(
            f"{label}: {item['revisited']} first visit (frame {item['first_visit_frame']})", fontsize=8
        )
        b.imshow(item["revisit"])
        b.set_title(
            f"{item['segment']} revisit (frame {item['revisit_frame']}): "
            f"PSNR {item['psnr']:.1f} dB, SSIM {item['ssim']:.3f}",
            fontsize=8,
        )
        for ax in (a, b):
            ax.axis("off")
    return _png(fig)


def _cell(metrics: dict[str, Any], key: str, fmt: str) -> str:
    value = metrics.get(key)
    if value is None:
        reason = metrics.get("skipped", {}).get(key)
        return f'<td title="{html.escape(reason)}">skipped</td>' if reason else "<td>-</td>"
    if isinstance(value, float) and not math.isfinite(value):
        return f"<td>{value}</td>"
    return f"<td>{html.escape(fmt.format(value))}</td>"


def render_html(result: dict[str, Any], strips: dict[str, dict[str, Any]] | None = None) -> str:
    """The self-contained HTML report of an ``evaluate_main`` result.

    Args:
        result: what ``evaluate_main`` returns.
        strips: per label, per revisit key ("segment->revisited"), the thumbnails and scores of the pair.
    """
    esc = html.escape
    rows = [(label, m) for label, m in result["videos"].items()]
    if result.get("reference"):
        rows.append((REFERENCE_LABEL, result["reference"]))
    head = "".join(f"<th>{esc(title)}</th>" for title, _, _ in COLUMNS)
    body = "\n".join(
        f"<tr><th>{esc(label)}</th>" + "".join(_cell(m, key, fmt) for _, key, fmt in COLUMNS) + "</tr>"
        for label, m in rows
    )
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>egolcd evaluation</title><style>',
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}",
        "</style></head><body>",
        "<h1>egolcd evaluation</h1>",
        f"<p>reference: {esc(str((result.get('reference') or {}).get('path', 'none')))}; "
        f"narrative: {esc(str(result.get('narrative') or 'none'))}</p>",
        "<h2>Metrics</h2>",
        f'<table class="metrics"><tr><th>video</th>{head}</tr>\n{body}\n</table>',
        "<p>NRDP = max(0, drift(G) - drift(R)) / mean(R), drift = |mean(first 15%) - mean(last 15%)| of the "
        "per-frame consistency; lower is better. Consistency features: "
        f"{esc(str(rows[0][1].get('features', '')))}. Flicker: 1 - mean|frame difference| / 255.</p>",
    ]
    if result.get("notes"):
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in result["notes"]) + "</ul>")
    parts += [
        "<h2>Drift curves</h2>",
        f'<img alt="drift curves" src="data:image/png;base64,{drift_figure(result)}">',
    ]
    if result.get("revisits"):
        parts.append("<h2>Revisits</h2>")
        for segment, revisited in result["revisits"]:
            key = f"{segment}->{revisited}"
            png = strip_figure(key, strips or {})
            parts.append(f"<h3>{esc(segment)} returns to {esc(revisited)}</h3>")
            parts.append(
                f'<img alt="revisit {esc(key)}" src="data:image/png;base64,{png}">'
                if png
                else "<p>no frames (the videos are shorter than the narrative)</p>"
            )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def summary_text(result: dict[str, Any]) -> str:
    """A plain-text table of the main metrics (for the terminal), one row per video and the reference."""
    rows = [(label, m) for label, m in result["videos"].items()]
    if result.get("reference"):
        rows.append((REFERENCE_LABEL, result["reference"]))
    keys = ("nrdp_subject", "nrdp_background", "flicker", "revisit_psnr", "revisit_ssim", "fvd", "clip_score")
    table = [("video", *keys)]
    for label, m in rows:
        table.append((label, *("-" if m.get(k) is None else f"{m[k]:.4g}" for k in keys)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines + [f"note: {n}" for n in result.get("notes", [])])
