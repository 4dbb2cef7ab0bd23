"""Datasets: COLMAP, nerfstudio transforms.json, Blender synthetic / D-NeRF.

``load_dataset(path)`` detects the layout and returns a :class:`Dataset` (see
:mod:`langfield.data.base` for the conventions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from .base import (Dataset, DatasetError, Distortion, Frame, ImageReadError, MissingFileError, PointCloud,
                   normalize_world, read_image)
from .blender import load_blender
from .colmap import find_colmap_model, load_colmap
from .nerfstudio import load_nerfstudio

__all__ = ["load_dataset", "detect_format", "Dataset", "Frame", "PointCloud", "Distortion", "DatasetError",
           "MissingFileError", "ImageReadError", "load_colmap", "load_nerfstudio", "load_blender", "normalize_world",
           "read_image", "FORMATS"]

FORMATS = ("colmap", "nerfstudio", "blender")


def detect_format(path: Union[str, Path]) -> str:
    """``"colmap"`` (``sparse/0`` or ``sparse`` with cameras.bin/txt), ``"nerfstudio"``
    (``transforms.json``) or ``"blender"`` (``transforms_train.json``, also D-NeRF), checked in
    that order; a ``.json`` file path picks by its name. Raises :class:`DatasetError` listing
    what was looked for."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError("dataset path does not exist", p)
    if p.is_file():
        if p.name.startswith("transforms_") and p.suffix == ".json":
            return "blender"
        if p.suffix == ".json":
            return "nerfstudio"
        raise DatasetError("not a dataset: give a folder (or a transforms*.json file)", p)
    for d in (p / "sparse" / "0", p / "sparse"):
        if any((d / f"cameras{e}").is_file() for e in (".bin", ".txt")):
            return "colmap"
    if (p / "transforms.json").is_file():
        return "nerfstudio"
    if (p / "transforms_train.json").is_file():
        return "blender"
    if find_colmap_model(p) is not None:
        return "colmap"
    raise DatasetError("no dataset layout recognised; looked for a COLMAP model (sparse/0/ or sparse/ with "
                       "cameras.bin|txt and images.bin|txt, or colmap/sparse/0/), a nerfstudio transforms.json, "
                       "and a Blender/D-NeRF transforms_train.json", p)


def load_dataset(path: Union[str, Path], *, downscale: int = 1, background: Sequence[float] = (1.0, 1.0, 1.0),
                 normalize: bool = True, test_every: int = 8, undistort: bool = True, format: Optional[str] = None,
                 cache_images: bool = False, **kwargs) -> Dataset:
    """Load a dataset, detecting its format (or forcing ``format``).

    ``downscale``: integer factor (``images_N`` folders where they exist, else on-the-fly
    resizing, K scaled); ``background``: RGB in [0, 1] that RGBA images are composited on;
    ``normalize``: gsplat's world normalisation (kept in ``dataset.transform``);
    ``test_every``: hold out every N-th image when the format has no split of its own;
    ``undistort``: undistort non-pinhole cameras (else they raise). Extra keyword arguments
    go to the format's loader.
    """
    if int(downscale) != downscale or downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    downscale = int(downscale)
    fmt = format or detect_format(path)
    if fmt == "colmap":
        return load_colmap(path, downscale=downscale, background=background, normalize=normalize,
                           test_every=test_every, undistort=undistort, cache_images=cache_images, **kwargs)
    if fmt == "nerfstudio":
        return load_nerfstudio(path, downscale=downscale, background=background, normalize=normalize,
                               test_every=test_every, undistort=undistort, cache_images=cache_images, **kwargs)
    if fmt in ("blender", "dnerf"):
        return load_blender(path, downscale=downscale, background=background, normalize=normalize,
                            cache_images=cache_images, **kwargs)
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {FORMATS}")
