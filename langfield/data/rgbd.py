"""RGB-D frame sources for online mapping: TUM RGB-D, Replica (NICE-SLAM layout),
Microsoft 7-Scenes, numbered colour/depth folders (ICL-NUIM / Open3D style) and what
``langfield scenes make ... --kind rgbd`` writes.

::

    from langfield.data.rgbd import open_rgbd

    seq = open_rgbd("data/rgbd_dataset_freiburg1_desk", downscale=2, max_frames=300)
    print(seq)                      # format, frames, size, intrinsics, ground truth
    for frame in seq:               # time order; bad frames are skipped with a warning
        frame.color                 # uint8 [H, W, 3]
        frame.depth                 # float32 [H, W] metres, 0 = invalid
        frame.K, frame.timestamp    # [3, 3] float64, seconds
        frame.camtoworld            # [4, 4] OpenCV camera-to-world, or None
    t, c2w = seq.gt_trajectory()    # frames that have ground truth (for eval.trajectory.ate)

Conventions: OpenCV cameras (x right, y down, z forward), pixel centres at +0.5 (published
intrinsics, which put pixel centres at integers, get 0.5 added to cx and cy; see
``pixel_centers``), ``K`` for the image as returned (after ``downscale``), ``camtoworld``
as the dataset gives it (TUM, Replica, 7-Scenes and Open3D logs all store camera-to-world
poses with OpenCV axes).
Depth is camera z-depth; ``depth_scale`` is the stored value per metre (5000 TUM, 6553.5
Replica, 1000 7-Scenes and Open3D folders).

Reading is cheap: :func:`open_rgbd` lists files and reads text files (trajectories,
intrinsics) and one image header; pixels are decoded when a frame is asked for.
``sequence[i]`` raises :class:`BadFrameError` for a frame that cannot be used (colour or
depth missing or unreadable, wrong size, NaNs, no valid depth); iterating warns and skips
it (``sequence.skipped`` lists them).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from langfield.data.base import DatasetError, Distortion, ImageReadError, MissingFileError, image_size, read_image
from langfield.eval.trajectory import TrajectoryError, interpolate_poses, quat_to_rot, read_tum_trajectory

__all__ = ["RGBDFrame", "RGBDSequence", "RGBDError", "BadFrameError", "open_rgbd", "detect_rgbd_format",
           "open_tum", "open_replica", "open_7scenes", "open_folders", "associate_tum", "tum_camera", "make_frame",
           "downscale_depth", "downscale_color", "undistort_maps", "remap_rgbd", "RGBD_FORMATS", "TUM_CAMERAS"]

PathLike = Union[str, os.PathLike]
RGBD_FORMATS = ("tum", "replica", "7scenes", "folders")

#: TUM RGB-D published colour intrinsics (fx, fy, cx, cy) and OpenCV distortion (k1 k2 p1 p2 k3)
#: by sensor; "ros" is the ROS default used for the depth-registered images.
TUM_CAMERAS: Dict[str, Tuple[Tuple[float, float, float, float], Tuple[float, ...]]] = {
    "fr1": ((517.3, 516.5, 318.6, 255.3), (0.2624, -0.9531, -0.0054, 0.0026, 1.1633)),
    "fr2": ((520.9, 521.0, 325.1, 249.7), (0.2312, -0.7849, -0.0033, -0.0001, 0.9172)),
    "fr3": ((535.4, 539.2, 320.1, 247.6), (0.0, 0.0, 0.0, 0.0, 0.0)),
    "ros": ((525.0, 525.0, 319.5, 239.5), (0.0, 0.0, 0.0, 0.0, 0.0)),
}
#: NICE-SLAM's Replica camera (configs/Replica/replica.yaml), used when no cam_params.json is found
REPLICA_DEFAULT = {"w": 1200, "h": 680, "fx": 600.0, "fy": 600.0, "cx": 599.5, "cy": 339.5, "scale": 6553.5}
SEVEN_SCENES_DEFAULT = (585.0, 585.0, 320.0, 240.0)
PRIMESENSE_DEFAULT = (525.0, 525.0, 319.5, 239.5)  # Open3D's PinholeCameraIntrinsic PrimeSenseDefault
COLOR_DIRS = ("color", "colour", "rgb", "image", "images")
DEPTH_DIRS = ("depth", "depths")
COLOR_EXTS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff")
DEPTH_EXTS = (".png", ".pgm", ".tif", ".tiff", ".npy")


class RGBDError(DatasetError):
    """Bad RGB-D input; the message names the file (and field or line)."""


class BadFrameError(RGBDError):
    """One frame that cannot be used (skipped with a warning when iterating)."""


# ------------------------------------------------------------------------------------------
# records

@dataclass
class RGBDFrame:
    """One RGB-D frame, decoded. ``index`` is its position in the sequence (after
    ``stride``/``max_frames``), ``timestamp`` seconds, ``color`` uint8 [H, W, 3], ``depth``
    float32 [H, W] metres (0 = invalid), ``K`` [3, 3] float64 of this image, ``camtoworld``
    [4, 4] float64 OpenCV ground truth or None, ``distortion`` of the colour image or None
    (pixels left distorted; None when the sequence undistorts them)."""

    index: int
    timestamp: float
    name: str
    color: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    width: int
    height: int
    camtoworld: Optional[np.ndarray] = None
    distortion: Optional[Distortion] = None
    color_path: Optional[Path] = None
    depth_path: Optional[Path] = None

    @property
    def viewmat(self) -> Optional[np.ndarray]:
        """Ground-truth world-to-camera [4, 4], or None."""
        if self.camtoworld is None:
            return None
        return _inv_rigid(self.camtoworld)

    @property
    def image(self) -> np.ndarray:
        """Colour as float32 [H, W, 3] in [0, 1]."""
        return self.color.astype(np.float32) / 255.0

    @property
    def valid(self) -> np.ndarray:
        """[H, W] bool: pixels with a depth measurement."""
        return self.depth > 0

    def to_torch(self, device: Any = "cpu") -> Dict[str, Any]:
        """``image`` [H, W, 3] float32, ``depth`` [H, W] float32, ``K`` [3, 3] float32 (and
        ``camtoworld`` [4, 4] float32 when known) as torch tensors on ``device``."""
        import torch

        out = {"image": torch.from_numpy(self.image).to(device), "depth": torch.from_numpy(self.depth).to(device),
               "K": torch.from_numpy(self.K).float().to(device), "timestamp": self.timestamp, "index": self.index}
        if self.camtoworld is not None:
            out["camtoworld"] = torch.from_numpy(self.camtoworld).float().to(device)
        return out


@dataclass
class _Entry:
    timestamp: float
    name: str
    color: Path
    depth: Path
    pose: Optional[np.ndarray] = None


def _inv_rigid(M: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = M[:3, :3].T
    out[:3, 3] = -M[:3, :3].T @ M[:3, 3]
    return out


# ------------------------------------------------------------------------------------------
# pixels

def downscale_color(color: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter an [H, W, C] uint8 image by an integer ``factor`` (the bottom/right rows
    that do not fill a block are dropped)."""
    if factor == 1:
        return color
    from PIL import Image

    h, w = color.shape[0] // factor, color.shape[1] // factor
    im = Image.fromarray(np.ascontiguousarray(color[:h * factor, :w * factor]))
    return np.asarray(im.reduce(factor))  # box filter (C)


def downscale_depth(depth: np.ndarray, factor: int) -> np.ndarray:
    """Min-pool the *valid* (> 0) depths of each ``factor`` x ``factor`` block, so invalid
    pixels never blend into measurements (0 where a block has no valid pixel)."""
    if factor == 1:
        return depth
    h, w = depth.shape[0] // factor, depth.shape[1] // factor
    z = np.where(depth[:h * factor, :w * factor] > 0, depth[:h * factor, :w * factor], np.float32(np.inf))
    out = z[0::factor, 0::factor].astype(np.float32)
    for dy in range(factor):
        for dx in range(factor):
            if dy or dx:
                np.minimum(out, z[dy::factor, dx::factor], out=out)
    out[np.isinf(out)] = 0
    return out


def undistort_maps(K: np.ndarray, coeffs: Sequence[float], width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """For every pixel of the undistorted pinhole image (same ``K``, pixel centres at +0.5),
    where it lies in the distorted image: ``(x [H, W], y [H, W])`` float64 continuous
    coordinates, OpenCV's model ``(k1, k2, p1, p2, k3)``."""
    k1, k2, p1, p2, k3 = (list(coeffs) + [0.0] * 5)[:5]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd * K[0, 0] + K[0, 2], yd * K[1, 1] + K[1, 2]


def remap_rgbd(color: np.ndarray, depth: np.ndarray, mx: np.ndarray, my: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Resample colour bilinearly and depth by nearest pixel at continuous coordinates
    (``mx``, ``my``; pixel centres at +0.5); outside the image: black, depth 0."""
    h, w = depth.shape
    fx, fy = mx - 0.5, my - 0.5
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    ax, ay = (fx - x0)[..., None], (fy - y0)[..., None]
    inside = (fx >= -0.5) & (fx <= w - 0.5) & (fy >= -0.5) & (fy <= h - 0.5)
    x0c, x1c = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    y0c, y1c = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    c = color.astype(np.float32)
    out = ((c[y0c, x0c] * (1 - ax) + c[y0c, x1c] * ax) * (1 - ay) + (c[y1c, x0c] * (1 - ax) + c[y1c, x1c] * ax) * ay)
    out = np.where(inside[..., None], np.clip(np.round(out), 0, 255), 0).astype(np.uint8)
    xn = np.clip(np.floor(mx).astype(np.int64), 0, w - 1)
    yn = np.clip(np.floor(my).astype(np.int64), 0, h - 1)
    d = np.where(inside, depth[yn, xn], 0).astype(np.float32)
    return out, d


def _read_depth_raw(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise MissingFileError("depth map not found", path)
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ImageReadError(f"cannot read depth map ({e})", path) from None
        if arr.dtype.kind not in "fiu":
            raise ImageReadError(f"depth map has dtype {arr.dtype}, not numbers", path)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return arr
    arr = read_image(path, "depth map")
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr


# ------------------------------------------------------------------------------------------
# the sequence

class RGBDSequence:
    """A time-ordered RGB-D sequence read lazily. ``len(seq)``, ``seq[i]`` (an
    :class:`RGBDFrame`, or :class:`BadFrameError`), iteration (bad frames skipped with a
    warning, listed in ``skipped``), ``K`` / ``width`` / ``height`` / ``intrinsics`` of the
    returned images, ``timestamps`` [N], ``gt_poses`` [N, 4, 4] (NaN where a frame has no
    ground truth), ``has_gt``, :meth:`gt_trajectory`, ``name``, ``format``, ``root``,
    ``depth_scale``, ``downscale``, ``stride``, ``max_frames``, ``distortion``, ``meta``."""

    def __init__(self, entries: List[_Entry], *, root: PathLike, format: str, name: str, K: np.ndarray,
                 width: int, height: int, depth_scale: float, distortion: Optional[Sequence[float]] = None,
                 downscale: int = 1, stride: int = 1, max_frames: Optional[int] = None,
                 invalid_depth: Sequence[int] = (), pixel_centers: str = "half", undistort: bool = False,
                 meta: Optional[dict] = None):
        if int(downscale) != downscale or downscale < 1:
            raise ValueError(f"downscale must be a positive integer, got {downscale}")
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        if not (depth_scale > 0 and math.isfinite(depth_scale)):
            raise ValueError(f"depth_scale must be a positive number (stored units per metre), got {depth_scale}")
        self.root = Path(root)
        self.format = format
        self.name = name
        self.downscale = int(downscale)
        self.stride = int(stride)
        self.max_frames = max_frames
        self.depth_scale = float(depth_scale)
        self.invalid_depth = tuple(int(v) for v in invalid_depth)
        self.meta = dict(meta or {})
        if pixel_centers not in ("half", "opencv"):
            raise ValueError(f"pixel_centers must be 'half' or 'opencv', got {pixel_centers!r}")
        self.meta["pixel_centers"] = pixel_centers
        entries = sorted(entries, key=lambda e: e.timestamp)
        entries = entries[::self.stride]
        if max_frames is not None:
            entries = entries[:int(max_frames)]
        if not entries:
            raise RGBDError("no RGB-D frames", root)
        self._entries = entries
        self.source_K = np.array(K, dtype=np.float64)
        if pixel_centers == "opencv":  # integer pixel centres -> langfield's +0.5 convention
            self.source_K[:2, 2] += 0.5
        self.source_width, self.source_height = int(width), int(height)
        f = self.downscale
        self.width, self.height = self.source_width // f, self.source_height // f
        self.K = self.source_K.copy()
        self.K[:2] /= f
        self.distortion: Optional[Distortion] = None
        self._coeffs: Optional[Tuple[float, ...]] = None
        self._maps: Optional[Tuple[np.ndarray, np.ndarray]] = None
        if distortion is not None and any(abs(v) > 0 for v in distortion):
            if len(distortion) > 5:
                raise ValueError(f"distortion must be (k1, k2, p1, p2[, k3]), got {len(distortion)} values")
            d = tuple(float(v) for v in distortion) + (0.0,) * (5 - len(distortion))
            self._coeffs = d
            if not undistort:
                fx, fy, cx, cy = self.K[0, 0], self.K[1, 1], self.K[0, 2], self.K[1, 2]
                self.distortion = Distortion("FULL_OPENCV", (fx, fy, cx, cy, *d, 0.0, 0.0, 0.0), self.width,
                                             self.height)
        self.undistort = bool(undistort) and self._coeffs is not None
        self.skipped: List[Tuple[int, str]] = []

    # ---- sizes and metadata --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def intrinsics(self) -> Dict[str, float]:
        """``fx fy cx cy w h`` of the returned images."""
        return {"fx": float(self.K[0, 0]), "fy": float(self.K[1, 1]), "cx": float(self.K[0, 2]),
                "cy": float(self.K[1, 2]), "w": self.width, "h": self.height}

    @property
    def timestamps(self) -> np.ndarray:
        return np.array([e.timestamp for e in self._entries], dtype=np.float64)

    @property
    def names(self) -> List[str]:
        return [e.name for e in self._entries]

    @property
    def gt_poses(self) -> np.ndarray:
        """[N, 4, 4] camera-to-world ground truth; NaN for frames without."""
        out = np.full((len(self), 4, 4), np.nan)
        for i, e in enumerate(self._entries):
            if e.pose is not None:
                out[i] = e.pose
        return out

    @property
    def has_gt(self) -> np.ndarray:
        """[N] bool: frames with a ground-truth pose."""
        return np.array([e.pose is not None for e in self._entries], dtype=bool)

    def gt_trajectory(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(timestamps [M], camera-to-world [M, 4, 4])`` of the frames with ground truth
        (write it with :func:`langfield.eval.trajectory.write_tum_trajectory`)."""
        m = self.has_gt
        return self.timestamps[m], self.gt_poses[m]

    def paths(self, i: int) -> Tuple[Path, Path]:
        """(colour path, depth path) of frame ``i``."""
        e = self._entries[i]
        return e.color, e.depth

    # ---- frames --------------------------------------------------------------------------
    def __getitem__(self, i: int) -> RGBDFrame:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"RGBDSequence indices must be integers, not {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} out of range (sequence of {len(self)})")
        e = self._entries[i]
        try:
            color = read_image(e.color, "colour image")
        except DatasetError as err:
            raise BadFrameError(f"frame {i} ({e.name}) skipped: {err}") from None
        if color.ndim == 2:
            color = np.repeat(color[..., None], 3, axis=2)
        if color.shape[2] == 1:
            color = np.repeat(color, 3, axis=2)
        elif color.shape[2] == 2:
            color = np.repeat(color[..., :1], 3, axis=2)
        color = color[..., :3]
        if color.dtype == np.uint16:
            color = (color >> 8).astype(np.uint8)
        elif color.dtype != np.uint8:
            c = color.astype(np.float32)
            color = np.clip(np.round(c * (255.0 if c.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        try:
            raw = _read_depth_raw(e.depth)
        except DatasetError as err:
            raise BadFrameError(f"frame {i} ({e.name}) skipped: {err}") from None
        sw, sh = self.source_width, self.source_height
        if color.shape[:2] != (sh, sw):
            raise BadFrameError(f"frame {i} ({e.name}) skipped: colour image is {color.shape[1]}x{color.shape[0]}, "
                                f"the sequence is {sw}x{sh}", e.color)
        if raw.shape != (sh, sw):
            raise BadFrameError(f"frame {i} ({e.name}) skipped: depth map is "
                                f"{'x'.join(map(str, raw.shape[::-1]))}, the colour image {sw}x{sh}", e.depth)
        if raw.dtype.kind == "f":
            if np.isnan(raw).any():
                raise BadFrameError(f"frame {i} ({e.name}) skipped: depth map has {int(np.isnan(raw).sum())} NaN "
                                    "values", e.depth)
            depth = raw.astype(np.float32) / np.float32(self.depth_scale)
            depth[~np.isfinite(depth) | (depth < 0)] = 0
        else:
            bad = np.zeros(raw.shape, dtype=bool)
            for v in self.invalid_depth:
                bad |= raw == v
            depth = (raw.astype(np.float64) / self.depth_scale).astype(np.float32)
            depth[bad | (raw < 0)] = 0
        if self.undistort:
            if self._maps is None:
                self._maps = undistort_maps(self.source_K, self._coeffs, sw, sh)  # type: ignore[arg-type]
            color, depth = remap_rgbd(color, depth, *self._maps)
        if not (depth > 0).any():
            raise BadFrameError(f"frame {i} ({e.name}) skipped: no valid depth", e.depth)
        if self.downscale > 1:
            color = downscale_color(color, self.downscale)
            depth = downscale_depth(depth, self.downscale)
        return RGBDFrame(index=i, timestamp=e.timestamp, name=e.name, color=np.ascontiguousarray(color),
                         depth=np.ascontiguousarray(depth, dtype=np.float32), K=self.K.copy(), width=self.width,
                         height=self.height, camtoworld=None if e.pose is None else e.pose.copy(),
                         distortion=self.distortion, color_path=e.color, depth_path=e.depth)

    def __iter__(self) -> Iterator[RGBDFrame]:
        for i in range(len(self)):
            try:
                yield self[i]
            except BadFrameError as err:
                if all(j != i for j, _ in self.skipped):
                    self.skipped.append((i, str(err)))
                warnings.warn(str(err), stacklevel=2)

    def __repr__(self) -> str:
        gt = int(self.has_gt.sum())
        return (f"RGBDSequence({self.format}, {self.name!r}, {len(self)} frames, {self.width}x{self.height}, "
                f"fx={self.K[0, 0]:.2f} fy={self.K[1, 1]:.2f} cx={self.K[0, 2]:.2f} cy={self.K[1, 2]:.2f}, "
                f"depth/{self.depth_scale:g}, ground truth for {gt})")


# ------------------------------------------------------------------------------------------
# helpers

def _intrinsics(intrinsics, where: PathLike) -> Tuple[float, float, float, float]:
    try:
        v = tuple(float(x) for x in np.asarray(intrinsics, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        raise RGBDError("intrinsics must be numbers (fx, fy, cx, cy) or a 3x3 K", where, "intrinsics") from None
    if len(v) == 9:
        v = (v[0], v[4], v[2], v[5])
    if len(v) != 4 or not all(math.isfinite(x) for x in v) or v[0] <= 0 or v[1] <= 0:
        raise RGBDError(f"intrinsics must be (fx, fy, cx, cy) with positive focal lengths, got {v}", where,
                        "intrinsics")
    return v  # type: ignore[return-value]


def _K(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


def _first_size(entries: List[_Entry], root: PathLike) -> Tuple[int, int]:
    errs = []
    for e in entries[:8]:
        try:
            return image_size(e.color, "colour image")
        except DatasetError as err:
            errs.append(str(err))
    raise RGBDError("cannot read the size of the first colour images: " + "; ".join(errs[:2]), root)


def _read_pose_matrix(path: Path, rows: int = 4) -> Optional[np.ndarray]:
    """A 4x4 (or 3x4) whitespace matrix file -> c2w, or None with a warning when unusable."""
    try:
        vals = [float(v) for v in path.read_text().split()]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: unreadable pose ({type(e).__name__}); frame has no ground truth", stacklevel=4)
        return None
    if len(vals) not in (12, 16):
        warnings.warn(f"{path}: expected a 4x4 pose matrix, got {len(vals)} numbers; frame has no ground truth",
                      stacklevel=4)
        return None
    M = np.eye(4)
    M[:3] = np.asarray(vals[:12]).reshape(3, 4)
    if not np.isfinite(M).all():
        warnings.warn(f"{path}: non-finite pose; frame has no ground truth", stacklevel=4)
        return None
    return M


def _seq_name(root: Path) -> str:
    r = root.resolve()
    return f"{r.parent.name}/{r.name}" if r.name in ("tum", "replica") else r.name


def _number(stem: str) -> Optional[int]:
    m = re.findall(r"\d+", stem)
    return int(m[-1]) if m else None


# ------------------------------------------------------------------------------------------
# TUM RGB-D

def _read_tum_list(path: Path) -> List[Tuple[float, str]]:
    if not path.is_file():
        raise RGBDError("file not found", path)
    out = []
    for ln, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.replace(",", " ").split()
        if len(parts) < 2:
            raise RGBDError(f"line {ln}: expected 'timestamp filename', got {s[:80]!r}", path)
        try:
            t = float(parts[0])
        except ValueError:
            raise RGBDError(f"line {ln}: timestamp {parts[0]!r} is not a number", path) from None
        if not math.isfinite(t):
            raise RGBDError(f"line {ln}: timestamp is not finite", path)
        out.append((t, parts[1]))
    return out


def associate_tum(t_first, t_second, max_difference: float = 0.02, offset: float = 0.0) -> List[Tuple[int, int]]:
    """TUM's ``associate.py`` rule: candidate pairs with ``|a - (b + offset)| < max_difference``,
    taken greedily by smallest difference (ties by first then second timestamp), each
    timestamp used once. Returns index pairs ``(i_first, i_second)`` sorted by the first."""
    a = np.asarray(t_first, dtype=np.float64)
    b = np.asarray(t_second, dtype=np.float64) + offset
    if len(a) == 0 or len(b) == 0:
        return []
    order = np.argsort(b, kind="stable")
    bs = b[order]
    lo = np.searchsorted(bs, a - max_difference, side="left")
    hi = np.searchsorted(bs, a + max_difference, side="right")
    ia, ib, d = [], [], []
    for i in range(len(a)):
        js = order[lo[i]:hi[i]]
        if len(js) == 0:
            continue
        dd = np.abs(a[i] - b[js])
        k = dd < max_difference
        ia.append(np.full(int(k.sum()), i))
        ib.append(js[k])
        d.append(dd[k])
    if not ia:
        return []
    ia, ib, d = np.concatenate(ia), np.concatenate(ib), np.concatenate(d)
    sel = np.lexsort((b[ib], a[ia], d))
    used_a, used_b, pairs = set(), set(), []
    for s in sel:
        i, j = int(ia[s]), int(ib[s])
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        pairs.append((i, j))
    pairs.sort()
    return pairs


def tum_camera(path: PathLike) -> Optional[str]:
    """``"fr1"`` / ``"fr2"`` / ``"fr3"`` from a TUM folder name (``rgbd_dataset_freiburg2_xyz``,
    ``fr1_desk``...), else None."""
    name = Path(path).resolve().name.lower()
    m = re.search(r"freiburg([123])", name) or re.search(r"(?:^|[^a-z0-9])fr([123])(?:[^0-9]|$)", name)
    return f"fr{m.group(1)}" if m else None


def open_tum(path: PathLike, *, intrinsics=None, distortion=None, depth_scale: Optional[float] = None,
             camera: Optional[str] = None, max_difference: float = 0.02, gt_max_gap: Optional[float] = 0.1,
             undistort: bool = False, pixel_centers: str = "auto", downscale: int = 1, stride: int = 1,
             max_frames: Optional[int] = None) -> RGBDSequence:
    """A TUM RGB-D folder (``rgb.txt``, ``depth.txt``, optional ``groundtruth.txt``).

    Colour and depth are associated one-to-one by nearest timestamp (< ``max_difference`` s,
    :func:`associate_tum`); colour frames without depth are dropped. Ground truth is
    interpolated to the colour timestamps (linear translation, slerp rotation); frames
    outside its time range, or between samples more than ``gt_max_gap`` s apart, get none.
    Intrinsics: ``intrinsics=(fx, fy, cx, cy)`` > ``cameras.json`` (langfield scenes) >
    ``camera`` (``"fr1"``, ``"fr2"``, ``"fr3"``, ``"ros"``) > the folder name
    (``freiburg1`` ...) > ROS default (525, 525, 319.5, 239.5) with a warning.
    ``distortion``: (k1, k2, p1, p2, k3), default that of the TUM camera (none with given
    ``intrinsics`` or cameras.json); it is reported (``sequence.distortion``, a COLMAP
    FULL_OPENCV camera) and the pixels are left as they are, unless ``undistort``: colour
    (bilinear) and depth (nearest) are then resampled to the pinhole camera ``K`` and
    ``sequence.distortion`` is None. Depth: value / 5000.
    ``pixel_centers``: the convention of the intrinsics read or given: ``"opencv"`` (pixel
    centres at integers, as datasets publish them: 0.5 is added to cx, cy so that ``K``
    follows langfield's +0.5 convention), ``"half"`` (already +0.5) or ``"auto"`` (half for cameras.json, which langfield writes, else opencv)."""
    root = Path(path)
    rgb = _read_tum_list(root / "rgb.txt")
    dep = _read_tum_list(root / "depth.txt")
    pairs = associate_tum([t for t, _ in rgb], [t for t, _ in dep], max_difference)
    meta: Dict[str, Any] = {"colour_frames": len(rgb), "depth_frames": len(dep), "associated": len(pairs)}
    if not pairs:
        raise RGBDError(f"no colour/depth pair is within {max_difference} s ({len(rgb)} colour, {len(dep)} depth "
                        "timestamps)", root / "rgb.txt")
    entries = [_Entry(rgb[i][0], Path(rgb[i][1]).stem, root / rgb[i][1], root / dep[j][1]) for i, j in pairs]

    gt_path = root / "groundtruth.txt"
    if gt_path.is_file():
        try:
            gt = read_tum_trajectory(gt_path)
        except TrajectoryError as e:
            raise RGBDError(str(e)) from None
        poses, ok = interpolate_poses(gt.timestamps, gt.poses, [e.timestamp for e in entries], max_gap=gt_max_gap)
        for e, p, v in zip(entries, poses, ok):
            e.pose = p if v else None
        meta["groundtruth"] = str(gt_path)

    cam_json = root / "cameras.json"
    scale = 5000.0
    dist = None
    fxy = None
    cam_name = camera
    if cam_json.is_file() and intrinsics is None and camera is None:
        try:
            c = json.loads(cam_json.read_text())
            fxy = (float(c["fx"]), float(c["fy"]), float(c["cx"]), float(c["cy"]))
            scale = float(c.get("depth_scale", scale))
            cam_name = "cameras.json"
        except (ValueError, KeyError, TypeError) as e:
            raise RGBDError(f"cannot read intrinsics ({type(e).__name__}: {e})", cam_json, "fx fy cx cy") from None
    if intrinsics is not None:
        fxy = _intrinsics(intrinsics, root)
        cam_name = "given"
    elif fxy is None:
        if cam_name is None:
            cam_name = tum_camera(root)
        if cam_name is None:
            warnings.warn(f"{root}: TUM camera unknown (folder name has no freiburg1/2/3); using the ROS default "
                          "intrinsics 525 525 319.5 239.5 (pass intrinsics= or camera='fr1'|'fr2'|'fr3')", stacklevel=3)
            cam_name = "ros"
        if cam_name not in TUM_CAMERAS:
            raise RGBDError(f"unknown TUM camera {cam_name!r}; use one of {', '.join(TUM_CAMERAS)}", root, "camera")
        fxy, dist = TUM_CAMERAS[cam_name]
    if distortion is not None:
        dist = tuple(float(v) for v in distortion)
    if depth_scale is not None:
        scale = float(depth_scale)
    meta["camera"] = cam_name
    if pixel_centers == "auto":
        pixel_centers = "half" if cam_name == "cameras.json" else "opencv"
    w, h = _first_size(entries, root)
    return RGBDSequence(entries, root=root, format="tum", name=_seq_name(root), K=_K(*fxy), width=w, height=h,
                        depth_scale=scale, distortion=dist, downscale=downscale, stride=stride, max_frames=max_frames,
                        pixel_centers=pixel_centers, undistort=undistort, meta=meta)


# ------------------------------------------------------------------------------------------
# Replica (NICE-SLAM layout)

def open_replica(path: PathLike, *, intrinsics=None, depth_scale: Optional[float] = None, fps: float = 30.0,
                 pixel_centers: str = "auto", downscale: int = 1, stride: int = 1,
                 max_frames: Optional[int] = None) -> RGBDSequence:
    """Replica as NICE-SLAM / SplaTAM / MonoGS store it: ``results/frame%06d.jpg``,
    ``results/depth%06d.png`` (metres x 6553.5), ``traj.txt`` (one row-major camera-to-
    world 4x4 per line, frame order), intrinsics from ``cam_params.json`` (``{"camera":
    {w h fx fy cx cy scale}}``, in the folder or its parent) or NICE-SLAM's defaults with a
    warning. Timestamps are ``index / fps``.
    ``pixel_centers``: the convention of the intrinsics read or given: ``"opencv"`` (pixel
    centres at integers, as datasets publish them: 0.5 is added to cx, cy so that ``K``
    follows langfield's +0.5 convention), ``"half"`` (already +0.5) or ``"auto"`` (half inside a langfield scene folder (a scene.json beside replica/), else opencv)."""
    root = Path(path)
    res = root / "results"
    colors = {_number(p.stem): p for p in res.glob("frame*") if p.suffix.lower() in COLOR_EXTS}
    depths = {_number(p.stem): p for p in res.glob("depth*") if p.suffix.lower() in DEPTH_EXTS}
    colors.pop(None, None)
    depths.pop(None, None)
    nums = sorted(set(colors) & set(depths))
    if not nums:
        raise RGBDError("no frame*/depth* pairs in results/", root)
    missing = len(set(colors) - set(depths))
    if missing:
        warnings.warn(f"{res}: {missing} colour frame(s) without a depth map are left out", stacklevel=3)
    cam = None
    for p in (root / "cam_params.json", root.parent / "cam_params.json"):
        if p.is_file():
            try:
                c = json.loads(p.read_text())["camera"]
                cam = {k: float(c[k]) for k in ("fx", "fy", "cx", "cy")}
                cam["scale"] = float(c.get("scale", REPLICA_DEFAULT["scale"]))
            except (ValueError, KeyError, TypeError) as e:
                raise RGBDError(f"cannot read camera ({type(e).__name__}: {e})", p, "camera") from None
            break
    if cam is None and intrinsics is None:
        warnings.warn(f"{root}: no cam_params.json; using NICE-SLAM's Replica camera (fx=fy=600, cx=599.5, "
                      "cy=339.5, depth/6553.5)", stacklevel=3)
        cam = dict(REPLICA_DEFAULT)
    fxy = _intrinsics(intrinsics, root) if intrinsics is not None else (cam["fx"], cam["fy"], cam["cx"], cam["cy"])
    scale = float(depth_scale) if depth_scale is not None else (cam or REPLICA_DEFAULT)["scale"]
    entries = [_Entry(k / fps, colors[n].stem, colors[n], depths[n]) for k, n in enumerate(nums)]
    traj = root / "traj.txt"
    if traj.is_file():
        rows = []
        for ln, line in enumerate(traj.read_text(errors="replace").splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                v = [float(x) for x in s.split()]
            except ValueError:
                raise RGBDError(f"line {ln}: not a number in {s[:60]!r}", traj) from None
            if len(v) != 16:
                raise RGBDError(f"line {ln}: expected 16 numbers (a row-major 4x4 camera-to-world), got {len(v)}",
                                traj)
            rows.append(np.asarray(v).reshape(4, 4))
        if len(rows) != len(nums):
            warnings.warn(f"{traj}: {len(rows)} poses for {len(nums)} frames; matched in order", stacklevel=3)
        for k, e in enumerate(entries):
            n = nums[k]
            if n < len(rows) and np.isfinite(rows[n]).all():
                e.pose = rows[n]
    if pixel_centers == "auto":
        pixel_centers = "half" if (root.resolve().parent / "scene.json").is_file() else "opencv"
    w, h = _first_size(entries, root)
    return RGBDSequence(entries, root=root, format="replica", name=_seq_name(root), K=_K(*fxy), width=w,
                        height=h, depth_scale=scale, downscale=downscale, stride=stride, max_frames=max_frames,
                        pixel_centers=pixel_centers, meta={"fps": fps})


# ------------------------------------------------------------------------------------------
# Microsoft 7-Scenes

_SEVEN = re.compile(r"^frame-(\d+)\.color\.(png|jpg|jpeg)$", re.IGNORECASE)


def _seven_frames(root: Path) -> Dict[int, Path]:
    out = {}
    if root.is_dir():
        for p in root.iterdir():
            m = _SEVEN.match(p.name)
            if m:
                out[int(m.group(1))] = p
    return out


def open_7scenes(path: PathLike, *, intrinsics=None, depth_scale: float = 1000.0, fps: float = 30.0,
                 pixel_centers: str = "auto", downscale: int = 1, stride: int = 1,
                 max_frames: Optional[int] = None) -> RGBDSequence:
    """One Microsoft 7-Scenes sequence folder: ``frame-NNNNNN.color.{png,jpg}``,
    ``frame-NNNNNN.depth.png`` (millimetres; 0 and 65535 invalid), ``frame-NNNNNN.pose.txt``
    (4x4 camera-to-world). Intrinsics from ``camera-intrinsics.txt`` (a 3x3 K) when present,
    else fx=fy=585, cx=320, cy=240. Timestamps are ``index / fps``. (The original release's
    depth is not registered to the colour camera; frames are read as stored.)
    ``pixel_centers``: the convention of the intrinsics read or given: ``"opencv"`` (pixel
    centres at integers, as datasets publish them: 0.5 is added to cx, cy so that ``K``
    follows langfield's +0.5 convention), ``"half"`` (already +0.5) or ``"auto"`` (opencv)."""
    root = Path(path)
    colors = _seven_frames(root)
    if not colors:
        raise RGBDError("no frame-NNNNNN.color.png|jpg files", root)
    entries = []
    for k, n in enumerate(sorted(colors)):
        c = colors[n]
        stem = c.name[:c.name.lower().index(".color.")]
        e = _Entry(k / fps, stem, c, root / f"{stem}.depth.png")
        pp = root / f"{stem}.pose.txt"
        if pp.is_file():
            e.pose = _read_pose_matrix(pp)
        entries.append(e)
    fxy: Tuple[float, float, float, float] = SEVEN_SCENES_DEFAULT
    ci = root / "camera-intrinsics.txt"
    if intrinsics is not None:
        fxy = _intrinsics(intrinsics, root)
    elif ci.is_file():
        try:
            vals = [float(v) for v in ci.read_text().split()]
        except ValueError:
            raise RGBDError("not numbers", ci, "K") from None
        if len(vals) != 9:
            raise RGBDError(f"expected a 3x3 matrix, got {len(vals)} numbers", ci, "K")
        fxy = _intrinsics(vals, ci)
    w, h = _first_size(entries, root)
    return RGBDSequence(entries, root=root, format="7scenes", name=_seq_name(root), K=_K(*fxy), width=w,
                        height=h, depth_scale=depth_scale, invalid_depth=(0, 65535), downscale=downscale,
                        stride=stride, max_frames=max_frames,
                        pixel_centers="opencv" if pixel_centers == "auto" else pixel_centers, meta={"fps": fps})


# ------------------------------------------------------------------------------------------
# numbered colour/depth folders (ICL-NUIM / Open3D style)

def _find_dir(root: Path, names: Sequence[str]) -> Optional[Path]:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _numbered(folder: Path, exts: Sequence[str]) -> Dict[int, Path]:
    out: Dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in exts:
            n = _number(p.stem)
            if n is not None and n not in out:
                out[n] = p
    return out


def _read_log(path: Path) -> List[np.ndarray]:
    """Open3D / ICL ``trajectory.log``: per frame a line of three ids, then a 4x4 camera-to-world."""
    lines = [s for s in (ln.strip() for ln in path.read_text(errors="replace").splitlines()) if s]
    if len(lines) % 5:
        raise RGBDError(f"{len(lines)} non-empty lines; expected 5 per frame (an 'id id id' line and 4 matrix rows)",
                        path)
    out = []
    for k in range(0, len(lines), 5):
        try:
            M = np.array([[float(v) for v in lines[k + r].split()] for r in range(1, 5)])
        except ValueError:
            raise RGBDError(f"line {k + 2}..{k + 5}: not numbers", path) from None
        if M.shape != (4, 4) or not np.isfinite(M).all():
            raise RGBDError(f"lines {k + 2}..{k + 5}: expected a finite 4x4 matrix", path)
        out.append(M)
    return out


def _read_pose_txt(path: Path) -> List[np.ndarray]:
    """``tx ty tz qx qy qz qw`` (or with a leading timestamp) per line, frame order."""
    out = []
    for ln, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            v = [float(x) for x in s.split()]
        except ValueError:
            raise RGBDError(f"line {ln}: not a number", path) from None
        if len(v) == 8:
            v = v[1:]
        if len(v) != 7:
            raise RGBDError(f"line {ln}: expected 'tx ty tz qx qy qz qw', got {len(v)} numbers", path)
        M = np.eye(4)
        M[:3, :3] = quat_to_rot(v[3:])
        M[:3, 3] = v[:3]
        out.append(M)
    return out


def open_folders(path: PathLike, *, intrinsics=None, depth_scale: float = 1000.0, fps: float = 30.0,
                 trajectory: Optional[PathLike] = None, pixel_centers: str = "auto", downscale: int = 1,
                 stride: int = 1, max_frames: Optional[int] = None) -> RGBDSequence:
    """Numbered colour and depth folders: ``color/`` (or ``colour/``, ``rgb/``, ``image/``,
    ``images/``) and ``depth/`` with files paired by the last number in their names.
    ``depth_scale``: stored units per metre (default 1000, Open3D's); ``intrinsics``: (fx, fy,
    cx, cy), else an Open3D ``camera_intrinsic.json`` / ``intrinsic.json`` in the folder,
    else PrimeSense defaults (525, 525, 319.5, 239.5) with a warning. Poses: ``trajectory``,
    or a ``trajectory.log`` (Open3D / ICL-NUIM; in the folder or one level down) or a
    ``pose.txt`` (``tx ty tz qx qy qz qw`` per line), matched to the frames in order.
    Timestamps are ``index / fps``.
    ``pixel_centers``: the convention of the intrinsics read or given: ``"opencv"`` (pixel
    centres at integers, as datasets publish them: 0.5 is added to cx, cy so that ``K``
    follows langfield's +0.5 convention), ``"half"`` (already +0.5) or ``"auto"`` (opencv)."""
    root = Path(path)
    cdir, ddir = _find_dir(root, COLOR_DIRS), _find_dir(root, DEPTH_DIRS)
    if cdir is None or ddir is None:
        raise RGBDError(f"expected a colour folder ({'/, '.join(COLOR_DIRS)}/) and a depth/ folder", root)
    colors, depths = _numbered(cdir, COLOR_EXTS), _numbered(ddir, DEPTH_EXTS)
    nums = sorted(set(colors) & set(depths))
    if not nums:
        raise RGBDError(f"no numbered colour and depth files with matching numbers in {cdir.name}/ and {ddir.name}/",
                        root)
    unmatched = len(set(colors) ^ set(depths))
    if unmatched:
        warnings.warn(f"{root}: {unmatched} colour/depth file(s) without a partner are left out", stacklevel=3)
    entries = [_Entry(k / fps, colors[n].stem, colors[n], depths[n]) for k, n in enumerate(nums)]
    traj = Path(trajectory) if trajectory is not None else None
    if traj is None:
        cands = [root / "trajectory.log", *sorted(root.glob("*/trajectory.log")), root / "pose.txt",
                 root / "poses.txt"]
        traj = next((p for p in cands if p.is_file()), None)
    meta: Dict[str, Any] = {"fps": fps}
    if traj is not None:
        if not traj.is_file():
            raise RGBDError("trajectory file not found", traj)
        poses = _read_log(traj) if traj.suffix == ".log" else _read_pose_txt(traj)
        if len(poses) != len(entries):
            warnings.warn(f"{traj}: {len(poses)} poses for {len(entries)} frames; matched in order", stacklevel=3)
        for e, p in zip(entries, poses):
            e.pose = p
        meta["trajectory"] = str(traj)
    fxy = None
    if intrinsics is not None:
        fxy = _intrinsics(intrinsics, root)
    else:
        for name in ("camera_intrinsic.json", "intrinsic.json", "intrinsics.json"):
            p = root / name
            if p.is_file():
                try:
                    m = np.asarray(json.loads(p.read_text())["intrinsic_matrix"], dtype=np.float64)
                except (ValueError, KeyError, TypeError) as e:
                    raise RGBDError(f"cannot read ({type(e).__name__}: {e})", p, "intrinsic_matrix") from None
                if m.size != 9:
                    raise RGBDError(f"expected 9 numbers, got {m.size}", p, "intrinsic_matrix")
                fxy = _intrinsics(m.reshape(3, 3).T, p)  # Open3D stores it column-major
                break
    if fxy is None:
        warnings.warn(f"{root}: no intrinsics given; using the PrimeSense defaults 525 525 319.5 239.5 "
                      "(pass intrinsics=(fx, fy, cx, cy))", stacklevel=3)
        fxy = PRIMESENSE_DEFAULT
    w, h = _first_size(entries, root)
    return RGBDSequence(entries, root=root, format="folders", name=_seq_name(root), K=_K(*fxy), width=w,
                        height=h, depth_scale=depth_scale, downscale=downscale, stride=stride, max_frames=max_frames,
                        pixel_centers="opencv" if pixel_centers == "auto" else pixel_centers, meta=meta)


# ------------------------------------------------------------------------------------------
# live sources

def make_frame(color, depth, K, *, timestamp: float = 0.0, depth_scale: float = 1.0, index: int = 0, name: str = "",
               camtoworld=None, pixel_centers: str = "half") -> RGBDFrame:
    """An :class:`RGBDFrame` from arrays, e.g. from a live camera loop::

        for i, (rgb, raw_depth, t) in enumerate(camera):            # your driver
            frame = make_frame(rgb, raw_depth, K, timestamp=t, depth_scale=1000.0, index=i)
            mapper.step(frame)

    ``color`` [H, W, 3] uint8 (or float in [0, 1]); ``depth`` [H, W] stored values
    (``depth / depth_scale`` = metres; 0, negative and non-finite values are invalid); ``K``
    [3, 3] (``pixel_centers="opencv"`` adds 0.5 to cx, cy). Raises :class:`BadFrameError` when
    the sizes differ or no depth is valid."""
    c = np.asarray(color)
    if c.ndim != 3 or c.shape[2] < 3:
        raise BadFrameError(f"colour must be [H, W, 3], got shape {list(c.shape)}", None, "color")
    c = c[..., :3]
    if c.dtype != np.uint8:
        c = np.clip(np.round(np.nan_to_num(c.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
    d = np.asarray(depth)
    if d.ndim == 3 and d.shape[2] == 1:
        d = d[..., 0]
    if d.shape != c.shape[:2]:
        raise BadFrameError(f"depth is {list(d.shape)}, colour {list(c.shape[:2])}", None, "depth")
    d = d.astype(np.float64) / float(depth_scale)
    d = np.where(np.isfinite(d) & (d > 0), d, 0).astype(np.float32)
    if not (d > 0).any():
        raise BadFrameError("no valid depth", None, "depth")
    Km = np.array(K, dtype=np.float64).reshape(3, 3)
    if pixel_centers == "opencv":
        Km[:2, 2] += 0.5
    pose = None if camtoworld is None else np.asarray(camtoworld, dtype=np.float64).reshape(4, 4)
    return RGBDFrame(index=int(index), timestamp=float(timestamp), name=name or f"frame_{index:06d}",
                     color=np.ascontiguousarray(c), depth=d, K=Km, width=c.shape[1], height=c.shape[0],
                     camtoworld=pose)


# ------------------------------------------------------------------------------------------
# detection

def detect_rgbd_format(path: PathLike) -> Tuple[str, Path]:
    """``(format, folder)``: ``tum`` (rgb.txt + depth.txt), ``replica`` (results/ with
    frame*/depth*), ``7scenes`` (frame-NNNNNN.color.*), ``folders`` (colour + depth
    subfolders); a langfield scene folder resolves to its ``tum/`` (else ``replica/``) copy.
    Raises :class:`RGBDError` listing what was expected."""
    p = Path(path)
    if not p.exists():
        raise RGBDError("RGB-D path does not exist", p)
    if not p.is_dir():
        raise RGBDError("not an RGB-D sequence: give a folder", p)

    def kind(d: Path) -> Optional[str]:
        if (d / "rgb.txt").is_file() and (d / "depth.txt").is_file():
            return "tum"
        if (d / "results").is_dir() and any((d / "results").glob("frame*")):
            return "replica"
        if _seven_frames(d):
            return "7scenes"
        return None

    k = kind(p)
    if k is not None:
        return k, p
    for sub in ("tum", "replica"):  # a langfield scene folder (its images/ + depth/*.npy have no intrinsics)
        if (p / sub).is_dir() and kind(p / sub) == sub:
            return sub, p / sub
    if _find_dir(p, COLOR_DIRS) is not None and _find_dir(p, DEPTH_DIRS) is not None:
        return "folders", p
    hint = ""
    seqs = sorted(d.name for d in p.glob("seq-*") if d.is_dir())
    if seqs:
        hint = f" (7-Scenes: give one sequence folder, e.g. {p / seqs[0]})"
    raise RGBDError("no RGB-D layout recognised; expected TUM RGB-D (rgb.txt and depth.txt), Replica (results/"
                    "frame*.jpg + depth*.png, traj.txt), 7-Scenes (frame-NNNNNN.color.png|jpg, .depth.png, "
                    ".pose.txt), numbered folders (color/ or rgb/ or image/ and depth/) or a langfield scene "
                    "(tum/ or replica/)" + hint, p)


def open_rgbd(path: PathLike, format: Optional[str] = None, **opts) -> RGBDSequence:
    """Open an RGB-D sequence, detecting its layout (:func:`detect_rgbd_format`) or forcing
    ``format`` (one of :data:`RGBD_FORMATS`). Common options: ``downscale`` (integer;
    colour box-filtered, depth min-pooled over valid pixels, K scaled), ``stride``,
    ``max_frames`` (after the stride), ``intrinsics=(fx, fy, cx, cy)``, ``depth_scale``
    (stored units per metre); format-specific ones are those of :func:`open_tum`,
    :func:`open_replica`, :func:`open_7scenes` and :func:`open_folders`."""
    if format is None:
        format, path = detect_rgbd_format(path)
    elif format not in RGBD_FORMATS:
        raise ValueError(f"unknown RGB-D format {format!r}; use one of {', '.join(RGBD_FORMATS)}")
    fn = {"tum": open_tum, "replica": open_replica, "7scenes": open_7scenes, "folders": open_folders}[format]
    try:
        return fn(path, **opts)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"open_rgbd({format}): {e}") from None
        raise
