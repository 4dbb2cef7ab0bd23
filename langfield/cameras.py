"""Cameras to look at a scene from when it carries none of its own: the held-out views of a
dataset folder, or views placed on a circle around the Gaussians (``langfield query
model.ply``). Both return :class:`langfield.field.FieldCamera` lists (OpenCV world-to-camera
``viewmat``, pixel-centre ``K``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from langfield.field import FieldCamera

__all__ = ["look_at", "intrinsics_from_fov", "orbit_cameras", "dataset_cameras"]

PathLike = Union[str, os.PathLike]


def look_at(eye, target, up) -> np.ndarray:
    """OpenCV world-to-camera ``[4, 4]`` of a camera at ``eye`` looking at ``target`` (+z
    forward, +y down in the image, ``up`` pointing up in the image)."""
    eye, target, up = (np.asarray(v, dtype=np.float64).reshape(3) for v in (eye, target, up))
    f = target - eye
    n = np.linalg.norm(f)
    if not n > 0:
        raise ValueError("look_at: the eye is at the target")
    f /= n
    r = np.cross(f, up)
    if np.linalg.norm(r) < 1e-9:  # looking along up: any right vector will do
        r = np.cross(f, np.array([1.0, 0.0, 0.0]) if abs(f[0]) < 0.9 else np.array([0.0, 1.0, 0.0]))
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    R = np.stack([r, d, f])
    m = np.eye(4)
    m[:3, :3] = R
    m[:3, 3] = -R @ eye
    return m


def intrinsics_from_fov(width: int, height: int, fov_deg: float = 60.0) -> np.ndarray:
    """Pinhole ``K`` with a horizontal field of view of ``fov_deg`` and square pixels."""
    if not 0 < fov_deg < 180:
        raise ValueError(f"field of view must be in (0, 180) degrees, got {fov_deg}")
    fx = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return np.array([[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]])


def orbit_cameras(means, weights=None, n: int = 6, width: int = 512, height: int = 512, fov_deg: float = 60.0,
                  elevation_deg: float = 30.0, up=None, margin: float = 1.15) -> List[FieldCamera]:
    """``n`` cameras on a circle above the scene, looking at its centre.

    The centre is the (``weights``-weighted, e.g. opacity) mean of the Gaussians' centres
    ``means [N, 3]``; the radius of the scene is the 90th percentile of their distances to
    it; ``up`` defaults to the axis along which the centres spread least (a scene's "height"
    for tabletops and rooms), signed towards the positive world axis it is closest to. The
    cameras sit at ``elevation_deg`` above the horizontal plane, far enough that a sphere of
    ``margin`` x the radius fits the (``fov_deg``, horizontal) view."""
    x = np.asarray(means.detach().cpu().numpy() if hasattr(means, "detach") else means, dtype=np.float64)
    x = x.reshape(-1, 3)
    ok = np.isfinite(x).all(1)
    if weights is not None:
        w = np.asarray(weights.detach().cpu().numpy() if hasattr(weights, "detach") else weights,
                       dtype=np.float64).reshape(-1)
        ok &= np.isfinite(w) & (w > 0)
    else:
        w = np.ones(len(x))
    if not ok.any():
        raise ValueError("no finite Gaussian centres to place cameras around")
    if n < 1:
        raise ValueError(f"need at least one camera, got n={n}")
    x, w = x[ok], w[ok] / w[ok].sum()
    c = (x * w[:, None]).sum(0)
    d = np.linalg.norm(x - c, axis=1)
    radius = float(np.quantile(d, 0.9)) if len(d) > 1 else 1.0
    radius = radius if radius > 1e-9 else 1.0
    if up is None:
        cov = ((x - c) * w[:, None]).T @ (x - c) if len(x) >= 3 else np.eye(3)
        evals, evecs = np.linalg.eigh(cov)
        up = evecs[:, 0]
        up = up * (1.0 if up[np.argmax(np.abs(up))] > 0 else -1.0)
    up = np.asarray(up, dtype=np.float64)
    up /= np.linalg.norm(up)
    a = np.cross(up, [1.0, 0.0, 0.0] if abs(up[0]) < 0.9 else [0.0, 1.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(up, a)
    fov = math.radians(min(fov_deg, fov_deg * height / width))
    dist = margin * radius / math.sin(fov / 2)
    el = math.radians(elevation_deg)
    K = intrinsics_from_fov(width, height, fov_deg)
    cams = []
    for i in range(n):
        t = 2 * math.pi * i / n
        eye = c + dist * (math.cos(el) * (math.cos(t) * a + math.sin(t) * b) + math.sin(el) * up)
        cams.append(FieldCamera(f"orbit_{i:02d}", look_at(eye, c, up), K.copy(), int(width), int(height), "test", i))
    return cams


def dataset_cameras(data: PathLike, *, normalize: bool = False, downscale: int = 1, test_every: int = 8,
                    splits: Sequence[str] = ("test",)) -> List[FieldCamera]:
    """The cameras of a dataset folder (no image is read), those of ``splits`` first (all of
    them when the dataset has none in these splits), in the dataset's own world frame
    (``normalize=False``, the frame ``langfield export`` writes PLYs in) or gsplat's
    normalised one (the frame of a run folder's checkpoints)."""
    from langfield.data import load_dataset

    ds = load_dataset(Path(data), downscale=downscale, normalize=normalize, test_every=test_every,
                      background=(1.0, 1.0, 1.0), cache_images=False)
    split_of = {}
    for sp in ("train", "test", "val"):
        for i in ds.indices(sp):
            split_of.setdefault(i, sp)
    cams = [FieldCamera(f.name, np.asarray(f.viewmat, dtype=np.float64), np.asarray(f.K, dtype=np.float64),
                        int(f.width), int(f.height), split_of.get(i, "train"), i) for i, f in enumerate(ds.frames)]
    chosen = [c for c in cams if c.split in splits]
    return chosen or cams


def orbit_for(gaussians, n: int = 6, size: Optional[Sequence[int]] = None, **kw) -> List[FieldCamera]:
    """:func:`orbit_cameras` around a :class:`langfield.scene.Gaussians` (weighted by opacity)."""
    import torch

    w = torch.sigmoid(gaussians.splats["opacities"].detach().reshape(-1))
    W, H = (512, 512) if size is None else (int(size[0]), int(size[1]))
    return orbit_cameras(gaussians.splats["means"].detach(), w, n=n, width=W, height=H, **kw)
