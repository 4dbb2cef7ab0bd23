"""Dataset loaders (langfield.data): COLMAP, nerfstudio transforms.json, Blender / D-NeRF.

Every loader reads a fixture written here (a pycolmap reconstruction written with pycolmap's
API, a transforms.json, a Blender set) and must give back the cameras it was written with.
"""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from langfield.data import (DatasetError, ImageReadError, MissingFileError, detect_format, load_blender, load_colmap,
                            load_dataset)
from langfield.io import write_points_ply
from langfield.scene import Gaussians

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GL = np.diag([1.0, -1.0, -1.0, 1.0])


def look_at(eye, target=(0, 0, 0), up=(0, 0, 1.0)):
    """OpenCV world-to-camera looking from eye at target."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, y, z], 1)
    c2w[:3, 3] = eye
    return np.linalg.inv(c2w)


def ring_views(n, radius=4.0, height=1.5, jitter=0.0):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = 2 * math.pi * i / n
        t = rng.normal(size=3) * jitter
        out.append(look_at([radius * math.cos(a), radius * math.sin(a), height], t))
    return out


def pattern(xn, yn):
    """A smooth colour as a function of the normalised camera ray (x/z, y/z)."""
    return np.stack([0.5 + 0.8 * xn, 0.5 + 0.8 * yn, 0.5 + 0.3 * xn * yn], -1).clip(0, 1)


def save_png(path, arr):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype != np.uint8 and arr.dtype != np.uint16:
        arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def project(viewmat, K, xyz):
    """Pixel coordinates of the points in front of the camera (NaN for the others)."""
    pc = np.asarray(xyz, np.float64) @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = pc @ K.T
    z = np.abs(pc[:, 2:3]) / np.abs(pc).max()
    return np.where(z > 1e-2, uv[:, :2] / uv[:, 2:3], np.nan)


# ------------------------------------------------------------------------------------------
# COLMAP

W, H = 40, 30
COLMAP_CAMERAS = [
    ("PINHOLE", [35.0, 36.0, 20.0, 15.0]),
    ("SIMPLE_RADIAL", [38.0, 20.5, 14.5, 0.08]),
    ("OPENCV", [37.0, 36.0, 19.5, 15.5, -0.05, 0.01, 0.001, -0.002]),
]


def make_colmap(root: Path, n_images=10, text=False, with_points=True, small_for=()):
    pycolmap = pytest.importorskip("pycolmap")
    rec = pycolmap.Reconstruction()
    for cid, (model, params) in enumerate(COLMAP_CAMERAS, start=1):
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model=model, width=W, height=H, params=params, camera_id=cid))
    views = ring_views(n_images, jitter=0.1)
    names = []
    for i, V in enumerate(views):
        cid = 1 + i % 3
        name = f"img{i:02d}.png"
        names.append(name)
        rec.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=cid, image_id=i + 1),
                                         pycolmap.Rigid3d(V[:3, :4]))
        cam = rec.cameras[cid]
        xs, ys = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
        rays = cam.cam_from_img(np.stack([xs.ravel(), ys.ravel()], 1))  # normalised (x/z, y/z)
        img = pattern(rays[:, 0], rays[:, 1]).reshape(H, W, 3)
        save_png(root / "images" / name, img)
        if i in small_for:
            small = Image.open(root / "images" / name).resize((W // 2, H // 2), Image.BOX)
            (root / "images_2").mkdir(exist_ok=True)
            small.save(root / "images_2" / name)
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(50, 3)) * 0.5
    rgb = rng.integers(0, 256, size=(50, 3)).astype(np.uint8)
    if with_points:
        for p, c in zip(xyz, rgb):
            rec.add_point3D(p, pycolmap.Track(), c)
    out = root / "sparse" / "0"
    out.mkdir(parents=True)
    (rec.write_text if text else rec.write)(str(out))
    return {"views": views, "names": names, "xyz": xyz, "rgb": rgb}


def test_colmap_cameras_points_split(tmp_path):
    pycolmap = pytest.importorskip("pycolmap")
    fx = make_colmap(tmp_path)
    assert detect_format(tmp_path) == "colmap"
    ds = load_dataset(tmp_path, normalize=False)
    assert ds.format == "colmap" and len(ds) == 10
    assert [f.name for f in ds.frames] == fx["names"]
    assert [f.split for f in ds.frames] == ["test"] + ["train"] * 7 + ["test", "train"]
    for i, f in enumerate(ds.frames):
        assert np.allclose(f.viewmat, fx["views"][i], atol=1e-9)
        model, params = COLMAP_CAMERAS[i % 3]
        if model == "PINHOLE":
            assert f.distortion is None and (f.width, f.height) == (W, H)
            assert np.allclose(f.K, [[35, 0, 20], [0, 36, 15], [0, 0, 1]])
        else:
            uc = pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(),
                                           pycolmap.Camera(model=model, width=W, height=H, params=params))
            assert np.allclose(f.K, uc.calibration_matrix()) and (f.width, f.height) == (uc.width, uc.height)
            assert f.distortion.model == model
    assert np.allclose(ds.points.xyz, fx["xyz"], atol=1e-6)
    assert np.allclose(ds.points.rgb, fx["rgb"] / 255.0)
    assert np.array_equal(ds.transform, np.eye(4))
    # text model reads the same
    root2 = tmp_path / "txt"
    make_colmap(root2, text=True)
    ds2 = load_dataset(root2, normalize=False)
    for a, b in zip(ds.frames, ds2.frames):
        assert np.allclose(a.viewmat, b.viewmat, atol=1e-9) and np.allclose(a.K, b.K)
    # the model folder itself works as the path
    assert len(load_colmap(tmp_path / "sparse" / "0", normalize=False)) == 10


def test_colmap_undistortion_pixels(tmp_path):
    """Images drawn through the distorted cameras, once undistorted, show the pattern of the
    undistorted pinhole cameras."""
    make_colmap(tmp_path, n_images=3)
    ds = load_dataset(tmp_path, normalize=False)
    for i in range(3):
        f = ds.frames[i]
        img = ds.load_image(i).numpy()
        assert img.shape == (f.height, f.width, 3)
        xs, ys = np.meshgrid(np.arange(f.width) + 0.5, np.arange(f.height) + 0.5)
        want = pattern((xs - f.K[0, 2]) / f.K[0, 0], (ys - f.K[1, 2]) / f.K[1, 1])
        err = np.abs(img - want)
        assert err[1:-1, 1:-1].max() < 0.02, (f.distortion, err.max())


def test_colmap_downscale(tmp_path):
    make_colmap(tmp_path, small_for=(0, 1, 2, 3, 4))
    full = load_dataset(tmp_path, normalize=False)
    with pytest.warns(UserWarning, match="missing from"):
        ds = load_dataset(tmp_path, downscale=2, normalize=False)
    for i, (a, b) in enumerate(zip(full.frames, ds.frames)):
        assert b.image_path.parent.name == ("images_2" if i < 5 else "images")
        assert np.allclose(a.viewmat, b.viewmat)
        img = ds.load_image(i)
        assert img.shape == (b.height, b.width, 3)
        if a.distortion is None:
            assert (b.width, b.height) == (W // 2, H // 2)
            assert np.allclose(b.K[:2], a.K[:2] / 2)
        else:
            assert (b.distortion.width, b.distortion.height) == (W // 2, H // 2)


def test_colmap_normalize_consistent(tmp_path):
    make_colmap(tmp_path)
    raw = load_dataset(tmp_path, normalize=False)
    ds = load_dataset(tmp_path, normalize=True)
    T = ds.transform
    A = T[:3, :3]
    s = abs(np.linalg.det(A)) ** (1 / 3)
    assert np.allclose(A @ A.T / s ** 2, np.eye(3), atol=1e-9) and np.linalg.det(A) > 0
    assert np.allclose(ds.points.xyz, raw.points.xyz @ A.T + T[:3, 3], atol=1e-5)
    c = np.stack([f.camtoworld[:3, 3] for f in ds.frames])
    assert ds.scene_scale == pytest.approx(np.linalg.norm(c - c.mean(0), axis=1).max())
    for a, b in zip(raw.frames, ds.frames):
        R = b.camtoworld[:3, :3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-9)
        assert np.allclose(project(a.viewmat, a.K, raw.points.xyz), project(b.viewmat, b.K, ds.points.xyz), atol=1e-3,
                           equal_nan=True)
        assert b.depth_scale == pytest.approx(s)
    # splits, subsets and tensors
    tr, te = ds.split("train"), ds.test
    assert len(tr) == 8 and len(te) == 2 and tr.points is ds.points and tr.scene_scale == ds.scene_scale
    assert ds.viewmats().shape == (10, 4, 4) and ds.Ks().dtype == torch.float32
    item = ds[3]
    assert set(item) >= {"image", "K", "viewmat", "camtoworld", "width", "height"}
    assert torch.allclose(item["viewmat"] @ item["camtoworld"], torch.eye(4), atol=1e-5)
    # initialisation from the SfM points
    g = Gaussians.from_dataset(ds, sh_degree=1)
    assert g.num == 50 and torch.allclose(g.means, torch.from_numpy(ds.points.xyz))


def test_colmap_errors(tmp_path):
    pytest.importorskip("pycolmap")
    make_colmap(tmp_path)
    # distorted cameras without undistortion
    with pytest.raises(DatasetError, match="SIMPLE_RADIAL"):
        load_dataset(tmp_path, undistort=False)
    # missing image: the error names it
    (tmp_path / "images" / "img03.png").unlink()
    with pytest.raises(MissingFileError, match="img03.png"):
        load_dataset(tmp_path)
    # corrupt image: found at load time, named
    (tmp_path / "images" / "img03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageReadError, match="img03.png"):
        load_dataset(tmp_path).load_image(3)
    # corrupt model file
    (tmp_path / "sparse" / "0" / "cameras.bin").write_bytes(b"\x05\x00\x00")
    with pytest.raises(DatasetError, match="COLMAP model"):
        load_dataset(tmp_path)
    # no points -> warning, random init later
    root2 = tmp_path / "nopoints"
    make_colmap(root2, with_points=False)
    with pytest.warns(UserWarning, match="no 3D points"):
        ds = load_dataset(root2)
    assert ds.points is None


# ------------------------------------------------------------------------------------------
# nerfstudio

def make_nerfstudio(root: Path, n=6, distortion=None, lists=True, downscaled=False):
    root.mkdir(parents=True, exist_ok=True)
    views = ring_views(n, radius=3.0)
    w, h = 32, 24
    rng = np.random.default_rng(2)
    frames = []
    for i, V in enumerate(views):
        img = rng.random((h, w, 3))
        save_png(root / "images" / f"frame_{i:05d}.png", img)
        if downscaled:
            save_png(root / "images_2" / f"frame_{i:05d}.png", rng.random((h // 2, w // 2, 3)))
        fr = {"file_path": f"images/frame_{i:05d}.png", "transform_matrix": (np.linalg.inv(V) @ GL).tolist(),
              "label_paths": {"whole": f"labels/{i}.png"}}
        if i == 2:
            fr["fl_x"] = 40.0
            fr["fl_y"] = 41.0
        if i == 3:
            fr["time"] = 0.25
        frames.append(fr)
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2:] = 255
    save_png(root / "masks" / "m0.png", mask)
    frames[0]["mask_path"] = "masks/m0.png"
    (root / "depth").mkdir()
    d0 = rng.random((h, w)).astype(np.float32) * 3000
    np.save(root / "depth" / "d0.npy", d0)
    d1 = (rng.random((h, w)) * 5000).astype(np.uint16)
    save_png(root / "depth" / "d1.png", d1)
    frames[0]["depth_file_path"] = "depth/d0.npy"
    frames[1]["depth_file_path"] = "depth/d1.png"
    xyz = rng.normal(size=(40, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (40, 3)).astype(np.uint8)
    write_points_ply(root / "points.ply", xyz, rgb)
    applied = [[1, 0, 0, 0.5], [0, 0, 1, 0], [0, -1, 0, 0.0]]
    meta = {"camera_model": "OPENCV", "fl_x": 30.0, "fl_y": 31.0, "cx": 16.5, "cy": 11.5, "w": w, "h": h,
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "applied_transform": applied, "ply_file_path": "points.ply",
            "depth_unit_scale_factor": 0.001}
    if distortion:
        meta.update(distortion)
    if lists:
        meta["train_filenames"] = [f"images/frame_{i:05d}.png" for i in range(4)]
        meta["val_filenames"] = ["images/frame_00004.png"]
        meta["test_filenames"] = ["./images/frame_00005.png"]
    meta["frames"] = frames
    (root / "transforms.json").write_text(json.dumps(meta))
    return {"views": views, "d0": d0, "d1": d1, "xyz": xyz, "rgb": rgb, "applied": applied, "meta": meta}


def test_nerfstudio_cameras_and_extras(tmp_path):
    fx = make_nerfstudio(tmp_path)
    assert detect_format(tmp_path) == "nerfstudio"
    ds = load_dataset(tmp_path, normalize=False)
    assert ds.format == "nerfstudio" and len(ds) == 6
    for i, f in enumerate(ds.frames):
        assert np.allclose(f.viewmat, fx["views"][i], atol=1e-12)
        K = [[40, 0, 16.5], [0, 41, 11.5], [0, 0, 1]] if i == 2 else [[30, 0, 16.5], [0, 31, 11.5], [0, 0, 1]]
        assert np.allclose(f.K, K) and (f.width, f.height) == (32, 24)
    assert [f.split for f in ds.frames] == ["train"] * 4 + ["val", "test"]
    assert len(ds.test) == 1 and ds.frames[3].time == 0.25 and ds.frames[0].time is None
    assert ds.frames[0].extras["label_paths"] == {"whole": "labels/0.png"}
    assert np.allclose(ds.applied_transform, fx["applied"] + [[0, 0, 0, 1]])
    assert np.allclose(ds.points.xyz, fx["xyz"]) and np.allclose(ds.points.rgb, fx["rgb"] / 255)
    it0, it1 = ds[0], ds[1]
    assert it0["mask"].shape == (24, 32) and not it0["mask"][:, :16].any() and it0["mask"][:, 16:].all()
    assert torch.allclose(it0["depth"], torch.from_numpy(fx["d0"]) * 0.001, rtol=1e-6)
    assert torch.allclose(it1["depth"], torch.from_numpy(fx["d1"].astype(np.float32)) * 0.001, rtol=1e-6)
    assert "depth" not in ds[2] and ds[3]["time"] == 0.25
    saved = np.asarray(Image.open(tmp_path / "images" / "frame_00004.png"), dtype=np.float32) / 255
    assert torch.allclose(ds.load_image(4), torch.from_numpy(saved))
    # normalised: depth in the new units
    dn = load_dataset(tmp_path)
    s = abs(np.linalg.det(dn.transform[:3, :3])) ** (1 / 3)
    assert torch.allclose(dn.load_depth(0), torch.from_numpy(fx["d0"]) * 0.001 * s, rtol=1e-5)


def test_nerfstudio_default_split_and_downscale(tmp_path):
    make_nerfstudio(tmp_path, n=10, lists=False, downscaled=True)
    ds = load_dataset(tmp_path, downscale=2, normalize=False)
    assert [f.split for f in ds.frames] == ["test"] + ["train"] * 7 + ["test", "train"]
    f = ds.frames[0]
    assert f.image_path.parent.name == "images_2" and (f.width, f.height) == (16, 12)
    assert np.allclose(f.K, [[15, 0, 8.25], [0, 15.5, 5.75], [0, 0, 1]])
    it = ds[0]
    assert it["image"].shape == (12, 16, 3) and it["mask"].shape == (12, 16) and it["depth"].shape == (12, 16)
    ds3 = load_dataset(tmp_path, downscale=3, normalize=False)  # no images_3: resized on the fly
    assert ds3[5]["image"].shape == (8, 11, 3)
    assert np.allclose(ds3.frames[5].K[0], [30 * 11 / 32, 0, 16.5 * 11 / 32])


def test_nerfstudio_distortion(tmp_path):
    pycolmap = pytest.importorskip("pycolmap")
    make_nerfstudio(tmp_path, distortion={"k1": 0.05, "k2": -0.01, "p1": 0.001, "p2": 0.0005})
    ds = load_dataset(tmp_path, normalize=False)
    f = ds.frames[0]
    uc = pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(),
                                   pycolmap.Camera(model="OPENCV", width=32, height=24,
                                                   params=[30, 31, 16.5, 11.5, 0.05, -0.01, 0.001, 0.0005]))
    assert np.allclose(f.K, uc.calibration_matrix()) and (f.width, f.height) == (uc.width, uc.height)
    it = ds[0]
    assert it["image"].shape == (uc.height, uc.width, 3) and it["depth"].shape == (uc.height, uc.width)
    with pytest.raises(DatasetError, match="distortion"):
        load_dataset(tmp_path, undistort=False)


def _edit_json(path, fn):
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def test_nerfstudio_errors(tmp_path):
    fx = make_nerfstudio(tmp_path / "d")
    j = tmp_path / "d" / "transforms.json"
    orig = j.read_text()

    def expect(fn, exc, *parts):
        j.write_text(orig)
        _edit_json(j, fn)
        with pytest.raises(exc) as e:
            load_dataset(tmp_path / "d")
        msg = str(e.value)
        for p in parts:
            assert p in msg, msg
        assert isinstance(e.value, DatasetError)

    expect(lambda m: m.pop("frames"), DatasetError, "transforms.json", "'frames'")
    expect(lambda m: m["frames"][1].pop("transform_matrix"), DatasetError, "transforms.json",
           "frames[1].transform_matrix")
    expect(lambda m: m["frames"][1].update(transform_matrix=[[1, 0], [0, 1]]), DatasetError,
           "frames[1].transform_matrix", "4x4")
    expect(lambda m: (m.pop("fl_x"), m["frames"][0].pop("fl_x", None)), DatasetError, "transforms.json", "fl_x")
    expect(lambda m: m.update(fl_y="abc"), DatasetError, "'fl_y'", "number")
    expect(lambda m: m.update(camera_model="EQUIRECTANGULAR"), DatasetError, "camera_model", "EQUIRECTANGULAR")
    expect(lambda m: m["frames"][2].update(file_path="images/nope.png"), MissingFileError, "nope.png")
    expect(lambda m: m["frames"][0].update(mask_path="masks/none.png"), MissingFileError, "none.png")
    expect(lambda m: m.update(ply_file_path="missing.ply"), MissingFileError, "missing.ply")
    # empty point cloud
    write_points_ply(tmp_path / "d" / "empty.ply", np.zeros((0, 3)))
    expect(lambda m: m.update(ply_file_path="empty.ply"), DatasetError, "ply_file_path", "empty.ply", "empty")
    # invalid JSON names the file and line
    j.write_text('{"frames": [\n  {,}\n]}')
    with pytest.raises(DatasetError, match=r"transforms.json: invalid JSON \(line 2"):
        load_dataset(tmp_path / "d")
    # corrupt image and depth map: named at load time
    j.write_text(orig)
    (tmp_path / "d" / "images" / "frame_00002.png").write_bytes(b"garbage")
    ds = load_dataset(tmp_path / "d")
    with pytest.raises(ImageReadError, match="frame_00002.png"):
        ds[2]
    (tmp_path / "d" / "depth" / "d0.npy").write_bytes(b"not numpy")
    with pytest.raises(ImageReadError, match="d0.npy"):
        ds.load_depth(0)


# ------------------------------------------------------------------------------------------
# Blender / D-NeRF

def make_blender(root: Path, times=False, n_train=4, n_test=2, angle=0.7):
    views = ring_views(n_train + n_test, radius=4.0)
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, 10:] = [255, 0, 0, 255]  # right half opaque red, left half transparent
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        frames = []
        for i in range(n):
            save_png(root / split / f"r_{i}.png", rgba)
            fr = {"file_path": f"./{split}/r_{i}", "rotation": 0.0,
                  "transform_matrix": (np.linalg.inv(views[k]) @ GL).tolist()}
            if times:
                fr["time"] = k / (n_train + n_test - 1)
            frames.append(fr)
            k += 1
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))
    return views


def test_blender(tmp_path):
    views = make_blender(tmp_path)
    assert detect_format(tmp_path) == "blender"
    ds = load_dataset(tmp_path, normalize=False)
    assert ds.format == "blender" and len(ds) == 6 and ds.points is None
    assert [f.split for f in ds.frames] == ["train"] * 4 + ["test"] * 2
    fx = 0.5 * 20 / math.tan(0.35)
    for f, V in zip(ds.frames, views):
        assert np.allclose(f.viewmat, V, atol=1e-12)
        assert np.allclose(f.K, [[fx, 0, 10], [0, fx, 10], [0, 0, 1]])
    it = ds[0]
    assert torch.allclose(it["image"][:, :10], torch.ones(20, 10, 3))  # white background
    assert torch.allclose(it["image"][:, 10:], torch.tensor([1.0, 0, 0]).expand(20, 10, 3))
    assert torch.equal(it["alpha"][:, :10], torch.zeros(20, 10, 1))
    blue = load_blender(tmp_path, background=(0, 0, 1), normalize=False)
    assert torch.allclose(blue.load_image(0)[:, :10], torch.tensor([0, 0, 1.0]).expand(20, 10, 3))
    half = load_dataset(tmp_path, downscale=2, normalize=False)
    assert half[1]["image"].shape == (10, 10, 3) and np.allclose(half.frames[1].K[:2], ds.frames[1].K[:2] / 2)
    # no points: random initialisation in the common view, with a warning
    with pytest.warns(UserWarning, match="no points"):
        g = Gaussians.from_dataset(load_dataset(tmp_path), n_random=500, sh_degree=0)
    assert g.num == 500


def test_dnerf_time(tmp_path):
    make_blender(tmp_path, times=True)
    ds = load_dataset(tmp_path)
    assert ds.format == "dnerf" and ds.has_time
    assert [f.time for f in ds.frames] == pytest.approx([k / 5 for k in range(6)])
    assert ds[5]["time"] == pytest.approx(1.0)


def test_blender_errors(tmp_path):
    make_blender(tmp_path)
    j = tmp_path / "transforms_train.json"
    _edit_json(j, lambda m: m.pop("camera_angle_x"))
    with pytest.raises(DatasetError, match=r"transforms_train.json: field 'camera_angle_x'"):
        load_dataset(tmp_path)
    make_blender(tmp_path)
    (tmp_path / "test" / "r_1.png").unlink()
    with pytest.raises(MissingFileError, match="r_1.png"):
        load_dataset(tmp_path)


def test_detect_errors(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "sparse/0" in msg and "transforms.json" in msg and "transforms_train.json" in msg
    with pytest.raises(MissingFileError):
        load_dataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="downscale"):
        load_dataset(tmp_path, downscale=0)


# ------------------------------------------------------------------------------------------
# procedural scenes (langfield.scenes writes nerfstudio transforms.json)

def test_scenes_tabletop_roundtrip(tmp_path):
    scenes = pytest.importorskip("langfield.scenes")
    out = tmp_path / "tt"
    scenes.make_scene("tabletop", out, views=9, size=(24, 18), aa=1, workers=1)
    truth = json.loads((out / "scene.json").read_text())
    ds = load_dataset(out, normalize=False)
    assert len(ds) == len(truth["frames"]) == 9
    for f, t in zip(ds.frames, truth["frames"]):
        assert np.allclose(f.viewmat, t["viewmat"], atol=1e-9)
        assert np.allclose(f.K, t["K"], atol=1e-9)
        assert f.split == t["split"]
    assert ds.points is not None and len(ds.points) > 0
    it = ds[0]
    depth = np.load(out / "depth" / "frame_00000.npy")
    assert torch.allclose(it["depth"], torch.from_numpy(depth))
    assert it["image"].shape == (18, 24, 3)
    # normalised world: same pixels for the same points
    dn = load_dataset(out)
    for a, b in zip(ds.frames, dn.frames):
        assert np.allclose(project(a.viewmat, a.K, ds.points.xyz), project(b.viewmat, b.K, dn.points.xyz),
                           atol=1e-3, equal_nan=True)


# ------------------------------------------------------------------------------------------
# shared real data (skipped when absent)

@pytest.mark.skipif(not (DATA / "colmap_beer" / "sparse").exists(), reason="shared data (colmap_beer) not present")
def test_real_colmap_beer():
    pycolmap = pytest.importorskip("pycolmap")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_dataset(DATA / "colmap_beer", downscale=8)
    assert len(ds) == 71 and len(ds.points) == 4414
    rec = pycolmap.Reconstruction(str(DATA / "colmap_beer" / "sparse" / "0"))
    by_name = {im.name: im for im in rec.images.values()}
    for i, f in enumerate(ds.frames):
        cam = rec.cameras[by_name[f.name].camera_id]
        if f.image_path.parent.name == "images_8":
            assert Image.open(f.image_path).size == (f.distortion.width, f.distortion.height)
        assert (f.distortion.width, f.distortion.height) == (90, 160)
        assert f.K[0, 0] == pytest.approx(cam.params[0] / 8)  # undistortion keeps the focal length
        assert f.K[0, 2] == pytest.approx(f.width / 2) and f.K[1, 2] == pytest.approx(f.height / 2)
    for i in (0, 40):
        assert ds[i]["image"].shape == (ds.frames[i].height, ds.frames[i].width, 3)


@pytest.mark.skipif(not (DATA / "blender_lego_200").exists(), reason="shared data (blender_lego_200) not present")
def test_real_blender_lego():
    ds = load_dataset(DATA / "blender_lego_200", normalize=False)
    assert len(ds.split("train")) == 100 and len(ds.split("test")) == 50
    meta = json.loads((DATA / "blender_lego_200" / "transforms_train.json").read_text())
    fx = 0.5 * 200 / math.tan(0.5 * meta["camera_angle_x"])
    assert np.allclose(ds.frames[0].K, [[fx, 0, 100], [0, fx, 100], [0, 0, 1]])
    assert np.allclose(ds.frames[0].camtoworld, np.asarray(meta["frames"][0]["transform_matrix"]) @ GL)
    assert ds[0]["image"].shape == (200, 200, 3)
