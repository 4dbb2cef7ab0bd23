"""Scene description: objects of analytic primitives, a three-level label hierarchy,
materials, lights, motion and named states.

Conventions
-----------
* World frame: metres, **z up**.
* Every primitive lives in its own local frame (``pos``/``rot`` relative to its object;
  ``rot`` is XYZ Euler angles in degrees, applied as ``Rz @ Ry @ Rx``). Shapes in their local
  frame:

  ============  ===================  ==============================================
  shape         size                 local geometry
  ============  ===================  ==============================================
  ``sphere``    ``(r,)``             centred at the origin
  ``box``       ``(hx, hy, hz)``     half extents, centred
  ``cylinder``  ``(r, hh)``          axis z, ``|z| <= hh``, closed by caps
  ``cone``      ``(r, h)``           base disc radius r at z=0, apex at z=h
  ``plane``     ``(hx, hy)``         rectangle in the xy plane (two-sided)
  ``torus``     ``(R, r)``           axis z, major radius R, tube radius r
  ``capsule``   ``(r, hh)``          segment z in [-hh, hh] swept by radius r
  ============  ===================  ==============================================

* Labels: three levels, :data:`LEVELS` = ``("whole", "part", "subpart")``. An object's
  ``name`` is its whole-level label ("mug"); each primitive names its ``part`` ("handle of
  the mug") and ``subpart``; a missing part inherits the whole name, a missing subpart the
  part name, so every primitive belongs to one (whole, part, subpart) triple.
  Label ids are assigned once per scene (time independent): whole ids are instance ids
  (object index + 1, 0 = background); part and subpart ids enumerate (object, label) pairs.
* Time: objects move by pose keyframes (linear in position and Euler angles) and switch
  between named :class:`State` s on a ``schedule``; a state's name is a time-sensitive text
  query ("red light", "open box").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

LEVELS: Tuple[str, str, str] = ("whole", "part", "subpart")
SHAPES: Tuple[str, ...] = ("sphere", "box", "cylinder", "cone", "plane", "torus", "capsule")
TEXTURES: Tuple[str, ...] = ("solid", "checker", "stripes", "noise")

Vec3 = Tuple[float, float, float]


def euler_matrix(rot_deg: Sequence[float]) -> np.ndarray:
    """XYZ Euler angles in degrees -> 3x3 rotation ``Rz @ Ry @ Rx`` (float64)."""
    ax, ay, az = (math.radians(float(a)) for a in rot_deg)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(pos: Sequence[float] = (0, 0, 0), rot: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """4x4 rigid transform from a position and XYZ Euler angles in degrees."""
    m = np.eye(4)
    m[:3, :3] = euler_matrix(rot)
    m[:3, 3] = np.asarray(pos, dtype=np.float64)
    return m


@dataclass
class Material:
    """Procedural texture evaluated on the primitive's local coordinates.

    ``kind``: solid | checker (3D checker of cell 1/scale) | stripes (along local ``axis``)
    | noise (value noise of frequency ``scale``, mixing ``color`` and ``color2``).
    ``emit`` adds ``emit * albedo`` regardless of lighting (light bulbs, screens).
    """

    color: Vec3 = (0.8, 0.8, 0.8)
    kind: str = "solid"
    color2: Vec3 = (0.2, 0.2, 0.2)
    scale: float = 10.0
    axis: int = 2
    emit: float = 0.0

    def __post_init__(self):
        if self.kind not in TEXTURES:
            raise ValueError(f"unknown texture {self.kind!r}; known: {', '.join(TEXTURES)}")


def solid(r: float, g: float, b: float, emit: float = 0.0) -> Material:
    return Material((r, g, b), emit=emit)


@dataclass
class Prim:
    """One analytic primitive of an object (see the module docstring for shapes)."""

    shape: str
    size: Tuple[float, ...]
    pos: Vec3 = (0.0, 0.0, 0.0)
    rot: Vec3 = (0.0, 0.0, 0.0)
    mat: Material = field(default_factory=Material)
    part: Optional[str] = None
    subpart: Optional[str] = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        need = {"sphere": 1, "box": 3, "cylinder": 2, "cone": 2, "plane": 2, "torus": 2, "capsule": 2}[self.shape]
        if len(self.size) != need:
            raise ValueError(f"{self.shape} needs {need} size values, got {self.size}")

    def bound_radius(self) -> float:
        s = self.size
        return {
            "sphere": lambda: s[0],
            "box": lambda: math.sqrt(s[0] ** 2 + s[1] ** 2 + s[2] ** 2),
            "cylinder": lambda: math.hypot(s[0], s[1]),
            "cone": lambda: max(math.hypot(s[0], s[1] / 2), s[1] / 2),
            "plane": lambda: math.hypot(s[0], s[1]),
            "torus": lambda: s[0] + s[1],
            "capsule": lambda: s[0] + s[1],
        }[self.shape]()

    def bound_center(self) -> np.ndarray:
        """Local-frame centre of the bounding sphere (the cone's is half-way up)."""
        if self.shape == "cone":
            return np.array([0.0, 0.0, self.size[1] / 2])
        return np.zeros(3)


@dataclass
class State:
    """A named state of an object: colour overrides, hidden parts, moved parts.

    ``colors`` maps a part or subpart label to a Material (or an RGB triple);
    ``hidden`` lists part/subpart labels not drawn in this state; ``moves`` maps a part
    label to ``(rot_deg, pivot, translate)``: rotate about ``pivot`` (object frame) then
    translate. ``query_part`` names the part the state's text query selects (None: the
    whole object).
    """

    name: str
    colors: Dict[str, object] = field(default_factory=dict)
    hidden: Tuple[str, ...] = ()
    moves: Dict[str, Tuple[Vec3, Vec3, Vec3]] = field(default_factory=dict)
    query_part: Optional[str] = None


@dataclass
class Keyframe:
    t: float
    pos: Vec3
    rot: Vec3 = (0.0, 0.0, 0.0)


@dataclass
class Obj:
    """A named object: its whole-level label, synonyms, primitives, pose, motion, states."""

    name: str
    prims: List[Prim]
    pos: Vec3 = (0.0, 0.0, 0.0)
    rot: Vec3 = (0.0, 0.0, 0.0)
    queries: Tuple[str, ...] = ()
    part_queries: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    keyframes: List[Keyframe] = field(default_factory=list)
    states: List[State] = field(default_factory=list)
    schedule: List[Tuple[float, str]] = field(default_factory=list)
    queryable: bool = True  # False for floors, walls: labelled but not offered as queries

    def labels_of(self, prim: Prim) -> Tuple[str, str, str]:
        part = prim.part or self.name
        return (self.name, part, prim.subpart or part)

    def pose(self, t: float) -> np.ndarray:
        if not self.keyframes:
            return rigid(self.pos, self.rot)
        kf = sorted(self.keyframes, key=lambda k: k.t)
        if t <= kf[0].t:
            return rigid(kf[0].pos, kf[0].rot)
        if t >= kf[-1].t:
            return rigid(kf[-1].pos, kf[-1].rot)
        for a, b in zip(kf[:-1], kf[1:]):
            if a.t <= t <= b.t:
                w = (t - a.t) / max(b.t - a.t, 1e-12)
                pos = [(1 - w) * p + w * q for p, q in zip(a.pos, b.pos)]
                rot = [(1 - w) * p + w * q for p, q in zip(a.rot, b.rot)]
                return rigid(pos, rot)
        raise AssertionError("unreachable")

    def state_at(self, t: float) -> Optional[State]:
        if not self.schedule:
            return None
        current = None
        for t0, name in sorted(self.schedule, key=lambda s: s[0]):
            if t >= t0 - 1e-12:
                current = name
        if current is None:
            current = sorted(self.schedule, key=lambda s: s[0])[0][1]
        for s in self.states:
            if s.name == current:
                return s
        raise ValueError(f"object {self.name!r}: schedule names unknown state {current!r}")


@dataclass
class Light:
    """``kind='directional'``: ``vec`` points *towards* the light; ``'point'``: ``vec`` is
    its position. Lambert term ``intensity * color * max(0, n.l)``, hard shadows."""

    kind: str
    vec: Vec3
    intensity: float = 0.8
    color: Vec3 = (1.0, 1.0, 1.0)


@dataclass
class Scene:
    """A scene plus the hints camera paths need.

    ``center``/``radius``: what multi-view cameras orbit and at which distance;
    ``room``: ``(xmin, ymin, xmax, ymax, zmin, zmax)`` the hand-held RGB-D walk stays in
    (None: a walk around ``center``); ``time_range``: of dynamic renders.
    """

    name: str
    objects: List[Obj]
    lights: List[Light]
    ambient: float = 0.3
    background: Vec3 = (0.92, 0.93, 0.96)
    center: Vec3 = (0.0, 0.0, 0.0)
    radius: float = 2.0
    room: Optional[Tuple[float, float, float, float, float, float]] = None
    time_range: Tuple[float, float] = (0.0, 1.0)
    default_kind: str = "multiview"
    description: str = ""
    seed: int = 0

    # ---------------------------------------------------------------- labels
    def label_tables(self) -> Dict[str, Dict[int, str]]:
        """Per level: id -> label text (id 0 = background, never listed)."""
        return self._labels()[0]

    def _labels(self):
        if getattr(self, "_label_cache", None) is not None:
            return self._label_cache
        tables: Dict[str, Dict[int, str]] = {lv: {} for lv in LEVELS}
        prim_ids: List[List[Tuple[int, int, int]]] = []
        keys: Dict[str, Dict[tuple, int]] = {"part": {}, "subpart": {}}
        for oi, obj in enumerate(self.objects):
            tables["whole"][oi + 1] = obj.name
            ids = []
            for p in obj.prims:
                _, part, sub = obj.labels_of(p)
                kp = (oi, part)
                if kp not in keys["part"]:
                    keys["part"][kp] = len(keys["part"]) + 1
                    tables["part"][keys["part"][kp]] = part
                ks = (oi, part, sub)
                if ks not in keys["subpart"]:
                    keys["subpart"][ks] = len(keys["subpart"]) + 1
                    tables["subpart"][keys["subpart"][ks]] = sub
                ids.append((oi + 1, keys["part"][kp], keys["subpart"][ks]))
            prim_ids.append(ids)
        self._label_cache = (tables, prim_ids)
        return self._label_cache

    def vocabulary(self) -> Dict[str, Dict[str, List[int]]]:
        """Query text -> {level: label ids}, over all times (states excluded).

        Whole level: object name and synonyms; part/subpart levels: their labels and
        ``part_queries`` synonyms. Objects with ``queryable=False`` are left out.
        """
        tables, prim_ids = self._labels()
        vocab: Dict[str, Dict[str, List[int]]] = {}

        def add(text, level, i):
            lst = vocab.setdefault(text, {}).setdefault(level, [])
            if i not in lst:
                lst.append(i)

        for oi, obj in enumerate(self.objects):
            if not obj.queryable:
                continue
            for text in (obj.name,) + tuple(obj.queries):
                add(text, "whole", oi + 1)
            for p, (_, pid, sid) in zip(obj.prims, prim_ids[oi]):
                _, part, sub = obj.labels_of(p)
                if part != obj.name:
                    add(part, "part", pid)
                    for syn in obj.part_queries.get(part, ()):
                        add(syn, "part", pid)
                if sub != part:
                    add(sub, "subpart", sid)
                    for syn in obj.part_queries.get(sub, ()):
                        add(syn, "subpart", sid)
        return vocab

    def state_queries(self, t: float) -> Dict[str, Dict[str, List[int]]]:
        """Time-sensitive queries: every state name of the scene -> {level: ids active at t}
        (an empty dict when the state is not active at time ``t``)."""
        _, prim_ids = self._labels()
        out: Dict[str, Dict[str, List[int]]] = {}
        for oi, obj in enumerate(self.objects):
            if not obj.states:
                continue
            active = obj.state_at(t)
            for st in obj.states:
                entry = out.setdefault(st.name, {})
                if active is None or active.name != st.name:
                    continue
                if st.query_part is None:
                    entry.setdefault("whole", []).append(oi + 1)
                else:
                    for p, (_, pid, sid) in zip(obj.prims, prim_ids[oi]):
                        _, part, sub = obj.labels_of(p)
                        if part == st.query_part and pid not in entry.get("part", []):
                            entry.setdefault("part", []).append(pid)
                        elif sub == st.query_part and sid not in entry.get("subpart", []):
                            entry.setdefault("subpart", []).append(sid)
        return out

    # ---------------------------------------------------------------- flatten
    def flatten(self, t: float = 0.0) -> "FlatScene":
        """All visible primitives at time ``t`` as flat arrays (world transforms, materials,
        label ids) for the renderer."""
        _, prim_ids = self._labels()
        rows = []
        for oi, obj in enumerate(self.objects):
            opose = obj.pose(t)
            st = obj.state_at(t)
            for pi, p in enumerate(obj.prims):
                labels = obj.labels_of(p)
                mat = p.mat
                local = rigid(p.pos, p.rot)
                if st is not None:
                    if labels[1] in st.hidden or labels[2] in st.hidden:
                        continue
                    for key in (labels[1], labels[2]):
                        if key in st.colors:
                            c = st.colors[key]
                            mat = c if isinstance(c, Material) else Material(tuple(c), emit=mat.emit)
                        if key in st.moves:
                            rot, pivot, trans = st.moves[key]
                            m = np.eye(4)
                            m[:3, :3] = euler_matrix(rot)
                            pv = np.asarray(pivot, dtype=np.float64)
                            m[:3, 3] = pv - m[:3, :3] @ pv + np.asarray(trans, dtype=np.float64)
                            local = m @ local
                world = opose @ local
                rows.append((p, mat, world, prim_ids[oi][pi]))
        return FlatScene.build(rows, self)


SHAPE_CODE = {s: i for i, s in enumerate(SHAPES)}
TEXTURE_CODE = {s: i for i, s in enumerate(TEXTURES)}


@dataclass
class FlatScene:
    """Primitives at one time as numpy arrays (P = number of visible primitives)."""

    shape: np.ndarray  # [P] int
    size: np.ndarray  # [P, 3] float
    rot: np.ndarray  # [P, 3, 3] local -> world rotation
    trans: np.ndarray  # [P, 3] local origin in world
    bcenter: np.ndarray  # [P, 3] bounding-sphere centre (world)
    bradius: np.ndarray  # [P]
    tex: np.ndarray  # [P] texture code
    color: np.ndarray  # [P, 3]
    color2: np.ndarray  # [P, 3]
    tscale: np.ndarray  # [P]
    taxis: np.ndarray  # [P]
    emit: np.ndarray  # [P]
    ids: np.ndarray  # [P, 3] label ids (whole = instance, part, subpart)
    lights: List[Light]
    ambient: float
    background: np.ndarray
    seed: int

    @staticmethod
    def build(rows, scene: Scene) -> "FlatScene":
        n = len(rows)
        f = FlatScene(
            shape=np.zeros(n, np.int64), size=np.zeros((n, 3)), rot=np.zeros((n, 3, 3)),
            trans=np.zeros((n, 3)), bcenter=np.zeros((n, 3)), bradius=np.zeros(n),
            tex=np.zeros(n, np.int64), color=np.zeros((n, 3)), color2=np.zeros((n, 3)),
            tscale=np.zeros(n), taxis=np.zeros(n, np.int64), emit=np.zeros(n),
            ids=np.zeros((n, 3), np.int64), lights=list(scene.lights), ambient=scene.ambient,
            background=np.asarray(scene.background, dtype=np.float64), seed=scene.seed,
        )
        for i, (p, mat, world, ids) in enumerate(rows):
            f.shape[i] = SHAPE_CODE[p.shape]
            f.size[i, : len(p.size)] = p.size
            f.rot[i] = world[:3, :3]
            f.trans[i] = world[:3, 3]
            f.bcenter[i] = world[:3, :3] @ p.bound_center() + world[:3, 3]
            f.bradius[i] = p.bound_radius()
            f.tex[i] = TEXTURE_CODE[mat.kind]
            f.color[i] = mat.color
            f.color2[i] = mat.color2
            f.tscale[i] = mat.scale
            f.taxis[i] = mat.axis
            f.emit[i] = mat.emit
            f.ids[i] = ids
        return f

    def __len__(self) -> int:
        return len(self.shape)
