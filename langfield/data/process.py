"""``langfield process IMAGES_DIR --out DIR``: structure from motion on images without poses.

Runs pycolmap (COLMAP's SIFT features, exhaustive or sequential matching, incremental
mapping) and writes a COLMAP dataset that :func:`langfield.data.load_dataset` reads::

    DIR/images/<name>            the input images, copied (or symlinked with --link)
    DIR/images_<N>/<name>        resized copies for each --downscale N (round(W/N) x round(H/N))
    DIR/sparse/0/{cameras,images,points3D}.bin   the largest reconstruction (plus COLMAP 4's
                                 rigs.bin, frames.bin)
    DIR/database.db              COLMAP's feature/match database (for re-running COLMAP)
    DIR/process.json             what was registered, points, reprojection error, options, timings

Cameras keep their lens distortion (SIMPLE_RADIAL by default); the loader undistorts. The
dataset is built in a hidden sibling folder and moved to DIR only when everything succeeded,
so a failed run leaves no half-written output (and --overwrite keeps the old DIR until then).

From Python: :func:`process_images` (raises :class:`ProcessError`); the CLI is
:func:`cli_process`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import tyro

from .base import DatasetError

__all__ = ["process_images", "cli_process", "ProcessError", "ProcessResult", "IMAGE_EXTENSIONS", "list_images"]

#: file extensions read as images (case-insensitive); COLMAP and PIL both read these
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
CAMERA_MODELS = ("SIMPLE_RADIAL", "PINHOLE", "OPENCV", "SIMPLE_PINHOLE", "RADIAL")
MATCHERS = ("exhaustive", "sequential")
EXHAUSTIVE_HINT_IMAGES = 100  # above this, exhaustive matching gets slow on a CPU: say so
MIN_GOOD_FEATURES = 200  # median SIFT features per image below which SfM is warned to be unreliable
MIN_GOOD_REGISTERED = 0.5  # registered fraction below which the result is flagged


class ProcessError(DatasetError):
    """Bad input to :func:`process_images`, or SfM that could not reconstruct the images."""


@dataclass
class ProcessResult:
    """What :func:`process_images` wrote (also saved as ``DIR/process.json``)."""

    out: str
    images_dir: str
    num_images: int
    num_registered: int
    num_points: int
    mean_reprojection_error: float
    mean_track_length: float
    camera_model: str
    cameras: List[dict]
    registered: List[str]
    unregistered: List[str]
    other_models: List[int]  # registered-image counts of the reconstructions not kept
    options: Dict[str, object]
    warnings: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    pycolmap_version: str = ""


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def list_images(images_dir: Union[str, Path]) -> List[Path]:
    """The images directly inside ``images_dir`` (not in subfolders), sorted by name."""
    d = Path(images_dir)
    if not d.exists():
        raise ProcessError("image folder does not exist", d)
    if not d.is_dir():
        raise ProcessError("not a folder: give the folder that holds the images", d)
    files = sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name)
    if not files:
        exts = ", ".join(IMAGE_EXTENSIONS)
        hint = ""
        if (d / "images").is_dir() and any(_is_image(p) for p in (d / "images").iterdir()):
            hint = f"; did you mean {d / 'images'}?"
        raise ProcessError(f"no images found (supported extensions: {exts}, any case){hint}", d)
    return files


def _check_images(files: Sequence[Path]) -> Dict[str, Tuple[int, int]]:
    """Decode every image (so an unreadable one is named now, not skipped by COLMAP later)."""
    from PIL import Image, UnidentifiedImageError

    sizes = {}
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                sizes[p.name] = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ProcessError(f"cannot read image ({type(e).__name__}: {e}); remove it or fix it", p) from None
        if sizes[p.name][0] < 16 or sizes[p.name][1] < 16:
            raise ProcessError(f"image is only {sizes[p.name][0]}x{sizes[p.name][1]} pixels; too small for SfM", p)
    return sizes


def _check_out(out: Path, images_dir: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ProcessError("--out exists and is a file; give a folder", out)
    src, dst = images_dir.resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise ProcessError(f"--out must not be the image folder or contain it ({images_dir})", out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ProcessError("--out already exists and is not empty; pass --overwrite to replace it", out)


def _resize_image(src: Path, dst: Path, factor: int) -> Tuple[int, int]:
    from PIL import Image

    from .base import scaled_size

    with Image.open(src) as im:
        im.load()
        if im.mode in ("P", "1", "CMYK", "LA", "PA"):
            im = im.convert("RGBA" if ("transparency" in im.info or im.mode in ("LA", "PA")) else "RGB")
        w, h = scaled_size(im.width, im.height, factor)
        small = im.resize((w, h), Image.Resampling.LANCZOS)
        kw = {"quality": 95} if dst.suffix.lower() in (".jpg", ".jpeg") else {}
        if kw and small.mode not in ("RGB", "L"):
            small = small.convert("RGB")
        small.save(dst, **kw)
    return w, h


def _implausible_camera(c: dict) -> bool:
    """Focal length far outside [0.25, 5] x the longest side, or strong radial distortion."""
    size = max(c["width"], c["height"])
    p = c["params"]
    m = c["model"]
    focals = {"SIMPLE_PINHOLE": p[:1], "SIMPLE_RADIAL": p[:1], "RADIAL": p[:1], "PINHOLE": p[:2],
              "OPENCV": p[:2]}.get(m, p[:1])
    if any(not (0.25 * size <= f <= 5 * size) for f in focals):
        return True
    if m in ("SIMPLE_RADIAL", "RADIAL", "OPENCV") and abs(p[3] if m != "OPENCV" else p[4]) > 0.5:
        return True
    return m in ("PINHOLE", "OPENCV") and not (0.8 <= p[0] / p[1] <= 1.25)


def _model_name(cam) -> str:
    m = cam.model.name if hasattr(cam.model, "name") else str(cam.model)
    return m.split(".")[-1]


def process_images(images_dir: Union[str, Path], out: Union[str, Path], *, matcher: str = "exhaustive",
                   camera_model: str = "SIMPLE_RADIAL", single_camera: bool = True, max_image_size: int = 3200,
                   max_features: int = 8192, downscale: Sequence[int] = (), link: bool = False,
                   overwrite: bool = False, overlap: int = 10, seed: int = 0, num_threads: int = -1,
                   device: str = "auto", verbose: bool = False,
                   log: Optional[Callable[[str], None]] = print) -> ProcessResult:
    """Structure from motion on the images in ``images_dir``; writes a COLMAP dataset to
    ``out`` (see the module docstring) and returns what was reconstructed.

    ``matcher``: ``exhaustive`` (every pair; unordered photos, up to ~100 images on a CPU) or
    ``sequential`` (each image with the next ``overlap`` ones, by file name; video frames).
    ``camera_model``: COLMAP model to estimate (SIMPLE_RADIAL, PINHOLE, OPENCV, ...).
    ``single_camera``: one shared camera for all images (one phone/camera at one zoom);
    else one camera per image. ``max_image_size``: longest side features are extracted at
    (keypoints are rescaled; the model is at full resolution). ``max_features``: SIFT
    features per image. ``downscale``: factors N to also write ``images_N`` for. ``link``:
    symlink the images instead of copying. ``seed``: COLMAP's random seed (bit-reproducible
    with ``num_threads=1``; multi-threaded runs can differ slightly). ``num_threads``: -1 =
    all cores. ``device``: auto | cpu | cuda (cuda needs a CUDA build of pycolmap).
    ``log``: progress lines go here (None: silent). Raises :class:`ProcessError` on bad input
    or when fewer than two images register.
    """
    say = log or (lambda s: None)
    t_all = time.perf_counter()
    images_dir, out = Path(images_dir), Path(out)
    if matcher not in MATCHERS:
        raise ProcessError(f"unknown matcher {matcher!r}; use one of {', '.join(MATCHERS)}")
    if camera_model not in CAMERA_MODELS:
        raise ProcessError(f"unknown camera model {camera_model!r}; use one of {', '.join(CAMERA_MODELS)}")
    factors = sorted({int(f) for f in downscale})
    if any(f < 2 for f in factors) or any(int(f) != f for f in downscale):
        raise ProcessError(f"--downscale factors must be integers >= 2 (got {list(downscale)})")
    if max_image_size < 16 and max_image_size != -1:
        raise ProcessError(f"--max-image-size must be at least 16 pixels (or -1 for full size), got {max_image_size}")
    if max_features < 16:
        raise ProcessError(f"--max-features must be at least 16, got {max_features}")
    if overlap < 1:
        raise ProcessError(f"--overlap must be at least 1, got {overlap}")
    if device not in ("auto", "cpu", "cuda"):
        raise ProcessError(f"unknown device {device!r}; use auto, cpu or cuda")

    files = list_images(images_dir)
    _check_out(out, images_dir, overwrite)
    try:
        import pycolmap
    except ImportError as e:  # pragma: no cover - pycolmap is a core dependency
        raise ProcessError(f"pycolmap is needed for structure from motion ({e}); pip install pycolmap") from None

    n = len(files)
    timings: Dict[str, float] = {}
    warns: List[str] = []
    say(f"[1/5] checking {n} images in {images_dir}")
    t0 = time.perf_counter()
    if n < 2:
        raise ProcessError(f"only {n} image found; structure from motion needs at least 2 overlapping images",
                           images_dir)
    sizes = _check_images(files)
    distinct = sorted(set(sizes.values()))
    if single_camera and len(distinct) > 1:
        desc = ", ".join(f"{w}x{h}" for w, h in distinct[:4]) + (" ..." if len(distinct) > 4 else "")
        raise ProcessError(f"images have different sizes ({desc}) but --single-camera shares one camera; pass "
                           f"--no-single-camera (or resize them to one size)", images_dir)
    say(f"      {n} images, " + (f"{distinct[0][0]}x{distinct[0][1]}" if len(distinct) == 1
                                 else f"{len(distinct)} sizes"))
    if matcher == "exhaustive" and n > EXHAUSTIVE_HINT_IMAGES:
        say(f"      note: exhaustive matching of {n} images ({n * (n - 1) // 2} pairs) is slow on a CPU; for video "
            f"frames or an ordered capture use --matcher sequential")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    old_level = pycolmap.logging.minloglevel
    if not verbose:
        pycolmap.logging.minloglevel = 2  # COLMAP's INFO and WARNING lines off; errors still show
    ok = False
    try:
        img_out = work / "images"
        img_out.mkdir()
        for p in files:
            if link:
                os.symlink(p.resolve(), img_out / p.name)
            else:
                shutil.copy2(p, img_out / p.name)
        timings["check_copy_s"] = time.perf_counter() - t0

        pycolmap.set_random_seed(int(seed))
        dev = getattr(pycolmap.Device, device)
        db = work / "database.db"
        names = [p.name for p in files]

        # ---------------------------------------------------------------- features
        say(f"[2/5] extracting SIFT features (camera {camera_model}, "
            f"{'one shared camera' if single_camera else 'one camera per image'}, "
            f"max {max_features} features at <= {max_image_size} px)")
        t0 = time.perf_counter()
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model = camera_model
        ext = pycolmap.FeatureExtractionOptions()
        ext.max_image_size = int(max_image_size)
        ext.num_threads = int(num_threads)
        ext.sift.max_num_features = int(max_features)
        ext.use_gpu = device == "cuda"
        mode = pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.PER_IMAGE
        pycolmap.extract_features(db, img_out, image_names=names, camera_mode=mode, reader_options=reader,
                                  extraction_options=ext, device=dev)
        with pycolmap.Database.open(db) as d:
            kp = {im.name: d.num_keypoints_for_image(im.image_id) for im in d.read_all_images()}
        missing = [nm for nm in names if nm not in kp]
        if missing:
            raise ProcessError(f"COLMAP could not read {len(missing)} image(s): {', '.join(missing[:3])}"
                               + (" ..." if len(missing) > 3 else ""), images_dir)
        counts = sorted(kp.values())
        timings["features_s"] = time.perf_counter() - t0
        say(f"      {sum(counts)} features (per image min {counts[0]}, median {int(statistics.median(counts))}, "
            f"max {counts[-1]}) in {timings['features_s']:.1f} s")
        if counts[-1] == 0:
            raise ProcessError("no SIFT features found in any image (blank or textureless images?)", images_dir)
        median_kp = int(statistics.median(counts))
        if median_kp < MIN_GOOD_FEATURES:
            warns.append(f"few features per image (median {median_kp}"
                         + (f"; the images are only {distinct[0][0]}x{distinct[0][1]}" if len(distinct) == 1 else "")
                         + "): SfM is unreliable on images this small or plain; use higher-resolution photos "
                           "(--max-image-size bounds the cost)")
            say(f"      warning: {warns[-1]}")

        # ---------------------------------------------------------------- matching
        mopts = pycolmap.FeatureMatchingOptions()
        mopts.num_threads = int(num_threads)
        mopts.use_gpu = device == "cuda"
        t0 = time.perf_counter()
        if matcher == "exhaustive":
            say(f"[3/5] matching features: exhaustive, {n * (n - 1) // 2} image pairs")
            pycolmap.match_exhaustive(db, matching_options=mopts, device=dev)
        else:
            say(f"[3/5] matching features: sequential, each image with the next {overlap} (by file name)")
            pair = pycolmap.SequentialPairingOptions()
            pair.overlap = int(overlap)
            pair.num_threads = int(num_threads)
            pycolmap.match_sequential(db, matching_options=mopts, pairing_options=pair, device=dev)
        with pycolmap.Database.open(db) as d:
            pair_ids, _ = d.read_two_view_geometry_num_inliers()  # only pairs that passed verification
            n_pairs = len(pair_ids)
        timings["matching_s"] = time.perf_counter() - t0
        say(f"      {n_pairs} image pairs with geometrically verified matches in {timings['matching_s']:.1f} s")
        if n_pairs == 0:
            raise ProcessError("no two images share enough verified feature matches; the photos need more overlap"
                               + (" (or try --matcher exhaustive)" if matcher == "sequential" else ""), images_dir)

        # ---------------------------------------------------------------- mapping
        say("[4/5] incremental mapping")
        t0 = time.perf_counter()
        popts = pycolmap.IncrementalPipelineOptions()
        popts.random_seed = int(seed)
        popts.num_threads = int(num_threads)
        popts.min_model_size = 2  # keep small models too; we pick the largest and check it below
        map_dir = work / "mapping"
        map_dir.mkdir()
        n_reg_calls = [0]
        every = max(1, n // 10)

        def on_next_image():
            n_reg_calls[0] += 1
            if n_reg_calls[0] % every == 0:
                say(f"      ... {n_reg_calls[0]} images added to the model(s) after the initial pairs "
                    f"({time.perf_counter() - t0:.0f} s)")

        recs = pycolmap.incremental_mapping(db, img_out, map_dir, options=popts, next_image_callback=on_next_image)
        timings["mapping_s"] = time.perf_counter() - t0
        recs = dict(recs) if recs else {}
        if not recs:
            raise ProcessError(f"no reconstruction found from {n} images: COLMAP could not find an initial pair; "
                               f"the photos need more overlap and texture"
                               + (" (or try --matcher exhaustive)" if matcher == "sequential" else ""), images_dir)
        order = sorted(recs, key=lambda k: (recs[k].num_reg_images(), recs[k].num_points3D()), reverse=True)
        rec = recs[order[0]]
        others = [int(recs[k].num_reg_images()) for k in order[1:]]
        n_reg = int(rec.num_reg_images())
        if n_reg < 2:
            raise ProcessError(f"only {n_reg} of {n} images registered; the photos need more overlap"
                               + (" (or try --matcher exhaustive)" if matcher == "sequential" else ""), images_dir)

        # ---------------------------------------------------------------- write
        say("[5/5] writing the dataset")
        t0 = time.perf_counter()
        sparse = work / "sparse" / "0"
        sparse.mkdir(parents=True)
        rec.write(sparse)
        shutil.rmtree(map_dir)
        for f in factors:
            d = work / f"images_{f}"
            d.mkdir()
            for p in files:
                _resize_image(p, d / p.name, f)
            say(f"      images_{f}/: {n} images resized by 1/{f}")
        reg_names = sorted(im.name for im in rec.images.values() if im.has_pose)
        unreg = [nm for nm in names if nm not in set(reg_names)]
        cams = []
        for cid, cam in sorted(rec.cameras.items()):
            cams.append({"camera_id": int(cid), "model": _model_name(cam), "width": int(cam.width),
                         "height": int(cam.height), "params": [float(v) for v in cam.params]})
        hint = "more overlap between neighbouring photos, more texture, higher resolution" + \
            (", or --matcher exhaustive" if matcher == "sequential" else "")
        if n_reg < MIN_GOOD_REGISTERED * n:
            warns.append(f"only {n_reg} of {n} images registered; try {hint}")
        bad = [c for c in cams if _implausible_camera(c)]
        if bad:
            c = bad[0]
            params = ", ".join(f"{v:.4g}" for v in c["params"])
            warns.append(f"camera {c['camera_id']} looks implausible ({c['model']} {c['width']}x{c['height']}, params "
                         f"{params}); the reconstruction is likely wrong; try {hint}")
        result = ProcessResult(
            out=str(out), images_dir=str(images_dir), num_images=n, num_registered=n_reg,
            num_points=int(rec.num_points3D()),
            mean_reprojection_error=float(rec.compute_mean_reprojection_error()),
            mean_track_length=float(rec.compute_mean_track_length()) if rec.num_points3D() else 0.0,
            camera_model=camera_model, cameras=cams, registered=reg_names, unregistered=unreg, other_models=others,
            warnings=warns,
            options={"matcher": matcher, "camera_model": camera_model, "single_camera": single_camera,
                     "max_image_size": max_image_size, "max_features": max_features, "downscale": factors,
                     "link": link, "overlap": overlap, "seed": seed, "num_threads": num_threads, "device": device},
            pycolmap_version=str(getattr(pycolmap, "__version__", "")))
        timings["write_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_all
        result.timings = {k: round(v, 3) for k, v in timings.items()}
        (work / "process.json").write_text(json.dumps(asdict(result), indent=2) + "\n")

        # ---------------------------------------------------------------- move into place
        backup = None
        if out.exists():
            if any(out.iterdir()):
                backup = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, backup)
            else:
                out.rmdir()
        os.replace(work, out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        ok = True
    finally:
        pycolmap.logging.minloglevel = old_level
        if not ok:
            shutil.rmtree(work, ignore_errors=True)

    say(summary(result))
    return result


def summary(r: ProcessResult) -> str:
    lines = [f"registered {r.num_registered} of {r.num_images} images, {r.num_points} points, mean reprojection "
             f"error {r.mean_reprojection_error:.3f} px, mean track length {r.mean_track_length:.2f} "
             f"({r.timings.get('total_s', 0.0):.1f} s)"]
    for c in r.cameras[:3]:
        lines.append(f"  camera {c['camera_id']}: {c['model']} {c['width']}x{c['height']} params "
                     + ", ".join(f"{v:.4g}" for v in c["params"]))
    if len(r.cameras) > 3:
        lines.append(f"  ... and {len(r.cameras) - 3} more cameras")
    if r.unregistered:
        more = f" (and {len(r.unregistered) - 5} more)" if len(r.unregistered) > 5 else ""
        lines.append(f"  not registered: {', '.join(r.unregistered[:5])}{more}")
    for w in r.warnings:
        lines.append(f"warning: {w}")
    if r.other_models:
        lines.append(f"  kept the largest of {len(r.other_models) + 1} reconstructions; the others had "
                     f"{', '.join(map(str, r.other_models))} images")
    lines.append(f"wrote {r.out} (sparse/0, images/, process.json); train with: langfield train {r.out}")
    return "\n".join(lines)


def cli_process(
    images_dir: Annotated[pathlib.Path, tyro.conf.Positional, tyro.conf.arg(metavar="IMAGES_DIR")],
    out: pathlib.Path,
    matcher: Literal["exhaustive", "sequential"] = "exhaustive",
    camera_model: Literal["SIMPLE_RADIAL", "PINHOLE", "OPENCV", "SIMPLE_PINHOLE", "RADIAL"] = "SIMPLE_RADIAL",
    single_camera: bool = True,
    downscale: Tuple[int, ...] = (),
    max_image_size: int = 3200,
    max_features: int = 8192,
    overlap: int = 10,
    link: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    num_threads: int = -1,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    verbose: bool = False,
) -> int:
    """Structure from motion (pycolmap) on a folder of images without poses -> a COLMAP dataset
    (OUT/images, OUT/sparse/0, OUT/process.json) that `langfield train OUT` reads.

    Args:
        images_dir: folder of images (.jpg .jpeg .png .tif .tiff .bmp, any case; subfolders ignored).
        out: output dataset folder (must not exist or be empty, unless --overwrite).
        matcher: exhaustive (all pairs; unordered photos, <= ~100 on a CPU) or sequential (video frames).
        camera_model: COLMAP camera model to estimate; distortion is undone when loading.
        single_camera: one camera shared by all images (same camera and zoom); --no-single-camera: one per image.
        downscale: also write images_N/ (resized by 1/N) for each factor, e.g. --downscale 2 4.
        max_image_size: features are extracted with the longest side resized to this (-1: full size).
        max_features: SIFT features per image.
        overlap: sequential matcher: each image is matched with the next OVERLAP images (by file name).
        link: symlink the images into OUT/images instead of copying them.
        overwrite: replace an existing non-empty OUT (only once the new dataset is complete).
        seed: COLMAP's random seed (runs are bit-reproducible with --num-threads 1).
        num_threads: CPU threads (-1: all cores).
        device: where SIFT and matching run; cuda needs a CUDA build of pycolmap.
        verbose: show COLMAP's own log lines.
    """
    try:
        process_images(images_dir, out, matcher=matcher, camera_model=camera_model, single_camera=single_camera,
                       max_image_size=max_image_size, max_features=max_features, downscale=downscale, link=link,
                       overwrite=overwrite, overlap=overlap, seed=seed, num_threads=num_threads, device=device,
                       verbose=verbose, log=lambda s: print(s, flush=True))
    except ProcessError as e:
        from langfield.errors import CliError

        raise CliError(f"langfield process: {e}") from None
    except KeyboardInterrupt:
        print("langfield process: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0
