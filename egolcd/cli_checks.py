"""The checks ``egolcd validate`` and ``egolcd generate`` make on their options and the model's config before
any weights load, so that bad input ends in one line within seconds (used by :mod:`egolcd.cli`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import PRESETS


def check_size(width: int, height: int, vae_factor: int, patch: int) -> None:
    """The size check ``generate`` makes (``EgoLCDPipeline.video_size``, same message), without weights."""
    factor = vae_factor * patch
    if height % factor or width % factor:
        raise ValueError(
            f"impossible size {width}x{height}: width and height must be multiples of {factor} "
            f"(VAE factor {vae_factor} x patch {patch})"
        )


def precheck_model(model_dir: Path, narrative, footage: tuple[str, str] | None = None) -> None:
    """Check the narrative against the model's preset (frame limit, size) from its config alone, so these
    fail before the weights load; a missing or broken folder is left to ``from_pretrained``'s message.
    ``footage`` (path, ``video``/``image``) is checked from its header at the video's size."""
    import json

    from .limits import count_frames

    try:
        config = json.loads((model_dir / "egolcd_config.json").read_text())
        preset = PRESETS[config["preset"]]
        fps = int(narrative.fps or config.get("fps") or preset.fps)
        width = int(narrative.width or config.get("width") or preset.width)
        height = int(narrative.height or config.get("height") or preset.height)
        vae_factor, patch = preset.vae_spatial, int(preset.transformer.get("patch_size", (1, 2, 2))[1])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return
    count_frames([s.seconds for s in narrative.segments], fps)
    check_size(width, height, vae_factor, patch)
    if footage is not None:
        from .footage import check_footage

        check_footage(footage[0], footage[1], width, height)


def footage_option(args: argparse.Namespace, narrative, output: Path) -> tuple[str, str] | None:
    """``(path, kind)`` of --from-video/--from-image, checked against the other options (before any work)."""
    if args.from_video is not None and args.from_image is not None:
        raise ValueError("give --from-video or --from-image, not both")
    footage = (args.from_video, "video") if args.from_video else (args.from_image, "image") if args.from_image else None
    if footage is None:
        if args.no_footage_in_output:
            raise ValueError("--no-footage-in-output needs --from-video or --from-image")
        if narrative.segments[0].footage and args.resume is None:
            raise ValueError(
                f"segment 1 ({narrative.segments[0].id!r}) is footage (footage: true): "
                "start from a clip or a photo with --from-video or --from-image"
            )
        return None
    if args.resume is not None:
        raise ValueError("--resume continues a saved run, whose footage is in its state: drop --from-video/--from-image")
    path = Path(footage[0]).expanduser()
    if path.exists() and output.exists() and os.path.samefile(path, output) or path.resolve() == output.resolve():
        raise ValueError(f"--from-{footage[1]} and the output (-o) are the same file ({path}): it would be overwritten")
    from .footage import check_footage_path

    check_footage_path(path, footage[1])  # a folder, a missing file: one line now (its size comes with the model)
    return footage


def check_output(path: Path) -> None:
    """The output video's folder is writable and its name ends in ``.mp4`` (before any work; one line)."""
    from .video_io import check_writable_dir

    check_writable_dir(path.resolve().parent)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"output must be an .mp4 file, got {path.name}")
