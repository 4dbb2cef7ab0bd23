"""``langfield process``: pycolmap SfM on images without poses -> a COLMAP dataset.

A small procedural scene (value-noise and checker textures, so SIFT has features) is
rendered from known cameras on an arc; SfM must register most views, and after a
similarity alignment (Umeyama on camera centres) its cameras must match the truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycolmap")

from langfield.cli import main as cli_main  # noqa: E402
from langfield.data import load_dataset  # noqa: E402
from langfield.data.process import IMAGE_EXTENSIONS, ProcessError, process_images  # noqa: E402

W, H, N_VIEWS, FOV = 256, 192, 12, 55.0


# ----------------------------------------------------------------------------- scene
def _scene():
    from langfield.scenes import Light, Material, Obj, Prim, Scene

    def noise(c1, c2, s):
        return Material(c1, "noise", c2, s)

    objs = [
        Obj("floor", [Prim("plane", (1.5, 1.5), mat=noise((0.85, 0.75, 0.55), (0.25, 0.2, 0.15), 12.0))],
            queryable=False),
        Obj("crate", [Prim("box", (0.2, 0.15, 0.15), (0, 0, 0.15), mat=noise((0.9, 0.3, 0.2), (0.2, 0.05, 0.1), 30.0))],
            (-0.35, 0.1, 0)),
        Obj("block", [Prim("box", (0.12, 0.25, 0.1), (0, 0, 0.1), (0, 0, 30),
                           mat=noise((0.2, 0.5, 0.9), (0.9, 0.9, 0.3), 25.0))], (0.3, -0.2, 0)),
        Obj("ball", [Prim("sphere", (0.14,), (0, 0, 0.14), mat=noise((0.2, 0.8, 0.3), (0.05, 0.1, 0.4), 20.0))],
            (0.2, 0.35, 0)),
        Obj("post", [Prim("cylinder", (0.07, 0.25), (0, 0, 0.25),
                          mat=Material((0.95, 0.95, 0.9), "checker", (0.1, 0.1, 0.1), 12.0))], (-0.1, -0.35, 0)),
    ]
    lights = [Light("directional", (0.4, -0.3, 1.0), 0.6), Light("point", (0.3, 0.2, 1.9), 0.35)]
    return Scene("sfm-test", objs, lights, ambient=0.35, center=(0, 0, 0.1), radius=1.6)


def _cameras(seed: int = 0):
    """An arc of 120 degrees around the scene with elevation sway and distance jitter."""
    from langfield.scenes.cameras import intrinsics, look_at

    rng = np.random.default_rng(seed)
    K = intrinsics(W, H, FOV)
    frames = []
    for i in range(N_VIEWS):
        az = math.radians(-60 + 120 * i / (N_VIEWS - 1))
        el = math.radians(30 + 12 * math.sin(2 * math.pi * i / N_VIEWS))
        r = 1.6 * (1 + 0.08 * rng.uniform(-1, 1))
        eye = np.array([r * math.cos(el) * math.cos(az), r * math.cos(el) * math.sin(az), 0.1 + r * math.sin(el)])
        target = np.array([0.0, 0.0, 0.1]) + 0.05 * rng.uniform(-1, 1, 3)
        frames.append({"viewmat": look_at(eye, target), "K": K, "time": None})
    return K, frames


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(images folder, {name: ground-truth world-to-camera}, K)."""
    from langfield.scenes.make import render_frames

    root = tmp_path_factory.mktemp("sfm_scene")
    K, frames = _cameras()
    results = render_frames(_scene(), frames, W, H, aa=2)
    img_dir = root / "photos"
    img_dir.mkdir()
    gt = {}
    for i, (f, r) in enumerate(zip(frames, results)):
        name = f"view_{i:03d}.png"
        Image.fromarray(r["rgb"]).save(img_dir / name)
        gt[name] = np.asarray(f["viewmat"], dtype=np.float64)
    return img_dir, gt, K


@pytest.fixture(scope="module")
def processed(rendered, tmp_path_factory):
    img_dir, _, _ = rendered
    out = tmp_path_factory.mktemp("sfm_out") / "dataset"
    lines = []
    res = process_images(img_dir, out, downscale=(2,), seed=0, num_threads=1, log=lines.append)  # reproducible
    return out, res, lines


# ----------------------------------------------------------------------------- alignment
def umeyama(src: np.ndarray, dst: np.ndarray):
    """s, R, t minimising |dst - (s R src + t)|^2 (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1
    R = U @ S @ Vt
    s = np.trace(np.diag(D) @ S) / (xs ** 2).sum(1).mean()
    return s, R, mu_d - s * R @ mu_s


def rot_angle_deg(R: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)))


def compare_to_truth(out: Path, gt: dict):
    ds = load_dataset(out, normalize=False, test_every=0)
    names = [f.name for f in ds.frames]
    c2w_est = np.stack([np.asarray(f.camtoworld, dtype=np.float64) for f in ds.frames])
    c2w_gt = np.stack([np.linalg.inv(gt[n]) for n in names])
    s, R, t = umeyama(c2w_est[:, :3, 3], c2w_gt[:, :3, 3])
    centres = (s * (R @ c2w_est[:, :3, 3].T)).T + t
    pos_err = np.linalg.norm(centres - c2w_gt[:, :3, 3], axis=1)
    spread = np.linalg.norm(c2w_gt[:, :3, 3] - c2w_gt[:, :3, 3].mean(0), axis=1).mean()
    rot_err = np.array([rot_angle_deg((R @ c2w_est[i, :3, :3]).T @ c2w_gt[i, :3, :3]) for i in range(len(names))])
    return ds, names, pos_err / spread, rot_err


# ----------------------------------------------------------------------------- pipeline
def test_sfm_recovers_known_cameras(rendered, processed):
    img_dir, gt, K = rendered
    out, res, lines = processed
    assert res.num_images == N_VIEWS
    assert res.num_registered >= math.ceil(0.8 * N_VIEWS), res
    assert res.num_points > 200 and res.mean_reprojection_error < 1.0
    # layout the loader expects
    for f in ("cameras.bin", "images.bin", "points3D.bin"):
        assert (out / "sparse" / "0" / f).is_file()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(gt)
    ds, names, rel_pos_err, rot_err = compare_to_truth(out, gt)
    assert len(names) == res.num_registered and ds.points is not None and len(ds.points) == res.num_points
    # measured (3 camera seeds x 3 SfM seeds, both matchers): centres <= 1.1% of the camera
    # spread, rotations <= 0.6 deg, focal <= 0.3%; the limits leave ~3x margin
    assert rel_pos_err.max() < 0.03, rel_pos_err
    assert rot_err.max() < 2.0, rot_err
    cam = res.cameras[0]
    assert len(res.cameras) == 1 and cam["model"] == "SIMPLE_RADIAL" and (cam["width"], cam["height"]) == (W, H)
    assert abs(cam["params"][0] / K[0, 0] - 1) < 0.02, (cam["params"][0], K[0, 0])
    # the loaded (undistorted) intrinsics stay close to the truth too
    assert abs(float(ds.frames[0].K[0, 0]) / K[0, 0] - 1) < 0.03
    # progress for every stage and the log file
    text = "\n".join(lines)
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", f"registered {res.num_registered} of {N_VIEWS}"):
        assert stage in text, text
    log = json.loads((out / "process.json").read_text())
    assert log["num_registered"] == res.num_registered and log["num_points"] == res.num_points
    assert sorted(log["registered"] + log["unregistered"]) == sorted(gt)
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no partial folder left behind


def test_downscaled_images(processed):
    out, res, _ = processed
    files = sorted((out / "images_2").iterdir())
    assert len(files) == N_VIEWS
    assert Image.open(files[0]).size == (W // 2, H // 2)
    full = load_dataset(out, normalize=False)
    half = load_dataset(out, normalize=False, downscale=2)
    assert all(f.image_path.parent.name == "images_2" for f in half.frames)
    d = half.frames[0].distortion  # SIMPLE_RADIAL: the loader undistorts (and may crop a little)
    assert (d.width, d.height) == (W // 2, H // 2) and abs(half.frames[0].width - full.frames[0].width / 2) <= 1
    np.testing.assert_allclose(half.frames[0].K[0, 0], full.frames[0].K[0, 0] / 2, rtol=0.01)
    assert tuple(half[0]["image"].shape) == (half.frames[0].height, half.frames[0].width, 3)


def test_sequential_matcher(rendered, tmp_path):
    img_dir, gt, _ = rendered
    res = process_images(img_dir, tmp_path / "seq", matcher="sequential", overlap=3, camera_model="PINHOLE",
                         link=True, log=None, num_threads=1)  # one thread: bit-reproducible SfM
    assert res.num_registered >= math.ceil(0.8 * N_VIEWS)
    assert res.cameras[0]["model"] == "PINHOLE"
    assert (tmp_path / "seq" / "images" / "view_000.png").is_symlink()
    _, _, rel_pos_err, rot_err = compare_to_truth(tmp_path / "seq", gt)
    assert rel_pos_err.max() < 0.03 and rot_err.max() < 2.0


# ----------------------------------------------------------------------------- bad input
def run_cli(*args) -> str:
    """The CLI's exit message (SystemExit) as a string; fails if it exits 0."""
    with pytest.raises(SystemExit) as e:
        cli_main(["process", *map(str, args)])
    assert e.value.code == 2
    return str(e.value)


def test_missing_folder(tmp_path):
    msg = run_cli(tmp_path / "nope", "--out", tmp_path / "out")
    assert "does not exist" in msg and "nope" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "sub" / "a.png")
    msg = run_cli(tmp_path, "--out", tmp_path.parent / (tmp_path.name + "_out"))
    assert "no images found" in msg and all(e in msg for e in IMAGE_EXTENSIONS)
    # a dataset root with images/ inside gets a hint
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    msg = run_cli(tmp_path, "--out", tmp_path.parent / (tmp_path.name + "_out"))
    assert "did you mean" in msg and str(tmp_path / "images") in msg


def test_unreadable_image_is_named(rendered, tmp_path):
    img_dir, _, _ = rendered
    src = tmp_path / "imgs"
    src.mkdir()
    for p in sorted(img_dir.iterdir())[:3]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    msg = run_cli(src, "--out", tmp_path / "out")
    assert "broken.jpg" in msg and "cannot read image" in msg
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_overwrite(rendered, tmp_path):
    img_dir, _, _ = rendered
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    msg = run_cli(img_dir, "--out", out)
    assert "--overwrite" in msg and (out / "keep.txt").is_file()
    (tmp_path / "file").write_text("x")
    assert "is a file" in run_cli(img_dir, "--out", tmp_path / "file")
    # --out must not hold the input
    assert "must not be the image folder" in run_cli(img_dir, "--out", img_dir.parent, "--overwrite")
    # a failed --overwrite run keeps the old folder
    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(noise_dir / f"n{i}.png")
    msg = run_cli(noise_dir, "--out", out, "--overwrite")
    assert str(noise_dir) in msg and "overlap" in msg
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "noise", "out"]  # no partial folders


def test_overwrite_replaces(rendered, tmp_path):
    img_dir, _, _ = rendered
    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(img_dir.iterdir())[:6]:
        (small / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert cli_main(["process", str(small), "--out", str(out), "--overwrite", "--max-features", "2000"]) == 0
    assert not (out / "keep.txt").exists()
    assert len(load_dataset(out, normalize=False)) >= 5


def test_mixed_sizes_need_no_single_camera(tmp_path):
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (48, 64), (10, 200, 10)).save(tmp_path / "b.png")
    msg = run_cli(tmp_path, "--out", tmp_path / "out")
    assert "--no-single-camera" in msg and "64x48" in msg


def test_single_image_and_bad_options(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    assert "at least 2" in run_cli(tmp_path, "--out", tmp_path / "out")
    with pytest.raises(ProcessError, match="downscale"):
        process_images(tmp_path, tmp_path / "out", downscale=(1,), log=None)
