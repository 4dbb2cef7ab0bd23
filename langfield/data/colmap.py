"""COLMAP datasets, read with pycolmap.

Layout: ``<root>/images/`` and a model (``cameras``, ``images``, ``points3D`` as ``.bin`` or
``.txt``) in ``<root>/sparse/0``, ``<root>/sparse``, ``<root>/colmap/sparse/0`` or ``<root>``.
Registered images are sorted by name; every ``test_every``-th (0, 8, 16, ...) is held out.
An image the model names but the folder holds only with another letter case or image
extension (``x.jpg`` as ``x.JPG`` or ``x.png``) is found; a model without a points3D file
loads without points.

Cameras: PINHOLE and SIMPLE_PINHOLE are used as they are; every other model (SIMPLE_RADIAL,
RADIAL, OPENCV, FULL_OPENCV, fisheye models ...) is undistorted to the pinhole camera
``pycolmap.undistort_camera`` chooses, with the pixel maps of ``pycolmap.Camera.img_from_cam``
(bilinear; the same warp as ``pycolmap.undistort_image``), computed at the loaded resolution.

``downscale=N`` reads ``<root>/images_N/<name>`` where it exists (K scaled by that image's
size over the camera's), and otherwise resizes the full image on the fly to
``round(W/N) x round(H/N)``. Optional ``<root>/masks/<name>[.png]`` become masks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from .base import (DatasetError, Distortion, Frame, MissingFileError, PointCloud, every_nth_split, finalize,
                   find_image_file, image_size, import_pycolmap, scaled_size, undistorted_camera)

__all__ = ["load_colmap", "find_colmap_model"]

PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")


def _has_model(d: Path) -> bool:
    return any((d / f"cameras{e}").is_file() for e in (".bin", ".txt")) and \
        any((d / f"images{e}").is_file() for e in (".bin", ".txt"))


def find_colmap_model(root: Union[str, Path]) -> Optional[Path]:
    """The COLMAP model folder of a dataset root (None if there is none)."""
    root = Path(root)
    for d in (root / "sparse" / "0", root / "sparse", root / "colmap" / "sparse" / "0", root):
        if _has_model(d):
            return d
    sp = root / "sparse"
    if sp.is_dir():  # sparse/<k> with another number
        for d in sorted(p for p in sp.iterdir() if p.is_dir()):
            if _has_model(d):
                return d
    return None


def _dataset_root(model_dir: Path) -> Path:
    if model_dir.parent.name == "sparse":
        r = model_dir.parent.parent
        return r.parent if r.name == "colmap" and not (r / "images").is_dir() else r
    if model_dir.name == "sparse":
        return model_dir.parent
    return model_dir


def _cam_from_world(image) -> np.ndarray:
    cfw = image.cam_from_world
    if callable(cfw):  # pycolmap >= 3.12: a method (poses live in frames/rigs)
        cfw = cfw()
    M = np.eye(4)
    M[:3, :4] = np.asarray(cfw.matrix(), dtype=np.float64)
    return M


def _find_mask(masks_dir: Optional[Path], name: str) -> Optional[Path]:
    if masks_dir is None:
        return None
    for cand in (masks_dir / name, masks_dir / (name + ".png"), (masks_dir / name).with_suffix(".png")):
        if cand.is_file():
            return cand
    return None


def _find_downscaled(down_dir: Optional[Path], name: str) -> Optional[Path]:
    """``images_N/<name>``, or the same stem with another image extension."""
    if down_dir is None:
        return None
    return find_image_file(down_dir / name)


def _read_reconstruction(pycolmap, model_dir: Path):
    """``pycolmap.Reconstruction`` of a model folder; a model without a points3D file (which
    pycolmap refuses) is read with an empty one."""
    if any((model_dir / f"points3D{e}").is_file() for e in (".bin", ".txt")):
        return pycolmap.Reconstruction(str(model_dir))
    text = not (model_dir / "images.bin").is_file()
    with tempfile.TemporaryDirectory(prefix="langfield-colmap-") as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and f.stem in ("cameras", "images", "rigs", "frames"):
                try:
                    os.symlink(f.resolve(), Path(tmp) / f.name)
                except OSError:
                    shutil.copy(f, Path(tmp) / f.name)
        pts = Path(tmp) / ("points3D.txt" if text else "points3D.bin")
        pts.write_bytes(b"" if text else bytes(8))  # binary: a uint64 count of 0
        return pycolmap.Reconstruction(tmp)


_FILE_OF = (("rig", "rigs"), ("frame", "frames"), ("camera", "cameras"), ("image", "images"), ("point", "points3D"))


def colmap_error(e: BaseException, model_dir: Path) -> DatasetError:
    """A pycolmap exception (``Rig with ID 1 does not exist``, ...) as a one-line
    :class:`DatasetError` naming the model folder and the file the message points at."""
    msg = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
    low = msg.lower()
    target = model_dir
    for word, stem in _FILE_OF:
        if word in low:
            found = [model_dir / f"{stem}{x}" for x in (".bin", ".txt") if (model_dir / f"{stem}{x}").is_file()]
            target = found[0] if found else model_dir / f"{stem}.bin|txt (missing)"
            break
    return DatasetError(f"cannot read the COLMAP model in {model_dir} ({msg}); the model is inconsistent: re-export "
                        f"it from COLMAP or re-run `langfield process IMAGES --out DATA`", target)


def load_colmap(path: Union[str, Path], *, downscale: int = 1, images_dir: Optional[Union[str, Path]] = None,
                undistort: bool = True, test_every: int = 8, normalize: bool = True,
                background: Sequence[float] = (1.0, 1.0, 1.0), masks_dir: Optional[Union[str, Path]] = None,
                cache_images: bool = False):
    """Load a COLMAP dataset (see the module docstring). ``path``: the dataset root or the
    model folder itself."""
    pycolmap = import_pycolmap("COLMAP models")
    path = Path(path)
    model_dir = find_colmap_model(path)
    if model_dir is None:
        raise DatasetError("no COLMAP model: looked for cameras.{bin,txt} + images.{bin,txt} in sparse/0, sparse, "
                           "colmap/sparse/0 and the folder itself", path)
    root = path if model_dir != path else _dataset_root(model_dir)
    try:
        rec = _read_reconstruction(pycolmap, model_dir)
        images = sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: im.name)
        poses = {im.image_id: np.linalg.inv(_cam_from_world(im)) for im in images}
        for im in images:
            rec.cameras[im.camera_id]
    except Exception as e:
        raise colmap_error(e, model_dir) from None
    if not images:
        raise DatasetError("the COLMAP model has no registered images", model_dir, "images")
    img_dir = Path(images_dir) if images_dir is not None else root / "images"
    if images_dir is not None and not img_dir.is_absolute() and not img_dir.exists():
        img_dir = root / img_dir
    if not img_dir.is_dir():
        raise MissingFileError(f"image folder not found (the model lists {len(images)} images)", img_dir)
    down_dir = img_dir.parent / f"{img_dir.name}_{downscale}" if downscale > 1 else None
    if down_dir is not None and not down_dir.is_dir():
        down_dir = None
    mdir = Path(masks_dir) if masks_dir is not None else (root / "masks" if (root / "masks").is_dir() else None)

    splits = every_nth_split(len(images), test_every)
    frames: List[Frame] = []
    n_resized = 0
    missing = []
    rescaled = []
    for i, im in enumerate(images):
        src = find_image_file(img_dir / im.name)
        if src is None:
            missing.append(str(img_dir / im.name))
            continue
        cam = rec.cameras[im.camera_id]
        model = cam.model.name if hasattr(cam.model, "name") else str(cam.model)
        model = model.split(".")[-1]
        W, H = int(cam.width), int(cam.height)
        file = src
        small = _find_downscaled(down_dir, im.name)
        if small is not None:
            file = small
            w, h = image_size(small)
        else:
            fw, fh = image_size(src)
            if (fw, fh) != (W, H):
                if abs(fw / fh - W / H) > 0.01 * (W / H):
                    raise DatasetError(f"image is {fw}x{fh} but its camera {im.camera_id} in {model_dir} is "
                                       f"{W}x{H} (aspect ratios differ)", src)
                rescaled.append(f"{src.name} is {fw}x{fh}, camera {im.camera_id} is {W}x{H}")
            w, h = scaled_size(fw, fh, downscale) if downscale > 1 else (fw, fh)
            if downscale > 1:
                n_resized += 1
        params = [float(p) for p in np.asarray(cam.params)]
        scaled = pycolmap.Camera(model=model, width=W, height=H, params=params)
        if (w, h) != (W, H):
            scaled.rescale(int(w), int(h))
        sparams = tuple(float(p) for p in np.asarray(scaled.params))
        dist = None
        if model in PINHOLE_MODELS:
            K = np.asarray(scaled.calibration_matrix(), dtype=np.float64)
            ow, oh = w, h
        elif undistort:
            K, ow, oh = undistorted_camera(model, sparams, w, h, source=model_dir / "cameras")
            dist = Distortion(model, sparams, int(w), int(h))
        else:
            raise DatasetError(f"camera {im.camera_id} has model {model}, which has lens distortion; load with "
                               f"undistort=True (or undistort the images first)", model_dir, "cameras")
        c2w = poses[im.image_id]
        frames.append(Frame(image_path=file, width=int(ow), height=int(oh), K=K, camtoworld=c2w, split=splits[i],
                            name=im.name, mask_path=_find_mask(mdir, im.name), camera_id=int(im.camera_id),
                            distortion=dist))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MissingFileError(f"{len(missing)} image(s) listed in the COLMAP model {model_dir} not found: "
                               f"{', '.join(missing[:3])}{more}", img_dir)
    if rescaled:
        more = f" (and {len(rescaled) - 3} more)" if len(rescaled) > 3 else ""
        warnings.warn(f"{img_dir}: {len(rescaled)} image(s) differ in size from their COLMAP camera; scaling the "
                      f"intrinsics: {'; '.join(rescaled[:3])}{more}", stacklevel=2)
    if n_resized and down_dir is not None:
        warnings.warn(f"{n_resized} of {len(frames)} images are missing from {down_dir}; resizing the full images "
                      f"by 1/{downscale} on the fly", stacklevel=2)

    points = None
    if rec.num_points3D() > 0:
        pts = [p for _, p in sorted(rec.points3D.items())]
        xyz = np.array([p.xyz for p in pts], dtype=np.float32).reshape(-1, 3)
        rgb = np.array([p.color for p in pts], dtype=np.float32).reshape(-1, 3) / 255.0
        points = PointCloud(xyz, rgb)
    else:
        warnings.warn(f"{model_dir}: the COLMAP model has no 3D points; Gaussians will be initialised at random",
                      stacklevel=2)
    return finalize(frames, root=root, format="colmap", points=points, normalize=normalize, background=background,
                    meta={"model_dir": str(model_dir), "downscale": downscale}, cache_images=cache_images)
