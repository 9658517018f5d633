"""Prompts of a training clip: a caption split into a narrative (scene, then actions over the chunks), or a
clip's own narrative file compiled as ``generate`` compiles it. Either way the prompts use the inference
template (:func:`egolcd.narrative.build_prompts`)."""

from __future__ import annotations

import os
import re

from ..narrative import DEFAULT_ACTOR, Narrative, Segment, build_prompts, compile_narrative, load_narrative

_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")
_NARRATION_RE = re.compile(r"^\s*#?\s*C\s+C\s+|^\s*#C\s+", re.IGNORECASE)
_SUBJECT_RE = re.compile(
    r"^(?:(?:the|a|an)\s+(?:person|man|woman|user|individual|camera\s+wearer|wearer)|he|she|c)\s+",
    re.IGNORECASE,
)
_SCENE_RE = re.compile(
    r"^(?:in\s+(?:the|this)\s+(?:video|clip|footage),?\s+(?:we\s+see\s+)?|"
    r"(?:the|this)\s+(?:video|clip|footage|scene)\s+(?:shows|depicts|captures|features|displays|presents|"
    r"is\s+of|begins\s+with)\s+(?:a\s+view\s+of\s+)?)",
    re.IGNORECASE,
)

def split_sentences(text: str) -> list[str]:
    """Split a caption into sentences (at ``.``, ``!`` or ``?`` followed by white space).

    Args:
        text: the caption.
    """
    text = " ".join(str(text).split())
    return [s.strip() for s in _SENTENCE_RE.split(text) if s.strip()]


def _narration(name: str) -> str:
    """An Ego4D narration ("#C C picks up a knife") as an action clause ("picks up a knife")."""
    return " ".join(_NARRATION_RE.sub("", name).split())


def _subjectless(sentence: str) -> str:
    """A caption sentence as an action clause: subject ("The person", "He", ...) and final stop removed."""
    return _SUBJECT_RE.sub("", sentence.strip().rstrip(".!?").strip(), count=1).strip()


def _scene(sentence: str) -> str:
    """A caption's first sentence as a scene ("The video shows a kitchen." -> "a kitchen")."""
    scene = _SCENE_RE.sub("", sentence.strip().rstrip(".!?").strip(), count=1).strip()
    first = scene.split(" ", 1)[0]
    if first == "A" or (len(first) > 1 and first[0].isupper() and first[1:].islower()):
        scene = scene[0].lower() + scene[1:]  # "A kitchen" -> "a kitchen"; "TV room" stays
    return scene


def caption_narrative(caption: str, num_chunks: int, name: str = "") -> tuple[Narrative, list[int]]:
    """The narrative of a captioned clip and the segment owning each chunk.

    The caption is split into sentences. With two or more, the first is the scene ("The video shows" and
    the like removed) and the others are actions; a single sentence is the only action (no scene). The
    actions' subjects ("The person", "He", ...) are removed, since the compiled prompt puts the actor
    before them. ``S = min(#actions, num_chunks)`` segments take consecutive actions (extra ones are joined
    with ", then "; none is dropped) and segment ``j`` covers chunks ``[j * N / S, (j + 1) * N / S)``. A
    clip with only a ``name`` (an Ego4D narration such as "#C C opens the fridge") has it as its action.

    Args:
        caption: the clip caption (``llava_cap``); may be empty when ``name`` is given.
        num_chunks: N, latent chunks in the clip.
        name: fallback narration.

    Returns:
        ``(narrative, chunk_segments)`` with ``len(chunk_segments) == num_chunks``.

    Raises:
        ValueError: ``num_chunks < 1``, or neither a caption nor a name.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    sentences = split_sentences(caption)
    scene = ""
    if len(sentences) >= 2:
        scene, sentences = _scene(sentences[0]), sentences[1:]
    if not sentences:
        sentences = [_narration(name)] if _narration(name) else []
    actions = [a for a in (_subjectless(x) for x in sentences) if a]
    if not actions:
        raise ValueError("empty caption: the clip has neither a caption nor a name")
    n, s = len(actions), min(len(actions), num_chunks)
    groups = [", then ".join(actions[j * n // s : (j + 1) * n // s]) for j in range(s)]
    chunk_segments = [0] * num_chunks
    for j in range(s):
        for c in range(j * num_chunks // s, (j + 1) * num_chunks // s):
            chunk_segments[c] = j
    segments = [
        Segment(id=f"s{j + 1}", seconds=float(chunk_segments.count(j)), action=text)
        for j, text in enumerate(groups)
    ]
    return Narrative(segments=segments, scene=scene, actor=DEFAULT_ACTOR), chunk_segments


def caption_prompts(caption: str, num_chunks: int, name: str = "") -> tuple[list[str], list[int]]:
    """Per-chunk prompts of a captioned clip, in the inference template ("Step j of J. ...").

    Args:
        caption: the clip caption.
        num_chunks: N, latent chunks in the clip.
        name: fallback narration (see :func:`caption_narrative`).

    Returns:
        ``(prompts, segments)``: N prompts and the segment index of each chunk.
    """
    narrative, chunk_segments = caption_narrative(caption, num_chunks, name)
    per_segment = build_prompts(narrative)
    return [per_segment[j] for j in chunk_segments], chunk_segments


def narrative_prompts(
    path: str | os.PathLike[str], num_chunks: int, fps: int, chunk_frames: int, vae_temporal: int
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Per-chunk prompts of a clip that has a narrative file (``prepare-data`` writes one per episode).

    The narrative is compiled with :func:`egolcd.narrative.compile_narrative`, exactly as ``generate``
    compiles it, so training prompts, memory keys, segment boundaries and revisits are the inference ones.

    Returns:
        ``(prompts, segments, keys, revisits)`` for the first ``num_chunks`` chunks: the full prompt, the
        segment index, the memory-key text, and the segment index its segment revisits (-1: none).
    """
    compiled = compile_narrative(
        load_narrative(path), fps=fps, chunk_frames=chunk_frames, vae_temporal=vae_temporal
    )
    if compiled.num_chunks < num_chunks:
        raise ValueError(f"narrative {path} covers {compiled.num_chunks} chunks, the clip has {num_chunks}")
    segs = compiled.chunk_segments[:num_chunks]
    return (
        [compiled.prompts[j] for j in segs],
        list(segs),
        [compiled.key_texts[j] for j in segs],
        [compiled.revisits.get(j, -1) for j in segs],
    )
