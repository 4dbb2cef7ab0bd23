"""Writers for the dataset formats langfield's loaders read.

Cameras come in OpenCV convention: world-to-camera ``viewmat`` 4x4 and ``K`` 3x3.

* nerfstudio ``transforms.json``: ``transform_matrix`` is camera-to-world in the OpenGL
  convention (camera y and z axes flipped), intrinsics ``fl_x fl_y cx cy w h`` (+
  ``camera_angle_x``), ``camera_model: OPENCV`` without distortion; per frame
  ``depth_file_path`` (float32 .npy z-depth in metres, ``depth_unit_scale_factor: 1.0``),
  ``instance_path`` and ``label_paths`` (uint16 PNG label ids per level), ``time`` for
  dynamic scenes; top-level ``train_filenames`` / ``val_filenames`` / ``test_filenames``
  and ``ply_file_path``.
* D-NeRF ``transforms_{train,val,test}.json``: ``camera_angle_x`` and frames of
  ``file_path`` (without extension, ``.png`` implied), ``time`` in [0, 1],
  ``transform_matrix`` (OpenGL camera-to-world); intrinsics in ``fl_x ... h`` too.
* TUM RGB-D: ``rgb/<ts>.png``, ``depth/<ts>.png`` (uint16, metres x 5000, 0 = invalid),
  ``rgb.txt`` / ``depth.txt`` (``timestamp path``), ``groundtruth.txt`` (``timestamp tx
  ty tz qx qy qz qw``, camera-to-world, OpenCV camera axes as in TUM), ``associations.txt``
  (``ts rgb ts depth``) and ``cameras.json`` (``fx fy cx cy w h depth_scale``).
* Replica (NICE-SLAM layout): ``results/frame%06d.jpg``, ``results/depth%06d.png``
  (uint16, metres x 6553.5), ``traj.txt`` (one row-major camera-to-world 4x4 per line,
  OpenCV axes) and ``cam_params.json`` (``{"camera": {w h fx fy cx cy scale}}``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from langfield.maths import rot_to_quat_xyzw

TUM_DEPTH_SCALE = 5000.0
REPLICA_DEPTH_SCALE = 6553.5
GL_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


def c2w_opengl(viewmat) -> np.ndarray:
    """OpenCV world-to-camera -> OpenGL camera-to-world (nerfstudio, Blender, D-NeRF)."""
    return np.linalg.inv(np.asarray(viewmat, dtype=np.float64)) @ GL_FLIP


rot_to_quat = rot_to_quat_xyzw  # 3x3 -> (qx, qy, qz, qw), qw >= 0 (langfield.maths)


def save_rgb(path, rgb, quality: Optional[int] = None) -> None:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    if quality is not None:
        Image.fromarray(arr).save(path, quality=quality)
    else:
        Image.fromarray(arr).save(path, compress_level=3)


def save_u16(path, arr) -> None:
    arr = np.ascontiguousarray(np.asarray(arr, dtype=np.uint16))
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=3)


def depth_to_u16(depth, scale: float) -> np.ndarray:
    """Metres -> uint16 ``round(z * scale)``; 0 where there is no surface or out of range."""
    d = np.asarray(depth, dtype=np.float64) * scale
    out = np.round(d)
    out[(d <= 0) | (out > 65535)] = 0
    return out.astype(np.uint16)


def write_json(path, obj, indent: Optional[int] = 1) -> None:
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def intrinsics_dict(K, w: int, h: int) -> Dict[str, float]:
    K = np.asarray(K, dtype=np.float64)
    return {"fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]),
            "w": int(w), "h": int(h), "camera_angle_x": float(2 * math.atan(w / (2 * K[0, 0]))),
            "camera_angle_y": float(2 * math.atan(h / (2 * K[1, 1])))}


def write_nerfstudio(out: Path, frames: List[dict], K, w: int, h: int, ply: Optional[str] = None,
                     extra: Optional[dict] = None) -> Path:
    """``frames``: dicts with name, viewmat, split, file_path, depth_file_path, instance_path,
    label_paths and optional time / camera index."""
    meta = {"camera_model": "OPENCV", **intrinsics_dict(K, w, h), "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
            "depth_unit_scale_factor": 1.0}
    if ply:
        meta["ply_file_path"] = ply
    has_val = any(f["split"] == "val" for f in frames)  # else val = test
    for split in ("train", "val", "test"):
        want = "test" if split == "val" and not has_val else split
        meta[f"{split}_filenames"] = [f["file_path"] for f in frames if f["split"] == want]
    meta.update(extra or {})
    meta["frames"] = []
    for f in frames:
        fr = {"file_path": f["file_path"], "transform_matrix": c2w_opengl(f["viewmat"]).tolist(),
              "depth_file_path": f["depth_file_path"], "instance_path": f["instance_path"],
              "label_paths": f["label_paths"], "split": f["split"]}
        if f.get("time") is not None:
            fr["time"] = float(f["time"])
        if f.get("camera") is not None:
            fr["camera"] = int(f["camera"])
        meta["frames"].append(fr)
    path = Path(out) / "transforms.json"
    write_json(path, meta, indent=1)
    return path


def write_dnerf(out: Path, frames: List[dict], K, w: int, h: int) -> List[Path]:
    """D-NeRF / Blender style ``transforms_{train,val,test}.json`` with per-frame ``time``."""
    paths = []
    intr = intrinsics_dict(K, w, h)
    has_val = any(f["split"] == "val" for f in frames)  # else val = test
    for split in ("train", "val", "test"):
        want = "test" if split == "val" and not has_val else split
        meta = {"camera_angle_x": intr["camera_angle_x"], **{k: v for k, v in intr.items() if k != "camera_angle_x"},
                "frames": []}
        for f in frames:
            if f["split"] != want:
                continue
            stem = os.path.splitext(f["file_path"])[0]
            meta["frames"].append({"file_path": "./" + stem, "rotation": 0.0, "time": float(f.get("time") or 0.0),
                                   "transform_matrix": c2w_opengl(f["viewmat"]).tolist()})
        p = Path(out) / f"transforms_{split}.json"
        write_json(p, meta, indent=1)
        paths.append(p)
    return paths


def tum_timestamp(i: int, fps: float = 30.0, start: float = 1000.0) -> str:
    return f"{start + i / fps:.6f}"


def write_tum(out: Path, frames: List[dict], images: Sequence[np.ndarray], depths: Sequence[np.ndarray], K,
              w: int, h: int, fps: float = 30.0) -> Path:
    """TUM RGB-D layout (see the module docstring)."""
    out = Path(out)
    rgb_lines, depth_lines, gt_lines, assoc = [], [], [], []
    for i, (f, img, dep) in enumerate(zip(frames, images, depths)):
        ts = tum_timestamp(i, fps)
        save_rgb(out / "rgb" / f"{ts}.png", img)
        save_u16(out / "depth" / f"{ts}.png", depth_to_u16(dep, TUM_DEPTH_SCALE))
        c2w = np.linalg.inv(np.asarray(f["viewmat"], dtype=np.float64))
        q = rot_to_quat(c2w[:3, :3])
        t = c2w[:3, 3]
        rgb_lines.append(f"{ts} rgb/{ts}.png")
        depth_lines.append(f"{ts} depth/{ts}.png")
        gt_lines.append(f"{ts} " + " ".join(f"{v:.9f}" for v in (*t, *q)))
        assoc.append(f"{ts} rgb/{ts}.png {ts} depth/{ts}.png")
    head = "# langfield procedural scene\n# timestamp filename\n"
    (out / "rgb.txt").write_text("# color images\n" + head + "\n".join(rgb_lines) + "\n")
    (out / "depth.txt").write_text("# depth maps (uint16, metres x 5000)\n" + head + "\n".join(depth_lines) + "\n")
    (out / "groundtruth.txt").write_text("# ground truth trajectory (camera-to-world)\n# langfield procedural scene\n"
                                         "# timestamp tx ty tz qx qy qz qw\n" + "\n".join(gt_lines) + "\n")
    (out / "associations.txt").write_text("\n".join(assoc) + "\n")
    K = np.asarray(K, dtype=np.float64)
    write_json(out / "cameras.json", {"fx": float(K[0, 0]), "fy": float(K[1, 1]), "cx": float(K[0, 2]),
                                      "cy": float(K[1, 2]), "w": int(w), "h": int(h), "depth_scale": TUM_DEPTH_SCALE,
                                      "fps": fps})
    return out


def write_replica(out: Path, frames: List[dict], images: Sequence[np.ndarray], depths: Sequence[np.ndarray], K,
                  w: int, h: int) -> Path:
    """Replica layout as NICE-SLAM / SplaTAM / MonoGS read it (see the module docstring)."""
    out = Path(out)
    lines = []
    for i, (f, img, dep) in enumerate(zip(frames, images, depths)):
        save_rgb(out / "results" / f"frame{i:06d}.jpg", img, quality=95)
        save_u16(out / "results" / f"depth{i:06d}.png", depth_to_u16(dep, REPLICA_DEPTH_SCALE))
        c2w = np.linalg.inv(np.asarray(f["viewmat"], dtype=np.float64))
        lines.append(" ".join(repr(float(v)) for v in c2w.reshape(-1)))
    (out / "traj.txt").write_text("\n".join(lines) + "\n")
    K = np.asarray(K, dtype=np.float64)
    write_json(out / "cam_params.json", {"camera": {"w": int(w), "h": int(h), "fx": float(K[0, 0]), "fy": float(K[1, 1]),
                                                    "cx": float(K[0, 2]), "cy": float(K[1, 2]),
                                                    "scale": REPLICA_DEPTH_SCALE}})
    return out


#: Kinect-like sensor model used by ``make_scene(..., noise=True)`` (``--noise``): axial noise
#: sigma(z) = sigma0 + sigma2 * (z - z0)^2 metres (Nguyen, Izadi, Lovell 2012, Kinect v1),
#: no depth nearer than ``min_depth`` or beyond ``max_depth``, holes at depth discontinuities
#: (second difference of inverse depth along a row or column above ``edge_jump`` times the
#: pixel's inverse depth, or a neighbour with no surface: dropped with probability ``edge_drop``) and on dark surfaces (luminance below
#: ``dark_level`` in [0, 1]: dropped with probability ``dark_drop * (1 - lum / dark_level)``).
KINECT_NOISE = {"sigma0": 0.0012, "sigma2": 0.0019, "z0": 0.4, "min_depth": 0.4, "max_depth": 8.0,
                "edge_jump": 0.05, "edge_drop": 0.85, "dark_level": 0.12, "dark_drop": 0.9}


def kinect_sigma(z, params: Optional[dict] = None):
    """Axial depth noise standard deviation (metres) of the sensor model at depth ``z``."""
    p = {**KINECT_NOISE, **(params or {})}
    return p["sigma0"] + p["sigma2"] * (np.asarray(z, dtype=np.float64) - p["z0"]) ** 2


def sensor_depth(depth, rgb, rng: np.random.Generator, params: Optional[dict] = None) -> np.ndarray:
    """Kinect-like measured depth (float32 metres, 0 = missing) from an exact z-depth map
    [H, W] and the colour it was rendered with ([H, W, 3] uint8 or float in [0, 1]); see
    :data:`KINECT_NOISE`. Deterministic for a given ``rng`` state (every random draw is made
    for every pixel, in a fixed order)."""
    p = {**KINECT_NOISE, **(params or {})}
    z = np.asarray(depth, dtype=np.float64)
    h, w = z.shape
    gauss = rng.standard_normal((h, w))
    u_edge = rng.random((h, w))
    u_dark = rng.random((h, w))
    valid = z > 0
    # depth discontinuities: second differences of inverse depth (zero on any plane, however
    # slanted), relative to the pixel's inverse depth, along rows or columns; or a neighbour
    # without a surface
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.pad(np.where(valid, 1.0 / np.where(valid, z, 1.0), np.nan), 1, mode="edge")
        c0 = inv[1:-1, 1:-1]
        d2 = np.maximum(np.abs(inv[1:-1, :-2] + inv[1:-1, 2:] - 2 * c0), np.abs(inv[:-2, 1:-1] + inv[2:, 1:-1] - 2 * c0))
        jump = d2 / c0
    edge = valid & (np.isnan(jump) | (jump > p["edge_jump"]))
    c = np.asarray(rgb)
    c = c.astype(np.float64) / 255.0 if c.dtype == np.uint8 else c.astype(np.float64)
    lum = c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114
    p_dark = p["dark_drop"] * np.clip(1.0 - lum / p["dark_level"], 0.0, 1.0)
    out = z + gauss * kinect_sigma(z, p)
    drop = ~valid | (z < p["min_depth"]) | (z > p["max_depth"]) | (edge & (u_edge < p["edge_drop"])) | (u_dark < p_dark)
    out[drop | (out <= 0)] = 0.0
    return out.astype(np.float32)


def write_points_ply(path, xyz, rgb) -> None:
    """Binary little-endian PLY with ``x y z`` (float) and ``red green blue`` (uchar)."""
    xyz = np.asarray(xyz, dtype=np.float32)
    rgb = np.asarray(rgb, dtype=np.uint8)
    v = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    v["x"], v["y"], v["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    v["red"], v["green"], v["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(v)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(v.tobytes())


def slug(text: str) -> str:
    s = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    while "__" in s:
        s = s.replace("__", "_")
    return s or "query"
