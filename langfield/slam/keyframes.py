"""Keyframes: which frames the map is optimised on.

A tracked frame becomes a keyframe when it sees enough that the last keyframe did not
(covisibility: the share of its depth points, unprojected with the estimated pose, that land
inside the last keyframe's image at a consistent depth, below ``min_overlap``), when the
camera moved or turned far enough from the last keyframe (``max_translation`` as a share of
the median depth, ``max_rotation_deg``), when the map explains too little of it (tracking
coverage below ``min_coverage``), or after ``max_gap`` frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from langfield.maths import inv_rigid

__all__ = ["KeyframeConfig", "Keyframe", "covisibility", "is_keyframe", "choose_window"]


@dataclass
class KeyframeConfig:
    min_overlap: float = 0.85
    max_translation: float = 0.15  # share of the frame's median depth
    max_rotation_deg: float = 15.0
    min_coverage: float = 0.9
    max_gap: int = 10
    sample_stride: int = 4  # pixels used for the covisibility test

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "KeyframeConfig":
        return cls(**{k: v for k, v in dict(d).items() if k in cls.__dataclass_fields__})


@dataclass
class Keyframe:
    """A keyframe: its frame ``index``, ``name``, ``timestamp``, estimated world-to-camera
    ``viewmat`` [4, 4] (refined by mapping), ``image`` [H, W, 3] float, ``depth`` [H, W], and
    the Adam state of its pose refinement."""

    index: int
    name: str
    timestamp: float
    viewmat: Tensor
    image: Tensor
    depth: Tensor
    pose_m: Optional[Tensor] = None  # Adam moments [6] of the pose refinement in mapping
    pose_v: Optional[Tensor] = None
    pose_steps: int = 0


def covisibility(depth: Tensor, K: Tensor, viewmat: Tensor, kf_depth: Tensor, kf_viewmat: Tensor,
                 stride: int = 4, rel_tol: float = 0.1) -> float:
    """Share of this frame's valid depth points (every ``stride``-th pixel) that the keyframe
    sees: inside its image, in front, with its depth within ``rel_tol`` of the point's."""
    H, W = depth.shape
    d = depth[::stride, ::stride]
    vv, uu = torch.nonzero(d > 0, as_tuple=True)
    if vv.numel() == 0:
        return 0.0
    z = d[vv, uu]
    u = uu.float() * stride + 0.5
    v = vv.float() * stride + 0.5
    pc = torch.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], -1)
    rel = kf_viewmat @ inv_rigid(viewmat)
    q = pc @ rel[:3, :3].T + rel[:3, 3]
    zk = q[:, 2]
    front = zk > 1e-6
    pu = K[0, 0] * q[:, 0] / zk.clamp_min(1e-6) + K[0, 2]
    pv = K[1, 1] * q[:, 1] / zk.clamp_min(1e-6) + K[1, 2]
    inside = front & (pu >= 0) & (pu < W) & (pv >= 0) & (pv < H)
    iu = pu.clamp(0, W - 1).long()
    iv = pv.clamp(0, H - 1).long()
    dk = kf_depth[iv, iu]
    ok = inside & (dk > 0) & ((dk - zk).abs() < rel_tol * zk)
    return float(ok.float().mean())


def motion(viewmat: Tensor, ref_viewmat: Tensor) -> Tuple[float, float]:
    """(camera-centre distance in metres, rotation angle in degrees) between two poses."""
    E = viewmat @ inv_rigid(ref_viewmat)
    R = E[:3, :3]
    vee = torch.stack([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    ang = math.degrees(float(torch.atan2(0.5 * vee.norm(), 0.5 * (R.trace() - 1))))
    c = inv_rigid(viewmat)[:3, 3]
    c0 = inv_rigid(ref_viewmat)[:3, 3]
    return float((c - c0).norm()), ang


def is_keyframe(depth: Tensor, K: Tensor, viewmat: Tensor, last: Optional[Keyframe], frames_since: int,
                coverage: float, cfg: KeyframeConfig) -> Tuple[bool, str, float]:
    """(is it a keyframe, why, covisibility with the last keyframe)."""
    if last is None:
        return True, "first", 0.0
    ov = covisibility(depth, K, viewmat, last.depth, last.viewmat, cfg.sample_stride)
    if ov < cfg.min_overlap:
        return True, "overlap", ov
    dist, ang = motion(viewmat, last.viewmat)
    valid = depth[depth > 0]
    med = float(valid.median()) if valid.numel() else 1.0
    if dist > cfg.max_translation * med:
        return True, "translation", ov
    if ang > cfg.max_rotation_deg:
        return True, "rotation", ov
    if coverage < cfg.min_coverage:
        return True, "coverage", ov
    if frames_since >= cfg.max_gap:
        return True, "gap", ov
    return False, "", ov


def choose_window(n_keyframes: int, window: int, random_older: int, generator: torch.Generator) -> List[int]:
    """Indices of the keyframes to optimise: the ``window`` most recent plus ``random_older``
    random older ones (drawn with ``generator``, so runs are reproducible)."""
    recent = list(range(max(0, n_keyframes - window), n_keyframes))
    older = n_keyframes - len(recent)
    extra: List[int] = []
    if older > 0 and random_older > 0:
        perm = torch.randperm(older, generator=generator)[:random_older]
        extra = sorted(int(i) for i in perm)
    return extra + recent
