"""Datasets: COLMAP, nerfstudio transforms.json, Blender synthetic / D-NeRF, HyperNeRF,
Neu3D / DyNeRF multi-view video, LLFF.

``load_dataset(path)`` detects the layout and returns a :class:`Dataset` (see
:mod:`langfield.data.base` for the conventions). Time-stamped formats (D-NeRF, nerfstudio with
``time``, HyperNeRF, Neu3D) give every frame a ``time`` in [0, 1] (``dataset.has_time``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from .base import (Dataset, DatasetError, Distortion, Frame, ImageReadError, MissingFileError, PointCloud,
                   check_image_file, normalize_world, read_image)
from .blender import load_blender
from .colmap import find_colmap_model, load_colmap
from .hypernerf import is_hypernerf, load_hypernerf
from .llff import is_llff, is_neu3d, load_llff, load_neu3d, read_poses_bounds
from .nerfstudio import load_nerfstudio
from .rgbd import BadFrameError, RGBDError, RGBDFrame, RGBDSequence, make_frame, open_rgbd

__all__ = ["open_rgbd", "RGBDFrame", "RGBDSequence", "RGBDError", "BadFrameError", "make_frame", "load_dataset", "detect_format", "Dataset", "Frame", "PointCloud", "Distortion", "DatasetError",
           "MissingFileError", "ImageReadError", "load_colmap", "load_nerfstudio", "load_blender", "normalize_world",
           "read_image", "FORMATS", "load_hypernerf", "load_llff", "load_neu3d", "read_poses_bounds",
           "check_image_file"]

FORMATS = ("colmap", "nerfstudio", "blender", "hypernerf", "neu3d", "llff")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".exr", ".tif", ".tiff", ".bmp", ".webp")


def _has_images(d: Path) -> bool:
    try:
        return d.is_dir() and any(p.suffix.lower() in _IMAGE_EXTS and not p.name.startswith(".")
                                  for p in d.iterdir() if p.is_file())
    except OSError:
        return False


def detect_format(path: Union[str, Path]) -> str:
    """The layout of a dataset folder, checked in this order: ``"neu3d"``
    (``poses_bounds.npy`` + one video per camera), ``"colmap"`` (``sparse/0`` or ``sparse`` with
    cameras.bin|txt), ``"nerfstudio"`` (``transforms.json``), ``"blender"``
    (``transforms_train.json``, also D-NeRF), ``"hypernerf"`` (``dataset.json`` + ``camera/``),
    ``"llff"`` (``poses_bounds.npy`` + ``images/``), then a COLMAP model elsewhere; a file path
    picks by its name. Raises :class:`DatasetError` listing what was looked for (and, for a
    folder of images without poses, the ``langfield process`` command that makes a dataset)."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError("dataset path does not exist", p)
    if p.is_file():
        if p.name.startswith("transforms_") and p.suffix == ".json":
            return "blender"
        if p.name == "dataset.json" and is_hypernerf(p.parent):
            return "hypernerf"
        if p.name == "poses_bounds.npy":
            return "neu3d" if is_neu3d(p.parent) else "llff"
        if p.suffix == ".json":
            return "nerfstudio"
        raise DatasetError("not a dataset: give a folder (or a transforms*.json file)", p)
    if is_neu3d(p):
        return "neu3d"
    for d in (p / "sparse" / "0", p / "sparse"):
        if any((d / f"cameras{e}").is_file() for e in (".bin", ".txt")):
            return "colmap"
    if (p / "transforms.json").is_file():
        return "nerfstudio"
    if (p / "transforms_train.json").is_file():
        return "blender"
    if is_hypernerf(p):
        return "hypernerf"
    if is_llff(p):
        return "llff"
    if find_colmap_model(p) is not None:
        return "colmap"
    looked = ("looked for a COLMAP model (sparse/0/ or sparse/ with cameras.bin|txt and images.bin|txt, or "
              "colmap/sparse/0/), a nerfstudio transforms.json, a Blender/D-NeRF transforms_train.json, a HyperNeRF "
              "dataset.json + camera/, and an LLFF / Neu3D poses_bounds.npy")
    images = p if _has_images(p) else (p / "images" if _has_images(p / "images") else None)
    if images is not None:
        raise DatasetError(f"images without camera poses ({looked}); make a dataset from them with: langfield "
                           f"process {images} --out DATA, then train DATA", p)
    raise DatasetError(f"no dataset layout recognised; {looked}", p)


def load_dataset(path: Union[str, Path], *, downscale: int = 1, background: Sequence[float] = (1.0, 1.0, 1.0),
                 normalize: bool = True, test_every: int = 8, undistort: bool = True, format: Optional[str] = None,
                 cache_images: bool = False, skip_bad_images: bool = False, verify_images: bool = False,
                 allow_outside: bool = False, **kwargs) -> Dataset:
    """Load a dataset, detecting its format (or forcing ``format``).

    ``downscale``: integer factor (``images_N`` / ``rgb/Nx`` folders where they exist, else
    on-the-fly resizing, K scaled); ``background``: RGB in [0, 1] that RGBA images are
    composited on; ``normalize``: gsplat's world normalisation (kept in ``dataset.transform``);
    ``test_every``: hold out every N-th image when the format has no split of its own;
    ``undistort``: undistort non-pinhole cameras (else they raise); ``verify_images``: decode
    every image now (:meth:`Dataset.verify_images`) and raise listing the bad ones;
    ``skip_bad_images``: verify and drop the frames of bad images with a warning;
    ``allow_outside``: accept ``file_path`` entries that lead outside the dataset folder
    (refused by default). Extra keyword arguments go to the format's loader (e.g. Neu3D's
    ``stride``, ``max_frames``, ``test_cameras``, ``cache_dir``).
    """
    if int(downscale) != downscale or downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    downscale = int(downscale)
    fmt = format or detect_format(path)
    common = dict(downscale=downscale, background=background, normalize=normalize, cache_images=cache_images)
    if fmt == "colmap":
        ds = load_colmap(path, test_every=test_every, undistort=undistort, **common, **kwargs)
    elif fmt == "nerfstudio":
        ds = load_nerfstudio(path, test_every=test_every, undistort=undistort, allow_outside=allow_outside, **common,
                             **kwargs)
    elif fmt in ("blender", "dnerf"):
        ds = load_blender(path, allow_outside=allow_outside, **common, **kwargs)
    elif fmt == "hypernerf":
        ds = load_hypernerf(path, test_every=test_every, undistort=undistort, **common, **kwargs)
    elif fmt == "neu3d":
        ds = load_neu3d(path, **common, **kwargs)
    elif fmt == "llff":
        ds = load_llff(path, test_every=test_every, **common, **kwargs)
    else:
        raise ValueError(f"unknown dataset format {fmt!r}; use one of {FORMATS}")
    if verify_images or skip_bad_images:
        ds.verify_images(skip_bad=skip_bad_images)
    return ds
