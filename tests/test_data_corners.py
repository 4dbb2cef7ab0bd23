"""Corner cases of the dataset loaders (langfield.data): every COLMAP camera model, COLMAP 3
model folders, image names that differ from the files, image modes, nerfstudio paths / split
lists / camera models / poses, Blender variants. Each checks the cameras numerically."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from langfield.data import DatasetError, MissingFileError, detect_format, load_dataset
from langfield.data.base import Dataset, Frame

GL = np.diag([1.0, -1.0, -1.0, 1.0])


def look_at(eye, target=(0, 0, 0), up=(0, 0, 1.0)):
    """OpenCV world-to-camera looking from eye at target."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(z, x), z], 1)
    c2w[:3, 3] = eye
    return np.linalg.inv(c2w)


def ring_views(n, radius=4.0, height=1.5, jitter=0.0):
    rng = np.random.default_rng(0)
    return [look_at([radius * math.cos(2 * math.pi * i / n), radius * math.sin(2 * math.pi * i / n), height],
                    rng.normal(size=3) * jitter) for i in range(n)]


def save_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype != np.uint8 and arr.dtype != np.uint16:
        arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


W, H = 40, 30
ALL_MODELS = [
    ("SIMPLE_PINHOLE", [36.0, 20.0, 15.0]),
    ("PINHOLE", [35.0, 36.0, 20.0, 15.0]),
    ("SIMPLE_RADIAL", [38.0, 20.5, 14.5, 0.08]),
    ("RADIAL", [38.0, 20.0, 15.0, 0.05, -0.01]),
    ("OPENCV", [37.0, 36.0, 19.5, 15.5, -0.05, 0.01, 0.001, -0.002]),
    ("OPENCV_FISHEYE", [30.0, 31.0, 20.0, 15.0, 0.01, -0.005, 0.001, 0.0]),
    ("FULL_OPENCV", [37.0, 36.0, 20.0, 15.0, -0.05, 0.01, 0.001, -0.002, 0.001, 0.0, 0.0, 0.0]),
]


def make_model(root, names, cameras=ALL_MODELS, text=False, folder="sparse/0", files=None, unregistered=(),
               points=True):
    """A COLMAP model with one camera per entry of ``cameras`` (ids 10, 20, ...), image i on
    camera i % len(cameras); images written under ``files[i]`` (default: the model's name)."""
    pycolmap = pytest.importorskip("pycolmap")
    rec = pycolmap.Reconstruction()
    for k, (model, params) in enumerate(cameras):
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model=model, width=W, height=H, params=params,
                                                        camera_id=10 * (k + 1)))
    views = ring_views(len(names), jitter=0.1)
    for i, (name, V) in enumerate(zip(names, views)):
        rec.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=10 * (1 + i % len(cameras)),
                                                        image_id=100 + i), pycolmap.Rigid3d(V[:3, :4]))
        save_png(root / "images" / (files[i] if files else name), np.random.default_rng(i).random((H, W, 3)))
    for i in unregistered:
        rec.deregister_frame(rec.images[100 + i].frame_id)
    if points:
        for x in np.random.default_rng(1).normal(size=(10, 3)):
            rec.add_point3D(x, pycolmap.Track(), np.array([10, 20, 30], np.uint8))
    out = root / folder
    out.mkdir(parents=True)
    (rec.write_text if text else rec.write)(str(out))
    return views


def expected_camera(model, params):
    pycolmap = pytest.importorskip("pycolmap")
    cam = pycolmap.Camera(model=model, width=W, height=H, params=params)
    if model in ("PINHOLE", "SIMPLE_PINHOLE"):
        return cam.calibration_matrix(), W, H
    uc = pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(), cam)
    return uc.calibration_matrix(), uc.width, uc.height


@pytest.mark.parametrize("variant", ["bin", "txt", "colmap3"])
def test_colmap_every_camera_model(tmp_path, variant):
    names = [f"img{i:02d}.png" for i in range(len(ALL_MODELS))]
    views = make_model(tmp_path, names, text=variant == "txt")
    if variant == "colmap3":  # a COLMAP 3.x model: no rigs/frames files
        for f in (tmp_path / "sparse" / "0").glob("*"):
            if f.stem in ("rigs", "frames"):
                f.unlink()
    ds = load_dataset(tmp_path, normalize=False)
    assert len(ds) == len(ALL_MODELS) and len(ds.points) == 10
    for i, f in enumerate(ds.frames):
        model, params = ALL_MODELS[i]
        K, w, h = expected_camera(model, params)
        assert np.allclose(f.K, K, atol=1e-9) and (f.width, f.height) == (w, h), model
        assert np.allclose(f.viewmat, views[i], atol=1e-9)
        assert (f.distortion is None) == (model in ("PINHOLE", "SIMPLE_PINHOLE"))
        assert ds.load_image(i).shape == (h, w, 3)


def test_colmap_image_names_vs_files(tmp_path):
    """Subfolders, upper-case extensions, a name whose file has another case or extension,
    unregistered images, a model in sparse/1 only, no points3D file."""
    names = ["cam0/0001.JPG", "cam1/0001.jpg", "cam0/0002.jpg", "cam1/0002.png", "cam0/0003.png"]
    files = ["cam0/0001.JPG", "cam1/0001.JPG", "cam0/0002.png", "cam1/0002.png", "cam0/0003.png"]
    views = make_model(tmp_path, names, cameras=ALL_MODELS[:2], folder="sparse/1", files=files, unregistered=(4,),
                       points=False)
    (tmp_path / "sparse" / "1" / "points3D.bin").unlink()
    assert detect_format(tmp_path) == "colmap"
    with pytest.warns(UserWarning, match="no 3D points"):
        ds = load_dataset(tmp_path, normalize=False)
    assert ds.points is None
    order = sorted(range(4), key=lambda i: names[i])
    assert [f.name for f in ds.frames] == [names[i] for i in order]
    for f, i in zip(ds.frames, order):
        assert f.image_path == tmp_path / "images" / files[i]
        assert np.allclose(f.viewmat, views[i], atol=1e-9)
    # a name with no file at all is still an error naming it
    (tmp_path / "images" / "cam0" / "0002.png").unlink()
    with pytest.raises(MissingFileError, match="cam0/0002.jpg"):
        load_dataset(tmp_path)


def test_colmap_images_larger_than_cameras(tmp_path):
    names = [f"im{i}.png" for i in range(4)]
    make_model(tmp_path, names, cameras=ALL_MODELS[:2])
    for n in names:
        p = tmp_path / "images" / n
        Image.open(p).resize((2 * W, 2 * H)).save(p)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = load_dataset(tmp_path, normalize=False)
    msgs = [str(x.message) for x in w if "differ in size" in str(x.message)]
    assert len(msgs) == 1 and "4 image(s)" in msgs[0]  # one warning, not one per image
    assert np.allclose(ds.frames[0].K, [[72, 0, 40], [0, 72, 30], [0, 0, 1]])
    assert np.allclose(ds.frames[1].K, [[70, 0, 40], [0, 72, 30], [0, 0, 1]])


def test_exif_orientation_is_not_applied(tmp_path):
    """COLMAP works on the stored pixels, ignoring EXIF orientation; so does the loader."""
    make_model(tmp_path, ["a.jpg", "b.jpg"], cameras=ALL_MODELS[1:2])
    p = tmp_path / "images" / "a.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.open(p).save(p, exif=exif, quality=95)
    raw = np.asarray(Image.open(p), dtype=np.float32) / 255
    ds = load_dataset(tmp_path, normalize=False)
    assert (ds.frames[0].width, ds.frames[0].height) == (W, H)
    assert torch.allclose(ds.load_image(0), torch.from_numpy(raw))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "1"])
def test_image_modes(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        arr = (rng.random((6, 8)) * 65535).astype(np.uint16)
        im = Image.fromarray(arr)
        want = np.repeat(arr[..., None] / 65535.0, 3, 2)
    else:
        rgba = (rng.random((6, 8, 4)) * 255).astype(np.uint8)
        im = Image.fromarray(rgba).convert(mode)
    im.save(tmp_path / "x.png")
    if mode != "I;16":  # composited on the background where there is transparency (LA, RGBA, P with tRNS)
        a = np.asarray(Image.open(tmp_path / "x.png").convert("RGBA"), dtype=np.float64) / 255
        want = a[..., :3] * a[..., 3:] + 0.25 * (1 - a[..., 3:])
    f = Frame(image_path=tmp_path / "x.png", width=8, height=6, K=np.eye(3), camtoworld=np.eye(4))
    img = Dataset([f], background=(0.25, 0.25, 0.25)).load_image(0)
    assert img.shape == (6, 8, 3) and np.allclose(img.numpy(), want, atol=1e-6), mode


# ------------------------------------------------------------------------------------------
# nerfstudio

def make_ns(root, n=4, meta=None, frame=None, ext="png"):
    views = ring_views(n, radius=3.0)
    frames = []
    for i, V in enumerate(views):
        save_png(root / "images" / f"f{i}.{ext}", np.random.default_rng(i).random((24, 32, 3)))
        fr = {"file_path": f"images/f{i}.{ext}", "transform_matrix": (np.linalg.inv(V) @ GL).tolist()}
        if frame:
            frame(i, fr)
        frames.append(fr)
    m = {"fl_x": 30.0, "fl_y": 31.0, "cx": 16.5, "cy": 11.5, "w": 32, "h": 24}
    m.update(meta or {})
    m["frames"] = frames
    (root / "transforms.json").write_text(json.dumps(m))
    return views


def test_nerfstudio_file_paths_and_split_lists(tmp_path):
    """file_path without extension, absolute, with './' or Windows separators; the split lists
    match them by file, not by spelling."""
    root = tmp_path / "d"
    styles = [lambda fp: fp[:-4], lambda fp: str(root / fp), lambda fp: "./" + fp, lambda fp: fp.replace("/", "\\")]
    lists = {"train_filenames": ["images/f0.png", "./images/f1.png", "images\\f3.png"],
             "test_filenames": [str(root / "images" / "f2.png")]}
    views = make_ns(root, ext="jpg", meta={k: [x.replace(".png", ".jpg") for x in v] for k, v in lists.items()},
                    frame=lambda i, fr: fr.update(file_path=styles[i](fr["file_path"])))
    (root / "images_2").mkdir()
    for i in range(4):
        Image.open(root / "images" / f"f{i}.jpg").resize((16, 12)).save(root / "images_2" / f"f{i}.png")
    ds = load_dataset(root, normalize=False)
    assert [f.split for f in ds.frames] == ["train", "train", "test", "train"]
    assert [f.image_path.name for f in ds.frames] == [f"f{i}.jpg" for i in range(4)]
    assert [f.name for f in ds.frames] == ["images/f0", "images/f1.jpg", "images/f2.jpg", "images/f3.jpg"]
    for f, V in zip(ds.frames, views):
        assert np.allclose(f.viewmat, V, atol=1e-12) and np.allclose(f.K, [[30, 0, 16.5], [0, 31, 11.5], [0, 0, 1]])
    half = load_dataset(root, normalize=False, downscale=2)  # images_2 found for every style (as .png)
    assert all(f.image_path.parent.name == "images_2" for f in half.frames)
    assert np.allclose(half.frames[0].K, [[15, 0, 8.25], [0, 15.5, 5.75], [0, 0, 1]])


def test_nerfstudio_per_frame_intrinsics_without_size(tmp_path):
    def frame(i, fr):
        fr.update(fl_x=20.0 + i, fl_y=21.0 + i, cx=15.0 + i, cy=10.0)

    views = make_ns(tmp_path, frame=frame)
    meta = json.loads((tmp_path / "transforms.json").read_text())
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": meta["frames"]}))  # no top-level intrinsics
    ds = load_dataset(tmp_path, normalize=False)
    for i, (f, V) in enumerate(zip(ds.frames, views)):
        assert np.allclose(f.K, [[20 + i, 0, 15 + i], [0, 21 + i, 10], [0, 0, 1]]) and (f.width, f.height) == (32, 24)
        assert np.allclose(f.viewmat, V, atol=1e-12)


@pytest.mark.parametrize("model", ["SIMPLE_RADIAL", "RADIAL", "OPENCV", "OPENCV_FISHEYE"])
def test_nerfstudio_distorted_models(tmp_path, model):
    pycolmap = pytest.importorskip("pycolmap")
    k = {"k1": 0.05, "k2": -0.01}
    make_ns(tmp_path, meta=dict(k, camera_model=model))
    ds = load_dataset(tmp_path, normalize=False)
    cmodel = "OPENCV_FISHEYE" if model == "OPENCV_FISHEYE" else "OPENCV"
    params = [30, 31, 16.5, 11.5, 0.05, -0.01, 0, 0]
    uc = pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(),
                                   pycolmap.Camera(model=cmodel, width=32, height=24, params=params))
    f = ds.frames[0]
    assert f.distortion.model == cmodel and np.allclose(f.distortion.params, params)
    assert np.allclose(f.K, uc.calibration_matrix()) and (f.width, f.height) == (uc.width, uc.height)
    assert ds.load_image(0).shape == (uc.height, uc.width, 3)


@pytest.mark.parametrize("model", ["EQUIRECTANGULAR", "FISHEYE624", "OMNIDIRECTIONALSTEREO_L"])
def test_nerfstudio_unsupported_models(tmp_path, model):
    make_ns(tmp_path, meta={"camera_model": model})
    with pytest.raises(DatasetError, match=rf"transforms.json: field 'camera_model': camera model '{model}'"):
        load_dataset(tmp_path)


def test_nerfstudio_poses(tmp_path):
    """3x4 matrices, a bottom row that is not [0 0 0 1] (ignored, as nerfstudio does), scaled
    rotations (the nearest rotation is used, with a warning), mirrored ones (kept, with a
    warning), singular ones (an error)."""
    def frame(i, fr):
        M = np.array(fr["transform_matrix"])
        if i == 0:
            fr["transform_matrix"] = M[:3].tolist()
        elif i == 1:
            M[3] = [0, 0, 0, 0]
            fr["transform_matrix"] = M.tolist()
        elif i == 2:
            M[:3, :3] *= 1.05
            fr["transform_matrix"] = M.tolist()

    views = make_ns(tmp_path, frame=frame)
    with pytest.warns(UserWarning, match="1 transform_matrix rotation.*not orthonormal"):
        ds = load_dataset(tmp_path, normalize=False)
    for f, V in zip(ds.frames, views):
        assert np.allclose(f.viewmat, V, atol=1e-12)
        assert np.allclose(f.viewmat @ f.camtoworld, np.eye(4), atol=1e-12)
    meta = json.loads((tmp_path / "transforms.json").read_text())
    M = np.array(meta["frames"][3]["transform_matrix"])
    M[:3, 0] *= -1
    meta["frames"][3]["transform_matrix"] = M.tolist()
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning) as rec:
        ds = load_dataset(tmp_path, normalize=False)
    assert any("1 of 4 transform_matrix rotation(s) are mirrored" in str(w.message) for w in rec)
    assert np.allclose(ds.frames[3].camtoworld, M @ GL, atol=1e-12)
    M[:3, 0] = 0
    meta["frames"][3]["transform_matrix"] = M.tolist()
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"frames\[3\].transform_matrix': rotation part .* singular"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------------------
# Blender

def test_blender_variants(tmp_path):
    """JPEG frames named without extension, 3x4 matrices, ./ and plain file paths, no val."""
    views = ring_views(4, radius=4.0)
    for split, idx in (("train", (0, 1, 2)), ("test", (3,))):
        frames = []
        for i in idx:
            save_png(tmp_path / split / f"r_{i}.jpg", np.random.default_rng(i).random((20, 20, 3)))
            m = (np.linalg.inv(views[i]) @ GL)[:3].tolist()
            frames.append({"file_path": f"./{split}/r_{i}" if i % 2 else f"{split}/r_{i}", "transform_matrix": m})
        (tmp_path / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": frames}))
    ds = load_dataset(tmp_path, normalize=False)
    assert [f.name for f in ds.frames] == ["train/r_0", "train/r_1", "train/r_2", "test/r_3"]
    assert [f.split for f in ds.frames] == ["train"] * 3 + ["test"] and len(ds.test) == 1
    fx = 10 / math.tan(0.35)
    for f, V in zip(ds.frames, views):
        assert f.image_path.suffix == ".jpg" and np.allclose(f.viewmat, V, atol=1e-12)
        assert np.allclose(f.K, [[fx, 0, 10], [0, fx, 10], [0, 0, 1]])
    assert ds[3]["image"].shape == (20, 20, 3) and "alpha" not in ds[3]


def test_blender_rgba_backgrounds(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = [255, 0, 0, 255]
    rgba[:, 2:] = [0, 255, 0, 64]
    save_png(tmp_path / "train" / "r_0.png", rgba)
    save_png(tmp_path / "train" / "r_1.png", rgba)
    frames = [{"file_path": f"./train/r_{i}", "transform_matrix": (np.linalg.inv(look_at([3, i, 1])) @ GL).tolist()}
              for i in range(2)]
    (tmp_path / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.5, "frames": frames}))
    a = 64 / 255
    for bg in ((1, 1, 1), (0, 0, 0)):
        it = load_dataset(tmp_path, background=bg)[0]
        assert torch.allclose(it["image"][:, :2], torch.tensor([1.0, 0, 0]).expand(4, 2, 3))
        want = torch.tensor([0, 1.0, 0]) * a + torch.tensor(bg, dtype=torch.float32) * (1 - a)
        assert torch.allclose(it["image"][:, 2:], want.expand(4, 2, 3), atol=1e-6)
        assert torch.allclose(it["alpha"][:, 2:], torch.full((4, 2, 1), a))


def test_find_image_file_prefers_exact(tmp_path):
    from langfield.data.base import find_image_file

    for n in ("x.png", "x.jpg", "y.JPG", "z.PNG"):
        (tmp_path / n).write_bytes(b"")
    assert find_image_file(tmp_path / "x.jpg") == tmp_path / "x.jpg"
    assert find_image_file(tmp_path / "x") == tmp_path / "x.png"  # .png first, as Blender implies it
    assert find_image_file(tmp_path / "y.jpg") == tmp_path / "y.JPG"
    assert find_image_file(tmp_path / "z.jpg") == tmp_path / "z.PNG"
    assert find_image_file(tmp_path / "w.png") is None and find_image_file(tmp_path / "no" / "x.png") is None
