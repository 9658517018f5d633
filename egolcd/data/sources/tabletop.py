"""Tabletop episodes: a head-mounted camera over a table where a hand moves objects, looks away and back.

The scene is built in pybullet (``p.DIRECT``, ``pybullet_data`` assets, CPU ``ER_TINY_RENDERER``): a room
with a table, a tray and a few objects (cube, duck, lego brick, mug, ball, jenga block), a bookshelf on
one side and a window on the other. A scripted head trajectory looks at the table, turns to the shelf or
the window and back (revisits), and a kinematic right hand reaches for an object, picks it up and puts it
into the tray or elsewhere on the table (hand-object interaction). Everything is kinematic, so an episode
is fully determined by its seed.

Pose per frame: the eye position (metres) and yaw/pitch (radians) of the camera. The arrangement of the
objects is recorded as a state id (it changes at each grasp and release), so a look back at the table
only counts as a revisit of views with the same arrangement.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .episodes import Episode, EpisodeSegment, RevisitTolerance, frame_bounds


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence C-level writes to stdout and stderr (pybullet prints its build time on import and connect)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved: list[tuple[int, int]] = []
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    saved.append((fd, os.dup(fd)))
                    os.dup2(null.fileno(), fd)
            yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)  # C stdio buffers may still hold the text
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


with _quiet_stdout():
    import pybullet as p
    import pybullet_data

logger = logging.getLogger(__name__)

__all__ = ["TabletopSource", "TabletopTiming"]

TABLE_TOP = 0.625
EYE = np.array([0.0, -0.8, 1.42])
TABLE_VIEW = (math.pi / 2, math.atan2(TABLE_TOP - EYE[2], 0.75))  # yaw, pitch: the middle of the table
SHOULDER = np.array([0.22, -0.85, 1.2])
HAND_REST = np.array([0.3, -1.1, 0.6])  # below the field of view
HIDDEN = np.array([0.0, 0.0, -5.0])
SKIN = (0.88, 0.68, 0.56, 1.0)
COLORS = {
    "red": (0.85, 0.12, 0.1),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.12, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "orange": (0.95, 0.5, 0.1),
    "purple": (0.55, 0.2, 0.7),
    "pink": (0.95, 0.5, 0.7),
    "white": (0.92, 0.92, 0.9),
}
WALLS = {
    "light green": (0.7, 0.82, 0.68),
    "pale blue": (0.68, 0.78, 0.9),
    "beige": (0.86, 0.8, 0.68),
    "light grey": (0.8, 0.8, 0.8),
}
# name, urdf, global scaling, colourable
OBJECTS = (
    ("cube", "cube_small.urdf", 2.0, True),
    ("duck", "duck_vhacd.urdf", 1.6, False),
    ("lego brick", "lego/lego.urdf", 3.2, True),
    ("mug", "objects/mug.urdf", 1.2, True),
    ("ball", "sphere_small.urdf", 1.5, True),
    ("wooden block", "jenga/jenga.urdf", 1.0, False),
)
GRASP_AT = 0.75  # fraction of the pick beat when the hand closes on the object
RELEASE_AT = 0.7  # fraction of the place beat when it lets go
SLACK = 1.25  # beats may be compressed by up to this factor to fit the episode
SLOTS = [(x, y) for y in (-0.28, 0.08) for x in (-0.5, -0.2, 0.1, 0.4)]


@dataclass
class TabletopTiming:
    """Nominal beat lengths (seconds); beats are scaled together to fill the episode exactly.

    Args:
        look: looking at the table.
        away: turning the head away (and holding the view).
        back: turning back to the table.
        pick: reaching for an object and lifting it.
        place: carrying it and putting it down, then withdrawing the hand.
        short_seconds: shorter episodes only look at the table, away and back.
    """

    look: float = 2.0
    away: float = 2.0
    back: float = 1.5
    pick: float = 3.0
    place: float = 3.0
    short_seconds: float = 6.0


@dataclass
class _Object:
    name: str
    body: int
    pos: np.ndarray
    orn: tuple[float, float, float, float]
    half_height: float


@dataclass
class _Beat:
    kind: str  # look | away | back | pick | place
    seconds: float
    action: str
    head_from: tuple[float, float] = TABLE_VIEW
    head_to: tuple[float, float] = TABLE_VIEW
    obj: int = -1
    target: np.ndarray = field(default_factory=lambda: np.zeros(3))


def _smooth(u: float) -> float:
    u = min(max(u, 0.0), 1.0)
    return u * u * (3 - 2 * u)


def _lerp(a: np.ndarray, b: np.ndarray, u: float) -> np.ndarray:
    return a + (b - a) * _smooth(u)


def _path(points: list[np.ndarray], u: float) -> np.ndarray:
    """Eased motion through ``points``, each leg taking an equal share of ``u`` in [0, 1]."""
    legs = len(points) - 1
    k = min(int(u * legs), legs - 1)
    return _lerp(points[k], points[k + 1], u * legs - k)


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


class TabletopSource:
    """Generates tabletop episodes (see the module docstring).

    Args:
        width, height: frame size.
        fps: frames per second.
        timing: nominal beat lengths.
        fov: vertical field of view in degrees.
    """

    name = "tabletop"

    def __init__(
        self, width: int, height: int, fps: int, timing: TabletopTiming | None = None, fov: float = 60.0
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.timing = timing or TabletopTiming()
        self.fov = fov
        self.tolerance = RevisitTolerance(radius=0.15, yaw_deg=8.0, pitch_deg=6.0, min_fraction=0.5)

    # ------------------------------------------------------------------------------ episode
    def episode(self, rng: np.random.Generator, num_frames: int) -> Episode:
        """Build the scene and plan one episode of ``num_frames`` frames (rendered when iterated).

        Args:
            rng: the episode's random generator.
            num_frames: frames in the video.
        """
        with _quiet_stdout():
            client = p.connect(p.DIRECT)
        try:
            scene, objects, tray, sides = self._build(client, rng)
            beats = self._script(rng, objects, tray, sides, num_frames / self.fps)
            bounds = frame_bounds([b.seconds for b in beats], num_frames)
            segments = [
                EpisodeSegment(f"s{i + 1}", bounds[i], bounds[i + 1], b.action) for i, b in enumerate(beats)
            ]
            sway = rng.uniform(0, 2 * math.pi, size=5)
            poses = np.zeros((num_frames, 5), dtype=np.float32)
            state = np.zeros(num_frames, dtype=np.int64)
            hand_at = np.zeros((num_frames, 3))
            objects_at = np.zeros((num_frames, len(objects), 3))
            positions = [o.pos.copy() for o in objects]
            arrangement = 0
            for i, beat in enumerate(beats):
                n = bounds[i + 1] - bounds[i]
                for f in range(n):
                    frame, u = bounds[i] + f, (f + 1) / n
                    t = frame / self.fps
                    yaw, pitch = _lerp(np.array(beat.head_from), np.array(beat.head_to), u)
                    eye = EYE + np.array(
                        [
                            0.008 * math.sin(0.9 * t + sway[0]),
                            0.008 * math.sin(0.7 * t + sway[1]),
                            0.006 * math.sin(1.3 * t + sway[2]),
                        ]
                    )
                    yaw += math.radians(0.6) * math.sin(0.5 * t + sway[3])
                    pitch += math.radians(0.5) * math.sin(0.6 * t + sway[4])
                    poses[frame] = (*eye, yaw, pitch)
                    hand, obj_pos, changed = self._hand(beat, u, objects, positions)
                    hand_at[frame] = hand
                    objects_at[frame] = positions
                    if beat.obj >= 0:
                        objects_at[frame, beat.obj] = obj_pos
                    state[frame] = arrangement + int(changed)
                if beat.obj >= 0:
                    positions[beat.obj] = objects_at[bounds[i + 1] - 1, beat.obj].copy()
                    arrangement += 1
        except BaseException:
            p.disconnect(client)
            raise

        def frames() -> Iterator[np.ndarray]:
            for f in range(num_frames):
                self._pose_hand(client, scene["hand"], hand_at[f])
                for k, o in enumerate(objects):
                    p.resetBasePositionAndOrientation(
                        o.body, objects_at[f, k].tolist(), o.orn, physicsClientId=client
                    )
                yield self._render(client, poses[f])

        names = [o.name for o in objects]
        picked = [b for b in beats if b.kind == "place"]
        name = picked[0].action if picked else "looks at the table, away and back"
        return Episode(
            scene=scene["description"],
            name=f"tabletop: {name}",
            nouns=["table", "tray", *names, sides[0][0], sides[1][0]],
            verbs=sorted({"look", "turn"} | ({"pick up", "put"} if picked else set())),
            segments=segments,
            poses=poses,
            state=state,
            frames=frames(),
            tolerance=self.tolerance,
            close=lambda: p.disconnect(client) if p.isConnected(client) else None,
        )

    # ------------------------------------------------------------------------------ scene
    def _box(
        self, client: int, half: tuple[float, float, float], pos: tuple[float, float, float], rgb: tuple
    ) -> int:
        shape = p.createVisualShape(
            p.GEOM_BOX, halfExtents=half, rgbaColor=(*rgb[:3], 1.0), physicsClientId=client
        )
        return p.createMultiBody(
            baseMass=0, baseVisualShapeIndex=shape, basePosition=pos, physicsClientId=client
        )

    def _build(
        self, client: int, rng: np.random.Generator
    ) -> tuple[dict, list[_Object], np.ndarray, list[tuple[str, tuple[float, float]]]]:
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=client)
        load = dict(useFixedBase=True, physicsClientId=client)
        floor = p.loadURDF("plane.urdf", [0, 0, 0], **load)
        p.changeVisualShape(floor, -1, rgbaColor=(0.55, 0.42, 0.3, 1), physicsClientId=client)
        p.loadURDF("table/table.urdf", [0, 0, 0], **load)
        wall_name = list(WALLS)[int(rng.integers(len(WALLS)))]
        wall = WALLS[wall_name]
        self._box(client, (3.0, 0.05, 1.5), (0, 2.0, 1.5), wall)
        self._box(client, (0.05, 3.0, 1.5), (-2.0, 0, 1.5), wall)
        self._box(client, (0.05, 3.0, 1.5), (2.0, 0, 1.5), wall)
        self._box(client, (3.0, 0.05, 1.5), (0, -2.5, 1.5), wall)
        # a picture on the wall behind the table
        art = list(COLORS.values())
        self._box(client, (0.35, 0.02, 0.25), (float(rng.uniform(-0.4, 0.4)), 1.93, 1.5), (0.2, 0.15, 0.1))
        for k in range(3):
            rgb = art[int(rng.integers(len(art)))]
            self._box(client, (0.09, 0.025, 0.18), (-0.2 + 0.2 * k, 1.9, 1.5), rgb)
        shelf_side = 1.0 if rng.random() < 0.5 else -1.0  # shelf on the left (-x) or right (+x)
        shelf_x, window_x = -1.7 * shelf_side, 1.8 * shelf_side
        self._shelf(client, rng, shelf_x)
        self._window(client, window_x)
        tray_x = float(rng.choice([-0.42, 0.42]))
        p.loadURDF("tray/traybox.urdf", [tray_x, 0.12, TABLE_TOP], globalScaling=0.6, **load)
        tray_pos = np.array([tray_x, 0.12, TABLE_TOP + 0.012])
        slots = [s for s in SLOTS if abs(s[0] - tray_x) > 0.25 or s[1] < -0.1]
        count = int(rng.integers(3, 5))
        chosen = rng.choice(len(OBJECTS), size=count, replace=False)
        slot_ids = rng.choice(len(slots), size=count, replace=False)
        colors = rng.choice(list(COLORS), size=count, replace=False)
        objects = []
        for obj_index, slot, color in zip(chosen, slot_ids, colors, strict=True):
            label, urdf, scale, colourable = OBJECTS[int(obj_index)]
            x, y = slots[int(slot)]
            x, y = x + float(rng.uniform(-0.04, 0.04)), y + float(rng.uniform(-0.03, 0.03))
            orn = p.getQuaternionFromEuler([0, 0, float(rng.uniform(-math.pi, math.pi))])
            body = p.loadURDF(urdf, [x, y, 1.0], orn, globalScaling=scale, **load)
            if colourable:
                p.changeVisualShape(body, -1, rgbaColor=(*COLORS[str(color)], 1), physicsClientId=client)
                label = f"{color} {label}"
            elif label == "duck":
                label = "yellow duck"
            lo, _ = p.getAABB(body, physicsClientId=client)
            half = 1.0 - lo[2]
            pos = np.array([x, y, TABLE_TOP + half])
            p.resetBasePositionAndOrientation(body, pos.tolist(), orn, physicsClientId=client)
            objects.append(_Object(label, body, pos, orn, half))
        names = [_article(o.name) for o in objects]
        description = (
            f"a first-person view of a wooden table with a tray, {_join(names)}, in a room with {wall_name} "
            f"walls, a bookshelf and a window"
        )
        hand = {
            "palm": self._box(client, (0.045, 0.055, 0.014), (0, 0, -5), SKIN),
            "thumb": self._box(client, (0.012, 0.03, 0.012), (0, 0, -5), SKIN),
            "arm": p.createMultiBody(
                baseMass=0,
                baseVisualShapeIndex=p.createVisualShape(
                    p.GEOM_CAPSULE, radius=0.035, length=0.26, rgbaColor=SKIN, physicsClientId=client
                ),
                basePosition=(0, 0, -5),
                physicsClientId=client,
            ),
        }
        sides = [("bookshelf", self._look_at(np.array([shelf_x, -0.75, 1.0])))]
        sides.append(("window", self._look_at(np.array([window_x, -0.75, 1.35]))))
        return dict(description=description, hand=hand), objects, tray_pos, sides

    def _shelf(self, client: int, rng: np.random.Generator, x: float) -> None:
        wood = (0.45, 0.3, 0.18)
        face = 1.0 if x < 0 else -1.0  # the open side faces the room
        self._box(client, (0.03, 0.5, 0.9), (x - 0.17 * face, -0.75, 0.9), wood)
        for side in (-1, 1):
            self._box(client, (0.18, 0.02, 0.9), (x, -0.75 + 0.48 * side, 0.9), wood)
        for level in range(4):
            z = 0.3 + 0.42 * level
            self._box(client, (0.18, 0.5, 0.015), (x, -0.75, z), wood)
            if level == 3:
                break
            y = -1.2
            while y < -0.32:
                w = float(rng.uniform(0.025, 0.05))
                h = float(rng.uniform(0.12, 0.18))
                rgb = list(COLORS.values())[int(rng.integers(len(COLORS)))]
                self._box(client, (0.12, w, h), (x + 0.02 * face, y + w, z + 0.015 + h), rgb)
                y += 2 * w + 0.01

    def _window(self, client: int, x: float) -> None:
        inward = -0.04 if x > 0 else 0.04
        self._box(client, (0.02, 0.55, 0.45), (x + inward * 0.5, -0.75, 1.4), (0.95, 0.95, 0.95))
        self._box(client, (0.02, 0.5, 0.4), (x + inward, -0.75, 1.4), (0.55, 0.75, 0.95))
        self._box(client, (0.025, 0.015, 0.4), (x + inward * 1.2, -0.75, 1.4), (0.95, 0.95, 0.95))
        self._box(client, (0.025, 0.5, 0.015), (x + inward * 1.2, -0.75, 1.4), (0.95, 0.95, 0.95))
        self._box(client, (0.2, 0.6, 0.4), (x - 0.25 * np.sign(x), -0.75, 0.4), (0.9, 0.88, 0.85))

    @staticmethod
    def _look_at(point: np.ndarray) -> tuple[float, float]:
        d = point - EYE
        return math.atan2(d[1], d[0]), math.atan2(d[2], math.hypot(d[0], d[1]))

    # ------------------------------------------------------------------------------ script
    def _script(
        self,
        rng: np.random.Generator,
        objects: list[_Object],
        tray: np.ndarray,
        sides: list[tuple[str, tuple[float, float]]],
        seconds: float,
    ) -> list[_Beat]:
        tm = self.timing
        order = list(rng.permutation(2))
        away_side = 0

        def look_away_and_back() -> list[_Beat]:
            nonlocal away_side
            what, view = sides[order[away_side % 2]]
            away_side += 1
            side = "left" if math.sin(view[0] - TABLE_VIEW[0]) > 0 else "right"
            return [
                _Beat("away", tm.away, f"turns the head to the {side} toward the {what}", TABLE_VIEW, view),
                _Beat("back", tm.back, "looks back at the table", view, TABLE_VIEW),
            ]

        beats = [_Beat("look", tm.look, "looks at the objects on the table")]
        beats += look_away_and_back()
        if seconds < tm.short_seconds:
            return beats
        positions = [o.pos.copy() for o in objects]
        in_tray = [False] * len(objects)
        queue: list[int] = []
        last = -1
        groups = 0
        while True:  # alternate moving an object and looking away and back, while they fit
            group_seconds = tm.pick + tm.place if groups % 2 == 0 else tm.away + tm.back
            if sum(b.seconds for b in beats) + group_seconds > seconds * SLACK:
                break
            groups += 1
            if groups % 2 == 0:
                beats += look_away_and_back()
                continue
            if not queue:
                queue = [int(k) for k in rng.permutation(len(objects)) if int(k) != last]
            k = last = queue.pop(0)
            obj = objects[k]
            source = " from the tray" if in_tray[k] else ""
            if not in_tray[k] and (not any(in_tray) or rng.random() < 0.6):
                offset = np.array([rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06), 0.0])
                target = tray + offset + np.array([0, 0, obj.half_height])
                where = "into the tray"
            else:
                others = [q for i, q in enumerate(positions) if i != k]
                target = self._free_spot(rng, others, tray) + np.array([0, 0, obj.half_height])
                where = f"down on the {'left' if target[0] < 0 else 'right'} side of the table"
            in_tray[k] = where == "into the tray"
            positions[k] = target
            picks = f"reaches out with the right hand and picks up the {obj.name}{source}"
            beats.append(_Beat("pick", tm.pick, picks, obj=k))
            beats.append(_Beat("place", tm.place, f"puts the {obj.name} {where}", obj=k, target=target))
        return beats

    @staticmethod
    def _free_spot(rng: np.random.Generator, positions: list[np.ndarray], tray: np.ndarray) -> np.ndarray:
        """The table spot (of 64 random ones) farthest from the objects and the tray."""
        best, best_gap = np.array([0.0, -0.3, TABLE_TOP]), -np.inf
        for _ in range(64):
            cand = np.array([rng.uniform(-0.55, 0.55), rng.uniform(-0.32, 0.18), TABLE_TOP])
            gaps = [float(np.linalg.norm((cand - q)[:2])) for q in positions]
            gaps.append(float(np.linalg.norm((cand - tray)[:2])) - 0.2)
            if min(gaps) > best_gap:
                best, best_gap = cand, min(gaps)
        return best

    # ------------------------------------------------------------------------------ hand
    @staticmethod
    def _hand(
        beat: _Beat, u: float, objects: list[_Object], positions: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Hand position, position of the beat's object and whether it has been grasped (pick) or
        released (place) yet, at progress ``u`` in (0, 1] of the beat.

        Args:
            beat: the beat.
            u: progress.
            objects: the objects.
            positions: object positions at the start of the beat.
        """
        if beat.kind not in ("pick", "place"):
            return HIDDEN.copy(), np.zeros(3), False
        obj = objects[beat.obj]
        grip = np.array([0.0, 0.0, obj.half_height + 0.02])  # palm above the object's centre
        lift = np.array([0.0, 0.0, 0.15])
        start = positions[beat.obj]
        if beat.kind == "pick":
            if u < GRASP_AT:
                return _path([HAND_REST, start + grip + lift, start + grip], u / GRASP_AT), start, False
            hand = _lerp(start + grip, start + grip + lift, (u - GRASP_AT) / (1 - GRASP_AT))
            return hand, hand - grip, True
        release = beat.target + grip
        if u < RELEASE_AT:
            hand = _path([start + grip, release + lift, release], u / RELEASE_AT)
            return hand, hand - grip, False
        hand = _path([release, release + lift, HAND_REST], (u - RELEASE_AT) / (1 - RELEASE_AT))
        return hand, beat.target.copy(), True

    @staticmethod
    def _pose_hand(client: int, parts: dict[str, int], hand: np.ndarray) -> None:
        reach = hand - SHOULDER
        yaw = math.atan2(reach[1], reach[0])
        orn = p.getQuaternionFromEuler([0, 0, yaw - math.pi / 2])
        p.resetBasePositionAndOrientation(parts["palm"], hand.tolist(), orn, physicsClientId=client)
        side = np.array([math.cos(yaw - math.pi / 2), math.sin(yaw - math.pi / 2), 0.0])
        thumb = hand - 0.05 * side + 0.01 * np.array([math.cos(yaw), math.sin(yaw), 0])
        p.resetBasePositionAndOrientation(parts["thumb"], thumb.tolist(), orn, physicsClientId=client)
        back = -reach / (np.linalg.norm(reach) + 1e-9)
        arm = hand + back * 0.19
        axis = np.cross([0.0, 0.0, 1.0], back)
        angle = math.acos(max(-1.0, min(1.0, back[2])))
        norm = np.linalg.norm(axis)
        arm_orn = (
            p.getQuaternionFromAxisAngle((axis / norm).tolist(), angle)
            if norm > 1e-9
            else (0.0, 0.0, 0.0, 1.0)
        )
        p.resetBasePositionAndOrientation(parts["arm"], arm.tolist(), arm_orn, physicsClientId=client)

    # ------------------------------------------------------------------------------ rendering
    def _render(self, client: int, pose: np.ndarray) -> np.ndarray:
        x, y, z, yaw, pitch = (float(v) for v in pose)
        forward = np.array(
            [math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)]
        )
        eye = np.array([x, y, z])
        view = p.computeViewMatrix(eye.tolist(), (eye + forward).tolist(), [0, 0, 1], physicsClientId=client)
        proj = p.computeProjectionMatrixFOV(
            self.fov, self.width / self.height, 0.05, 12.0, physicsClientId=client
        )
        _, _, rgba, _, _ = p.getCameraImage(
            self.width,
            self.height,
            view,
            proj,
            renderer=p.ER_TINY_RENDERER,
            lightDirection=[0.4, -0.6, 1.0],
            shadow=0,
            flags=p.ER_NO_SEGMENTATION_MASK,
            physicsClientId=client,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(self.height, self.width, 4)[..., :3].copy()
