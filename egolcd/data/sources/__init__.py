"""Simulated egocentric sources with ground-truth revisits, written as an EgoVid-5M-format dataset.

``prepare_data("memory-maze" | "tabletop", out_dir, ...)`` renders scripted first-person episodes and
writes, per episode ``<video_id>`` (``VideoID_StartFrame_EndFrame``, e.g. ``tabletop-s0-e0003_0_96``)::

    OUT/metadata.csv                 video_id,frame_num,fps,llava_cap,name,noun_cls,verb_cls,source,narrative,pose
    OUT/videos/<video_id>.mp4        H.264, width x height, fps
    OUT/poses/<video_id>.npy         float32 (T, 5): x, y, z (metres, world frame), yaw, pitch (radians)
    OUT/narratives/<video_id>.yaml   egolcd narrative: scene, fps, segments (id, seconds, action, revisit)
    OUT/revisits.json                {video_id: [{segment, revisits, first_visit_frames, revisit_frames,
                                                   match_fraction}, ...]}

Frame ranges are 0-based video frame indices, end exclusive (``[a, b)``), like the ``video_id`` range.
Narrative segments cover the video exactly: segment ``j`` has ``round(seconds_j * fps)`` frames.

Revisits come from the ground-truth pose, not from the script (:func:`detect_revisits`): a segment
revisits the earlier segment that holds a matching pose (position within a radius, heading within a
tolerance, and the same arrangement of objects) for the largest fraction of its frames, when that
fraction is at least ``min_fraction`` and the segment ends at a matching pose (so the narrative's "returns
to the view of" holds). ``revisit_frames`` spans the matching frames of the revisiting
segment and ``first_visit_frames`` the frames of the earlier one that they match.

Rerunning into the same folder replaces the episodes it generates and keeps other rows, so two sources
can share one dataset. The optional packages (``egolcd[sim]``) are imported only by the chosen source.
"""

from ...errors import MissingDependencyError
from .episodes import (
    POSE_COLUMNS,
    Episode,
    EpisodeSegment,
    Revisit,
    RevisitTolerance,
    build_caption,
    detect_revisits,
    episode_rng,
    frame_bounds,
)
from .prepare import CSV_COLUMNS, SIM_INSTALL, SOURCES, prepare_data

__all__ = [
    "CSV_COLUMNS",
    "Episode",
    "EpisodeSegment",
    "MissingDependencyError",
    "POSE_COLUMNS",
    "RevisitTolerance",
    "Revisit",
    "SOURCES",
    "SIM_INSTALL",
    "build_caption",
    "detect_revisits",
    "episode_rng",
    "frame_bounds",
    "prepare_data",
]
