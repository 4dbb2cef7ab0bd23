"""Blender synthetic (NeRF-synthetic) and D-NeRF datasets.

Layout: ``transforms_train.json`` (required), ``transforms_val.json``, ``transforms_test.json``,
each with ``camera_angle_x`` (horizontal field of view, radians; ``fl_x``/``fl_y``/``cx``/``cy``
used instead when present) and ``frames`` of ``file_path`` (usually without extension:
``.png`` is implied, another image extension is found too), ``transform_matrix``
(camera-to-world, OpenGL axes, 4x4 or 3x4; see :func:`~langfield.data.base.pose_matrix`) and,
for D-NeRF, ``time``. Images are RGBA, composited on ``background`` (white by default). The
format's own split is used. There are no points: :meth:`langfield.scene.Gaussians.from_dataset`
initialises at random in the cameras' common view.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

import numpy as np

from .base import (GL_TO_CV, DatasetError, Frame, MissingFileError, finalize, find_image_file, fov_to_focal, image_size,
                   inside_root, normalize_times, pose_matrix, scale_K, scaled_size, warn_poses)
from .nerfstudio import norm_rel, json_number, json_size, frame_file_path, read_transforms_json

__all__ = ["load_blender"]


def _image_file(root: Path, fp: str) -> Path:
    """The image of a ``file_path`` (``.png`` implied, as in the NeRF synthetic sets; other
    extensions and letter cases are found too); the ``.png`` path when there is none."""
    p = Path(fp)
    p = p if p.is_absolute() else root / p
    found = find_image_file(p.parent / (p.name + ".png")) or find_image_file(p)
    return found if found is not None else p.parent / (p.name + ".png")


def load_blender(path: Union[str, Path], *, downscale: int = 1, background: Sequence[float] = (1.0, 1.0, 1.0),
                 normalize: bool = True, splits: Sequence[str] = ("train", "val", "test"), cache_images: bool = False,
                 allow_outside: bool = False):
    """Load a Blender / D-NeRF dataset (see the module docstring). ``path``: the folder with
    ``transforms_*.json``. A ``file_path`` outside the folder is refused unless
    ``allow_outside``. D-NeRF times outside [0, 1] are rescaled to [0, 1] over all splits
    (raw values in ``frame.extras["time_raw"]``)."""
    path = Path(path)
    root = path.parent if path.suffix == ".json" else path
    if not (root / "transforms_train.json").is_file():
        raise MissingFileError("Blender dataset without transforms_train.json", root / "transforms_train.json")
    frames: List[Frame] = []
    is_dnerf = False
    for split in splits:
        jpath = root / f"transforms_{split}.json"
        if not jpath.is_file():
            continue
        meta = read_transforms_json(jpath)
        fl = meta.get("frames")
        if fl is None:
            raise DatasetError("missing (the list of posed images)", jpath, "frames")
        if not isinstance(fl, list):
            raise DatasetError("must be a list", jpath, "frames")
        if "camera_angle_x" not in meta and "fl_x" not in meta:
            raise DatasetError("missing (horizontal field of view in radians)", jpath, "camera_angle_x")
        poses = []
        for i, fr in enumerate(fl):
            where = f"frames[{i}]"
            fp = frame_file_path(fr, i, jpath)
            p = Path(fp.replace("\\", "/"))
            inside_root(root, p if p.is_absolute() else root / p, jpath, f"{where}.file_path", allow_outside, fp)
            img = _image_file(root, fp)
            if not img.is_file():
                raise MissingFileError(f"image of {where} not found (file_path {fp!r} in {jpath})", img)
            if "transform_matrix" not in fr:
                raise DatasetError(f"missing (camera-to-world pose of {fp})", jpath, f"{where}.transform_matrix")
            c2w, dev = pose_matrix(fr["transform_matrix"], jpath, f"{where}.transform_matrix")
            poses.append((c2w, dev))
            c2w = c2w @ GL_TO_CV
            W, H = image_size(img)
            if "fl_x" in meta:
                fx = json_number(meta["fl_x"], jpath, "fl_x")
                fy = json_number(meta.get("fl_y", fx), jpath, "fl_y")
                # fl_* given for the stored size w x h (if stated); rescale to the actual image
                sw = W / json_size(meta.get("w", W), jpath, "w")
                sh = H / json_size(meta.get("h", H), jpath, "h")
                fx, fy = fx * sw, fy * sh
                cx = json_number(meta.get("cx", W / 2 / sw), jpath, "cx") * sw
                cy = json_number(meta.get("cy", H / 2 / sh), jpath, "cy") * sh
            else:
                fx = fov_to_focal(json_number(meta["camera_angle_x"], jpath, "camera_angle_x"), W)
                fy = fov_to_focal(json_number(meta["camera_angle_y"], jpath, "camera_angle_y"), H) \
                    if "camera_angle_y" in meta else fx
                cx, cy = W / 2.0, H / 2.0
            K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
            w, h = scaled_size(W, H, downscale) if downscale > 1 else (W, H)
            K = scale_K(K, w / W, h / H)
            t = fr.get("time")
            if t is not None:
                t = json_number(t, jpath, f"{where}.time")
                is_dnerf = True
            name = norm_rel(fp)
            frames.append(Frame(image_path=img, width=w, height=h, K=K, camtoworld=c2w, split=split, name=name,
                                time=t))
        warn_poses(poses, jpath)
    if not frames:
        raise DatasetError("no frames in transforms_{train,val,test}.json", root)
    frames, time_meta = normalize_times(frames, root / "transforms_train.json")
    return finalize(frames, root=root, format="dnerf" if is_dnerf else "blender", points=None, normalize=normalize,
                    background=background, meta={"downscale": downscale, **time_meta}, cache_images=cache_images)
