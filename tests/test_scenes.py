"""Procedural scenes (scenes/): exact depth, labels, writers, determinism, CLI errors.

Writers are read back by small independent parsers written here (not by the code under
test), so a convention error in a writer cannot cancel out.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from langfield.scenes.model import SHAPES
from langfield.scenes import LEVELS, Light, Material, Obj, Prim, Scene
from langfield.scenes.builtin import SCENES, get_scene
from langfield.scenes.make import make_scene, parse_size
from langfield.scenes.raycast import TorchScene, cast_pixels, render_view

GL = np.diag([1.0, -1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------- parsers
def parse_nerfstudio(root: Path):
    meta = json.loads((root / "transforms.json").read_text())
    K = np.array([[meta["fl_x"], 0, meta["cx"]], [0, meta["fl_y"], meta["cy"]], [0, 0, 1.0]])
    views = {}
    for fr in meta["frames"]:
        c2w_cv = np.asarray(fr["transform_matrix"], dtype=np.float64) @ GL
        views[fr["file_path"]] = (np.linalg.inv(c2w_cv), fr)
    return meta, K, views


def quat_to_rot(qx, qy, qz, qw):
    return np.array([
        [1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qz * qw), 2 * (qx * qz + qy * qw)],
        [2 * (qx * qy + qz * qw), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qx * qw)],
        [2 * (qx * qz - qy * qw), 2 * (qy * qz + qx * qw), 1 - 2 * (qx * qx + qy * qy)],
    ])


def read_list(path: Path):
    return [ln.split() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def tree_digest(root: Path):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tabletop(tmp_path_factory):
    out = tmp_path_factory.mktemp("tabletop")
    res = make_scene("tabletop", out, kind="multiview", views=6, size=(64, 48), seed=3, test_every=3, workers=1)
    return out, res


# ----------------------------------------------------------------------------- geometry
def _implicit(shape, size, p):
    """Signed distance-like residual of local points p on each analytic surface."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    rho = np.hypot(x, y)
    if shape == "sphere":
        return np.linalg.norm(p, axis=1) - size[0]
    if shape == "box":
        q = np.abs(p) - np.asarray(size)
        return np.max(q, axis=1)
    if shape == "cylinder":
        return np.maximum(rho - size[0], np.abs(z) - size[1])
    if shape == "cone":
        r, h = size
        side = (rho - r * (h - z) / h) * h / math.hypot(r, h)
        return np.maximum(side, -z)
    if shape == "plane":
        return z
    if shape == "torus":
        return np.hypot(rho - size[0], z) - size[1]
    if shape == "capsule":
        c = np.clip(z, -size[1], size[1])
        return np.sqrt(x * x + y * y + (z - c) ** 2) - size[0]
    raise ValueError(shape)


@pytest.mark.parametrize("shape,size,rot", [
    ("sphere", (0.3,), (0, 0, 0)), ("box", (0.3, 0.2, 0.25), (20, 30, 40)), ("cylinder", (0.2, 0.3), (60, 0, 10)),
    ("cone", (0.25, 0.5), (30, 20, 0)), ("plane", (0.4, 0.3), (50, 0, 30)), ("torus", (0.3, 0.08), (70, 10, 0)),
    ("capsule", (0.12, 0.25), (0, 80, 20)),
])
def test_primitive_depth_is_exact(shape, size, rot):
    """Hits reconstructed from z-depth lie on the analytic surface (to float32 precision)."""
    sc = Scene("one", [Obj("thing", [Prim(shape, size, (0.1, -0.05, 0.02), rot)])], [Light("directional", (0, 0, 1))])
    flat = sc.flatten(0)
    from langfield.scenes.cameras import intrinsics, look_at

    K = intrinsics(64, 48, 50)
    vm = look_at((1.2, -1.4, 0.9), (0, 0, 0))
    out = render_view(TorchScene(flat), K, vm, 64, 48, aa=1)
    z = out["depth"].numpy().astype(np.float64)
    hit = z > 0
    assert hit.sum() > 50
    v, u = np.nonzero(hit)
    cam = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0] * z[hit], (v + 0.5 - K[1, 2]) / K[1, 1] * z[hit], z[hit]], 1)
    c2w = np.linalg.inv(vm)
    world = cam @ c2w[:3, :3].T + c2w[:3, 3]
    local = (world - flat.trans[0]) @ flat.rot[0]
    res = np.abs(_implicit(shape, size, local))
    assert res.max() < 2e-5 * 2.0, (shape, res.max())
    assert np.array_equal(out["instance"].numpy() > 0, hit)


def test_depth_reprojects_between_views(tabletop):
    """Depth of one view, reprojected into others with the *written* poses, matches the
    exact depth there (cast at the sub-pixel position) and the written depth map."""
    out, res = tabletop
    meta, K, views = parse_nerfstudio(out)
    scene = get_scene("tabletop", seed=3)
    tsc = TorchScene(scene.flatten(0))
    frames = meta["frames"]
    n_exact = n_interp = 0
    worst = 0.0
    rel_interp = []
    for a in range(len(frames)):
        for b in range(len(frames)):
            if a == b:
                continue
            va, fa = views[frames[a]["file_path"]]
            vb, fb = views[frames[b]["file_path"]]
            za = np.load(out / fa["depth_file_path"]).astype(np.float64)
            sub_a = png(out / fa["label_paths"]["subpart"])
            # primitive ids of view a (not written): a shared surface is the same primitive
            ra = render_view(tsc, K, va, za.shape[1], za.shape[0])
            assert np.array_equal(ra["depth"].numpy(), np.load(out / fa["depth_file_path"]))
            prim_a = ra["prim"].numpy()
            h, w = za.shape
            v, u = np.nonzero(za > 0)
            cam = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0], (v + 0.5 - K[1, 2]) / K[1, 1], np.ones_like(u, float)], 1)
            cam *= za[v, u][:, None]
            world = cam @ np.linalg.inv(va)[:3, :3].T + np.linalg.inv(va)[:3, 3]
            pb = world @ vb[:3, :3].T + vb[:3, 3]
            zpred = pb[:, 2]
            ub = K[0, 0] * pb[:, 0] / zpred + K[0, 2]
            vb_ = K[1, 1] * pb[:, 1] / zpred + K[1, 2]
            inside = (zpred > 0.05) & (ub > 1) & (ub < w - 1) & (vb_ > 1) & (vb_ < h - 1)
            if inside.sum() == 0:
                continue
            # exact depth in view b at the projected sub-pixel positions
            cast = cast_pixels(tsc, K, vb, np.stack([ub[inside], vb_[inside]], 1))
            zb = cast["depth"].numpy().astype(np.float64)
            # shared surface: the same primitive, facing camera b (all but the torus are convex,
            # so a front-facing point of a convex primitive is not hidden by that primitive)
            pa = prim_a[v[inside], u[inside]]
            nrm = ra["normal"].numpy()[v[inside], u[inside]].astype(np.float64)
            tob = np.linalg.inv(vb)[:3, 3] - world[inside]
            facing = (nrm * tob).sum(1) / np.linalg.norm(tob, axis=1) > 0.05
            convex = tsc.fs.shape[pa] != SHAPES.index("torus")
            same = (cast["prim"].numpy() == pa) & facing & convex
            rel = np.abs(zb[same] - zpred[inside][same]) / zpred[inside][same]
            n_exact += int(same.sum())
            if same.any():
                assert rel.max() < 1e-3, rel.max()
                worst = max(worst, float(rel.max()))
            # written depth of view b, inverse depth interpolated bilinearly within one label
            zbw = np.load(out / fb["depth_file_path"]).astype(np.float64)
            sub_b = png(out / fb["label_paths"]["subpart"])
            x0 = np.floor(ub[inside] - 0.5).astype(int)
            y0 = np.floor(vb_[inside] - 0.5).astype(int)
            fx = ub[inside] - 0.5 - x0
            fy = vb_[inside] - 0.5 - y0
            lab = sub_a[v[inside], u[inside]]
            ok = np.ones_like(lab, bool)
            inv = np.zeros_like(fx)
            for dy, dx, wgt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
                zz = zbw[y0 + dy, x0 + dx]
                ok &= (sub_b[y0 + dy, x0 + dx] == lab) & (zz > 0)
                inv += wgt / np.where(zz > 0, zz, 1.0)
            zi = 1.0 / inv
            ok &= zi >= zpred[inside] * (1 - 1e-2)
            rel_interp.append(np.abs(zi[ok] - zpred[inside][ok]) / zpred[inside][ok])
            n_interp += int(ok.sum())
    print(f"reprojection: {n_exact} shared pixels, max rel err {worst:.2e}; interpolated {n_interp}")
    assert n_exact > 500, n_exact
    assert n_interp > 300, n_interp
    r = np.concatenate(rel_interp)
    assert np.median(r) < 1e-4 and np.quantile(r, 0.95) < 1e-3, (np.median(r), np.quantile(r, 0.95))


def test_masks_equal_instance_ids(tabletop):
    out, res = tabletop
    meta, K, views = parse_nerfstudio(out)
    labels = json.loads((out / "labels.json").read_text())
    queries = json.loads((out / "queries.json").read_text())
    scene = get_scene("tabletop", seed=3)
    # the written label maps are the renderer's instance / label ids, exactly
    f0 = res["frames"][0]
    r = render_view(TorchScene(scene.flatten(0)), f0["K"], f0["viewmat"], 64, 48)
    fr = views[f0["file_path"]][1]
    assert np.array_equal(png(out / fr["instance_path"]).astype(np.int64), r["instance"].numpy())
    for li, lv in enumerate(LEVELS):
        assert np.array_equal(png(out / fr["label_paths"][lv]).astype(np.int64), r["labels"][li].numpy())
    # every id in every map has a name; the hierarchy is consistent (subpart -> part -> whole)
    parent = {}
    for fr in meta["frames"]:
        maps = [png(out / fr["label_paths"][lv]).astype(np.int64) for lv in LEVELS]
        for li, lv in enumerate(LEVELS):
            ids = set(np.unique(maps[li]).tolist()) - {0}
            assert ids <= {int(k) for k in labels["names"][lv]}
        assert np.array_equal(maps[0] == 0, maps[2] == 0)
        for s, p, w in zip(maps[2].ravel(), maps[1].ravel(), maps[0].ravel()):
            if s:
                assert parent.setdefault(int(s), (int(p), int(w))) == (int(p), int(w))
    # query masks are exactly the pixels of their label ids; absent queries have no pixels
    test_files = set(meta["test_filenames"])
    assert [v["file_path"] for v in queries["views"]] == sorted(test_files)
    n = 0
    for v in queries["views"]:
        fr = views[v["file_path"]][1]
        maps = {lv: png(out / fr["label_paths"][lv]) for lv in LEVELS}
        for q in v["queries"]:
            m = png(out / q["mask"])
            expect = np.isin(maps[q["level"]], q["ids"])
            assert np.array_equal(m == 255, expect) and set(np.unique(m).tolist()) <= {0, 255}
            assert q["pixels"] == int(expect.sum()) > 0
            n += 1
        assert not set(v["absent"]) & {q["text"] for q in v["queries"]}
    assert n > 10
    texts = {q["text"] for v in queries["views"] for q in v["queries"]}
    assert {"red mug", "mug"} <= texts or {"blue mug", "mug"} <= texts


def test_writers_read_back_same_cameras(tmp_path):
    out = tmp_path / "room"
    res = make_scene("room", out, kind="rgbd", frames=5, size=(40, 30), seed=1, formats=("tum", "replica", "dnerf"),
                     workers=1, test_every=2)
    frames = res["frames"]
    K = res["K"]
    # nerfstudio
    meta, Kn, views = parse_nerfstudio(out)
    assert np.allclose(Kn, K, atol=1e-9) and (meta["w"], meta["h"]) == (40, 30)
    for f in frames:
        vm, fr = views[f["file_path"]]
        assert np.abs(vm - f["viewmat"]).max() < 1e-6
        assert np.array_equal(np.load(out / fr["depth_file_path"]).shape, (30, 40))
    assert set(meta["test_filenames"]) == {f["file_path"] for f in frames if f["split"] == "test"}
    assert set(meta["train_filenames"]) | set(meta["test_filenames"]) == {f["file_path"] for f in frames}
    assert (out / meta["ply_file_path"]).exists()
    # TUM
    tum = out / "tum"
    gt = read_list(tum / "groundtruth.txt")
    rgb = read_list(tum / "rgb.txt")
    dep = read_list(tum / "depth.txt")
    cam = json.loads((tum / "cameras.json").read_text())
    assert len(gt) == len(rgb) == len(dep) == len(frames)
    assert np.allclose([cam["fx"], cam["fy"], cam["cx"], cam["cy"]], [K[0, 0], K[1, 1], K[0, 2], K[1, 2]], atol=1e-9)
    for f, g, rl, dl in zip(frames, gt, rgb, dep):
        assert g[0] == rl[0] == dl[0]
        vals = [float(x) for x in g[1:]]
        c2w = np.eye(4)
        c2w[:3, :3] = quat_to_rot(*vals[3:])
        c2w[:3, 3] = vals[:3]
        assert np.abs(np.linalg.inv(c2w) - f["viewmat"]).max() < 1e-6
        d16 = png(tum / dl[1]).astype(np.float64)
        z = np.load(out / f["depth_file_path"])
        ok = (z > 0) & (z * 5000 < 65535)
        assert np.abs(d16[ok] / cam["depth_scale"] - z[ok]).max() <= 0.5 / 5000 + 1e-6
        assert png(tum / rl[1]).shape == (30, 40, 3)
    # Replica
    rep = out / "replica"
    traj = np.loadtxt(rep / "traj.txt").reshape(-1, 4, 4)
    cp = json.loads((rep / "cam_params.json").read_text())["camera"]
    assert (cp["w"], cp["h"]) == (40, 30) and abs(cp["fx"] - K[0, 0]) < 1e-9 and cp["scale"] == 6553.5
    for i, f in enumerate(frames):
        assert np.abs(np.linalg.inv(traj[i]) - f["viewmat"]).max() < 1e-6
        d16 = png(rep / "results" / f"depth{i:06d}.png").astype(np.float64)
        z = np.load(out / f["depth_file_path"])
        assert np.abs(d16[z > 0] / 6553.5 - z[z > 0]).max() <= 0.5 / 6553.5 + 1e-6
        assert (rep / "results" / f"frame{i:06d}.jpg").exists()
    # D-NeRF style
    for split in ("train", "test"):
        d = json.loads((out / f"transforms_{split}.json").read_text())
        fx = 0.5 * 40 / math.tan(0.5 * d["camera_angle_x"])
        assert abs(fx - K[0, 0]) < 1e-6
        want = [f for f in frames if f["split"] == split]
        assert len(d["frames"]) == len(want)
        for f, fr in zip(want, d["frames"]):
            assert (out / (fr["file_path"] + ".png")).exists()
            c2w = np.asarray(fr["transform_matrix"]) @ GL
            assert np.abs(np.linalg.inv(c2w) - f["viewmat"]).max() < 1e-6


def test_dynamic_times_and_states(tmp_path):
    out = tmp_path / "dyn"
    res = make_scene("dynamic", out, frames=6, size=(48, 36), seed=0, workers=1, test_every=1)
    frames = res["frames"]
    times = [f["time"] for f in frames]
    assert times[0] == 0.0 and times[-1] == 1.0 and times == sorted(times)
    d = json.loads((out / "transforms_test.json").read_text())
    assert [fr["time"] for fr in d["frames"]] == times
    q = json.loads((out / "queries.json").read_text())
    scene = get_scene("dynamic")
    for v in q["views"]:
        t = v["time"]
        present = {e["text"] for e in v["queries"] if e["time_sensitive"]}
        absent = set(v["absent"])
        # the traffic light is red before t=0.5 and green after; never both
        assert not ({"red light", "green light"} <= present)
        assert ("red light" in present) <= (t < 0.5) and ("green light" in present) <= (t >= 0.5)
        assert ("open box" in present) <= (0.35 <= t < 0.8)
        assert {"red light", "green light", "open box", "closed box"} <= present | absent
    # objects move: the ball's mask differs between the first and last frame from one camera
    assert scene.objects[1].pose(0.0)[:3, 3].tolist() != scene.objects[1].pose(1.0)[:3, 3].tolist()
    # the open box hides nothing but moves its lid: different primitive poses at t=0 and t=0.5
    f0, f5 = scene.flatten(0.0), scene.flatten(0.5)
    assert len(f0) == len(f5) and not np.allclose(f0.trans, f5.trans)
    # static cameras: every camera sees every time step; camera 0 is held out
    res2 = make_scene("dynamic", tmp_path / "dyn2", frames=2, views=3, camera="static", size=(24, 18), workers=1)
    fr2 = res2["frames"]
    assert len(fr2) == 6 and [f["camera"] for f in fr2] == [0, 1, 2, 0, 1, 2]
    assert [f["split"] for f in fr2 if f["camera"] == 0] == ["test", "test"]
    assert np.allclose(fr2[0]["viewmat"], fr2[3]["viewmat"])


def test_same_seed_same_bytes(tmp_path):
    kw = dict(kind="multiview", views=3, size=(32, 24), test_every=2, workers=1)
    make_scene("shelf", tmp_path / "a", seed=5, **kw)
    make_scene("shelf", tmp_path / "b", seed=5, **kw)
    make_scene("shelf", tmp_path / "c", seed=6, **kw)
    da, db, dc = (tree_digest(tmp_path / x) for x in "abc")
    assert da == db
    assert da["images/frame_00000.png"] != dc["images/frame_00000.png"]


def test_points_ply(tabletop):
    from plyfile import PlyData

    out, _ = tabletop
    ply = PlyData.read(str(out / "points3d.ply"))
    v = ply["vertex"]
    assert [p.name for p in v.properties] == ["x", "y", "z", "red", "green", "blue"]
    assert v["red"].dtype == np.uint8 and len(v["x"]) > 100
    # points lie on the table-top scene: within a few metres and above the floor
    assert np.all(np.abs(np.stack([v["x"], v["y"]])) < 10) and v["z"].min() > -1e-3


def test_builtin_scenes_and_labels():
    assert {"tabletop", "room", "shelf", "dynamic", "large"} <= set(SCENES)
    for name in SCENES:
        sc = get_scene(name)
        tables = sc.label_tables()
        assert len(tables["whole"]) == len(sc.objects)
        assert len(tables["subpart"]) >= len(tables["part"]) >= len(tables["whole"])
    shelf = get_scene("shelf")
    vocab = shelf.vocabulary()
    assert vocab["red apple"]["whole"] != vocab["red ball"]["whole"]
    assert len(vocab["apple"]["whole"]) == 2  # red and green apple
    tab = get_scene("tabletop").vocabulary()
    assert "handle of the red mug" in tab and "lamp shade" in tab and "rim of the lamp shade" in tab
    assert sum(len(o.prims) for o in get_scene("large").objects) > 500


def test_bad_input_messages(tmp_path):
    from langfield.scenes.cli import scenes_make

    with pytest.raises(SystemExit, match="known scenes: tabletop"):
        scenes_make("nope", tmp_path / "x")
    for bad in ("256", "axb", "0x10", "64x48x3", "-3x4"):
        with pytest.raises(SystemExit, match="size"):
            scenes_make("tabletop", tmp_path / "x", size=bad)
    with pytest.raises(SystemExit, match="views"):
        scenes_make("tabletop", tmp_path / "x", views=0)
    with pytest.raises(ValueError):
        get_scene("nope")
    assert parse_size("64x48") == (64, 48)


def test_cli_list_and_make(tmp_path, capsys):
    from langfield.cli import main

    assert main(["scenes", "list"]) == 0
    text = capsys.readouterr().out
    for name in ("tabletop", "room", "shelf", "dynamic", "large"):
        assert name in text
    assert main(["scenes", "make", "tabletop", "--out", str(tmp_path / "tt"), "--views", "2", "--size", "32x24"]) == 0
    meta = json.loads((tmp_path / "tt" / "transforms.json").read_text())
    assert len(meta["frames"]) == 2 and meta["w"] == 32 and meta["h"] == 24
