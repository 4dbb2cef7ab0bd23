"""Camera trajectories: TUM files, timestamp association, Umeyama alignment, ATE and RPE.

Poses are camera-to-world [4, 4] float64 matrices (OpenCV camera axes, as TUM RGB-D and
the readers in :mod:`langfield.data.rgbd` use). Numbers follow evo (``evo_ape tum REF EST
--align`` and ``evo_rpe tum REF EST``), reimplemented here from its documented behaviour:

* association (:func:`associate`): for every timestamp of the *shorter* trajectory (the
  estimate when both have the same length), the nearest timestamp of the other one; the
  pair is kept when they are at most ``max_diff`` seconds apart (several stamps may match
  the same one of the longer trajectory, as in evo).
* ATE (:func:`ate`): the estimate is aligned to the reference by Umeyama's least-squares
  fit of the matched camera positions (SE(3), or Sim(3) with ``align="sim3"``), then the
  error is the distance between aligned and reference positions; statistics over frames.
* RPE (:func:`rpe`): for index pairs ``(i, i + delta)`` (consecutive pairs of every
  ``delta``-th pose, or all pairs), ``E = (Q_i^-1 Q_j)^-1 (P_i^-1 P_j)`` with Q the
  reference and P the estimate; translation error ``|t(E)|`` (m), rotation error the angle
  of ``R(E)`` (degrees).

TUM trajectory files: one pose per line, ``timestamp tx ty tz qx qy qz qw`` (camera-to-
world, quaternion Hamilton xyzw), ``#`` comments and blank lines allowed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

__all__ = ["Trajectory", "TrajectoryError", "read_tum_trajectory", "write_tum_trajectory", "format_tum_trajectory",
           "associate", "umeyama", "align_trajectory", "ate", "rpe", "trajectory_report", "format_report",
           "quat_to_rot", "rot_to_quat", "slerp", "interpolate_poses", "stats"]

PathLike = Union[str, os.PathLike]


class TrajectoryError(ValueError):
    """A trajectory file or array that cannot be used; the message names the file and line."""

    def __init__(self, message: str, path: Optional[PathLike] = None, line: Optional[int] = None):
        where = ""
        if path is not None:
            where = f"{path}" + (f":{line}" if line is not None else "") + ": "
        super().__init__(where + message)
        self.path = None if path is None else Path(path)
        self.line = line


@dataclass
class Trajectory:
    """``timestamps`` [N] float64 seconds and ``poses`` [N, 4, 4] float64 camera-to-world."""

    timestamps: np.ndarray
    poses: np.ndarray

    def __post_init__(self):
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64).reshape(-1)
        self.poses = np.asarray(self.poses, dtype=np.float64)
        if self.poses.ndim != 3 or self.poses.shape[1:] != (4, 4):
            raise TrajectoryError(f"poses must be [N, 4, 4], got shape {list(self.poses.shape)}")
        if len(self.timestamps) != len(self.poses):
            raise TrajectoryError(f"{len(self.timestamps)} timestamps for {len(self.poses)} poses")

    def __len__(self) -> int:
        return len(self.timestamps)

    @property
    def positions(self) -> np.ndarray:
        return self.poses[:, :3, 3]


# ------------------------------------------------------------------------------------------
# rotations

from langfield.maths import quat_xyzw_to_rot as quat_to_rot  # noqa: E402  (one copy of the maths)
from langfield.maths import rot_to_quat_xyzw as rot_to_quat  # noqa: E402
from langfield.maths import slerp  # noqa: E402


def _pose(t, q) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    M = np.zeros(t.shape[:-1] + (4, 4))
    M[..., :3, :3] = quat_to_rot(q)
    M[..., :3, 3] = t
    M[..., 3, 3] = 1.0
    return M


def interpolate_poses(times, poses, query, max_gap: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Poses at ``query`` times from a trajectory (``times`` [N], camera-to-world ``poses``
    [N, 4, 4]): translation linear, rotation slerp between the two bracketing samples.
    Returns ``(poses [M, 4, 4], valid [M] bool)``; a query outside ``[times[0], times[-1]]``
    (or between samples more than ``max_gap`` s apart) is not valid (its pose is NaN)."""
    times = np.asarray(times, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64).reshape(-1)
    order = np.argsort(times, kind="stable")
    times, poses = times[order], poses[order]
    out = np.full((len(query), 4, 4), np.nan)
    valid = np.zeros(len(query), dtype=bool)
    if len(times) == 0:
        return out, valid
    hi = np.searchsorted(times, query, side="left")
    exact = (hi < len(times)) & (times[np.minimum(hi, len(times) - 1)] == query)
    inside = (query >= times[0]) & (query <= times[-1])
    quats = rot_to_quat(poses[:, :3, :3])
    for m in np.nonzero(inside)[0]:
        j = int(hi[m])
        if exact[m]:
            out[m] = poses[j]
            valid[m] = True
            continue
        i = j - 1
        gap = times[j] - times[i]
        if max_gap is not None and gap > max_gap:
            continue
        a = (query[m] - times[i]) / gap
        t = (1 - a) * poses[i, :3, 3] + a * poses[j, :3, 3]
        out[m] = _pose(t, slerp(quats[i], quats[j], a))
        valid[m] = True
    return out, valid


# ------------------------------------------------------------------------------------------
# TUM files

def read_tum_trajectory(path: PathLike) -> Trajectory:
    """Read a TUM trajectory file (``timestamp tx ty tz qx qy qz qw`` per line; ``#``
    comments and blank lines skipped; commas accepted as separators). Errors name the file
    and line."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError("trajectory file not found", path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise TrajectoryError(f"cannot read trajectory file ({type(e).__name__}: {e})", path) from None
    ts, rows = [], []
    for ln, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.replace(",", " ").split()
        if len(parts) != 8:
            raise TrajectoryError(f"expected 8 values 'timestamp tx ty tz qx qy qz qw', got {len(parts)}", path, ln)
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise TrajectoryError(f"not a number in {s[:80]!r}", path, ln) from None
        if not all(math.isfinite(v) for v in vals):
            raise TrajectoryError("non-finite value", path, ln)
        if math.sqrt(sum(v * v for v in vals[4:])) < 1e-6:
            raise TrajectoryError("quaternion qx qy qz qw has zero length", path, ln)
        ts.append(vals[0])
        rows.append(vals[1:])
    if not rows:
        return Trajectory(np.zeros(0), np.zeros((0, 4, 4)))
    a = np.asarray(rows)
    return Trajectory(np.asarray(ts), _pose(a[:, :3], a[:, 3:]))


def format_tum_trajectory(timestamps, poses, header: Optional[str] = None) -> str:
    """The text of a TUM trajectory file (values written so that they read back exactly)."""
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    P = np.asarray(poses, dtype=np.float64)
    if P.ndim != 3 or P.shape[1:] != (4, 4) or len(P) != len(ts):
        raise TrajectoryError(f"need timestamps [N] and camera-to-world poses [N, 4, 4]; got {len(ts)} and "
                              f"{list(P.shape)}")
    if not (np.isfinite(P).all() and np.isfinite(ts).all()):
        raise TrajectoryError("poses and timestamps must be finite")
    q = rot_to_quat(P[:, :3, :3]) if len(P) else np.zeros((0, 4))
    lines = ["# " + h for h in (header or "").splitlines() if h] + ["# timestamp tx ty tz qx qy qz qw"]
    for i in range(len(ts)):
        vals = (*P[i, :3, 3], *q[i])
        lines.append(f"{ts[i]:.6f}" if float(f"{ts[i]:.6f}") == ts[i] else repr(float(ts[i])))
        lines[-1] += " " + " ".join(repr(float(v)) for v in vals)
    return "\n".join(lines) + "\n"


def write_tum_trajectory(path: PathLike, timestamps, poses, header: Optional[str] = None) -> Path:
    """Write ``(timestamps [N], camera-to-world poses [N, 4, 4])`` as a TUM trajectory file,
    atomically. Returns the path."""
    from langfield.io.checkpoint import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, format_tum_trajectory(timestamps, poses, header).encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------
# association and alignment

def associate(t_est, t_ref, max_diff: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """Match timestamps as evo does: for each stamp of the shorter list (``t_est`` when both
    have the same length), the nearest stamp of the other (first one on ties), kept when
    ``|difference| <= max_diff``. Returns index arrays ``(i_est, i_ref)`` of equal length,
    in the shorter list's order."""
    a = np.asarray(t_est, dtype=np.float64).reshape(-1)
    b = np.asarray(t_ref, dtype=np.float64).reshape(-1)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    swap = len(b) < len(a)  # iterate over the shorter one; est when equal (evo: ref is "first")
    short, long_ = (b, a) if swap else (a, b)
    order = np.argsort(long_, kind="stable")
    srt = long_[order]
    pos = np.searchsorted(srt, short)
    best = np.full(len(short), -1, dtype=np.int64)
    bestd = np.full(len(short), np.inf)
    for off in (-1, 0):  # the nearest value is one of the two neighbours in sorted order
        j = np.clip(pos + off, 0, len(srt) - 1)
        d = np.abs(srt[j] - short)
        better = d < bestd
        bestd = np.where(better, d, bestd)
        best = np.where(better, j, best)
    # first original index among the stamps equal to the nearest value (argmin tie rule)
    val = srt[best]
    lo = np.searchsorted(srt, val, side="left")
    hi = np.searchsorted(srt, val, side="right")
    idx_long = np.array([order[l:h].min() for l, h in zip(lo, hi)], dtype=np.int64)
    # an equally near stamp on the other side of the query (tie between two values)
    other = np.clip(np.where(val < short, hi, lo - 1), 0, len(srt) - 1)
    tie = (np.abs(srt[other] - short) == bestd) & (srt[other] != srt[best])
    for k in np.nonzero(tie)[0]:
        v = srt[other[k]]
        cand = order[np.searchsorted(srt, v, "left"):np.searchsorted(srt, v, "right")].min()
        idx_long[k] = min(idx_long[k], cand)
    keep = bestd <= max_diff
    i_short = np.nonzero(keep)[0].astype(np.int64)
    i_long = idx_long[keep]
    return (i_long, i_short) if swap else (i_short, i_long)


def umeyama(src, dst, with_scale: bool = False) -> Tuple[np.ndarray, np.ndarray, float]:
    """Least-squares similarity (Umeyama 1991) mapping points ``src`` [N, 3] onto ``dst``
    [N, 3]: returns ``(R [3, 3], t [3], s)`` minimising ``sum |dst - (s R src + t)|^2``
    (``s = 1`` unless ``with_scale``)."""
    x = np.asarray(src, dtype=np.float64)
    y = np.asarray(dst, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[1] != 3:
        raise TrajectoryError(f"umeyama needs two [N, 3] point sets, got {list(x.shape)} and {list(y.shape)}")
    n = len(x)
    if n < 3:
        raise TrajectoryError(f"alignment needs at least 3 matched poses, got {n}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    var_x = float((xc ** 2).sum() / n)
    cov = yc.T @ xc / n
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1.0
    R = U @ S @ Vt
    s = float(np.trace(np.diag(D) @ S) / var_x) if with_scale else 1.0
    if with_scale and not (var_x > 0):
        raise TrajectoryError("cannot estimate a scale: the estimated positions do not move")
    t = my - s * R @ mx
    return R, t, s


def _as_poses(x, what: str) -> np.ndarray:
    if isinstance(x, Trajectory):
        return x.poses
    P = np.asarray(x, dtype=np.float64)
    if P.ndim != 3 or P.shape[1:] != (4, 4):
        raise TrajectoryError(f"{what} must be a Trajectory or camera-to-world poses [N, 4, 4], got "
                              f"{list(P.shape)}")
    if not np.isfinite(P).all():
        raise TrajectoryError(f"{what} has non-finite poses")
    return P


def _matched(est, ref, max_diff: float) -> Tuple[np.ndarray, np.ndarray]:
    """Associate two Trajectories by time, or pair two pose arrays of the same length."""
    if isinstance(est, Trajectory) and isinstance(ref, Trajectory):
        ie, ir = associate(est.timestamps, ref.timestamps, max_diff)
        if len(ie) == 0:
            raise TrajectoryError(f"no matching timestamps between the estimate ({len(est)} poses) and the reference "
                                  f"({len(ref)} poses) within {max_diff} s")
        return est.poses[ie], ref.poses[ir]
    P, Q = _as_poses(est, "est"), _as_poses(ref, "ref")
    if len(P) != len(Q):
        raise TrajectoryError(f"est has {len(P)} poses and ref {len(Q)}: pass Trajectory objects to associate "
                              "them by time")
    return P, Q


def align_trajectory(est, ref, align: str = "se3") -> Tuple[np.ndarray, float]:
    """The transform ``T`` [4, 4] (a similarity for ``"sim3"``; its rotation part scaled by
    ``s``) that maps the estimated camera positions onto the reference ones, and ``s``.
    ``align``: ``"se3"``, ``"sim3"`` or ``"none"`` (identity). Poses must be paired."""
    P, Q = _as_poses(est, "est"), _as_poses(ref, "ref")
    T = np.eye(4)
    if align == "none":
        return T, 1.0
    if align not in ("se3", "sim3"):
        raise TrajectoryError(f"unknown alignment {align!r}; use se3, sim3 or none")
    R, t, s = umeyama(P[:, :3, 3], Q[:, :3, 3], with_scale=align == "sim3")
    T[:3, :3] = s * R
    T[:3, 3] = t
    return T, s


def stats(err) -> Dict[str, float]:
    """rmse, mean, median, std (population), min, max, sse and n of an error vector."""
    e = np.asarray(err, dtype=np.float64).reshape(-1)
    if len(e) == 0:
        raise TrajectoryError("no errors to summarise (no matched poses)")
    return {"rmse": float(np.sqrt(np.mean(e ** 2))), "mean": float(e.mean()), "median": float(np.median(e)),
            "std": float(e.std()), "min": float(e.min()), "max": float(e.max()), "sse": float((e ** 2).sum()),
            "n": int(len(e))}


def ate(est, ref, align: str = "se3", max_diff: float = 0.01) -> Dict[str, float]:
    """Absolute trajectory error (translation part, metres) as ``evo_ape tum REF EST --align``
    (``align="se3"``; ``"sim3"`` = ``--align --correct_scale``; ``"none"``).

    ``est``/``ref``: :class:`Trajectory` (associated by time, ``max_diff`` seconds) or paired
    camera-to-world arrays [N, 4, 4]. Returns :func:`stats` plus ``scale`` and ``align``."""
    P, Q = _matched(est, ref, max_diff)
    T, s = align_trajectory(P, Q, align)
    p = P[:, :3, 3] @ T[:3, :3].T + T[:3, 3]
    out = stats(np.linalg.norm(p - Q[:, :3, 3], axis=1))
    out.update(scale=float(s), align=align)
    return out


def _inv(P: np.ndarray) -> np.ndarray:
    out = np.zeros_like(P)
    Rt = np.swapaxes(P[..., :3, :3], -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -(Rt @ P[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def rpe(est, ref, delta: int = 1, all_pairs: bool = False, max_diff: float = 0.01) -> Dict[str, Dict[str, float]]:
    """Relative pose error as ``evo_rpe tum REF EST --delta DELTA --delta_unit f`` (``-a``
    changes nothing: RPE is invariant to a rigid alignment). Pairs ``(i, i + delta)`` of the
    matched poses: consecutive pairs of every ``delta``-th pose, or every such pair with
    ``all_pairs``. Returns ``{"trans": stats (m), "rot": stats (degrees)}``."""
    if int(delta) != delta or delta < 1:
        raise TrajectoryError(f"delta must be a positive integer number of frames, got {delta}")
    delta = int(delta)
    P, Q = _matched(est, ref, max_diff)
    if all_pairs:
        i = np.arange(0, max(len(P) - delta, 0))
        j = i + delta
    else:
        ids = np.arange(0, len(P), delta)
        i, j = ids[:-1], ids[1:]
    if len(i) == 0:
        raise TrajectoryError(f"RPE with delta {delta} needs more than {delta} matched poses, got {len(P)}")
    rel_p = _inv(P[i]) @ P[j]
    rel_q = _inv(Q[i]) @ Q[j]
    E = _inv(rel_q) @ rel_p
    te = np.linalg.norm(E[:, :3, 3], axis=1)
    c = np.clip((np.trace(E[:, :3, :3], axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)
    re = np.degrees(np.arccos(c))
    return {"trans": stats(te), "rot": stats(re), "delta": delta}


# ------------------------------------------------------------------------------------------
# report

def trajectory_report(est_path: PathLike, ref_path: PathLike, max_diff: float = 0.01, align: str = "se3",
                      delta: int = 1) -> dict:
    """Compare two TUM trajectory files (``langfield eval --trajectory EST --reference REF``):
    ``{"est", "ref", "n_est", "n_ref", "n_matched", "max_diff", "ate": ate(...), "rpe": rpe(...)}``
    (``rpe`` is None when fewer than ``delta + 1`` poses match)."""
    est = read_tum_trajectory(est_path)
    ref = read_tum_trajectory(ref_path)
    if len(est) == 0:
        raise TrajectoryError("no poses in the trajectory", est_path)
    if len(ref) == 0:
        raise TrajectoryError("no poses in the trajectory", ref_path)
    ie, ir = associate(est.timestamps, ref.timestamps, max_diff)
    if len(ie) == 0:
        raise TrajectoryError(f"no timestamp of {est_path} is within {max_diff} s of one in {ref_path}")
    P, Q = est.poses[ie], ref.poses[ir]
    rep = {"est": str(est_path), "ref": str(ref_path), "n_est": len(est), "n_ref": len(ref), "n_matched": int(len(ie)),
           "max_diff": float(max_diff), "ate": ate(P, Q, align=align)}
    try:
        rep["rpe"] = rpe(P, Q, delta=delta)
    except TrajectoryError:
        rep["rpe"] = None
    return rep


def format_report(rep: dict) -> str:
    """A few human-readable lines for :func:`trajectory_report`'s result."""
    a = rep["ate"]
    lines = [f"matched {rep['n_matched']} of {rep['n_est']} estimated / {rep['n_ref']} reference poses "
             f"(max difference {rep['max_diff']} s)",
             f"ATE ({a['align']}) rmse {a['rmse'] * 100:.3f} cm  mean {a['mean'] * 100:.3f}  median "
             f"{a['median'] * 100:.3f}  std {a['std'] * 100:.3f}  min {a['min'] * 100:.3f}  max {a['max'] * 100:.3f} cm"
             + (f"  scale {a['scale']:.4f}" if a["align"] == "sim3" else "")]
    r = rep.get("rpe")
    if r:
        lines.append(f"RPE (delta {r['delta']} frame(s)) translation rmse {r['trans']['rmse'] * 100:.3f} cm, "
                     f"rotation rmse {r['rot']['rmse']:.4f} deg over {r['trans']['n']} pairs")
    return "\n".join(lines)
