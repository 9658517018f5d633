"""Memory Maze episodes: scripted first-person walks through DeepMind Memory Maze that return to places.

Each episode builds a maze with ``memory_maze.tasks.memory_maze_9x9(seed=..., global_observables=True,
target_color_in_image=False)`` (rooms, corridors, coloured balls) and drives the agent kinematically: a
planner over ``maze_layout`` produces a tour of places (the start, the coloured balls, corridor ends)
where the agent looks around (a full turn) and later walks back to a place it has seen (a revisit):
start, A, B, back to A, C, back to B, D, back to C, ..., so revisits return to middle places, never the start. The
agent moves like the env's discrete actions (forward, turn left, turn right) at a constant speed, one
pose per video frame, and the frames are the egocentric camera rendered by MuJoCo (``MUJOCO_GL``:
``osmesa`` by default, ``egl`` on a GPU machine). Poses are read back from the simulator (camera
position and heading), so revisits are computed from ground truth.

Episodes shorter than a tour (about 12 s) turn left and back instead, which still revisits the first view.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

os.environ.setdefault("MUJOCO_GL", "osmesa")  # before dm_control is imported; headless CPU rendering

from ...errors import MissingDependencyError
from .episodes import Episode, EpisodeSegment, RevisitTolerance

try:
    with contextlib.redirect_stderr(io.StringIO()):  # gym prints a deprecation notice on import
        from dm_control import mujoco as dm_mujoco
        from memory_maze import tasks as mm_tasks
except ModuleNotFoundError:
    raise  # a Python package of egolcd[sim] is missing
except Exception as exc:  # the OpenGL backend failed to load: a system library is missing
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    raise MissingDependencyError(
        f"source 'memory-maze' cannot load the MuJoCo OpenGL backend MUJOCO_GL={os.environ['MUJOCO_GL']} "
        f"({type(exc).__name__}: {first}); install the system libraries with "
        "scripts/install_system_deps.sh (apt-get install libosmesa6 libegl1 libgl1), "
        "or set MUJOCO_GL=egl on a GPU machine"
    ) from None

logger = logging.getLogger(__name__)

__all__ = ["MazeMotion", "MemoryMazeSource"]

COLOR_NAMES = ("red", "green", "blue", "purple", "yellow", "salmon")
MAZE_TASKS = {9: "memory_maze_9x9", 11: "memory_maze_11x11", 13: "memory_maze_13x13", 15: "memory_maze_15x15"}
SCENE = "a first-person walk through a 3D maze of rooms and corridors with patterned walls and large coloured balls"
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # grid steps (x, y)
CELL_METRES = 2.0  # Memory Maze's xy_scale
MAX_NEARBY = 3  # cells: how far a new place may be (short walks: several revisits per episode)


class _QuietAbsl:
    """Drops absl's "Cannot set velocity on Entity with no free joint" warning of every reset."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "no free joint" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietAbsl())


@dataclass
class MazeMotion:
    """How the scripted agent moves.

    Args:
        walk_speed: metres per second (a maze cell is 2 m; the env's agent does about 1.5).
        turn_speed: degrees per second (a look around, a full turn, takes 3 s: two 12-frame chunks at 8 fps).
        short_seconds: episodes shorter than this turn left and back instead of touring.
        replay_revisit_looks: a revisit's look around starts at the heading of the first visit's look and
            turns the same way, so it replays the first visit's views in the same order (the agent turns to
            that heading at the end of its walk back). ``False``: a random side from the arrival heading
            (the tours of the first demo model, commit f58a0e2).
        align_looks, align_shift: every look around starts on a frame ``f`` with ``(f + align_shift) %
            align_looks == 0`` (the agent stands still at the end of its walk until then; ``align_looks`` 0 or
            1: no pause). The defaults are the demo preset's latent chunks: the Wan VAE encodes frame 0 alone,
            so latent chunk ``c >= 1`` (3 latent frames) covers pixel frames ``[12c - 3, 12c + 9)``. A look
            (24 frames) and its replayed revisit then fill whole chunks with the same poses frame by frame,
            so the revisit's latent chunks equal the first visit's and memory can be copied token for token.
            Other presets: frames per chunk and the VAE's temporal factor - 1.
    """

    walk_speed: float = 2.0
    turn_speed: float = 120.0
    short_seconds: float = 12.0
    replay_revisit_looks: bool = True
    align_looks: int = 12
    align_shift: int = 3


@dataclass
class _Place:
    cell: tuple[int, int]
    label: str  # "the starting spot", "the red ball", "the dead end"
    face: float | None = None  # heading to face on arrival (towards a ball)
    visits: int = 0
    look_yaw: float | None = None  # heading at the start of the first look around
    look_side: float | None = None  # +1 left, -1 right: the first look's direction

    @property
    def near(self) -> str:
        """How "looks around ..." names the place."""
        if self.label == "the starting spot":
            return self.label
        return f"next to {self.label}" if self.label.endswith(" ball") else f"at {self.label}"


@dataclass
class _Plan:
    """Per-frame agent states (grid x, grid y, yaw) and segments, built up to a frame budget."""

    budget: int
    fps: int
    motion: MazeMotion
    x: float
    y: float
    yaw: float
    states: list[tuple[float, float, float]] = field(default_factory=list)
    segments: list[EpisodeSegment] = field(default_factory=list)

    @property
    def left(self) -> int:
        return self.budget - len(self.states)

    def turn_frames(self, angle: float) -> int:
        return max(1, round(abs(math.degrees(angle)) / self.motion.turn_speed * self.fps))

    def walk_frames(self, cells: float) -> int:
        return max(1, round(CELL_METRES * abs(cells) / self.motion.walk_speed * self.fps))

    def turn(self, angle: float, frames: int | None = None) -> None:
        n = self.turn_frames(angle) if frames is None else frames
        for i in range(n):
            self.states.append((self.x, self.y, self.yaw + angle * i / n))
        self.yaw += angle

    def walk(self, dx: float, dy: float) -> None:
        n = self.walk_frames(math.hypot(dx, dy))
        for i in range(n):
            self.states.append((self.x + dx * i / n, self.y + dy * i / n, self.yaw))
        self.x, self.y = self.x + dx, self.y + dy

    def pause_to_alignment(self) -> None:
        """Stand still until the next frame starts a chunk (``MazeMotion.align_looks``)."""
        align = max(1, self.motion.align_looks)
        for _ in range(-(len(self.states) + self.motion.align_shift) % align):
            self.states.append((self.x, self.y, self.yaw))

    def segment(self, start: int, action: str) -> None:
        end = min(len(self.states), self.budget)
        if end > start:
            self.segments.append(EpisodeSegment(f"s{len(self.segments) + 1}", start, end, action))


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _heading(dx: int, dy: int) -> float:
    return math.atan2(dy, dx)


def _cell_label(free: set[tuple[int, int]], cell: tuple[int, int]) -> str:
    """Name a cell by its open sides: dead end, bend or middle of the corridor, junction, open area."""
    open_dirs = [(dx, dy) for dx, dy in _DIRS if (cell[0] + dx, cell[1] + dy) in free]
    if len(open_dirs) == 1:
        return "the dead end"
    if len(open_dirs) == 2:
        (ax, ay), (bx, by) = open_dirs
        return "the middle of the corridor" if (ax, ay) == (-bx, -by) else "the bend of the corridor"
    return "the junction" if len(open_dirs) == 3 else "the open area"


_ORDINALS = ("second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")


def _unique_label(label: str, used: set[str]) -> str:
    """``label`` or, when it names an earlier place of the episode, "the second dead end", ... (keys must
    tell places apart)."""
    if label not in used:
        return label
    for word in _ORDINALS:
        candidate = label.replace("the ", f"the {word} ", 1)
        if candidate not in used:
            return candidate
    return label


def _step(path: list[tuple[int, int]]) -> tuple[int, int]:
    """The first grid step of a path (of at least two cells)."""
    return path[1][0] - path[0][0], path[1][1] - path[0][1]


class MemoryMazeSource:
    """Generates Memory Maze episodes (see the module docstring).

    Args:
        width, height: frame size.
        fps: frames per second.
        maze_size: 9, 11, 13 or 15 cells.
        motion: agent speeds.
    """

    name = "memory-maze"

    def __init__(
        self, width: int, height: int, fps: int, maze_size: int = 9, motion: MazeMotion | None = None
    ) -> None:
        if maze_size not in MAZE_TASKS:
            raise ValueError(f"maze_size must be one of {sorted(MAZE_TASKS)}, got {maze_size}")
        self.width, self.height, self.fps = width, height, fps
        self.maze_size = maze_size
        self.motion = motion or MazeMotion()
        self.tolerance = RevisitTolerance(radius=0.5, yaw_deg=20.0, pitch_deg=10.0, min_fraction=0.5)

    # ------------------------------------------------------------------------------ episode
    def episode(self, rng: np.random.Generator, num_frames: int) -> Episode:
        """Plan one episode of ``num_frames`` frames; frames are rendered when iterated.

        Args:
            rng: the episode's random generator.
            num_frames: frames in the video.
        """
        make = getattr(mm_tasks, MAZE_TASKS[self.maze_size])
        env = make(
            seed=int(rng.integers(2**31 - 1)),
            global_observables=True,
            target_color_in_image=False,
            discrete_actions=True,
            camera_resolution=16,
        )
        try:
            base = env
            while hasattr(base, "env"):
                base = base.env
            # the offscreen framebuffer is sized when the model is compiled (at reset): make it fit the frames
            visual = getattr(base.task.root_entity.mjcf_model.visual, "global")
            visual.offwidth = max(int(visual.offwidth or 640), self.width)
            visual.offheight = max(int(visual.offheight or 480), self.height)
            obs = env.reset().observation
            physics = base.physics
            layout = np.asarray(obs["maze_layout"], dtype=bool)  # [y, x], bottom-left first
            targets = [(int(px), int(py)) for px, py in np.asarray(obs["targets_pos"])]
            start = (int(obs["agent_pos"][0]), int(obs["agent_pos"][1]))
            plan = self._plan(rng, layout, targets, start, num_frames)
            center = (np.array(layout.shape[::-1], dtype=float)) / 2.0
            scale = float(base.task._maze_arena.xy_scale)
            camera_id = physics.model.name2id("walker/egocentric", "camera")
            qpos = self._calibrate(physics, camera_id)
            poses = np.zeros((num_frames, 5), dtype=np.float32)
            for i, state in enumerate(plan.states[:num_frames]):
                self._set(physics, qpos, state, center, scale)
                poses[i] = self._camera_pose(physics, camera_id)
        except BaseException:
            env.close()
            raise

        def frames() -> Iterator[np.ndarray]:
            camera = dm_mujoco.Camera(physics, height=self.height, width=self.width, camera_id=camera_id)
            for state in plan.states[:num_frames]:
                self._set(physics, qpos, state, center, scale)
                yield camera.render().copy()  # the camera reuses its buffer

        actions = " ".join(s.action for s in plan.segments)
        balls = [f"{c} ball" for c in COLOR_NAMES if f"the {c} ball" in actions]
        return Episode(
            scene=SCENE,
            name=self._name(plan),
            nouns=["maze", "corridor", "room", "wall", *balls],
            verbs=sorted({w for s in plan.segments for w in ("walk", "turn", "look") if w in s.action}),
            segments=plan.segments,
            poses=poses,
            state=np.zeros(num_frames, dtype=np.int64),
            frames=frames(),
            tolerance=self.tolerance,
            close=env.close,
        )

    # ------------------------------------------------------------------------------ simulator
    def _calibrate(self, physics: dm_mujoco.Physics, camera_id: int) -> dict[str, float]:
        """qpos addresses of the walker's slide and steer joints, and how steer maps to the camera yaw."""
        model = physics.model
        cal: dict[str, float] = {
            name: int(model.jnt_qposadr[model.name2id(f"walker/{name}", "joint")])
            for name in ("root_x/", "root_y/", "steer")
        }
        steer = int(cal["steer"])
        yaws = []
        for value in (0.0, 0.5):
            physics.data.qpos[steer] = value
            physics.forward()
            yaws.append(float(self._camera_pose(physics, camera_id)[3]))
        cal["yaw0"] = yaws[0]
        cal["sign"] = 1.0 if _wrap(yaws[1] - yaws[0]) > 0 else -1.0
        return cal

    @staticmethod
    def _set(
        physics: dm_mujoco.Physics,
        cal: dict[str, float],
        state: tuple[float, float, float],
        center: np.ndarray,
        scale: float,
    ) -> None:
        x, y, yaw = state
        data = physics.data
        data.qpos[int(cal["root_x/"])] = (x - center[0]) * scale
        data.qpos[int(cal["root_y/"])] = (y - center[1]) * scale
        data.qpos[int(cal["steer"])] = (yaw - cal["yaw0"]) * cal["sign"]
        data.qvel[:] = 0.0
        physics.forward()

    @staticmethod
    def _camera_pose(physics: dm_mujoco.Physics, camera_id: int) -> np.ndarray:
        pos = np.asarray(physics.data.cam_xpos[camera_id], dtype=np.float64)
        forward = -np.asarray(physics.data.cam_xmat[camera_id], dtype=np.float64).reshape(3, 3)[:, 2]
        yaw = math.atan2(forward[1], forward[0])
        pitch = math.asin(max(-1.0, min(1.0, forward[2])))
        return np.array([pos[0], pos[1], pos[2], yaw, pitch], dtype=np.float32)

    # ------------------------------------------------------------------------------ planning
    def _plan(
        self,
        rng: np.random.Generator,
        layout: np.ndarray,
        targets: list[tuple[int, int]],
        start: tuple[int, int],
        budget: int,
    ) -> _Plan:
        blocked = set(targets)
        free = {(x, y) for y, x in zip(*np.nonzero(layout), strict=True) if (x, y) not in blocked}
        free.add(start)
        yaw0 = self._open_heading(rng, free, start)
        plan = _Plan(budget, self.fps, self.motion, start[0] + 0.5, start[1] + 0.5, yaw0)
        if budget / self.fps < self.motion.short_seconds:
            self._short(rng, plan)
            return plan
        places = [_Place(start, "the starting spot")]
        for i, t in enumerate(targets):
            goal = self._target_goal(free, start, t)
            if goal is not None:
                face = _heading(t[0] - goal[0], t[1] - goal[1])
                places.append(_Place(goal, f"the {COLOR_NAMES[i % len(COLOR_NAMES)]} ball", face))
        self._tour(rng, plan, free, places)
        return plan

    @staticmethod
    def _open_heading(rng: np.random.Generator, free: set[tuple[int, int]], cell: tuple[int, int]) -> float:
        """Heading down the longest free straight line from ``cell`` (ties broken at random)."""
        runs = []
        for dx, dy in _DIRS:
            n = 0
            while (cell[0] + (n + 1) * dx, cell[1] + (n + 1) * dy) in free:
                n += 1
            runs.append(n)
        best = [i for i, n in enumerate(runs) if n == max(runs)]
        dx, dy = _DIRS[int(rng.choice(best))]
        return _heading(dx, dy)

    @staticmethod
    def _bfs(
        free: set[tuple[int, int]], start: tuple[int, int]
    ) -> dict[tuple[int, int], tuple[int, int] | None]:
        parent: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
        queue = deque([start])
        while queue:
            c = queue.popleft()
            for dx, dy in _DIRS:
                n = (c[0] + dx, c[1] + dy)
                if n in free and n not in parent:
                    parent[n] = c
                    queue.append(n)
        return parent

    def _path(
        self, free: set[tuple[int, int]], a: tuple[int, int], b: tuple[int, int]
    ) -> list[tuple[int, int]]:
        parent = self._bfs(free, a)
        if b not in parent:
            return []
        path = [b]
        while parent[path[-1]] is not None:
            path.append(parent[path[-1]])  # type: ignore[arg-type]
        return path[::-1]

    def _target_goal(
        self, free: set[tuple[int, int]], start: tuple[int, int], target: tuple[int, int]
    ) -> tuple[int, int] | None:
        reach = self._bfs(free, start)
        options = [(target[0] + dx, target[1] + dy) for dx, dy in _DIRS]
        options = [c for c in options if c in reach and c != start]
        return min(options, key=lambda c: len(self._path(free, start, c))) if options else None

    @staticmethod
    def _runs(path: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """A cell path as straight runs ``(dx, dy, cells)``."""
        runs: list[tuple[int, int, int]] = []
        for a, b in zip(path, path[1:]):
            d = (b[0] - a[0], b[1] - a[1])
            if runs and runs[-1][:2] == d:
                runs[-1] = (d[0], d[1], runs[-1][2] + 1)
            else:
                runs.append((d[0], d[1], 1))
        return runs

    def _walk_cost(self, plan: _Plan, yaw: float, path: list[tuple[int, int]], face: float | None) -> int:
        frames = 0
        for dx, dy, n in self._runs(path):
            h = _heading(dx, dy)
            if abs(_wrap(h - yaw)) > 1e-6:
                frames += plan.turn_frames(_wrap(h - yaw))
            frames += plan.walk_frames(n)
            yaw = h
        if face is not None and abs(_wrap(face - yaw)) > 1e-6:
            frames += plan.turn_frames(_wrap(face - yaw))
        return frames + max(0, self.motion.align_looks - 1)  # at most this long a pause before the look

    def _walk(self, plan: _Plan, path: list[tuple[int, int]], place: _Place) -> None:
        start = len(plan.states)
        runs = self._runs(path)
        turns: list[str] = []
        about = False
        for i, (dx, dy, n) in enumerate(runs):
            delta = _wrap(_heading(dx, dy) - plan.yaw)
            if abs(delta) > 1e-6:
                plan.turn(delta)
                if i == 0:
                    about = abs(delta) > math.radians(135)
                else:
                    turns.append("left" if delta > 0 else "right")
            plan.walk(dx * n, dy * n)
        face = place.face
        if place.visits and place.look_yaw is not None and self.motion.replay_revisit_looks:
            face = place.look_yaw  # the revisit's look replays the first one from its start heading
        if face is not None and abs(_wrap(face - plan.yaw)) > 1e-6:
            plan.turn(_wrap(face - plan.yaw))
        plan.pause_to_alignment()  # the look around that follows starts on a chunk boundary
        arrived = len(plan.states) <= plan.budget
        verb = "walks back" if place.visits else "walks"
        verb = ("turns around and " + verb) if about else verb
        where = f"to {place.label}" if arrived else f"toward {place.label}"
        if not turns:
            action = f"{verb} straight {where}" if len(runs) == 1 else f"{verb} {where}"
        elif len(turns) <= 4:
            said = turns[0] if len(turns) == 1 else f"{', '.join(turns[:-1])} and {turns[-1]}"
            action = f"{verb} {where}, turning {said} on the way"
        else:
            action = f"{verb} {where}, turning several times on the way"
        plan.segment(start, action)
        place.visits += 1

    def _look(self, rng: np.random.Generator, plan: _Plan, place: _Place) -> None:
        start = len(plan.states)
        side = 1.0 if rng.random() < 0.5 else -1.0  # drawn at every look: the random stream stays the same
        if place.look_side is None:
            place.look_yaw, place.look_side = plan.yaw, side
        elif self.motion.replay_revisit_looks:
            side = place.look_side
        plan.turn(side * 2 * math.pi)
        again = " again" if place.visits > 1 else ""
        circle = "a full circle " if len(plan.states) <= plan.budget else ""
        plan.segment(
            start,
            f"looks around {place.near}{again}, turning {circle}to the {'left' if side > 0 else 'right'}",
        )

    def _short(self, rng: np.random.Generator, plan: _Plan) -> None:
        """Turn left (or right) and back: the second half revisits the views of the first."""
        side = 1.0 if rng.random() < 0.5 else -1.0
        half = plan.budget // 2
        angle = side * min(math.pi, math.radians(self.motion.turn_speed) * half / plan.fps)
        word, back = ("left", "right") if side > 0 else ("right", "left")
        plan.turn(angle, frames=half)
        plan.segment(0, f"looks around the starting spot, turning to the {word}")
        plan.turn(-angle, frames=plan.budget - half)
        plan.segment(half, f"turns back to the {back} to face the way it started")

    def _tour(
        self, rng: np.random.Generator, plan: _Plan, free: set[tuple[int, int]], places: list[_Place]
    ) -> None:
        """Look around the start, then visit new places and come back to *middle* ones.

        The pattern is start, A, B, back to A, C, back to B, D, back to C, ...: after each new place N_k
        (from the second on) the agent walks back to the new place before it, N_(k-1), and looks around
        again, then goes on to N_(k+1). Every revisit returns to a place seen in the middle of the
        episode, several chunks after it was left, and the start is never revisited. New places are the coloured balls and cells a few steps away (up to
        ``MAX_NEARBY``), chosen so that the walk, the look around and (when a return follows) the walk
        back and the second look fit in the frames left. What is left at the end is filled by looking
        around.
        """
        here = places[0]
        here.visits = 1
        self._look(rng, plan, here)
        look = plan.turn_frames(2 * math.pi)
        news = [here]  # places in the order of their first visit
        while plan.left > 0:
            cur = (int(plan.x), int(plan.y))
            before = news[-2] if len(news) >= 2 and news[-1] is here else None
            returning = before is not None and before is not places[0] and before.visits == 1
            if returning:
                assert before is not None
                path = self._path(free, cur, before.cell)
                fitting = [(before, path)] if len(path) > 1 else []
            else:
                will_return = len(news) >= 2 and here.visits == 1 or here.visits > 1
                fitting = self._new_places(rng, plan, free, places, look, will_return)
            if not fitting:
                break
            place, path = fitting[0]
            if place not in places:
                places.append(place)
            if place.visits == 0:
                news.append(place)
            self._walk(plan, path, place)
            if plan.left > 0:
                self._look(rng, plan, place)
            here = place
        if plan.left > 0:  # fill what is left by looking around
            start, n = len(plan.states), plan.left
            side = 1.0 if rng.random() < 0.5 else -1.0
            plan.turn(side * math.radians(self.motion.turn_speed) * n / plan.fps, frames=n)
            plan.segment(start, f"looks around, turning to the {'left' if side > 0 else 'right'}")

    def _new_places(
        self,
        rng: np.random.Generator,
        plan: _Plan,
        free: set[tuple[int, int]],
        places: list[_Place],
        look: int,
        round_trip: bool,
    ) -> list[tuple[_Place, list[tuple[int, int]]]]:
        """Unvisited places reachable from here whose visit fits, best first (nearby balls, then cells).

        A candidate is an unvisited ball or a cell 2..``MAX_NEARBY`` steps away that is at least two
        cells from every place already visited (so two places never share views). It fits when the walk
        there and a look around (plus the walk back and a second look when ``round_trip``) fit in the
        frames left; when nothing fits, the nearest candidate is returned and the episode ends on it.
        """
        cur = (int(plan.x), int(plan.y))
        taken = [p.cell for p in places if p.visits > 0]

        def far(cell: tuple[int, int]) -> bool:
            return all(abs(cell[0] - c[0]) + abs(cell[1] - c[1]) >= 2 for c in taken)

        parent = self._bfs(free, cur)
        candidates: list[tuple[_Place, list[tuple[int, int]]]] = []
        for p in places:
            if p.visits == 0 and p.cell in parent and far(p.cell):
                path = self._path(free, cur, p.cell)
                if 1 < len(path) <= MAX_NEARBY + 2:  # a ball up to MAX_NEARBY + 1 steps away
                    candidates.append((p, path))
        cells = [c for c in parent if c != cur and far(c)]
        rng.shuffle(cells)  # type: ignore[arg-type]
        used = {p.label for p in places}
        for cell in cells:
            path = self._path(free, cur, cell)
            if 3 <= len(path) <= MAX_NEARBY + 1:
                candidates.append((_Place(cell, _unique_label(_cell_label(free, cell), used)), path))

        def cost(p: _Place, path: list[tuple[int, int]]) -> int:
            go = self._walk_cost(plan, plan.yaw, path, p.face) + look
            if not round_trip:
                return go
            back = path[::-1]
            face_back = plan.turn_frames(math.pi) if self.motion.replay_revisit_looks else 0  # at most a half turn
            return go + self._walk_cost(plan, _heading(*_step(back)), back, None) + face_back + look

        fitting = [c for c in candidates if cost(*c) <= plan.left]
        if fitting:
            balls = [c for c in fitting if c[0].label.endswith(" ball")]
            return (balls + [c for c in fitting if c not in balls])[:1]
        return sorted(candidates, key=lambda c: len(c[1]))[:1]

    @staticmethod
    def _name(plan: _Plan) -> str:
        goals = []
        for s in plan.segments:
            if s.action.startswith(("walks", "turns around")) and " to " in s.action:
                goal = s.action.split(" to ", 1)[1].split(",")[0]
                goals.append(goal.removeprefix("the "))
        if not goals:
            return "looks around in a maze"
        return "maze walk: " + " -> ".join(["start", *goals])
