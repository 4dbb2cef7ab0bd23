"""The common dataset type: posed images (+ masks, depth, time), points, splits, normalisation.

Conventions: OpenCV cameras (x right, y down, z forward); ``camtoworld`` [4, 4] camera-to-world
and ``viewmat`` (its inverse, world-to-camera, what ``rasterization(viewmats=...)`` takes);
``K`` [3, 3] for the image as loaded (after downscaling and undistortion), pixel centres at
+0.5 (COLMAP's and gsplat's convention).

A :class:`Dataset` holds :class:`Frame` records and loads images lazily: ``dataset[i]`` gives a
dict of tensors (``image`` [H, W, 3] float32 in [0, 1], RGBA composited on the dataset's
background; ``K``, ``viewmat``, ``camtoworld``; ``mask``, ``depth``, ``alpha``, ``time`` when
present). ``dataset.split("train")`` / ``("test")`` are views sharing its points and transform.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["Frame", "PointCloud", "Dataset", "Distortion", "DatasetError", "ImageReadError", "MissingFileError",
           "read_image", "find_image_file", "pose_matrix", "GL_TO_CV", "normalize_world", "similarity_scale",
           "check_image_file", "inside_root", "normalize_times", "data_cache_dir"]

PathLike = Union[str, os.PathLike]
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # camera axes OpenGL <-> OpenCV (right-multiply c2w)
SPLITS = ("train", "val", "test")
#: image extensions tried, in this order, for a listed image whose extension is missing or differs
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".exr", ".tif", ".tiff", ".bmp", ".webp")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and, where it applies, the field."""

    def __init__(self, message: str, path: Optional[PathLike] = None, field: Optional[str] = None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__((": ".join(parts) + ": " if parts else "") + message)
        self.path = None if path is None else Path(path)
        self.field = field


class MissingFileError(DatasetError, FileNotFoundError):
    """A file the dataset lists does not exist."""


class ImageReadError(DatasetError, OSError):
    """An image (or mask / depth map) that exists but cannot be decoded."""


# ------------------------------------------------------------------------------------------
# records

@dataclass
class Distortion:
    """How to undistort: the distorted camera (a COLMAP model name and params) at the size
    the image is read at; the frame's ``K``/``width``/``height`` describe the undistorted
    pinhole image. Maps are computed with pycolmap and cached."""

    model: str
    params: Tuple[float, ...]
    width: int
    height: int
    skew: float = 0.0  # K[0, 1] of the distorted camera (u += skew * y_distorted); models with fx fy cx cy first


@dataclass
class Frame:
    """One posed image. ``K`` and ``width``/``height`` are those of the image as loaded."""

    image_path: Path
    width: int
    height: int
    K: np.ndarray  # [3, 3] float64
    camtoworld: np.ndarray  # [4, 4] float64, OpenCV axes
    split: str = "train"
    name: str = ""
    mask_path: Optional[Path] = None
    depth_path: Optional[Path] = None
    depth_scale: float = 1.0  # stored depth value * depth_scale = depth in world units
    time: Optional[float] = None
    camera_id: int = 0
    distortion: Optional[Distortion] = None  # None: pinhole, resized to width x height if needed
    extras: Dict[str, Any] = field(default_factory=dict)  # format-specific (e.g. label paths)

    @property
    def viewmat(self) -> np.ndarray:
        """World-to-camera [4, 4] (OpenCV)."""
        return _inv_rigid(self.camtoworld)

    @property
    def read_size(self) -> Tuple[int, int]:
        """(width, height) the image file is resized to before undistortion."""
        if self.distortion is not None:
            return self.distortion.width, self.distortion.height
        return self.width, self.height


@dataclass
class PointCloud:
    """Points for initialisation: ``xyz`` float32 [N, 3], ``rgb`` float32 [N, 3] in [0, 1]."""

    xyz: np.ndarray
    rgb: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.xyz.shape[0])


def _inv_rigid(M: np.ndarray) -> np.ndarray:
    R, t = M[:3, :3], M[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


# ------------------------------------------------------------------------------------------
# images

def read_image(path: PathLike, what: str = "image") -> np.ndarray:
    """Decode an image file to a numpy array [H, W] or [H, W, C] (uint8, uint16, int32 or
    float32 as stored; palettes expanded). Errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found", path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            elif im.mode == "I;16B":
                im = im.convert("I;16")
            arr = np.array(im)
    except UnidentifiedImageError:
        raise ImageReadError(f"not an image file (no image format recognised for this {what})", path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot decode {what} ({type(e).__name__}: {e})", path) from None
    if arr.size == 0:
        raise ImageReadError(f"{what} is empty", path)
    return arr


@functools.lru_cache(maxsize=32)
def _dir_index(folder: str, mtime_ns: int) -> Dict[str, List[str]]:
    """Lower-case file name -> the file names in ``folder`` (keyed by mtime, so never stale)."""
    out: Dict[str, List[str]] = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file():
                out.setdefault(e.name.lower(), []).append(e.name)
    for v in out.values():
        v.sort()
    return out


def find_image_file(path: PathLike) -> Optional[Path]:
    """``path`` if it is a file; else the one file that differs from it only in letter case
    (``x.jpg`` stored as ``x.JPG``), by an added image extension (``file_path`` ``r_0`` ->
    ``r_0.png``, tried in :data:`IMAGE_SUFFIXES` order) or by another image extension
    (``x.jpg`` converted to ``x.png``); None if there is none."""
    p = Path(path)
    if p.is_file():
        return p
    if "\\" in p.name:  # a name written on Windows
        return find_image_file(p.parent.joinpath(*p.name.split("\\")))
    folder = p.parent
    try:
        index = _dir_index(str(folder), folder.stat().st_mtime_ns)
    except OSError:
        return None
    name = p.name.lower()
    cands = [name] + [name + e for e in IMAGE_SUFFIXES]
    if Path(name).suffix in IMAGE_SUFFIXES:
        cands += [Path(name).stem + e for e in IMAGE_SUFFIXES]
    for c in cands:
        if c in index:
            return folder / index[c][0]
    return None


def image_size(path: PathLike, what: str = "image") -> Tuple[int, int]:
    """(width, height) from the header only."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found", path)
    try:
        with Image.open(path) as im:
            return im.size
    except UnidentifiedImageError:
        raise ImageReadError(f"not an image file (no image format recognised; expected {what} as PNG, JPEG, "
                             f"EXR, TIFF, BMP or WebP)", path) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read {what} header ({type(e).__name__}: {e})", path) from None


def _to_float(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32)


def _resize(t: Tensor, w: int, h: int, mode: str) -> Tensor:
    """[H, W, C] float -> [h, w, C]."""
    if t.shape[0] == h and t.shape[1] == w:
        return t
    x = t.permute(2, 0, 1)[None]
    if mode == "nearest":
        y = torch.nn.functional.interpolate(x, size=(h, w), mode="nearest-exact")
    else:
        down = h < t.shape[0] or w < t.shape[1]
        y = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down)
    return y[0].permute(1, 2, 0).contiguous()


_MAP_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()
_MAP_LOCK = threading.Lock()


def _undistort_grid(dist: Distortion, K: np.ndarray, w: int, h: int) -> Tensor:
    """grid_sample grid [1, h, w, 2] mapping the undistorted image to the distorted one."""
    key = (dist.model, tuple(dist.params), dist.width, dist.height, dist.skew, tuple(np.round(K, 9).reshape(-1)), w,
           h)
    with _MAP_LOCK:
        g = _MAP_CACHE.get(key)
        if g is not None:
            _MAP_CACHE.move_to_end(key)
            return g
    cam = colmap_camera(dist.model, dist.params, dist.width, dist.height)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float64) + 0.5, np.arange(h, dtype=np.float64) + 0.5)
    rays = np.stack([(xs - K[0, 2]) / K[0, 0], (ys - K[1, 2]) / K[1, 1], np.ones_like(xs)], -1).reshape(-1, 3)
    try:
        uv = cam.img_from_cam(rays)
    except TypeError:  # older pycolmap: normalised image-plane points [N, 2]
        uv = cam.img_from_cam(np.ascontiguousarray(rays[:, :2]))
    uv = np.asarray(uv, dtype=np.float64).reshape(h, w, 2)
    if dist.skew:
        fy, cy = float(dist.params[1]), float(dist.params[3])
        uv = uv.copy()
        uv[..., 0] += dist.skew * (uv[..., 1] - cy) / fy
    grid = np.stack([uv[..., 0] / dist.width * 2 - 1, uv[..., 1] / dist.height * 2 - 1], -1)
    g = torch.from_numpy(grid.astype(np.float32))[None]
    with _MAP_LOCK:
        _MAP_CACHE[key] = g
        while len(_MAP_CACHE) > 16:
            _MAP_CACHE.popitem(last=False)
    return g


def _remap(t: Tensor, grid: Tensor, mode: str) -> Tensor:
    y = torch.nn.functional.grid_sample(t.permute(2, 0, 1)[None], grid, mode=mode, padding_mode="border",
                                        align_corners=False)
    return y[0].permute(1, 2, 0).contiguous()


def colmap_camera(model: str, params: Sequence[float], width: int, height: int):
    """A ``pycolmap.Camera``; raises a clear error when pycolmap is missing."""
    pycolmap = import_pycolmap(f"a {model} camera")
    return pycolmap.Camera(model=model, width=int(width), height=int(height), params=list(map(float, params)))


def import_pycolmap(why: str):
    try:
        import pycolmap
    except ImportError:
        raise ImportError(f"pycolmap is needed to read {why}: pip install pycolmap") from None
    return pycolmap


def undistorted_camera(model: str, params: Sequence[float], width: int, height: int,
                       source: Optional[PathLike] = None) -> Tuple[np.ndarray, int, int]:
    """(K, width, height) of the pinhole camera COLMAP's undistorter makes for a camera."""
    pycolmap = import_pycolmap(f"a {model} camera")
    try:
        cam = colmap_camera(model, params, width, height)
    except Exception as e:
        raise DatasetError(f"invalid camera {model} {list(params)} ({e})", source, "camera") from None
    if hasattr(cam, "is_perspective") and not cam.is_perspective():
        raise DatasetError(f"camera model {model} is not perspective; it cannot be undistorted to a pinhole camera",
                           source, "camera model")
    try:
        uc = pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(), cam)
    except Exception as e:
        raise DatasetError(f"cannot undistort camera model {model} ({e})", source, "camera model") from None
    return np.asarray(uc.calibration_matrix(), dtype=np.float64), int(uc.width), int(uc.height)


# ------------------------------------------------------------------------------------------
# normalisation (gsplat's normalize_world_space, reimplemented)

def _similarity_from_cameras(c2w: np.ndarray) -> np.ndarray:
    t = c2w[:, :3, 3]
    R = c2w[:, :3, :3]
    ups = np.sum(R * np.array([0, -1.0, 0]), axis=-1)
    world_up = ups.mean(0)
    nrm = np.linalg.norm(world_up)
    world_up = world_up / nrm if nrm > 1e-12 else np.array([0.0, 0.0, 1.0])
    up_cam = np.array([0.0, -1.0, 0.0])
    c = float(up_cam @ world_up)
    cross = np.cross(world_up, up_cam)
    skew = np.array([[0.0, -cross[2], cross[1]], [cross[2], 0.0, -cross[0]], [-cross[1], cross[0], 0.0]])
    if c > -1 + 1e-9:
        R_align = np.eye(3) + skew + (skew @ skew) / (1 + c)
    else:
        R_align = np.diag([1.0, -1.0, -1.0])  # world up is +y: rotate 180 degrees about x
    R = R_align @ R
    fwds = np.sum(R * np.array([0, 0.0, 1.0]), axis=-1)
    t = (R_align @ t[..., None])[..., 0]
    nearest = t + (fwds * -t).sum(-1)[:, None] * fwds  # closest point to the origin on each axis
    translate = -np.median(nearest, axis=0)
    T = np.eye(4)
    T[:3, 3] = translate
    T[:3, :3] = R_align
    d = np.linalg.norm(t + translate, axis=-1)
    med = float(np.median(d))
    scale = 1.0 / med if med > 1e-12 else 1.0
    T[:3, :] *= scale
    return T


def _align_principal_axes(points: np.ndarray) -> np.ndarray:
    centroid = np.median(points, axis=0)
    cov = np.cov((points - centroid).T)
    evals, evecs = np.linalg.eigh(cov)
    evecs = evecs[:, np.argsort(evals)[::-1]]
    if np.linalg.det(evecs) < 0:
        evecs[:, 0] *= -1
    Rm = evecs.T
    T = np.eye(4)
    T[:3, :3] = Rm
    T[:3, 3] = -Rm @ centroid
    return T


def _apply_to_cameras(T: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    out = np.einsum("ij,njk->nik", T, c2w)
    s = np.linalg.norm(out[:, :3, 0], axis=-1)
    out[:, :3, :3] /= s[:, None, None]
    return out


def _apply_to_points(T: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x @ T[:3, :3].T + T[:3, 3]


def similarity_scale(T: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(T)[:3, :3])) ** (1.0 / 3.0))


def normalize_world(c2w: np.ndarray, points: Optional[np.ndarray] = None) -> np.ndarray:
    """The similarity T [4, 4] (``x_new = T @ x``) that gsplat's ``normalize_world_space``
    applies: rotate the mean camera up to +z, centre on the cameras' focus, scale the median
    camera distance to 1; then, with points, align their principal axes and flip the scene
    upright if most points lie above their median."""
    c2w = np.asarray(c2w, dtype=np.float64)
    if len(c2w) < 2:
        return np.eye(4)
    T = _similarity_from_cameras(c2w)
    if points is not None and len(points) >= 3:
        p = _apply_to_points(T, np.asarray(points, dtype=np.float64))
        T2 = _align_principal_axes(p)
        T = T2 @ T
        p = _apply_to_points(T2, p)
        if np.median(p[:, 2]) > np.mean(p[:, 2]):
            T = np.diag([1.0, -1.0, -1.0, 1.0]) @ T
    return T


# ------------------------------------------------------------------------------------------

class Dataset(torch.utils.data.Dataset):
    """Posed images with lazily loaded pixels; see the module docstring.

    Attributes: ``frames`` (list of :class:`Frame`), ``points`` (:class:`PointCloud` or None),
    ``transform`` [4, 4] (similarity from the format's world to this dataset's world; identity
    unless normalised: map results back with its inverse), ``applied_transform`` [4, 4] (from
    the capture's original world to the format's world, e.g. nerfstudio's
    ``applied_transform``; identity otherwise), ``scene_scale`` (max distance of the camera
    centres from their mean, as gsplat's parser), ``background`` (RGB in [0, 1] for RGBA
    images), ``root``, ``format``, ``meta``.
    """

    def __init__(self, frames: List[Frame], *, root: PathLike = ".", format: str = "",
                 points: Optional[PointCloud] = None,
                 background: Sequence[float] = (1.0, 1.0, 1.0), transform: Optional[np.ndarray] = None,
                 applied_transform: Optional[np.ndarray] = None, scene_scale: Optional[float] = None,
                 meta: Optional[Dict[str, Any]] = None, cache_images: bool = False):
        self.frames = list(frames)
        self.root = Path(root)
        self.format = format
        self.points = points
        self.background = tuple(float(b) for b in background)
        if len(self.background) != 3:
            raise ValueError(f"background must be 3 values in [0, 1], got {background}")
        self.transform = np.eye(4) if transform is None else np.asarray(transform, dtype=np.float64)
        self.applied_transform = np.eye(4) if applied_transform is None else np.asarray(applied_transform, np.float64)
        self.meta = dict(meta or {})
        self.cache_images = cache_images
        self._cache: Dict[int, Tuple[Tensor, Optional[Tensor]]] = {}
        self.scene_scale = float(scene_scale) if scene_scale is not None else self._scene_scale()

    def _scene_scale(self) -> float:
        if not self.frames:
            return 1.0
        c = np.stack([f.camtoworld[:3, 3] for f in self.frames])
        s = float(np.linalg.norm(c - c.mean(0), axis=-1).max())
        return s if s > 1e-9 else 1.0

    # ---- sizes and splits -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frames)

    def indices(self, split: str) -> List[int]:
        """Indices of the frames in ``split`` (``"train"``, ``"test"``, ``"val"``, ``"all"``)."""
        if split == "all":
            return list(range(len(self.frames)))
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS + ('all',)}")
        return [i for i, f in enumerate(self.frames) if f.split == split]

    def subset(self, indices: Sequence[int]) -> "Dataset":
        """A dataset of the given frames, sharing points, transform and scene scale."""
        ds = Dataset([self.frames[i] for i in indices], root=self.root, format=self.format, points=self.points,
                     background=self.background, transform=self.transform, applied_transform=self.applied_transform,
                     scene_scale=self.scene_scale, meta=self.meta, cache_images=self.cache_images)
        return ds

    def transformed(self, T: np.ndarray) -> "Dataset":
        """The same frames and points moved by the similarity ``T`` [4, 4] (``x_new = T @ x``;
        depths scaled with it): ``transform`` becomes ``T @ transform``. Another capture of a
        run's scene takes the run's world this way (``langfield.run.open_dataset_in_run_world``)."""
        T = np.asarray(T, dtype=np.float64)
        if T.shape != (4, 4) or not np.isfinite(T).all():
            raise ValueError(f"transform must be a finite 4x4 similarity, got shape {T.shape}")
        s = similarity_scale(T)
        if not s > 1e-12:
            raise ValueError("transform must be a 4x4 similarity with a non-zero scale (its rotation part is singular)")
        frames = self.frames
        if frames:
            new = _apply_to_cameras(T, np.stack([f.camtoworld for f in frames]))
            frames = [replace(f, camtoworld=new[i], depth_scale=f.depth_scale * s) for i, f in enumerate(frames)]
        points = self.points
        if points is not None:
            points = PointCloud(_apply_to_points(T, points.xyz.astype(np.float64)).astype(np.float32), points.rgb)
        return Dataset(frames, root=self.root, format=self.format, points=points, background=self.background,
                       transform=T @ self.transform, applied_transform=self.applied_transform, meta=self.meta,
                       cache_images=self.cache_images)

    def split(self, name: str) -> "Dataset":
        return self.subset(self.indices(name))

    @property
    def train(self) -> "Dataset":
        return self.split("train")

    @property
    def test(self) -> "Dataset":
        """The held-out frames (``test``, or ``val`` when the format has no test split)."""
        idx = self.indices("test") or self.indices("val")
        return self.subset(idx)

    @property
    def splits(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for f in self.frames:
            out[f.split] = out.get(f.split, 0) + 1
        return out

    # ---- cameras ----------------------------------------------------------------------
    def camtoworlds(self) -> Tensor:
        return torch.from_numpy(np.stack([f.camtoworld for f in self.frames])).float()

    def viewmats(self) -> Tensor:
        """World-to-camera [C, 4, 4] float32."""
        return torch.from_numpy(np.stack([f.viewmat for f in self.frames])).float()

    def Ks(self) -> Tensor:
        return torch.from_numpy(np.stack([f.K for f in self.frames])).float()

    def widths(self) -> Tensor:
        return torch.tensor([f.width for f in self.frames])

    def heights(self) -> Tensor:
        return torch.tensor([f.height for f in self.frames])

    @property
    def has_depth(self) -> bool:
        return any(f.depth_path is not None for f in self.frames)

    @property
    def has_masks(self) -> bool:
        return any(f.mask_path is not None for f in self.frames)

    @property
    def has_time(self) -> bool:
        return any(f.time is not None for f in self.frames)

    # ---- pixels -------------------------------------------------------------------------
    def _geometry(self, f: Frame, t: Tensor, mode: str) -> Tensor:
        rw, rh = f.read_size
        t = _resize(t, rw, rh, "nearest" if mode == "nearest" else "linear")
        if f.distortion is not None:
            grid = _undistort_grid(f.distortion, f.K, f.width, f.height)
            t = _remap(t, grid, mode)
        return t

    def load_rgba(self, i: int) -> Tuple[Tensor, Optional[Tensor]]:
        """(rgb [H, W, 3] float32 composited on the background, alpha [H, W, 1] or None)."""
        f = self.frames[i]
        arr = read_image(f.image_path, "image")
        x = _to_float(arr)
        if x.ndim == 2:
            x = x[..., None]
        c = x.shape[2]
        if c == 1:
            rgb, alpha = np.repeat(x, 3, axis=2), None
        elif c == 2:
            rgb, alpha = np.repeat(x[..., :1], 3, axis=2), x[..., 1:2]
        elif c == 3:
            rgb, alpha = x, None
        else:
            rgb, alpha = x[..., :3], x[..., 3:4]
        t = torch.from_numpy(np.ascontiguousarray(rgb))
        if alpha is not None:
            a = torch.from_numpy(np.ascontiguousarray(alpha))
            bg = torch.tensor(self.background, dtype=torch.float32)
            t = torch.cat([t * a + bg * (1 - a), a], -1)  # composite first = premultiplied resampling
        t = self._geometry(f, t, "bilinear")
        if alpha is not None:
            return t[..., :3].clamp(0, 1).contiguous(), t[..., 3:].clamp(0, 1).contiguous()
        return t.clamp(0, 1), None

    def _cached_rgba(self, i: int) -> Tuple[Tensor, Optional[Tensor]]:
        if self.cache_images and i in self._cache:
            return self._cache[i]
        out = self.load_rgba(i)
        if self.cache_images:
            self._cache[i] = out
        return out

    def load_image(self, i: int) -> Tensor:
        """[H, W, 3] float32 in [0, 1] (RGBA composited on the background)."""
        return self._cached_rgba(i)[0]

    def load_mask(self, i: int) -> Optional[Tensor]:
        """[H, W] bool (True = use the pixel; nerfstudio's convention: nonzero = keep) or None."""
        f = self.frames[i]
        if f.mask_path is None:
            return None
        arr = read_image(f.mask_path, "mask")
        if arr.ndim == 3:
            arr = arr[..., 3] if arr.shape[2] == 4 else arr[..., 0]
        t = torch.from_numpy((arr > 0).astype(np.float32))[..., None]
        t = self._geometry(f, t, "nearest")
        return t[..., 0] > 0.5

    def load_depth(self, i: int) -> Optional[Tensor]:
        """[H, W] float32 camera z-depth in this dataset's world units (0 = unknown) or None."""
        f = self.frames[i]
        if f.depth_path is None:
            return None
        p = Path(f.depth_path)
        if p.suffix.lower() == ".npy":
            if not p.is_file():
                raise MissingFileError("depth map not found", p)
            try:
                arr = np.load(p, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ImageReadError(f"cannot read depth map ({e})", p) from None
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim != 2:
                raise ImageReadError(f"depth map must be 2D, got shape {arr.shape}", p)
        else:
            arr = read_image(p, "depth map")
            if arr.ndim == 3:
                arr = arr[..., 0]
            arr = arr.astype(np.float32)
        arr = np.where(np.isfinite(arr), arr, 0).astype(np.float32) * np.float32(f.depth_scale)
        t = torch.from_numpy(np.ascontiguousarray(arr))[..., None]
        t = self._geometry(f, t, "nearest")
        return t[..., 0]

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        f = self.frames[i]
        img, alpha = self._cached_rgba(i)
        item: Dict[str, Any] = {
            "index": i,
            "name": f.name,
            "image": img,
            "K": torch.from_numpy(f.K).float(),
            "viewmat": torch.from_numpy(f.viewmat).float(),
            "camtoworld": torch.from_numpy(f.camtoworld).float(),
            "width": f.width,
            "height": f.height,
        }
        if alpha is not None:
            item["alpha"] = alpha
        m = self.load_mask(i)
        if m is not None:
            item["mask"] = m
        d = self.load_depth(i)
        if d is not None:
            item["depth"] = d
        if f.time is not None:
            item["time"] = float(f.time)
        return item

    # ---- checks ---------------------------------------------------------------------------
    def verify_images(self, skip_bad: bool = False, workers: Optional[int] = None,
                      persistent_cache: bool = True) -> List[str]:
        """Decode every image, mask and depth map the frames list (in parallel threads; results
        cached in memory and in a small JSON under :func:`data_cache_dir` by path, size and
        mtime, so a second check of unchanged files reads nothing), and check that each has the
        aspect ratio of its frame. Returns the bad files as ``"path: reason"`` lines.

        With bad files: raises :class:`ImageReadError` naming them (one line), or, with
        ``skip_bad=True``, drops their frames from this dataset with one warning (raises
        :class:`DatasetError` if no training frame is left)."""
        jobs = []
        for i, f in enumerate(self.frames):
            jobs.append((i, f.image_path, "image", f.read_size))
            if f.mask_path is not None:
                jobs.append((i, f.mask_path, "mask", f.read_size))
            if f.depth_path is not None:
                jobs.append((i, f.depth_path, "depth map", f.read_size))
        bad = _check_files(jobs, self.root, workers, persistent_cache)
        if not bad:
            return []
        lines = [msg for _, msg in bad]
        shown = "; ".join(lines[:5]) + (f" (and {len(lines) - 5} more)" if len(lines) > 5 else "")
        if not skip_bad:
            raise ImageReadError(f"{len(lines)} bad file(s) among the {len(self.frames)} frames: {shown}; fix or "
                                 f"remove them, or skip their frames (skip_bad_images=True / --skip-bad-images)",
                                 self.root)
        drop = {i for i, _ in bad}
        kept = [f for i, f in enumerate(self.frames) if i not in drop]
        if not any(f.split == "train" for f in kept):
            raise DatasetError(f"no training frame left after skipping {len(drop)} frame(s) with bad files: {shown}",
                               self.root)
        warnings.warn(f"{self.root}: skipping {len(drop)} of {len(self.frames)} frame(s) with bad files: {shown}",
                      stacklevel=2)
        self.frames = kept
        self._cache.clear()
        return lines

    def __repr__(self) -> str:
        sp = ", ".join(f"{k} {v}" for k, v in self.splits.items())
        pts = f"{len(self.points)} points" if self.points is not None else "no points"
        return (f"Dataset({self.format}, {self.root}, {len(self)} frames ({sp}), {pts}, "
                f"scene_scale={self.scene_scale:.4g})")


# ------------------------------------------------------------------------------------------
# helpers for loaders

def every_nth_split(n: int, test_every: int) -> List[str]:
    """Every ``test_every``-th image (0, N, 2N, ...) held out, as gsplat's parser does."""
    if test_every <= 0:
        return ["train"] * n
    return ["test" if i % test_every == 0 else "train" for i in range(n)]


def finalize(frames: List[Frame], *, root: PathLike, format: str, points: Optional[PointCloud], normalize: bool,
             background: Sequence[float], applied_transform: Optional[np.ndarray] = None,
             meta: Optional[dict] = None, cache_images: bool = False) -> Dataset:
    """Normalise (optionally) and build the Dataset."""
    if not frames:
        raise DatasetError("no frames", root)
    ds = Dataset(frames, root=root, format=format, points=points, background=background,
                 applied_transform=applied_transform, meta=meta, cache_images=cache_images)
    if normalize:
        c2w = np.stack([f.camtoworld for f in frames])
        ds = ds.transformed(normalize_world(c2w, points.xyz if points is not None else None))
    return ds


def scaled_size(w: int, h: int, factor: float) -> Tuple[int, int]:
    return max(1, int(round(w / factor))), max(1, int(round(h / factor)))


def scale_K(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    K = np.array(K, dtype=np.float64)
    K[0, :] *= sx
    K[1, :] *= sy
    K[2] = [0, 0, 1]
    return K


def downscaled_folder(root: Path, rel: str, factor: int) -> Optional[Path]:
    """``images/x.png`` -> ``images_<f>/x.png`` (or ``x.jpg`` ...) when that file exists
    (nerfstudio/gsplat)."""
    if factor <= 1:
        return None
    parts = Path(rel).parts
    if not parts:
        return None
    return find_image_file(root.joinpath(f"{parts[0]}_{factor}", *parts[1:]))


def warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def check_matrix(m, shape: Tuple[int, ...], path: PathLike, field_name: str) -> np.ndarray:
    try:
        a = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"must be a numeric {'x'.join(map(str, shape))} matrix", path, field_name) from None
    if a.shape != shape:
        raise DatasetError(f"must be {'x'.join(map(str, shape))}, got shape {list(a.shape)}", path, field_name)
    if not np.isfinite(a).all():
        raise DatasetError("has non-finite values", path, field_name)
    return a


def pose_matrix(m, path: PathLike, field_name: str) -> Tuple[np.ndarray, float]:
    """A camera-to-world pose from a JSON ``transform_matrix``: 4x4 or 3x4 (the bottom row is
    ignored, as nerfstudio does). A rotation part that is not orthonormal (a scale, or rounding)
    is replaced by the nearest rotation (the nearest mirror, for a left-handed one) when it is
    off by more than 1e-5; returns ``(c2w [4, 4], how far the rotation part was from that)`` so
    the caller can warn (:func:`warn_poses`). A singular rotation part raises
    :class:`DatasetError`."""
    try:
        a = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError("must be a numeric 4x4 (or 3x4) matrix", path, field_name) from None
    if a.shape not in ((4, 4), (3, 4)):
        raise DatasetError(f"must be 4x4 (or 3x4), got shape {list(a.shape)}", path, field_name)
    if not np.isfinite(a).all():
        raise DatasetError("has non-finite values", path, field_name)
    c2w = np.eye(4)
    c2w[:3] = a[:3]
    R = c2w[:3, :3]
    U, S, Vt = np.linalg.svd(R)
    if S[-1] <= 1e-9 * max(S[0], 1e-300):
        raise DatasetError(f"rotation part {R.round(6).tolist()} is singular; not a camera-to-world pose", path,
                           field_name)
    Rn = U @ Vt
    dev = float(np.abs(R - Rn).max())
    if dev > 1e-5:
        c2w[:3, :3] = Rn
    return c2w, dev


def warn_poses(poses: Sequence[Tuple[np.ndarray, float]], path: PathLike, field_name: str = "transform_matrix"):
    """One warning for the :func:`pose_matrix` results of a file whose rotations were
    noticeably not orthonormal, and one if some are mirrored (left-handed)."""
    bad = [d for _, d in poses if d > 1e-3]
    if bad:
        warnings.warn(f"{path}: {len(bad)} {field_name} rotation(s) are not orthonormal (off by up to "
                      f"{max(bad):.3g}, e.g. scaled); using the nearest rotations", stacklevel=3)
    mirrored = sum(np.linalg.det(c2w[:3, :3]) < 0 for c2w, _ in poses)
    if mirrored:
        warnings.warn(f"{path}: {mirrored} of {len(poses)} {field_name} rotation(s) are mirrored (determinant < 0: "
                      f"a left-handed camera frame); check the file's convention", stacklevel=3)


def fov_to_focal(fov: float, size: int) -> float:
    return 0.5 * size / math.tan(0.5 * fov)


# ------------------------------------------------------------------------------------------
# paths, times, checks

def inside_root(root: PathLike, p: PathLike, source: PathLike, field_name: str, allow_outside: bool = False,
                value: Optional[str] = None) -> Path:
    """``p`` (already joined to ``root`` if relative) when it lies inside the dataset folder
    ``root`` (compared after normalising ``..``, without following links); else a
    :class:`DatasetError` naming ``source`` and ``field_name``, unless ``allow_outside``."""
    p = Path(p)
    if allow_outside:
        return p
    a = os.path.normpath(os.path.abspath(str(p)))
    r = os.path.normpath(os.path.abspath(str(root)))
    try:
        inside = os.path.commonpath([a, r]) == r
    except ValueError:  # different drives
        inside = False
    if not inside:
        shown = value if value is not None else str(p)
        raise DatasetError(f"{shown!r} leaves the dataset folder {r}; refused (the CLI's --allow-outside, or "
                           f"load_dataset(..., allow_outside=True), reads files outside it)", source, field_name)
    return p


def normalize_times(frames: List[Frame], source: PathLike, field_name: str = "time") -> Tuple[List[Frame], dict]:
    """Frames with their ``time`` mapped to [0, 1]: kept as they are when every time already
    lies in [0, 1], else ``(t - min) / (max - min)`` with the raw value kept in
    ``frame.extras["time_raw"]``. Returns ``(frames, meta)`` with ``time_raw_range`` when
    rescaled. Frames without a time keep none (one warning says how many)."""
    have = [f for f in frames if f.time is not None]
    if not have:
        return frames, {}
    if len(have) < len(frames):
        warnings.warn(f"{source}: {len(frames) - len(have)} of {len(frames)} frames have no '{field_name}'; they "
                      f"are treated as static views", stacklevel=3)
    ts = np.array([f.time for f in have], dtype=np.float64)
    lo, hi = float(ts.min()), float(ts.max())
    if lo >= 0.0 and hi <= 1.0:
        return frames, {}
    return rescale_times(frames, lo, hi)[0], {"time_raw_range": [lo, hi]}


def rescale_times(frames: List[Frame], lo: float, hi: float) -> Tuple[List[Frame], List[float]]:
    """Frames with their raw time (``extras["time_raw"]`` when it was rescaled before, else
    ``time``) mapped by ``(raw - lo) / (hi - lo)`` to ``time`` in [0, 1] (clamped; all 0 when
    ``hi <= lo``), the raw value kept in ``extras["time_raw"]``; also the raw times that fell
    outside ``[lo, hi]`` (beyond 1e-6 of the span). Frames without a time keep none."""
    span = hi - lo
    out, outside = [], []
    for f in frames:
        if f.time is None:
            out.append(f)
            continue
        raw = float(f.extras.get("time_raw", f.time))
        t = (raw - lo) / span if span > 0 else 0.0
        if span > 0 and not -1e-6 <= t <= 1 + 1e-6:
            outside.append(raw)
        out.append(replace(f, time=float(min(max(t, 0.0), 1.0)), extras={**f.extras, "time_raw": raw}))
    return out, outside


def data_cache_dir() -> Path:
    """Where dataset caches go when the dataset folder is not used: ``$LANGFIELD_DATA_CACHE``,
    else ``$XDG_CACHE_HOME/langfield/data`` (``~/.cache/langfield/data``)."""
    env = os.environ.get("LANGFIELD_DATA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "langfield" / "data"


_CHECKED: Dict[Tuple[str, int, int], Tuple[int, int]] = {}  # (abs path, size, mtime_ns) -> (w, h) of good files
_CHECKED_LOCK = threading.Lock()


def _file_key(p: Path) -> Tuple[str, int, int]:
    st = p.stat()
    return (os.path.abspath(str(p)), int(st.st_size), int(st.st_mtime_ns))


def check_image_file(path: PathLike, what: str = "image") -> Tuple[int, int]:
    """Decode a whole image (or a ``.npy`` depth map) and return its (width, height); raises
    :class:`MissingFileError` / :class:`ImageReadError` naming the file. Good results are
    remembered by path, size and mtime."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{what} not found", p)
    key = _file_key(p)
    with _CHECKED_LOCK:
        if key in _CHECKED:
            return _CHECKED[key]
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            shape = arr.shape
            np.asarray(arr[-1:]).sum()  # touches the end: a truncated file fails here
        except (ValueError, OSError) as e:
            raise ImageReadError(f"cannot read {what} ({e})", p) from None
        if len(shape) == 3 and shape[-1] == 1:
            shape = shape[:2]
        if len(shape) != 2:
            raise ImageReadError(f"{what} must be 2D, got shape {tuple(shape)}", p)
        wh = (int(shape[1]), int(shape[0]))
    else:
        arr = read_image(p, what)
        wh = (int(arr.shape[1]), int(arr.shape[0]))
    with _CHECKED_LOCK:
        _CHECKED[key] = wh
    return wh


def _check_cache_file(root: PathLike) -> Path:
    import hashlib

    r = os.path.abspath(str(root))
    return data_cache_dir() / "image-checks" / f"{hashlib.sha1(r.encode()).hexdigest()[:16]}.json"


def _check_files(jobs, root: PathLike, workers: Optional[int], persistent: bool) -> List[Tuple[int, str]]:
    """[(frame index, "path: reason")] for the jobs ``(i, path, what, (w, h) expected)`` that fail."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    cache_file = _check_cache_file(root) if persistent and jobs else None
    stored: Dict[str, list] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            stored = json.loads(cache_file.read_text("utf-8"))
            if not isinstance(stored, dict):
                stored = {}
        except (OSError, ValueError):
            stored = {}
    with _CHECKED_LOCK:
        for k, v in stored.items():
            if isinstance(v, list) and len(v) == 4 and all(isinstance(x, int) for x in v):
                _CHECKED.setdefault((k, v[0], v[1]), (v[2], v[3]))

    def one(job):
        i, p, what, (ew, eh) = job
        try:
            w, h = check_image_file(p, what)
        except DatasetError as e:
            reason = str(e)
            prefix = f"{p}: "
            return i, (reason if reason.startswith(prefix) else f"{p}: {reason}")
        if ew > 0 and eh > 0 and abs(w / h - ew / eh) > 0.01 * (ew / eh):
            return i, f"{p}: {what} is {w}x{h}, its frame expects {ew}x{eh} (aspect ratios differ)"
        return None

    n = workers or min(8, (os.cpu_count() or 2))
    if len(jobs) <= 1 or n <= 1:
        results = [one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(max_workers=n) as ex:
            results = list(ex.map(one, jobs))
    bad = [r for r in results if r is not None]
    if cache_file is not None:
        good = {}
        with _CHECKED_LOCK:
            for _, p, _, _ in jobs:
                try:
                    key = _file_key(Path(p))
                except OSError:
                    continue
                if key in _CHECKED:
                    good[key[0]] = [key[1], key[2], *_CHECKED[key]]
        if good and good != stored:
            try:
                from ..io.checkpoint import atomic_write_json

                cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(cache_file, good, indent=None)
            except OSError:
                pass  # a cache only
    return bad
