"""Camera paths. Everything in OpenCV convention (x right, y down, z forward) with
world-to-camera 4x4 ``viewmats`` [N,4,4] and intrinsics ``Ks`` [N,3,3] (float64 numpy),
like gsplat. World is z up. All randomness comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from langfield.scenes.model import euler_matrix

UP = np.array([0.0, 0.0, 1.0])


def intrinsics(width: int, height: int, fov_x_deg: float = 60.0) -> np.ndarray:
    """Pinhole K with square pixels and the principal point at the image centre."""
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return np.array([[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]])


def look_at(eye: Sequence[float], target: Sequence[float], up: Sequence[float] = UP) -> np.ndarray:
    """World-to-camera 4x4 (OpenCV) for a camera at ``eye`` looking at ``target``."""
    eye = np.asarray(eye, dtype=np.float64)
    f = np.asarray(target, dtype=np.float64) - eye
    f /= np.linalg.norm(f)
    r = np.cross(f, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(r) < 1e-9:  # looking straight up/down
        r = np.cross(f, np.array([0.0, 1.0, 0.0]))
    r /= np.linalg.norm(r)
    dn = np.cross(f, r)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = r, dn, f, eye
    return np.linalg.inv(c2w)


def _spherical(center, radius, azim, elev):
    return np.asarray(center, dtype=np.float64) + radius * np.array(
        [math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim), math.sin(elev)]
    )


def orbit(center, radius: float, n: int, elevation_deg: float = 30.0, start_deg: float = 0.0) -> np.ndarray:
    """``n`` cameras evenly spaced on a circle around ``center`` looking at it."""
    return np.stack([
        look_at(_spherical(center, radius, math.radians(start_deg) + 2 * math.pi * i / n, math.radians(elevation_deg)), center)
        for i in range(n)
    ])


def hemisphere(center, radius: float, n: int, seed: int = 0, min_elev_deg: float = 12.0,
               max_elev_deg: float = 65.0, radius_jitter: float = 0.1, target_jitter: float = 0.05) -> np.ndarray:
    """``n`` cameras spread evenly over a band of the upper hemisphere (Fibonacci spiral),
    with seeded jitter of distance and look-at point."""
    rng = np.random.default_rng(seed)
    golden = math.pi * (3 - math.sqrt(5))
    zlo, zhi = math.sin(math.radians(min_elev_deg)), math.sin(math.radians(max_elev_deg))
    phase = rng.uniform(0, 2 * math.pi)
    out = []
    for i in range(n):
        z = zlo + (zhi - zlo) * (i + 0.5) / n
        elev = math.asin(z)
        azim = phase + golden * i
        rr = radius * (1 + radius_jitter * rng.uniform(-1, 1))
        tgt = np.asarray(center, dtype=np.float64) + target_jitter * radius * rng.uniform(-1, 1, 3) * np.array([1, 1, 0.5])
        out.append(look_at(_spherical(center, rr, azim, elev), tgt))
    return np.stack(out)


def _smooth_noise(rng, n: int, dims: int, fps: float, freqs=(0.3, 0.9, 2.3, 5.1), amps=(1.0, 0.5, 0.25, 0.12)):
    """Sum of sinusoids with random phases: low-frequency sway plus hand tremor."""
    t = np.arange(n) / fps
    out = np.zeros((n, dims))
    for f, a in zip(freqs, amps):
        fr = f * rng.uniform(0.8, 1.25, dims)
        ph = rng.uniform(0, 2 * math.pi, dims)
        out += a * np.sin(2 * math.pi * fr[None] * t[:, None] + ph[None])
    return out / sum(amps)


def handheld(room: Sequence[float], n: int, seed: int = 0, fps: float = 30.0, height: float = 1.45,
             margin: float = 0.9, pos_jitter: float = 0.02, rot_jitter_deg: float = 1.0,
             coverage: Optional[float] = None) -> np.ndarray:
    """A smooth hand-held walk through a room ``(xmin, ymin, xmax, ymax, zmin, zmax)``.

    The camera follows an ellipse ``margin`` metres inside the walls at about ``height``,
    looking inwards and slightly down with a slow yaw sweep, plus seeded hand jitter:
    ``pos_jitter`` metres and ``rot_jitter_deg`` degrees, band-limited (0.3-5 Hz at ``fps``).
    ``coverage``: fraction of the loop walked (default ``clip(n / 300, 0.25, 1)``, i.e.
    about 2 cm and 1.2 degrees per frame, an RGB-D-like speed).
    """
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1, z0, _ = room
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ax, ay = max((x1 - x0) / 2 - margin, 0.2), max((y1 - y0) / 2 - margin, 0.2)
    cov = float(np.clip(n / 300.0, 0.25, 1.0)) if coverage is None else coverage
    start = rng.uniform(0, 2 * math.pi)
    s = start + 2 * math.pi * cov * np.arange(n) / max(n, 1)
    pj = _smooth_noise(rng, n, 3, fps) * pos_jitter
    rj = np.radians(_smooth_noise(rng, n, 3, fps) * rot_jitter_deg)
    sway = _smooth_noise(rng, n, 2, fps, freqs=(0.05, 0.13), amps=(1.0, 0.5))
    out = []
    for i in range(n):
        eye = np.array([cx + ax * math.cos(s[i]), cy + ay * math.sin(s[i]), z0 + height]) + pj[i]
        eye[2] += 0.03 * math.sin(2 * math.pi * 1.8 * i / fps)  # walking bob
        # look towards the far side of the room: inwards, swept left/right, tilted down
        inward = math.atan2(cy - eye[1], cx - eye[0])
        yaw = inward + math.radians(35) * sway[i, 0]
        pitch = math.radians(-18 + 8 * sway[i, 1])
        fwd = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])
        w2c = look_at(eye, eye + fwd)
        c2w = np.linalg.inv(w2c)
        c2w[:3, :3] = c2w[:3, :3] @ euler_matrix(np.degrees(rj[i]))
        out.append(np.linalg.inv(c2w))
    return np.stack(out)


def dynamic_cameras(center, radius: float, frames: int, views: int, mode: str = "orbit",
                    seed: int = 0, elevation_deg: float = 25.0) -> Tuple[np.ndarray, np.ndarray]:
    """Cameras over a time range. Returns (viewmats [F*V',4,4], frame index per camera).

    ``orbit``: one moving camera (monocular, HyperNeRF-like) circling half-way round the
    scene over the time range with a gentle elevation sway; ``static``: ``views`` fixed
    cameras on a frontal arc (Neu3D-like), each rendering every frame.
    """
    rng = np.random.default_rng(seed)
    if mode == "orbit":
        start = rng.uniform(0, 2 * math.pi)
        mats = []
        for i in range(frames):
            u = i / max(frames - 1, 1)
            az = start + math.pi * u
            el = math.radians(elevation_deg + 8 * math.sin(2 * math.pi * u))
            mats.append(look_at(_spherical(center, radius, az, el), center))
        return np.stack(mats), np.arange(frames)
    if mode == "static":
        start = rng.uniform(0, 2 * math.pi)
        fixed = [look_at(_spherical(center, radius, start + math.radians(100) * (j / max(views - 1, 1) - 0.5),
                                    math.radians(elevation_deg)), center) for j in range(views)]
        mats = [fixed[j] for i in range(frames) for j in range(views)]
        idx = [i for i in range(frames) for _ in range(views)]
        return np.stack(mats), np.asarray(idx)
    raise ValueError(f"unknown camera mode {mode!r}: use 'orbit' or 'static'")
