"""langfield.data.rgbd: TUM, Replica, 7-Scenes, numbered folders, scenes writers read back."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from langfield.data.base import DatasetError
from langfield.data.rgbd import (TUM_CAMERAS, BadFrameError, RGBDError, associate_tum, downscale_depth, open_rgbd)
from langfield.eval.trajectory import quat_to_rot, rot_to_quat

W, H = 16, 12
SHARED = Path("/work/shared/data")


def save_rgb(p, arr):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(p)


def save_u16(p, arr):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr.astype(np.uint16))).save(p)


def rand_frame(rng, w=W, h=H, lo=1000, hi=20000):
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    dep = rng.integers(lo, hi, (h, w)).astype(np.uint16)
    dep[rng.random((h, w)) < 0.2] = 0
    return rgb, dep


def rot(axis, deg):
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    th = math.radians(deg)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * K @ K


def motion(t):
    """Constant velocity and constant angular velocity about a fixed axis: exact under
    linear + slerp interpolation."""
    M = np.eye(4)
    M[:3, :3] = rot([0.2, 1.0, -0.3], 40.0 * (t - 10.0)) @ rot([1, 0, 0], 20)
    M[:3, 3] = np.array([0.5, -0.2, 1.0]) + (t - 10.0) * np.array([0.3, 0.1, -0.2])
    return M


def brute_tum_associate(a, b, max_diff):
    cands = sorted((abs(x - y), x, y, i, j) for i, x in enumerate(a) for j, y in enumerate(b) if abs(x - y) < max_diff)
    ua, ub, out = set(), set(), []
    for _, _, _, i, j in cands:
        if i not in ua and j not in ub:
            ua.add(i)
            ub.add(j)
            out.append((i, j))
    return sorted(out)


def test_tum_association_rule():
    assert associate_tum([0.0, 0.033, 0.066], [0.015, 0.030, 0.100]) == [(0, 0), (1, 1)]
    rng = np.random.default_rng(0)
    for _ in range(100):
        a = np.sort(rng.uniform(0, 1, rng.integers(1, 30)))
        b = np.sort(rng.uniform(0, 1, rng.integers(1, 30)))
        assert associate_tum(a, b, 0.03) == brute_tum_associate(a, b, 0.03)


def write_tum(root, rng, n=8):
    """rgb at 30 Hz from t=10 with jitter, depth offset so association matters, gt at 100 Hz
    covering frames 1..n-2 only."""
    ts_rgb = 10.0 + np.arange(n) / 30.0 + rng.uniform(-0.003, 0.003, n)
    ts_dep = ts_rgb + np.array([0.012, -0.008, 0.015, 0.004, 0.004, -0.011, 0.0, -0.002][:n])
    ts_dep[3] = ts_rgb[3] + 0.025  # too far: colour frame 3 has no depth
    raws = []
    for i in range(n):
        rgb, dep = rand_frame(rng)
        save_rgb(root / "rgb" / f"{ts_rgb[i]:.6f}.png", rgb)
        save_u16(root / "depth" / f"{ts_dep[i]:.6f}.png", dep)
        raws.append((rgb, dep))
    # a decoy depth stamp close to frame 5's colour but farther than its own
    rgb_lines = [f"{t:.6f} rgb/{t:.6f}.png" for t in ts_rgb]
    dep_lines = [f"{t:.6f} depth/{t:.6f}.png" for t in ts_dep]
    (root / "rgb.txt").write_text("# colour\n# timestamp filename\n" + "\n".join(rgb_lines) + "\n")
    (root / "depth.txt").write_text("# depth\n" + "\n".join(dep_lines) + "\n")
    t_gt = np.round(np.arange(ts_rgb[1] - 0.004, ts_rgb[n - 2] + 0.001, 0.01), 6)
    lines = ["# ground truth"]
    for t in t_gt:
        M = motion(t)
        q = rot_to_quat(M[:3, :3])
        lines.append(f"{t:.6f} " + " ".join(repr(float(v)) for v in (*M[:3, 3], *q)))
    (root / "groundtruth.txt").write_text("\n".join(lines) + "\n")
    return np.round(ts_rgb, 6), raws


def test_tum_reader(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "rgbd_dataset_freiburg2_testing"
    ts, raws = write_tum(root, rng)
    seq = open_rgbd(root)
    assert seq.format == "tum" and len(seq) == 7  # colour frame 3 dropped (depth 25 ms away)
    kept = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_allclose(seq.timestamps, ts[kept], atol=1e-9)
    fx, fy, cx, cy = TUM_CAMERAS["fr2"][0]
    assert np.allclose(seq.K, [[fx, 0, cx + 0.5], [0, fy, cy + 0.5], [0, 0, 1]])  # +0.5 pixel centres
    assert np.allclose(open_rgbd(root, pixel_centers="half").K[:2, 2], [cx, cy])
    assert seq.distortion is not None and seq.distortion.params[4] == TUM_CAMERAS["fr2"][1][0]
    frames = list(seq)
    assert [f.index for f in frames] == list(range(7))
    for f, k in zip(frames, kept):
        rgb, dep = raws[k]
        assert np.array_equal(f.color, rgb) and f.color.dtype == np.uint8
        np.testing.assert_allclose(f.depth, dep / 5000.0, rtol=1e-6)
        assert f.depth.dtype == np.float32 and f.depth.shape == (H, W)
    # ground truth interpolated to the colour times; none outside the gt range
    assert seq.has_gt.tolist() == [False, True, True, True, True, True, False]
    for f in frames:
        if f.camtoworld is not None:
            np.testing.assert_allclose(f.camtoworld, motion(f.timestamp), atol=1e-9)
    t, c2w = seq.gt_trajectory()
    assert len(t) == 5 and np.isnan(seq.gt_poses[0]).all()
    # options
    s2 = open_rgbd(root, stride=2, max_frames=3, intrinsics=(100, 101, 8, 6))
    assert len(s2) == 3 and np.allclose(s2.timestamps, ts[[0, 2, 5]], atol=1e-9)
    assert s2.K[0, 0] == 100 and s2.distortion is None  # given intrinsics: no distortion unless given
    s3 = open_rgbd(root, intrinsics=(100, 101, 8, 6), distortion=(0.1, 0, 0, 0, 0))
    assert s3.distortion.model == "FULL_OPENCV" and s3.distortion.params[:5] == (100, 101, 8.5, 6.5, 0.1)
    assert open_rgbd(root, camera="fr3").distortion is None


def test_tum_unknown_camera_warns(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "mydata"
    write_tum(root, rng, n=4)
    with pytest.warns(UserWarning, match="ROS default"):
        seq = open_rgbd(root)
    assert seq.K[0, 0] == 525.0 and seq.distortion is None


def test_replica_reader(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "room0"
    poses, raws = [], []
    for i in range(4):
        rgb, dep = rand_frame(rng)
        save_rgb(root / "results" / f"frame{i:06d}.jpg", rgb)
        save_u16(root / "results" / f"depth{i:06d}.png", dep)
        M = np.eye(4)
        M[:3, :3] = rot([1, 1, 0], 10 * i)
        M[:3, 3] = [0.1 * i, 2.0, -1.0]
        poses.append(M)
        raws.append(dep)
    (root / "traj.txt").write_text("\n".join(" ".join(repr(float(v)) for v in M.reshape(-1)) for M in poses) + "\n")
    (tmp_path / "cam_params.json").write_text(json.dumps({"camera": {"w": W, "h": H, "fx": 20.0, "fy": 21.0,
                                                                     "cx": 8.0, "cy": 6.0, "scale": 6553.5}}))
    seq = open_rgbd(root)  # cam_params.json one level up, as in the Replica download
    assert seq.format == "replica" and len(seq) == 4 and seq.K[1, 1] == 21.0
    for i, f in enumerate(seq):
        np.testing.assert_allclose(f.camtoworld, poses[i], atol=0)
        np.testing.assert_allclose(f.depth, raws[i] / 6553.5, rtol=1e-6)
        assert abs(f.timestamp - i / 30) < 1e-12


def write_7scenes(root, rng, n=3, intrinsics=True):
    raws, poses = [], []
    for i in range(n):
        rgb, dep = rand_frame(rng)
        dep[0, :3] = 65535
        save_rgb(root / f"frame-{i:06d}.color.png", rgb)
        save_u16(root / f"frame-{i:06d}.depth.png", dep)
        M = np.eye(4)
        M[:3, :3] = rot([0, 0, 1], 15 * i)
        M[:3, 3] = [i, 0.5, 0.25]
        np.savetxt(root / f"frame-{i:06d}.pose.txt", M)
        raws.append(dep)
        poses.append(M)
    if intrinsics:
        np.savetxt(root / "camera-intrinsics.txt", [[30, 0, 7.5], [0, 31, 5.5], [0, 0, 1]])
    return raws, poses


def test_7scenes_reader(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "seq-01"
    raws, poses = write_7scenes(root, rng)
    seq = open_rgbd(root)
    assert seq.format == "7scenes" and len(seq) == 3 and seq.K[0, 0] == 30 and seq.K[1, 2] == 6.0
    for i, f in enumerate(seq):
        want = np.where(raws[i] == 65535, 0, raws[i]) / 1000.0
        np.testing.assert_allclose(f.depth, want, rtol=1e-6)
        assert (f.depth[0, :3] == 0).all()
        np.testing.assert_allclose(f.camtoworld, poses[i], atol=1e-15)
    (root / "camera-intrinsics.txt").unlink()
    assert open_rgbd(root).K[0, 0] == 585.0
    with pytest.raises(RGBDError, match="one sequence folder"):
        open_rgbd(tmp_path)


def test_numbered_folders_with_trajectory_log(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "icl"
    raws, poses = [], []
    for i in range(4):
        rgb, dep = rand_frame(rng)
        save_rgb(root / "image" / f"{i:05d}.jpg", rgb)
        save_u16(root / "depth" / f"{i:05d}.png", dep)
        M = np.eye(4)
        M[:3, :3] = rot([1, 0, 1], 5 * i)
        M[:3, 3] = [0, i * 0.01, 0]
        poses.append(M)
        raws.append(dep)
    (root / "scene").mkdir()
    (root / "scene" / "trajectory.log").write_text("".join(
        f"{i} {i} {i + 1}\n" + "\n".join(" ".join(f"{v:.8f}" for v in row) for row in M) + "\n"
        for i, M in enumerate(poses)))
    seq = open_rgbd(root, intrinsics=(30, 30, 8, 6), depth_scale=1000)
    assert seq.format == "folders" and len(seq) == 4
    for i, f in enumerate(seq):
        np.testing.assert_allclose(f.camtoworld, poses[i], atol=1e-8)
        np.testing.assert_allclose(f.depth, raws[i] / 1000.0, rtol=1e-6)
    with pytest.warns(UserWarning, match="PrimeSense"):
        assert open_rgbd(root).K[0, 0] == 525
    (root / "scene" / "trajectory.log").write_text("0 0 1\n1 0 0 0\n")
    with pytest.raises(RGBDError, match="trajectory.log"):
        open_rgbd(root, intrinsics=(30, 30, 8, 6))


def test_bad_frames_skipped_with_warning(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "seq"
    raws, _ = write_7scenes(root, rng, n=6)
    (root / "frame-000001.depth.png").unlink()  # missing
    (root / "frame-000002.depth.png").write_bytes(b"not a png")  # unreadable
    save_u16(root / "frame-000003.depth.png", np.zeros((H, W)))  # no valid depth
    save_u16(root / "frame-000004.depth.png", np.ones((H + 1, W)))  # wrong size
    seq = open_rgbd(root)
    assert len(seq) == 6
    with pytest.raises(BadFrameError, match="depth map not found"):
        seq[1]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = [f.index for f in seq]
    assert got == [0, 5]
    msgs = " | ".join(str(x.message) for x in w)
    for m in ("depth map not found", "not an image", "no valid depth", "16x13"):
        assert m in msgs
    assert [i for i, _ in seq.skipped] == [1, 2, 3, 4]
    # NaN in a float depth map (numbered folders accept .npy)
    f = tmp_path / "f"
    for i in range(2):
        save_rgb(f / "rgb" / f"{i}.png", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        d = np.full((H, W), 1500.0, np.float32)
        if i == 1:
            d[2, 2] = np.nan
        (f / "depth").mkdir(exist_ok=True)
        np.save(f / "depth" / f"{i}.npy", d)
    s = open_rgbd(f, intrinsics=(10, 10, 8, 6))
    with pytest.warns(UserWarning, match="NaN"):
        frames = list(s)
    assert len(frames) == 1 and np.allclose(frames[0].depth, 1.5)


def test_not_rgbd_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(RGBDError) as e:
        open_rgbd(tmp_path)
    assert isinstance(e.value, DatasetError)
    assert "rgb.txt" in str(e.value) and "frame-NNNNNN" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(RGBDError, match="does not exist"):
        open_rgbd(tmp_path / "nope")
    (tmp_path / "rgb.txt").write_text("1.0 a.png\nxx b.png\n")
    (tmp_path / "depth.txt").write_text("")
    with pytest.raises(RGBDError, match="line 2"):
        open_rgbd(tmp_path)


def test_downscale_min_pools_valid_depth(tmp_path):
    d = np.array([[0, 2, 5, 5], [3, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], np.float32)
    assert downscale_depth(d, 2).tolist() == [[2, 5], [1, 0]]
    rng = np.random.default_rng(7)
    root = tmp_path / "seq"
    write_7scenes(root, rng, n=2)
    seq = open_rgbd(root, downscale=2)
    f = seq[0]
    assert f.color.shape == (H // 2, W // 2, 3) and f.depth.shape == (H // 2, W // 2)
    assert np.allclose(seq.K, [[15, 0, 4.0], [0, 15.5, 3.0], [0, 0, 1]])  # (7.5 + 0.5) / 2
    full = open_rgbd(root)[0]
    np.testing.assert_array_equal(f.depth, downscale_depth(full.depth, 2))
    np.testing.assert_allclose(f.color, full.color.reshape(6, 2, 8, 2, 3).mean((1, 3)), atol=0.5)


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    from langfield.scenes.make import make_scene

    out = tmp_path_factory.mktemp("room")
    make_scene("room", out, kind="rgbd", frames=4, size=(40, 30), aa=1, workers=1)
    return out


@pytest.mark.parametrize("fmt", ["tum", "replica"])
def test_scenes_rgbd_writers_read_back(room, fmt):
    seq = open_rgbd(room / fmt) if fmt == "replica" else open_rgbd(room)
    assert seq.format == fmt and len(seq) == 4
    meta = json.loads((room / "scene.json").read_text())
    scale = 5000.0 if fmt == "tum" else 6553.5
    for f, fr in zip(seq, meta["frames"]):
        np.testing.assert_allclose(f.K, fr["K"], rtol=1e-9)
        np.testing.assert_allclose(f.camtoworld, np.linalg.inv(fr["viewmat"]), atol=1e-6)
        z = np.load(room / "depth" / f"{fr['name']}.npy")
        written = np.round(z.astype(np.float64) * scale)
        written[(z <= 0) | (written > 65535)] = 0
        np.testing.assert_allclose(f.depth, written / scale, rtol=1e-6)
        ok = written > 0
        assert ok.mean() > 0.9 and np.abs(f.depth[ok] - z[ok]).max() <= 0.5 / scale + 1e-6
        img = np.asarray(Image.open(room / "images" / f"{fr['name']}.png"))
        if fmt == "tum":
            assert np.array_equal(f.color, img)
        else:  # JPEG (quality 95, chroma subsampled): the decoded file exactly, near the PNG
            assert np.array_equal(f.color, np.asarray(Image.open(f.color_path).convert("RGB")))
            assert np.abs(f.color.astype(int) - img).mean() < 12


def _reprojection(seq, a, b):
    fa, fb = seq[a], seq[b]
    K = fa.K
    v, u = np.nonzero(fa.depth > 0)
    z = fa.depth[v, u].astype(np.float64)
    pts = np.stack([((u + 0.5) - K[0, 2]) / K[0, 0] * z, ((v + 0.5) - K[1, 2]) / K[1, 1] * z, z, np.ones_like(z)], 1)
    q = pts @ fa.camtoworld.T @ np.linalg.inv(fb.camtoworld).T
    ub = np.floor(q[:, 0] / q[:, 2] * K[0, 0] + K[0, 2]).astype(int)
    vb = np.floor(q[:, 1] / q[:, 2] * K[1, 1] + K[1, 2]).astype(int)
    ok = (q[:, 2] > 0) & (ub >= 0) & (ub < fb.width) & (vb >= 0) & (vb < fb.height)
    db = fb.depth[vb[ok], ub[ok]]
    m = db > 0
    return float(np.median(np.abs(db[m] - q[ok, 2][m]) / q[ok, 2][m])), int(m.sum())


@pytest.mark.skipif(not (SHARED / "rgbd_7scenes_redkitchen_200").is_dir(), reason="shared 7-Scenes frames absent")
def test_real_7scenes():
    seq = open_rgbd(SHARED / "rgbd_7scenes_redkitchen_200")
    assert seq.format == "7scenes" and len(seq) == 200 and (seq.width, seq.height) == (640, 480)
    assert np.allclose(seq.K, [[585, 0, 320.5], [0, 585, 240.5], [0, 0, 1]]) and seq.has_gt.all()
    f = seq[0]
    assert 0.5 < np.median(f.depth[f.depth > 0]) < 4.0 and f.valid.mean() > 0.8
    err, n = _reprojection(seq, 0, 20)  # depth of frame 0 lands on frame 20's depth with the given poses
    assert n > 100_000 and err < 0.01


@pytest.mark.skipif(not (SHARED / "rgbd_icl_livingroom1_micro").is_dir(), reason="shared ICL frames absent")
def test_real_icl_folders():
    seq = open_rgbd(SHARED / "rgbd_icl_livingroom1_micro", intrinsics=(525, 525, 319.5, 239.5), downscale=2)
    assert seq.format == "folders" and len(seq) == 211 and seq.has_gt.all() and (seq.width, seq.height) == (320, 240)
    np.testing.assert_allclose(seq.gt_poses[0], np.eye(4), atol=1e-8)
    err, n = _reprojection(seq, 0, 20)
    assert n > 20_000 and err < 0.01


# ------------------------------------------------------------------------------------------
# scenes: the rgbd writer's sensor-noise option and the overwrite refusal


def test_sensor_noise_model():
    from langfield.scenes.writers import KINECT_NOISE, kinect_sigma, sensor_depth

    z = np.full((200, 200), 2.0)
    grey = np.full((200, 200, 3), 128, np.uint8)
    a = sensor_depth(z, grey, np.random.default_rng(0))
    b = sensor_depth(z, grey, np.random.default_rng(0))
    assert np.array_equal(a, b) and a.dtype == np.float32  # deterministic
    assert not np.array_equal(a, sensor_depth(z, grey, np.random.default_rng(1)))
    sigma = 0.0012 + 0.0019 * (2.0 - 0.4) ** 2
    assert abs(kinect_sigma(2.0) - sigma) < 1e-12
    m = a > 0
    assert m.all()  # flat, bright, in range: nothing missing
    assert abs((a[m] - 2.0).std() / sigma - 1) < 0.2 and abs((a[m] - 2.0).mean()) < 3 * sigma / 200
    # noise grows with distance
    far = sensor_depth(np.full((100, 100), 4.0), grey[:100, :100], np.random.default_rng(0))
    assert far.std() > 3 * a.std()
    # a depth step: its edge pixels mostly dropped, pixels away from it kept
    step = np.full((50, 50), 1.0)
    step[:, 25:] = 3.0
    s = sensor_depth(step, grey[:50, :50], np.random.default_rng(2))
    edge_kept = (s[:, 24:26] > 0).mean()
    assert edge_kept < 0.35 and (s[:, :20] > 0).all() and (s[:, 30:] > 0).all()
    # dark surfaces lose most of their depth; nearer than the minimum range: none
    dark = sensor_depth(np.full((50, 50), 1.5), np.zeros((50, 50, 3), np.uint8), np.random.default_rng(3))
    assert abs((dark > 0).mean() - (1 - KINECT_NOISE["dark_drop"])) < 0.05
    assert not sensor_depth(np.full((8, 8), 0.3), grey[:8, :8], np.random.default_rng(0)).any()


def test_scenes_noise_option_deterministic(tmp_path, room):
    from langfield.scenes.make import make_scene

    kw = dict(kind="rgbd", frames=4, size=(40, 30), aa=1, workers=1, noise=True)
    make_scene("room", tmp_path / "a", **kw)
    make_scene("room", tmp_path / "b", **kw)
    for rel in ("tum/depth.txt", "replica/traj.txt"):
        assert (tmp_path / "a" / rel).read_bytes() == (room / rel).read_bytes()  # same cameras
    names = sorted(p.name for p in (tmp_path / "a" / "tum" / "depth").iterdir())
    for n in names:
        assert (tmp_path / "a/tum/depth" / n).read_bytes() == (tmp_path / "b/tum/depth" / n).read_bytes()
    # exact depth unchanged; the sensor copy has holes and distance-dependent noise
    assert (tmp_path / "a/depth/frame_00000.npy").read_bytes() == (room / "depth/frame_00000.npy").read_bytes()
    meta = json.loads((tmp_path / "a" / "scene.json").read_text())
    assert meta["sensor_noise"]["sigma2"] == 0.0019 and "sensor_noise" not in json.loads((room / "scene.json").read_text())
    noisy, exact = open_rgbd(tmp_path / "a"), open_rgbd(room)
    holes, errs = [], []
    for fn, fe in zip(noisy, exact):
        holes.append(((fn.depth == 0) & (fe.depth > 0)).mean())
        both = (fn.depth > 0) & (fe.depth > 0)
        errs.append(np.abs(fn.depth[both] - fe.depth[both]) / (0.0012 + 0.0019 * (fe.depth[both] - 0.4) ** 2))
    assert 0.005 < np.mean(holes) < 0.5
    e = np.concatenate(errs)
    assert 0.5 < np.sqrt(np.mean(e ** 2)) < 1.5 and e.max() < 8  # noise ~ the model's sigma (+ 16-bit rounding)


def test_scenes_make_refuses_to_overwrite(tmp_path, capsys):
    from langfield.cli import main
    from langfield.scenes.make import SceneExistsError, make_scene

    out = tmp_path / "d"
    make_scene("room", out, kind="rgbd", frames=4, size=(24, 18), aa=1, workers=1, test_every=2)
    (out / "notes.txt").write_text("mine")
    before = (out / "transforms.json").read_bytes()
    with pytest.raises(SceneExistsError, match="--overwrite"):
        make_scene("room", out, kind="rgbd", frames=2, size=(16, 12), aa=1, workers=1)
    rc = main(["scenes", "make", "room", "--out", str(out), "--kind", "rgbd", "--frames", "2", "--size", "16x12",
               "--aa", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "already holds a scene" in err and str(out) in err
    assert (out / "transforms.json").read_bytes() == before
    rc = main(["scenes", "make", "room", "--out", str(out), "--kind", "rgbd", "--frames", "2", "--size", "16x12",
               "--aa", "1", "--test-every", "0", "--overwrite"])
    assert rc == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["frame_00000.png", "frame_00001.png"]
    assert len(list((out / "tum" / "rgb").iterdir())) == 2 and len(list((out / "replica" / "results").iterdir())) == 4
    assert not (out / "queries").exists()  # the old scene's held-out queries are gone
    assert (out / "notes.txt").read_text() == "mine"  # files that are not scene outputs are kept
    assert len(open_rgbd(out)) == 2


def test_undistort_recovers_pinhole_image(tmp_path):
    from langfield.data.rgbd import remap_rgbd, undistort_maps

    w, h = 64, 48
    K = np.array([[50.0, 0, 32.0], [0, 50.0, 24.0], [0, 0, 1]])
    coeffs = (0.2624, -0.9531, -0.0054, 0.0026, 1.1633)  # TUM fr1

    def pattern(x, y):  # smooth colour as a function of the pinhole image's normalised coordinates
        return np.stack([128 + 100 * np.sin(3 * x), 128 + 100 * np.cos(4 * y), 128 + 60 * np.sin(2 * (x + y))], -1)

    # render the distorted image: for each distorted pixel, invert the distortion by fixed-point iteration
    ud, vd = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xd, yd = (ud - K[0, 2]) / K[0, 0], (vd - K[1, 2]) / K[1, 1]
    x, y = xd.copy(), yd.copy()
    k1, k2, p1, p2, k3 = coeffs
    for _ in range(200):
        r2 = x * x + y * y
        rad = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
        x = (xd - 2 * p1 * x * y - p2 * (r2 + 2 * x * x)) / rad
        y = (yd - p1 * (r2 + 2 * y * y) - 2 * p2 * x * y) / rad
    distorted = np.clip(np.round(pattern(x, y)), 0, 255).astype(np.uint8)
    mx, my = undistort_maps(K, coeffs, w, h)
    col, dep = remap_rgbd(distorted, np.ones((h, w), np.float32), mx, my)
    up, vp = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    want = pattern((up - K[0, 2]) / K[0, 0], (vp - K[1, 2]) / K[1, 1])
    inner = (slice(8, -8), slice(8, -8))
    err = np.abs(col.astype(float) - want)[inner]
    assert err.mean() < 1.5 and err.max() < 8
    assert (dep[inner] == 1).all()
    # through the TUM reader: same K, distortion consumed
    root = tmp_path / "rgbd_dataset_freiburg1_x"
    write_tum(root, np.random.default_rng(9), n=4)
    seq = open_rgbd(root, undistort=True, intrinsics=(20, 20, 7.5, 5.5), distortion=coeffs)
    assert seq.distortion is None and seq[0].distortion is None and seq[0].color.shape == (H, W, 3)
    raw = open_rgbd(root, intrinsics=(20, 20, 7.5, 5.5), distortion=coeffs)
    assert raw.distortion is not None
    want_c, want_d = remap_rgbd(raw[0].color, raw[0].depth, *undistort_maps(raw.K, coeffs, W, H))
    assert np.array_equal(seq[0].color, want_c) and np.array_equal(seq[0].depth, want_d)
    assert not np.array_equal(seq[0].color, raw[0].color)


def test_make_frame_for_live_sources():
    from langfield.data.rgbd import make_frame

    rng = np.random.default_rng(10)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    raw = rng.integers(500, 4000, (H, W)).astype(np.uint16)
    K = [[30, 0, 7.5], [0, 30, 5.5], [0, 0, 1]]
    f = make_frame(rgb, raw, K, timestamp=1.25, depth_scale=1000, index=3, pixel_centers="opencv")
    assert f.index == 3 and f.timestamp == 1.25 and f.K[0, 2] == 8.0 and np.array_equal(f.color, rgb)
    np.testing.assert_allclose(f.depth, raw / 1000.0, rtol=1e-6)
    fd = np.where(rng.random((H, W)) < 0.5, np.nan, 2.0)
    assert (make_frame(rgb, fd, K).depth[np.isnan(fd)] == 0).all()
    with pytest.raises(BadFrameError, match="depth"):
        make_frame(rgb, raw[:-1], K)
    with pytest.raises(BadFrameError, match="no valid depth"):
        make_frame(rgb, np.zeros((H, W)), K)
