"""nerfstudio ``transforms.json`` datasets, read natively (nerfstudio itself is not a dependency).

Read: intrinsics ``fl_x fl_y cx cy w h`` at the top level or per frame (``fl_y`` defaults to
``fl_x``, ``cx``/``cy`` to the image centre, ``w``/``h`` to the image size; ``camera_angle_x``
stands in for a missing ``fl_x``); ``camera_model`` ``OPENCV`` (distortion ``k1 k2 k3 p1 p2``; also
``PINHOLE``, ``SIMPLE_PINHOLE``, ``SIMPLE_RADIAL``, ``RADIAL``, which nerfstudio reads the same way)
or ``OPENCV_FISHEYE`` (``k1..k4``), undistorted with pycolmap's camera models;
``file_path`` (relative to the folder, or absolute; without an extension, or with another
letter case, the image file that matches is used); ``transform_matrix`` (camera-to-world,
4x4 or 3x4, OpenGL axes -> OpenCV by flipping the y and z columns; a rotation part that is
not orthonormal is replaced by the nearest rotation); ``applied_transform`` (3x4: the
transform nerfstudio already applied to the world; kept as ``dataset.applied_transform``);
``ply_file_path`` (points for initialisation, in the same world as the cameras);
``mask_path``; ``depth_file_path`` (.npy, or 16-bit PNG, times ``depth_unit_scale_factor``,
default 1e-3 as in nerfstudio); ``time``; ``train_filenames`` / ``val_filenames`` /
``test_filenames`` (matched to the frames by file, however the paths are spelt; else a
per-frame ``split``, else every ``test_every``-th frame held out). Other per-frame keys are kept in
``frame.extras``.

``downscale=N`` reads ``images_N/...`` (the first folder of ``file_path`` with ``_N``)
where it exists, else resizes on the fly.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from .base import (GL_TO_CV, DatasetError, Distortion, Frame, ImageReadError, MissingFileError, PointCloud, check_matrix,
                   downscaled_folder, every_nth_split, finalize, find_image_file, fov_to_focal, image_size, inside_root,
                   normalize_times, pose_matrix, scale_K, scaled_size, undistorted_camera, warn_poses)

__all__ = ["load_nerfstudio", "read_transforms_json"]

_INTR = ("fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "k3", "k4", "p1", "p2", "camera_model", "camera_angle_x",
         "camera_angle_y")
_FRAME_KEYS = set(_INTR) | {"file_path", "transform_matrix", "mask_path", "depth_file_path", "time", "split"}


def read_transforms_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise MissingFileError("not found", path)
    try:
        meta = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"not a UTF-8 text file ({e})", path) from None
    if not isinstance(meta, dict):
        raise DatasetError(f"expected a JSON object, got {type(meta).__name__}", path)
    return meta


def json_number(v, path, field_name) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DatasetError(f"must be a finite number, got {v!r}", path, field_name)
    return float(v)


def json_size(v, path, field_name) -> int:
    """A declared image width or height: a positive whole number of pixels."""
    x = json_number(v, path, field_name)
    if x <= 0 or x != int(x):
        raise DatasetError(f"must be a positive whole number of pixels, got {v!r}", path, field_name)
    return int(x)


def frame_file_path(fr, i: int, jpath) -> str:
    """``frames[i].file_path`` of a transforms.json, validated (errors name the file and field)."""
    where = f"frames[{i}]"
    if not isinstance(fr, dict):
        raise DatasetError("must be an object", jpath, where)
    fp = fr.get("file_path")
    if not isinstance(fp, str) or not fp:
        raise DatasetError("missing or not a string", jpath, f"{where}.file_path")
    return fp


def norm_rel(p: str) -> str:
    return os.path.normpath(str(p)).replace("\\", "/")


def _resolve(root: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


def _abs(p: Union[str, Path]) -> str:
    """An absolute normalised path (split lists match ``file_path`` by it; Windows separators
    read as ``/``)."""
    return os.path.abspath(str(p).replace("\\", "/"))


def load_nerfstudio(path: Union[str, Path], *, downscale: int = 1, test_every: int = 8, normalize: bool = True,
                    background: Sequence[float] = (1.0, 1.0, 1.0), undistort: bool = True, load_points: bool = True,
                    cache_images: bool = False, allow_outside: bool = False):
    """Load a nerfstudio dataset (see the module docstring). ``path``: the folder holding
    ``transforms.json`` or the JSON file itself. Files listed outside the folder (``..`` or an
    absolute path elsewhere) are refused unless ``allow_outside``. An image whose size differs
    from the declared ``w``/``h`` with the same aspect ratio gets its intrinsics scaled (one
    warning); another aspect ratio is refused. Times outside [0, 1] are rescaled to [0, 1]
    (the raw value kept in ``frame.extras["time_raw"]``)."""
    path = Path(path)
    jpath = path if path.suffix == ".json" else path / "transforms.json"
    root = jpath.parent
    meta = read_transforms_json(jpath)
    frames_meta = meta.get("frames")
    if frames_meta is None:
        raise DatasetError("missing (the list of posed images)", jpath, "frames")
    if not isinstance(frames_meta, list) or not frames_meta:
        raise DatasetError("must be a non-empty list", jpath, "frames")

    def split_set(key):
        v = meta.get(key)
        if v is None:
            return None
        if not isinstance(v, list):
            raise DatasetError("must be a list of file paths", jpath, key)
        if not all(isinstance(x, str) for x in v):
            raise DatasetError("must be a list of file paths (strings)", jpath, key)
        return {_abs(_resolve(root, x)) for x in v}

    train_set, val_set, test_set = split_set("train_filenames"), split_set("val_filenames"), split_set("test_filenames")
    has_lists = any(s is not None for s in (train_set, val_set, test_set))
    depth_unit = json_number(meta.get("depth_unit_scale_factor", 1e-3), jpath, "depth_unit_scale_factor")

    frames: List[Frame] = []
    rescaled: List[str] = []
    poses: List[Tuple[np.ndarray, float]] = []
    fallback_splits = every_nth_split(len(frames_meta), test_every)
    for i, fr in enumerate(frames_meta):
        where = f"frames[{i}]"
        fp = frame_file_path(fr, i, jpath)

        def get(key, default=None):
            return fr[key] if key in fr else meta.get(key, default)

        def fld(key):
            return f"{where}.{key}" if key in fr else key

        inside_root(root, _resolve(root, fp.replace("\\", "/")), jpath, f"{where}.file_path", allow_outside, fp)
        img = find_image_file(_resolve(root, fp))
        if img is None:
            raise MissingFileError(f"image of {where} not found (file_path {fp!r} in {jpath})", _resolve(root, fp))
        if "transform_matrix" not in fr:
            raise DatasetError(f"missing (camera-to-world pose of {fp})", jpath, f"{where}.transform_matrix")
        c2w_gl, dev = pose_matrix(fr["transform_matrix"], jpath, f"{where}.transform_matrix")
        poses.append((c2w_gl, dev))
        c2w = c2w_gl @ GL_TO_CV
        img_rel = os.path.relpath(_abs(img), _abs(root))
        if img_rel == ".." or img_rel.startswith(".." + os.sep):  # an absolute file_path outside the folder
            img_rel = None

        # full-resolution size
        w_full, h_full = get("w"), get("h")
        try:
            iw, ih = image_size(img)
        except ImageReadError:
            if w_full is None or h_full is None:
                raise
            iw = ih = None  # undecodable: reported by Dataset.verify_images or on first use
        w_full = iw if w_full is None else w_full
        h_full = ih if h_full is None else h_full
        W = json_size(w_full, jpath, fld("w"))
        H = json_size(h_full, jpath, fld("h"))
        if iw is None:
            iw, ih = W, H
        if get("fl_x") is not None:
            fx = json_number(get("fl_x"), jpath, fld("fl_x"))
        elif get("camera_angle_x") is not None:
            fx = fov_to_focal(json_number(get("camera_angle_x"), jpath, fld("camera_angle_x")), W)
        else:
            raise DatasetError("missing: no focal length for this frame (need fl_x at the top level or per frame, "
                               "or camera_angle_x)", jpath, f"{where}.fl_x")
        if get("fl_y") is not None:
            fy = json_number(get("fl_y"), jpath, fld("fl_y"))
        elif get("camera_angle_y") is not None:
            fy = fov_to_focal(json_number(get("camera_angle_y"), jpath, fld("camera_angle_y")), H)
        else:
            fy = fx
        cx = json_number(get("cx", W / 2.0), jpath, fld("cx"))
        cy = json_number(get("cy", H / 2.0), jpath, fld("cy"))
        if fx <= 0 or fy <= 0:
            raise DatasetError(f"focal length must be positive, got fl_x={fx}, fl_y={fy}", jpath, fld("fl_x"))
        K_full = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        if (iw, ih) != (W, H):
            if abs(iw / ih - W / H) > 0.01 * (W / H):
                raise DatasetError(f"image is {iw}x{ih} but {jpath} declares {W}x{H} for it ({fld('w')}, "
                                   f"{fld('h')}); the aspect ratios differ, so the intrinsics cannot be scaled", img)
            rescaled.append(f"{img.name} is {iw}x{ih}, declared {W}x{H}")
            K_full = scale_K(K_full, iw / W, ih / H)
            W, H = iw, ih

        # file and loaded size
        file = img
        small = downscaled_folder(root, img_rel, downscale) if img_rel is not None else None
        if small is not None:
            file = small
            w, h = image_size(small)
        else:
            w, h = scaled_size(W, H, downscale) if downscale > 1 else (W, H)
        K = scale_K(K_full, w / W, h / H)

        model = str(get("camera_model", "OPENCV")).upper()
        dk = {k: json_number(get(k, 0.0), jpath, fld(k)) for k in ("k1", "k2", "k3", "k4", "p1", "p2")}
        dist = None
        if model in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "PERSPECTIVE", "SIMPLE_RADIAL", "RADIAL"):
            if dk["k4"] != 0.0:
                raise DatasetError("k4 on a perspective (OPENCV) camera is not supported", jpath, fld("k4"))
            if any(dk[k] != 0.0 for k in ("k1", "k2", "k3", "p1", "p2")):
                if dk["k3"] != 0.0:
                    cmodel = "FULL_OPENCV"
                    params = (K[0, 0], K[1, 1], K[0, 2], K[1, 2], dk["k1"], dk["k2"], dk["p1"], dk["p2"], dk["k3"],
                              0.0, 0.0, 0.0)
                else:
                    cmodel = "OPENCV"
                    params = (K[0, 0], K[1, 1], K[0, 2], K[1, 2], dk["k1"], dk["k2"], dk["p1"], dk["p2"])
                dist = (cmodel, params)
        elif model == "OPENCV_FISHEYE":
            dist = ("OPENCV_FISHEYE", (K[0, 0], K[1, 1], K[0, 2], K[1, 2], dk["k1"], dk["k2"], dk["k3"], dk["k4"]))
        else:
            raise DatasetError(f"camera model {model!r} is not supported (OPENCV, OPENCV_FISHEYE and pinhole are)",
                               jpath, fld("camera_model"))
        distortion = None
        ow, oh = w, h
        if dist is not None:
            if not undistort:
                raise DatasetError(f"{fp} has lens distortion; load with undistort=True", jpath, fld("camera_model"))
            K, ow, oh = undistorted_camera(dist[0], dist[1], w, h, source=jpath)
            distortion = Distortion(dist[0], tuple(float(v) for v in dist[1]), int(w), int(h))

        mask = fr.get("mask_path")
        mask_path = None
        if mask is not None:
            if not isinstance(mask, str):
                raise DatasetError("must be a file path", jpath, f"{where}.mask_path")
            mask_path = inside_root(root, _resolve(root, mask), jpath, f"{where}.mask_path", allow_outside, mask)
            if not mask_path.is_file():
                raise MissingFileError(f"mask of {where} not found (mask_path {mask!r} in {jpath})", mask_path)
        depth = fr.get("depth_file_path")
        depth_path = None
        if depth is not None:
            if not isinstance(depth, str):
                raise DatasetError("must be a file path", jpath, f"{where}.depth_file_path")
            depth_path = inside_root(root, _resolve(root, depth), jpath, f"{where}.depth_file_path", allow_outside,
                                     depth)
            if not depth_path.is_file():
                raise MissingFileError(f"depth map of {where} not found (depth_file_path {depth!r} in {jpath})",
                                       depth_path)
        t = fr.get("time")
        if t is not None:
            t = json_number(t, jpath, f"{where}.time")

        rel = norm_rel(img_rel if Path(fp).is_absolute() and img_rel is not None else fp)
        keys = {_abs(_resolve(root, fp)), _abs(img)}
        if has_lists:
            if test_set is not None and keys & test_set:
                split = "test"
            elif val_set is not None and keys & val_set:
                split = "test" if test_set is None else "val"
            elif train_set is not None and keys & train_set:
                split = "train"
            else:
                split = "test" if train_set is not None else "train"
        elif fr.get("split") in ("train", "val", "test"):
            split = fr["split"]
        else:
            split = fallback_splits[i]
        extras = {k: v for k, v in fr.items() if k not in _FRAME_KEYS}
        frames.append(Frame(image_path=file, width=int(ow), height=int(oh), K=K, camtoworld=c2w, split=split,
                            name=rel, mask_path=mask_path, depth_path=depth_path, depth_scale=depth_unit, time=t,
                            camera_id=int(fr.get("camera", 0)) if isinstance(fr.get("camera", 0), int) else 0,
                            distortion=distortion, extras=extras))

    warn_poses(poses, jpath)
    if rescaled:
        more = f" (and {len(rescaled) - 3} more)" if len(rescaled) > 3 else ""
        warnings.warn(f"{jpath}: {len(rescaled)} image(s) differ in size from the declared w/h with the same aspect "
                      f"ratio; scaling their intrinsics: {'; '.join(rescaled[:3])}{more}", stacklevel=2)
    frames, time_meta = normalize_times(frames, jpath)
    applied = None
    if "applied_transform" in meta:
        a = np.asarray(meta["applied_transform"], dtype=object)
        rows = a.tolist()
        if a.shape == (3, 4):
            rows = rows + [[0, 0, 0, 1]]
        applied = check_matrix(rows, (4, 4), jpath, "applied_transform")

    points = None
    ply = meta.get("ply_file_path")
    if ply is not None and load_points:
        from ..io.ply import PlyError, read_points_ply

        if not isinstance(ply, str):
            raise DatasetError("must be a file path", jpath, "ply_file_path")
        ppath = inside_root(root, _resolve(root, ply), jpath, "ply_file_path", allow_outside, ply)
        if not ppath.is_file():
            raise MissingFileError(f"point cloud not found (ply_file_path {ply!r} in {jpath})", ppath)
        try:
            xyz, rgb = read_points_ply(ppath)
        except PlyError as e:
            raise DatasetError(f"bad point cloud: {e}", jpath, "ply_file_path") from None
        points = PointCloud(xyz, rgb)
    meta_out = {k: v for k, v in meta.items() if k != "frames" and not k.endswith("_filenames")}
    meta_out["transforms_json"] = str(jpath)
    meta_out.update(time_meta)
    return finalize(frames, root=root, format="nerfstudio", points=points, normalize=normalize, background=background,
                    applied_transform=applied, meta=meta_out, cache_images=cache_images)
