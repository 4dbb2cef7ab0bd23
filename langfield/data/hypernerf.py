"""HyperNeRF / Nerfies captures (time-stamped frames of one moving camera).

Layout (the format of google/hypernerf and google/nerfies, read natively):

* ``dataset.json``: ``ids`` (all frames), ``train_ids`` / ``val_ids`` (the split; without
  them every ``test_every``-th id is held out);
* ``metadata.json`` (optional): per id ``time_id`` (else ``warp_id``), ``appearance_id``,
  ``camera_id``; the time of a frame is its ``time_id`` mapped to [0, 1] over the dataset
  (``(t - min) / (max - min)``, raw value in ``frame.extras["time_raw"]``);
* ``camera/<id>.json``: ``orientation`` (3x3 world-to-camera rotation, rows = camera axes in
  world coordinates; camera axes x right, y down, z forward as OpenCV), ``position`` (camera
  centre in the world), ``focal_length``, ``principal_point``, ``skew``,
  ``pixel_aspect_ratio``, ``radial_distortion`` (k1 k2 k3), ``tangential_distortion`` (p1 p2),
  ``image_size`` (w h), all at the full (``1x``) resolution. Projection: normalised
  ``(x, y) = (X/Z, Y/Z)``, distorted with OpenCV's polynomial, then
  ``u = f x_d + skew y_d + c_x``, ``v = f * pixel_aspect_ratio * y_d + c_y``;
* ``rgb/{1x,2x,4x,...}/<id>.png``: ``downscale=N`` reads ``rgb/Nx`` where it exists, else
  resizes ``rgb/1x`` on the fly;
* ``scene.json`` (optional): ``center`` and ``scale`` (world -> ``(x - center) * scale``, as
  HyperNeRF does), ``near`` / ``far`` (kept in ``dataset.meta`` as stored);
* ``points.npy`` (optional, [N, 3] in the original world) for initialisation.

Distorted or skewed cameras are resampled to pinhole ones by the dataset's undistortion
(OPENCV / FULL_OPENCV with pycolmap, plus the skew term).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import numpy as np

from .base import (DatasetError, Distortion, Frame, MissingFileError, PointCloud, check_matrix, every_nth_split,
                   finalize, find_image_file, image_size, normalize_times, scaled_size, undistorted_camera)

__all__ = ["load_hypernerf", "is_hypernerf", "read_nerfies_camera", "nerfies_project"]


def is_hypernerf(root: Union[str, Path]) -> bool:
    root = Path(root)
    return (root / "dataset.json").is_file() and (root / "camera").is_dir()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise MissingFileError("not found", path)
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"not a UTF-8 text file ({e})", path) from None


def _vec(v, n: int, path: Path, name: str) -> np.ndarray:
    return check_matrix(v, (n,), path, name)


def _scalar(v, path: Path, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise DatasetError(f"must be a finite number, got {v!r}", path, name)
    return float(v)


def read_nerfies_camera(path: Union[str, Path]) -> Dict[str, Any]:
    """A ``camera/<id>.json`` as numpy values (errors name the file and field):
    ``orientation`` [3, 3], ``position`` [3], ``focal_length``, ``principal_point`` [2],
    ``skew``, ``pixel_aspect_ratio``, ``radial_distortion`` [3], ``tangential_distortion``
    [2], ``image_size`` (w, h)."""
    path = Path(path)
    c = _read_json(path)
    if not isinstance(c, dict):
        raise DatasetError("expected a JSON object", path)
    for key in ("orientation", "position", "focal_length", "principal_point", "image_size"):
        if key not in c:
            raise DatasetError("missing", path, key)
    out: Dict[str, Any] = {
        "orientation": check_matrix(c["orientation"], (3, 3), path, "orientation"),
        "position": _vec(c["position"], 3, path, "position"),
        "focal_length": _scalar(c["focal_length"], path, "focal_length"),
        "principal_point": _vec(c["principal_point"], 2, path, "principal_point"),
        "skew": _scalar(c.get("skew", 0.0), path, "skew"),
        "pixel_aspect_ratio": _scalar(c.get("pixel_aspect_ratio", 1.0), path, "pixel_aspect_ratio"),
    }
    rd = c.get("radial_distortion")
    rd = [0.0, 0.0, 0.0] if rd is None else rd
    if isinstance(rd, list) and len(rd) in (1, 2):
        rd = list(rd) + [0.0] * (3 - len(rd))
    out["radial_distortion"] = _vec(rd, 3, path, "radial_distortion")
    td = c.get("tangential_distortion")
    out["tangential_distortion"] = _vec([0.0, 0.0] if td is None else td, 2, path, "tangential_distortion")
    size = _vec(c["image_size"], 2, path, "image_size")
    if (size <= 0).any() or (size != np.round(size)).any():
        raise DatasetError(f"must be two positive whole numbers (width, height), got {c['image_size']!r}", path,
                           "image_size")
    out["image_size"] = (int(size[0]), int(size[1]))
    if out["focal_length"] <= 0 or out["pixel_aspect_ratio"] <= 0:
        raise DatasetError("focal_length and pixel_aspect_ratio must be positive", path, "focal_length")
    R = out["orientation"]
    if abs(abs(np.linalg.det(R)) - 1) > 1e-3 or np.abs(R @ R.T - np.eye(3)).max() > 1e-3:
        raise DatasetError("is not a rotation matrix", path, "orientation")
    return out


def nerfies_project(cam: Dict[str, Any], points: np.ndarray) -> np.ndarray:
    """Pixels [N, 2] (pixel centres at +0.5) of world points [N, 3] through a camera of
    :func:`read_nerfies_camera` (distortion included): the format's own projection."""
    local = (np.asarray(points, np.float64) - cam["position"]) @ cam["orientation"].T
    x, y = local[:, 0] / local[:, 2], local[:, 1] / local[:, 2]
    k1, k2, k3 = cam["radial_distortion"]
    p1, p2 = cam["tangential_distortion"]
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    f = cam["focal_length"]
    u = f * xd + cam["skew"] * yd + cam["principal_point"][0]
    v = f * cam["pixel_aspect_ratio"] * yd + cam["principal_point"][1]
    return np.stack([u, v], -1)


def _ids(v, path: Path, name: str) -> List[str]:
    if not isinstance(v, list) or not all(isinstance(x, (str, int)) for x in v):
        raise DatasetError("must be a list of frame ids", path, name)
    return [str(x) for x in v]


def load_hypernerf(path: Union[str, Path], *, downscale: int = 1, background: Sequence[float] = (1.0, 1.0, 1.0),
                   normalize: bool = True, test_every: int = 8, undistort: bool = True, load_points: bool = True,
                   cache_images: bool = False):
    """Load a HyperNeRF / Nerfies capture (see the module docstring). ``path``: the folder
    holding ``dataset.json``."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    dpath = root / "dataset.json"
    dmeta = _read_json(dpath)
    if not isinstance(dmeta, dict):
        raise DatasetError("expected a JSON object", dpath)
    if "train_ids" in dmeta or "val_ids" in dmeta:
        train = _ids(dmeta.get("train_ids", []), dpath, "train_ids")
        val = _ids(dmeta.get("val_ids", []), dpath, "val_ids")
        order = train + [i for i in val if i not in set(train)]
        split_of = {i: "train" for i in train}
        split_of.update({i: "test" for i in val if i not in split_of})
    elif "ids" in dmeta:
        order = _ids(dmeta["ids"], dpath, "ids")
        split_of = dict(zip(order, every_nth_split(len(order), test_every)))
    else:
        raise DatasetError("missing: needs train_ids / val_ids or ids", dpath, "ids")
    if not order:
        raise DatasetError("lists no frames", dpath, "train_ids")

    mpath = root / "metadata.json"
    meta: Dict[str, Any] = {}
    if mpath.is_file():
        meta = _read_json(mpath)
        if not isinstance(meta, dict):
            raise DatasetError("expected a JSON object (id -> time_id, warp_id, appearance_id, camera_id)", mpath)

    center = np.zeros(3)
    scale = 1.0
    spath = root / "scene.json"
    scene: Dict[str, Any] = {}
    if spath.is_file():
        scene = _read_json(spath)
        if not isinstance(scene, dict):
            raise DatasetError("expected a JSON object", spath)
        if "center" in scene:
            center = _vec(scene["center"], 3, spath, "center")
        if "scale" in scene:
            scale = _scalar(scene["scale"], spath, "scale")
            if scale <= 0:
                raise DatasetError(f"must be positive, got {scale}", spath, "scale")

    rgb_dir = root / "rgb"
    full_dir = rgb_dir / "1x"
    small_dir = rgb_dir / f"{downscale}x" if downscale > 1 else None
    if small_dir is not None and not small_dir.is_dir():
        small_dir = None
    if not full_dir.is_dir() and small_dir is None:
        have = sorted(p.name for p in rgb_dir.iterdir()) if rgb_dir.is_dir() else []
        raise MissingFileError(f"image folder not found (found rgb/{{{','.join(have)}}}; pass downscale=N to read "
                               f"rgb/Nx)" if have else "image folder not found", full_dir)

    frames: List[Frame] = []
    missing_time = 0
    for fid in order:
        cpath = root / "camera" / f"{fid}.json"
        cam = read_nerfies_camera(cpath)
        W, H = cam["image_size"]
        f = cam["focal_length"]
        K_full = np.array([[f, cam["skew"], cam["principal_point"][0]],
                           [0.0, f * cam["pixel_aspect_ratio"], cam["principal_point"][1]], [0, 0, 1.0]])
        file = find_image_file(small_dir / f"{fid}.png") if small_dir is not None else None
        if file is not None:
            w, h = image_size(file)
        else:
            file = find_image_file(full_dir / f"{fid}.png")
            if file is None:
                raise MissingFileError(f"image of frame {fid!r} not found", full_dir / f"{fid}.png")
            w, h = scaled_size(W, H, downscale) if downscale > 1 else (W, H)
        sx, sy = w / W, h / H
        K = K_full.copy()
        K[0] *= sx
        K[1] *= sy
        K[2] = [0, 0, 1]
        k1, k2, k3 = (float(v) for v in cam["radial_distortion"])
        p1, p2 = (float(v) for v in cam["tangential_distortion"])
        skew = float(K[0, 1])
        distortion = None
        Kp = np.array([[K[0, 0], 0, K[0, 2]], [0, K[1, 1], K[1, 2]], [0, 0, 1.0]])
        ow, oh = w, h
        if any(v != 0.0 for v in (k1, k2, k3, p1, p2)) or skew != 0.0:
            if not undistort:
                raise DatasetError("the camera has lens distortion or skew; load with undistort=True", cpath,
                                   "radial_distortion")
            base = (K[0, 0], K[1, 1], K[0, 2], K[1, 2])
            if k3 != 0.0:
                model, params = "FULL_OPENCV", base + (k1, k2, p1, p2, k3, 0.0, 0.0, 0.0)
            elif any(v != 0.0 for v in (k1, k2, p1, p2)):
                model, params = "OPENCV", base + (k1, k2, p1, p2)
            else:
                model, params = "PINHOLE", base
            if model != "PINHOLE":
                Kp, ow, oh = undistorted_camera(model, params, w, h, source=cpath)
            distortion = Distortion(model, tuple(float(v) for v in params), int(w), int(h), skew=skew)
        c2w = np.eye(4)
        c2w[:3, :3] = cam["orientation"].T
        c2w[:3, 3] = (cam["position"] - center) * scale
        m = meta.get(fid, {})
        if not isinstance(m, dict):
            raise DatasetError("must be an object", mpath, fid)
        t = m.get("time_id", m.get("warp_id"))
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t)):
            raise DatasetError(f"must be a number, got {t!r}", mpath, f"{fid}.time_id")
        if t is None:
            missing_time += 1
        extras = {k: m[k] for k in ("time_id", "warp_id", "appearance_id", "camera_id") if k in m}
        frames.append(Frame(image_path=file, width=int(ow), height=int(oh), K=Kp, camtoworld=c2w,
                            split=split_of[fid], name=fid, time=None if t is None else float(t),
                            camera_id=int(m.get("camera_id", 0)) if isinstance(m.get("camera_id", 0), int) else 0,
                            distortion=distortion, extras=extras))
    if missing_time == len(frames):  # no metadata: the ids' order is the time order
        frames = [replace(fr, time=float(k)) for k, fr in enumerate(frames)]
    frames, time_meta = normalize_times(frames, mpath)

    points = None
    ppath = root / "points.npy"
    if load_points and ppath.is_file():
        try:
            xyz = np.load(ppath, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DatasetError(f"cannot read points ({e})", ppath) from None
        if xyz.ndim != 2 or xyz.shape[1] != 3 or not np.issubdtype(xyz.dtype, np.number):
            raise DatasetError(f"must be a numeric [N, 3] array, got shape {list(xyz.shape)}", ppath)
        xyz = xyz.astype(np.float64)
        xyz = xyz[np.isfinite(xyz).all(1)]
        if len(xyz):
            points = PointCloud(((xyz - center) * scale).astype(np.float32), None)
    out_meta: Dict[str, Any] = {"downscale": downscale, "scene_center": center.tolist(), "scene_scale_factor": scale}
    for k in ("near", "far"):
        if k in scene:
            out_meta[k] = _scalar(scene[k], spath, k)
    out_meta.update(time_meta)
    return finalize(frames, root=root, format="hypernerf", points=points, normalize=normalize, background=background,
                    meta=out_meta, cache_images=cache_images)
