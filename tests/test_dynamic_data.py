"""Time-stamped datasets (issue #14 part 1): D-NeRF, nerfstudio with time, HyperNeRF, Neu3D
multi-view video, static LLFF, langfield's own dynamic scenes. Every example is written by
the test; cameras are compared with what was written, times with their definition."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from langfield.data import DatasetError, detect_format, load_dataset

GL = np.diag([1.0, -1.0, -1.0, 1.0])
SHARED = Path("/work/shared/data")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LANGFIELD_DATA_CACHE", str(tmp_path / "cache"))


def save_png(p: Path, arr):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(p)


def look_at(eye, target=(0, 0, 0)):
    """OpenCV camera-to-world looking from eye at target, z up."""
    eye = np.asarray(eye, float)
    z = np.asarray(target, float) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0, 0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, y, z], 1)
    c2w[:3, 3] = eye
    return c2w


def blob(w, h, u, v, sigma=1.6):
    xs, ys = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    g = np.exp(-((xs - u) ** 2 + (ys - v) ** 2) / (2 * sigma ** 2))
    return np.repeat(g[..., None], 3, -1)


def centroid(img):
    g = img[..., 0].numpy().astype(np.float64)
    g = np.where(g > 0.05, g, 0)
    ys, xs = np.mgrid[: g.shape[0], : g.shape[1]]
    return (g * (xs + 0.5)).sum() / g.sum(), (g * (ys + 0.5)).sum() / g.sum()


# ---- nerfstudio and D-NeRF time ------------------------------------------------------------------

def test_nerfstudio_time_normalised_and_raw_kept(tmp_path):
    frames = []
    raw = [2.0, 3.5, 5.0, 2.75]
    for i, t in enumerate(raw):
        save_png(tmp_path / "images" / f"f{i}.png", np.full((12, 16, 3), 0.5))
        frames.append({"file_path": f"images/f{i}.png", "time": t,
                       "transform_matrix": (look_at([3 * np.cos(i), 3 * np.sin(i), 1]) @ GL).tolist()})
    (tmp_path / "transforms.json").write_text(json.dumps({"fl_x": 20.0, "w": 16, "h": 12, "frames": frames}))
    ds = load_dataset(tmp_path, normalize=False)
    assert ds.has_time
    assert [f.time for f in ds.frames] == pytest.approx([(t - 2) / 3 for t in raw], abs=1e-12)
    assert [f.extras["time_raw"] for f in ds.frames] == raw and ds.meta["time_raw_range"] == [2.0, 5.0]
    assert ds[2]["time"] == 1.0 and ds[0]["time"] == 0.0
    # times already in [0, 1] are kept exactly
    for fr, t in zip(frames, [0.0, 0.3, 0.7, 1.0]):
        fr["time"] = t
    (tmp_path / "transforms.json").write_text(json.dumps({"fl_x": 20.0, "w": 16, "h": 12, "frames": frames}))
    ds = load_dataset(tmp_path)
    assert [f.time for f in ds.frames] == [0.0, 0.3, 0.7, 1.0] and "time_raw" not in ds.frames[0].extras
    frames[1]["time"] = "late"
    (tmp_path / "transforms.json").write_text(json.dumps({"fl_x": 20.0, "w": 16, "h": 12, "frames": frames}))
    with pytest.raises(DatasetError, match=r"frames\[1\].time.*finite number"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("name", ["dnerf_jumpingjacks_200", "dnerf_bouncingballs_200"])
def test_real_dnerf_times(name):
    root = SHARED / name
    if not (root / "transforms_train.json").is_file():
        pytest.skip(f"{root} not present")
    ds = load_dataset(root)
    assert ds.format == "dnerf" and ds.has_time and all(f.time is not None for f in ds.frames)
    want = []
    for split in ("train", "val", "test"):
        j = root / f"transforms_{split}.json"
        if j.is_file():
            want += [fr["time"] for fr in json.loads(j.read_text())["frames"]]
    assert [f.time for f in ds.frames] == want and 0 <= min(want) and max(want) <= 1
    tr = [f.time for f in ds.frames if f.split == "train"]
    assert tr == sorted(tr) and tr[0] == 0.0 and tr[-1] == pytest.approx(1.0)
    assert ds.test[0]["time"] == ds.test.frames[0].time and ds.test[0]["image"].shape == (200, 200, 3)


def test_langfield_dynamic_scene_has_time(tmp_path):
    from scenes.make import make_scene

    make_scene("dynamic", tmp_path / "d", kind="dynamic", frames=4, size=(24, 24), aa=1, workers=1)
    for fmt in ("nerfstudio", "blender"):
        ds = load_dataset(tmp_path / "d", format=fmt, normalize=False)
        assert ds.has_time and all(f.time is not None for f in ds.frames)
        ts = sorted({f.time for f in ds.frames})
        assert ts == pytest.approx([0, 1 / 3, 2 / 3, 1])


# ---- HyperNeRF -----------------------------------------------------------------------------------

def nerfies_pixel(cam, X):
    """The format's projection, written out independently of the loader."""
    R, c = np.asarray(cam["orientation"]), np.asarray(cam["position"])
    p = R @ (np.asarray(X, float) - c)
    x, y = p[0] / p[2], p[1] / p[2]
    k1, k2, k3 = cam["radial_distortion"]
    p1, p2 = cam["tangential_distortion"]
    r2 = x * x + y * y
    rad = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    xd = x * rad + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * rad + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    f = cam["focal_length"]
    return (f * xd + cam["skew"] * yd + cam["principal_point"][0],
            f * cam["pixel_aspect_ratio"] * yd + cam["principal_point"][1])


def make_hypernerf(root: Path, W=64, H=48, n=5, skew=0.0, par=1.0):
    X = np.array([0.15, -0.1, 0.05])  # the world point every image shows as a blob
    center, scale = np.array([0.5, -0.25, 0.1]), 0.8
    ids = [f"{k:06d}" for k in range(n)]
    cams = {}
    for k, fid in enumerate(ids):
        a = 0.5 * k
        c2w = look_at([2.0 * np.cos(a) + 0.5, 2.0 * np.sin(a) - 0.25, 0.6], target=[0.3, -0.3, 0.1])
        cam = {"orientation": c2w[:3, :3].T.tolist(), "position": c2w[:3, 3].tolist(), "focal_length": 52.0,
               "principal_point": [31.7, 24.4], "skew": skew, "pixel_aspect_ratio": par,
               "radial_distortion": [0.08, -0.03, 0.01], "tangential_distortion": [0.002, -0.003],
               "image_size": [W, H]}
        cams[fid] = cam
        (root / "camera").mkdir(parents=True, exist_ok=True)
        (root / "camera" / f"{fid}.json").write_text(json.dumps(cam))
        u, v = nerfies_pixel(cam, X)
        assert 12 < u < W - 12 and 12 < v < H - 12
        save_png(root / "rgb" / "1x" / f"{fid}.png", blob(W, H, u, v))
        save_png(root / "rgb" / "2x" / f"{fid}.png", blob(W // 2, H // 2, u / 2, v / 2, 0.8))
    time_ids = [3, 0, 4, 1, 2]
    (root / "metadata.json").write_text(json.dumps(
        {fid: {"time_id": t, "warp_id": t, "appearance_id": t, "camera_id": 0} for fid, t in zip(ids, time_ids)}))
    (root / "dataset.json").write_text(json.dumps({"count": n, "num_exemplars": 4, "ids": ids,
                                                   "train_ids": ids[:4], "val_ids": ids[4:]}))
    (root / "scene.json").write_text(json.dumps({"scale": scale, "center": center.tolist(), "near": 0.1,
                                                 "far": 3.0}))
    np.save(root / "points.npy", np.array([X, X + 1.0]))
    return {"X": X, "cams": cams, "ids": ids, "time_ids": time_ids, "center": center, "scale": scale}


def pinhole_pixel(frame, Xw):
    p = frame.viewmat @ np.append(Xw, 1.0)
    uvw = frame.K @ p[:3]
    return uvw[0] / uvw[2], uvw[1] / uvw[2]


@pytest.mark.parametrize("skew,par", [(0.0, 1.0), (1.5, 1.04)])
def test_hypernerf_cameras_distortion_and_time(tmp_path, skew, par):
    pytest.importorskip("pycolmap")
    fx = make_hypernerf(tmp_path, skew=skew, par=par)
    assert detect_format(tmp_path) == "hypernerf"
    ds = load_dataset(tmp_path, normalize=False)
    assert ds.format == "hypernerf" and len(ds) == 5 and ds.has_time
    assert [f.split for f in ds.frames] == ["train"] * 4 + ["test"] and [f.name for f in ds.frames] == fx["ids"]
    assert [f.time for f in ds.frames] == pytest.approx([t / 4 for t in fx["time_ids"]], abs=1e-12)
    assert ds[4]["time"] == pytest.approx(0.5) and ds.frames[0].extras["warp_id"] == 3
    Xw = (fx["X"] - fx["center"]) * fx["scale"]
    assert np.allclose(ds.points.xyz[0], Xw, atol=1e-6)
    assert ds.meta["near"] == 0.1 and ds.meta["far"] == 3.0
    for f, fid in zip(ds.frames, fx["ids"]):
        cam = fx["cams"][fid]
        assert np.allclose(f.camtoworld[:3, :3], np.asarray(cam["orientation"]).T, atol=1e-6)
        assert np.allclose(f.camtoworld[:3, 3], (np.asarray(cam["position"]) - fx["center"]) * fx["scale"],
                           atol=1e-6)
        assert f.K[0, 1] == 0 and f.distortion is not None and f.distortion.skew == pytest.approx(skew)
    # the undistorted image shows the point where the pinhole camera projects it
    errs = []
    for i, f in enumerate(ds.frames):
        u, v = pinhole_pixel(f, Xw)
        cu, cv = centroid(ds.load_image(i))
        errs.append(np.hypot(cu - u, cv - v))
    assert max(errs) < 0.12, errs
    # without undistortion the same point would be off by pixels: the distortion is real
    raw = [np.hypot(*(np.subtract(nerfies_pixel(fx["cams"][fid], fx["X"]), pinhole_pixel(f, Xw))))
           for f, fid in zip(ds.frames, fx["ids"])]
    assert max(raw) > 1.0
    # rgb/2x at downscale=2: K halved before undistortion
    half = load_dataset(tmp_path, normalize=False, downscale=2)
    assert half.frames[0].image_path.parent.name == "2x" and half.frames[0].distortion.width == 32
    assert half.frames[0].distortion.params[0] == pytest.approx(26.0)
    u, v = pinhole_pixel(half.frames[1], Xw)
    cu, cv = centroid(half.load_image(1))
    assert np.hypot(cu - u, cv - v) < 0.15
    with pytest.raises(DatasetError, match="undistort=True"):
        load_dataset(tmp_path, undistort=False)


def test_hypernerf_errors(tmp_path):
    make_hypernerf(tmp_path)
    cam = json.loads((tmp_path / "camera" / "000002.json").read_text())
    cam["orientation"] = [[1, 0], [0, 1]]
    (tmp_path / "camera" / "000002.json").write_text(json.dumps(cam))
    with pytest.raises(DatasetError, match=r"000002.json: field 'orientation': must be 3x3"):
        load_dataset(tmp_path)
    cam["orientation"] = np.eye(3).tolist()
    cam["image_size"] = [0, 48]
    (tmp_path / "camera" / "000002.json").write_text(json.dumps(cam))
    with pytest.raises(DatasetError, match=r"field 'image_size'"):
        load_dataset(tmp_path)
    (tmp_path / "camera" / "000002.json").unlink()
    with pytest.raises(DatasetError, match=r"000002.json: not found"):
        load_dataset(tmp_path)


# ---- LLFF and Neu3D -------------------------------------------------------------------------------

def llff_row(c2w, hwf, near=0.5, far=4.0):
    """poses_bounds row: [R|t|hwf] with R's columns (down, right, back)."""
    R = c2w[:3, :3]
    cols = np.stack([R[:, 1], R[:, 0], -R[:, 2]], 1)
    P = np.concatenate([cols, c2w[:3, 3:4], np.asarray(hwf, float)[:, None]], 1)
    return np.concatenate([P.reshape(-1), [near, far]])


def test_llff_static(tmp_path):
    n = 10
    c2ws = [look_at([3 * np.cos(0.2 * i), 3 * np.sin(0.2 * i), 0.5 + 0.05 * i]) for i in range(n)]
    rows = [llff_row(c, (48, 64, 55.0), 0.5 + i, 9.0) for i, c in enumerate(c2ws)]
    np.save(tmp_path / "poses_bounds.npy", np.stack(rows).astype(np.float32))
    for i in range(n):
        save_png(tmp_path / "images" / f"IMG_{i:04d}.JPG", np.random.default_rng(i).random((48, 64, 3)))
        save_png(tmp_path / "images_2" / f"IMG_{i:04d}.png", np.random.default_rng(i).random((24, 32, 3)))
    assert detect_format(tmp_path) == "llff"
    ds = load_dataset(tmp_path, normalize=False)
    assert ds.format == "llff" and len(ds) == n and not ds.has_time
    assert [i for i, f in enumerate(ds.frames) if f.split == "test"] == [0, 8]
    for f, c in zip(ds.frames, c2ws):
        assert np.allclose(f.camtoworld, c, atol=1e-6)
        assert np.allclose(f.K, [[55, 0, 32], [0, 55, 24], [0, 0, 1]]) and (f.width, f.height) == (64, 48)
    assert ds.frames[3].extras == {"near": 3.5, "far": 9.0} and ds.meta["near"] == 0.5
    half = load_dataset(tmp_path, normalize=False, downscale=2)
    assert half.frames[5].image_path.parent.name == "images_2" and (half.frames[5].width, half.frames[5].height) == (
        32, 24)
    assert np.allclose(half.frames[5].K, [[27.5, 0, 16], [0, 27.5, 12], [0, 0, 1]])
    np.save(tmp_path / "poses_bounds.npy", np.stack(rows[:9]))
    with pytest.raises(DatasetError, match="9 poses but 10 images"):
        load_dataset(tmp_path)
    np.save(tmp_path / "poses_bounds.npy", np.zeros((3, 15)))
    with pytest.raises(DatasetError, match=r"poses_bounds.npy: must be an N x 17"):
        load_dataset(tmp_path)


def write_video(path: Path, frames, fps=10):
    av = pytest.importorskip("av")
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qscale": "1"}
        s.codec_context.qmin = 1
        s.codec_context.qmax = 2
        for a in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def level(cam, k):
    return 30 + 40 * k + 12 * cam


def make_neu3d(root: Path, n_cams=3, n_frames=5, w=32, h=24):
    c2ws = [look_at([3 * np.cos(0.7 * c), 3 * np.sin(0.7 * c), 0.8]) for c in range(n_cams)]
    np.save(root / "poses_bounds.npy", np.stack([llff_row(c, (2 * h, 2 * w, 40.0)) for c in c2ws]))
    for c in range(n_cams):
        write_video(root / f"cam{c:02d}.mp4", [np.full((h, w, 3), level(c, k), np.uint8) for k in range(n_frames)])
    return c2ws


def test_neu3d_videos(tmp_path, monkeypatch):
    pytest.importorskip("av")
    root = tmp_path / "scene"
    root.mkdir()
    c2ws = make_neu3d(root)
    assert detect_format(root) == "neu3d"
    with pytest.warns(UserWarning, match="scaling the intrinsics"):  # hwf says 64x48, the videos are 32x24
        ds = load_dataset(root, normalize=False)
    assert ds.format == "neu3d" and len(ds) == 15 and ds.has_time
    assert [f.split for f in ds.frames] == ["test"] * 5 + ["train"] * 10  # cam00 held out
    assert [f.time for f in ds.frames[5:10]] == [0, 0.25, 0.5, 0.75, 1.0]
    for f in ds.frames:
        assert np.allclose(f.camtoworld, c2ws[f.camera_id], atol=1e-6)
        assert np.allclose(f.K, [[20, 0, 16], [0, 20, 12], [0, 0, 1]]) and (f.width, f.height) == (32, 24)
    for i in (0, 7, 14):
        f = ds.frames[i]
        img = ds[i]["image"]
        assert ds[i]["time"] == f.time
        assert abs(img.mean().item() * 255 - level(f.camera_id, f.extras["frame_index"])) < 3.0
    # cached as PNG: a second load decodes nothing
    import av

    monkeypatch.setattr(av, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
    with pytest.warns(UserWarning):
        again = load_dataset(root, normalize=False)
    assert [f.image_path for f in again.frames] == [f.image_path for f in ds.frames]
    assert all(".langfield" in str(f.image_path) for f in ds.frames)
    monkeypatch.undo()
    # stride, max_frames, downscale; time stays frame index / (n - 1)
    with pytest.warns(UserWarning):
        sub = load_dataset(root, normalize=False, stride=2, max_frames=2, downscale=2)
    assert [f.time for f in sub.frames if f.camera_id == 1] == [0.0, 0.5]
    assert (sub.frames[0].width, sub.frames[0].height) == (16, 12)
    assert np.allclose(sub.frames[0].K, [[10, 0, 8], [0, 10, 6], [0, 0, 1]])
    # a changed video is decoded again (new cache key)
    write_video(root / "cam01.mp4", [np.full((24, 32, 3), 200, np.uint8)] * 5)
    with pytest.warns(UserWarning):
        ds3 = load_dataset(root, normalize=False)
    assert abs(ds3[7]["image"].mean().item() * 255 - 200) < 3.0
    # errors name the file
    (root / "cam02.mp4").write_bytes(b"not a video")
    with pytest.raises(DatasetError, match="cam02.mp4: cannot open video"):
        load_dataset(root)
    (root / "cam02.mp4").unlink()
    with pytest.raises(DatasetError, match="3 poses but 2 videos"):
        load_dataset(root)
