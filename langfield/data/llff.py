"""``poses_bounds.npy`` datasets: static LLFF scenes and Neu3D / DyNeRF multi-view videos.

``poses_bounds.npy``: an ``N x 17`` float array, one row per camera (in the sorted order of
the images, or of the videos): a 3x5 matrix ``[R | t | hwf]`` stored row-major, whose rotation
columns are the camera's (down, right, back) axes in the world (LLFF's order), ``t`` the
camera centre and ``hwf`` = (height, width, focal length) at full resolution, then the
scene's near and far depth bounds. Converted to OpenCV camera-to-world by taking the
columns (right, down, -back); principal point at the image centre.

* **LLFF** (static): ``images/`` (and LLFF's downscaled ``images_N/``: ``downscale=N`` reads
  them where they exist, else resizes on the fly); every ``test_every``-th image (0, 8, 16,
  ...) is held out, as in NeRF.
* **Neu3D / DyNeRF**: one video per camera (``cam00.mp4``, ``cam01.mp4``, ... sorted by name,
  matching the rows), decoded with PyAV. ``stride`` / ``max_frames`` choose the frames
  (``range(0, n, stride)[:max_frames]``); the time of frame ``k`` is ``k / (n - 1)`` with ``n``
  the number of frames every video has; ``cam00`` is held out (the DyNeRF convention,
  ``test_cameras``). Decoded frames are cached as PNG (at the loaded size) in
  ``<dataset>/.langfield/frames/<video>-<size>-<mtime>-<factor>/`` when the dataset folder is
  writable, else under :func:`~langfield.data.base.data_cache_dir`; a changed video (size or
  mtime) gets a new folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import (IMAGE_SUFFIXES, DatasetError, Frame, MissingFileError, data_cache_dir, every_nth_split, finalize,
                   image_size, scale_K, scaled_size)

__all__ = ["read_poses_bounds", "load_llff", "load_neu3d", "decode_video_frames", "is_llff", "is_neu3d",
           "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
#: LLFF (down, right, back) columns -> OpenCV (right, down, forward)
_LLFF_TO_CV = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def _videos(root: Path) -> List[Path]:
    return sorted((p for p in root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                   and not p.name.startswith(".")), key=lambda p: p.name)


def _images(folder: Path) -> List[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".")), key=lambda p: p.name)


def is_neu3d(root: Union[str, Path]) -> bool:
    root = Path(root)
    return (root / "poses_bounds.npy").is_file() and bool(_videos(root))


def is_llff(root: Union[str, Path]) -> bool:
    root = Path(root)
    return (root / "poses_bounds.npy").is_file() and (root / "images").is_dir()


def read_poses_bounds(path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(c2w [N, 4, 4] OpenCV, hwf [N, 3], bounds [N, 2])`` from a ``poses_bounds.npy``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("not found", path)
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetError(f"cannot read ({e}); expected an N x 17 float array", path) from None
    if a.ndim != 2 or a.shape[1] != 17 or a.shape[0] == 0 or not np.issubdtype(a.dtype, np.number):
        raise DatasetError(f"must be an N x 17 numeric array (3x5 pose + near, far per camera), got shape "
                           f"{list(a.shape)} {a.dtype}", path)
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).all(1))[0])
        raise DatasetError(f"row {bad} has non-finite values", path)
    P = a[:, :15].reshape(-1, 3, 5)
    R = P[:, :, :3] @ _LLFF_TO_CV
    c2w = np.tile(np.eye(4), (len(a), 1, 1))
    U, S, Vt = np.linalg.svd(R)
    if (S[:, -1] < 1e-6).any():
        bad = int(np.flatnonzero(S[:, -1] < 1e-6)[0])
        raise DatasetError(f"row {bad}: the rotation part is singular", path)
    c2w[:, :3, :3] = U @ Vt  # re-orthonormalised (the file stores float32)
    c2w[:, :3, 3] = P[:, :, 3]
    hwf = P[:, :, 4]
    if (hwf <= 0).any():
        bad = int(np.flatnonzero((hwf <= 0).any(1))[0])
        raise DatasetError(f"row {bad}: height, width and focal length must be positive, got {hwf[bad].tolist()}",
                           path)
    return c2w, hwf, a[:, 15:17]


def _intrinsics(hwf: np.ndarray, actual: Tuple[int, int], what: Path, source: Path, scaled: List[str]) -> np.ndarray:
    """K at the size ``actual`` (w, h) of the file, from ``hwf`` at full resolution."""
    H, W, f = float(hwf[0]), float(hwf[1]), float(hwf[2])
    K = np.array([[f, 0, W / 2.0], [0, f, H / 2.0], [0, 0, 1.0]])
    w, h = actual
    if abs(w - W) > 0.5 or abs(h - H) > 0.5:
        if abs(w / h - W / H) > 0.01 * (W / H):
            raise DatasetError(f"is {w}x{h} but {source.name} gives {W:g}x{H:g} for it (aspect ratios differ)", what)
        scaled.append(f"{what.name} is {w}x{h}, poses give {W:g}x{H:g}")
        K = scale_K(K, w / W, h / H)
    return K


def load_llff(path: Union[str, Path], *, downscale: int = 1, test_every: int = 8, normalize: bool = True,
              background: Sequence[float] = (1.0, 1.0, 1.0), cache_images: bool = False):
    """Load a static LLFF scene (see the module docstring)."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    ppath = root / "poses_bounds.npy"
    c2w, hwf, bounds = read_poses_bounds(ppath)
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise MissingFileError("image folder not found", img_dir)
    files = _images(img_dir)
    if len(files) != len(c2w):
        raise DatasetError(f"{len(c2w)} poses but {len(files)} images in {img_dir}; they must match one to one "
                           f"(sorted by name)", ppath)
    small = None
    if downscale > 1 and (root / f"images_{downscale}").is_dir():
        small = _images(root / f"images_{downscale}")
        if len(small) != len(files):
            warnings.warn(f"{root / f'images_{downscale}'} holds {len(small)} images, images/ {len(files)}; resizing "
                          f"images/ on the fly instead", stacklevel=2)
            small = None
    splits = every_nth_split(len(files), test_every)
    frames: List[Frame] = []
    scaled: List[str] = []
    for i, src in enumerate(files):
        fw, fh = image_size(src)
        K = _intrinsics(hwf[i], (fw, fh), src, ppath, scaled)
        file = src
        if small is not None:
            file = small[i]
            w, h = image_size(file)
        else:
            w, h = scaled_size(fw, fh, downscale) if downscale > 1 else (fw, fh)
        K = scale_K(K, w / fw, h / fh)
        frames.append(Frame(image_path=file, width=int(w), height=int(h), K=K, camtoworld=c2w[i], split=splits[i],
                            name=src.name, camera_id=i,
                            extras={"near": float(bounds[i, 0]), "far": float(bounds[i, 1])}))
    if scaled:
        warnings.warn(f"{ppath}: {len(scaled)} image(s) differ in size from the poses' h, w with the same aspect "
                      f"ratio; scaling the intrinsics: {'; '.join(scaled[:3])}", stacklevel=2)
    return finalize(frames, root=root, format="llff", points=None, normalize=normalize, background=background,
                    meta={"downscale": downscale, "near": float(bounds[:, 0].min()), "far": float(bounds[:, 1].max())},
                    cache_images=cache_images)


# ------------------------------------------------------------------------------------------
# video

def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError("PyAV is needed to read videos: pip install av") from None
    return av


def video_size(path: Path) -> Tuple[int, int]:
    """(width, height) of the first video stream."""
    av = _import_av()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DatasetError("has no video stream", path)
            cc = c.streams.video[0].codec_context
            return int(cc.width), int(cc.height)
    except DatasetError:
        raise
    except Exception as e:  # av.error.FFmpegError and friends
        raise DatasetError(f"cannot open video ({type(e).__name__}: {e})", path) from None


def _cached_video_size(video: Path, cache_root: Path) -> Tuple[int, int]:
    """:func:`video_size`, remembered in ``cache_root`` by the video's size and mtime."""
    from ..io.checkpoint import atomic_write_json

    st = video.stat()
    rec = cache_root / f"{video.stem}-{st.st_size}-{st.st_mtime_ns}.json"
    try:
        d = json.loads(rec.read_text("utf-8"))
        if isinstance(d.get("width"), int) and isinstance(d.get("height"), int):
            return d["width"], d["height"]
    except (OSError, ValueError, AttributeError):
        pass
    w, h = video_size(video)
    try:
        atomic_write_json(rec, {"video": str(video), "width": w, "height": h})
    except OSError:
        pass
    return w, h


def _cache_root(root: Path, cache_dir: Optional[Union[str, Path]]) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.access(root, os.W_OK):
        return root / ".langfield" / "frames"
    h = hashlib.sha1(os.path.abspath(str(root)).encode()).hexdigest()[:16]
    return data_cache_dir() / "frames" / h


def decode_video_frames(video: Union[str, Path], folder: Union[str, Path], size: Optional[Tuple[int, int]] = None,
                        stride: int = 1, max_frames: Optional[int] = None) -> Tuple[Dict[int, Path], int]:
    """Decode the frames ``range(0, n, stride)[:max_frames]`` of ``video`` (0-based, in
    decoding order) to PNG files ``folder/<k:05d>.png`` (resized to ``size`` (w, h) when
    given), skipping those already there. Returns ``({k: png path}, n)`` with ``n`` the number
    of frames in the video; ``done.json`` in ``folder`` records ``n`` so a second call with the
    same selection decodes nothing."""
    import io

    from PIL import Image

    from ..io.checkpoint import atomic_write_bytes, atomic_write_json

    video, folder = Path(video), Path(folder)

    def selected(count: int) -> List[int]:
        idx = list(range(0, count, int(stride)))
        return idx[:max_frames] if max_frames is not None else idx

    done_path = folder / "done.json"
    count = None
    if done_path.is_file():
        try:
            count = json.loads(done_path.read_text("utf-8")).get("count")
        except (OSError, ValueError, AttributeError):
            count = None
    if isinstance(count, int) and count > 0:
        want = selected(count)
        if all((folder / f"{k:05d}.png").is_file() for k in want):
            return {k: folder / f"{k:05d}.png" for k in want}, count
    av = _import_av()
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with av.open(str(video)) as c:
            if not c.streams.video:
                raise DatasetError("has no video stream", video)
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for n, frame in enumerate(c.decode(stream), start=1):
                k = n - 1
                if k % stride or (max_frames is not None and k // stride >= max_frames):
                    continue
                out = folder / f"{k:05d}.png"
                if out.is_file():
                    continue
                im = frame.to_image()
                if size is not None and im.size != tuple(size):
                    im = im.resize(tuple(size), Image.BOX if size[0] < im.size[0] else Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="PNG", compress_level=1)
                atomic_write_bytes(out, buf.getvalue())
    except DatasetError:
        raise
    except Exception as e:  # av.error.FFmpegError (corrupt or truncated video) and friends
        raise DatasetError(f"cannot decode video after {n} frame(s) ({type(e).__name__}: {e})", video) from None
    if n == 0:
        raise DatasetError("the video has no frames", video)
    atomic_write_json(done_path, {"video": str(video), "count": n})
    return {k: folder / f"{k:05d}.png" for k in selected(n)}, n


def load_neu3d(path: Union[str, Path], *, downscale: int = 1, stride: int = 1, max_frames: Optional[int] = None,
               test_cameras: Sequence[str] = ("cam00",), cache_dir: Optional[Union[str, Path]] = None,
               normalize: bool = True, background: Sequence[float] = (1.0, 1.0, 1.0), cache_images: bool = False):
    """Load a Neu3D / DyNeRF multi-view video dataset (see the module docstring)."""
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer, got {max_frames}")
    root = Path(path)
    if root.is_file():
        root = root.parent
    ppath = root / "poses_bounds.npy"
    c2w, hwf, bounds = read_poses_bounds(ppath)
    videos = _videos(root)
    if len(videos) != len(c2w):
        raise DatasetError(f"{len(c2w)} poses but {len(videos)} videos ({', '.join(v.name for v in videos[:4])}"
                           f"{' ...' if len(videos) > 4 else ''}) in {root}; they must match one to one (sorted by "
                           f"name)", ppath)
    cache_root = _cache_root(root, cache_dir)
    scaled: List[str] = []
    per_cam = []
    for ci, v in enumerate(videos):
        vw, vh = _cached_video_size(v, cache_root)
        K = _intrinsics(hwf[ci], (vw, vh), v, ppath, scaled)
        w, h = scaled_size(vw, vh, downscale) if downscale > 1 else (vw, vh)
        K = scale_K(K, w / vw, h / vh)
        st = v.stat()
        folder = cache_root / f"{v.stem}-{st.st_size}-{st.st_mtime_ns}-{w}x{h}"
        per_cam.append((v, K, w, h, folder))
    decoded = [decode_video_frames(v, folder, (w, h), int(stride), max_frames) for v, K, w, h, folder in per_cam]
    n = min(count for _, count in decoded)
    if any(count != n for _, count in decoded):
        warnings.warn(f"{root}: the videos differ in length ({sorted({c for _, c in decoded})} frames); using the "
                      f"first {n} of each", stacklevel=2)
    frames: List[Frame] = []
    tests = set(test_cameras)
    for ci, ((v, K, w, h, _), (files, _)) in enumerate(zip(per_cam, decoded)):
        for k in sorted(files):
            if k >= n:
                continue
            frames.append(Frame(image_path=files[k], width=int(w), height=int(h), K=K.copy(), camtoworld=c2w[ci],
                                split="test" if v.stem in tests else "train", name=f"{v.stem}/{k:05d}",
                                time=k / (n - 1) if n > 1 else 0.0, camera_id=ci,
                                extras={"frame_index": k, "video": v.name, "near": float(bounds[ci, 0]),
                                        "far": float(bounds[ci, 1])}))
    if scaled:
        warnings.warn(f"{ppath}: {len(scaled)} video(s) differ in size from the poses' h, w with the same aspect "
                      f"ratio; scaling the intrinsics: {'; '.join(scaled[:3])}", stacklevel=2)
    if not any(f.split == "train" for f in frames):
        raise DatasetError(f"no training camera: every video is in test_cameras {sorted(tests)}", root)
    return finalize(frames, root=root, format="neu3d", points=None, normalize=normalize, background=background,
                    meta={"downscale": downscale, "near": float(bounds[:, 0].min()), "far": float(bounds[:, 1].max()),
                          "num_video_frames": n, "stride": int(stride), "frame_cache": str(cache_root)},
                    cache_images=cache_images)
