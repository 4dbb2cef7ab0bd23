"""Dynamic scenes (#14): deformable Gaussians, their trainer, language over time, queries with time."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tiny_gaussians(n=300, lang_dim=0, deg=1, seed=0):
    from langfield.scene import Gaussians

    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    gs = Gaussians.from_points(pts, torch.rand(n, 3, generator=g), sh_degree=deg, lang_dim=lang_dim)
    with torch.no_grad():
        gs.splats["shN"].normal_(0, 0.1, generator=g)
        gs.splats["scales"].add_(torch.randn(n, 3, generator=g) * 0.5)
        gs.splats["quats"].add_(torch.randn(n, 4, generator=g) * 0.3)
        if lang_dim:
            gs.splats["lang"].normal_(0, 1, generator=g)
    return gs


def _cams(C=2, size=40, time=None):
    from langfield.render import Cameras

    vms = []
    for k in range(C):
        a = 0.15 * k
        R = torch.tensor([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]], dtype=torch.float32)
        vm = torch.eye(4)
        vm[:3, :3] = R
        vm[:3, 3] = torch.tensor([0.05 * k, 0.0, 0.1 * k])
        vms.append(vm)
    K = torch.tensor([[50.0, 0, size / 2], [0, 50.0, size / 2], [0, 0, 1]])
    times = None if time is None else torch.full((C,), float(time))
    return Cameras(torch.stack(vms), K.expand(C, 3, 3).clone(), size, size, times)


# ------------------------------------------------------------------------------------------ model

@pytest.mark.parametrize("kind", ["hexplane", "mlp"])
def test_zero_deformation_renders_the_static_scene_exactly(kind):
    from langfield.dynamic import DeformableGaussians, DeformConfig
    from langfield.render import render

    g = _tiny_gaussians(lang_dim=4)
    dg = DeformableGaussians.from_gaussians(g, DeformConfig(kind=kind))
    assert dg.deform.is_zero()
    ref = render(g, _cams(), language=True, depth=True)
    for t in (0.0, 0.37, 1.0):
        out = render(dg, _cams(time=t), language=True, depth=True)
        for name in ("rgb", "alpha", "depth", "lang"):
            assert torch.equal(getattr(out, name), getattr(ref, name)), (kind, t, name)
        out2 = render(dg, _cams(), t=t, language=True)
        assert torch.equal(out2.rgb, ref.rgb)
    # zero temporal-opacity bins: a gate of exactly 1, the static scene bit for bit
    dg.set_time_opacity(torch.zeros(dg.num, 5))
    for t in (0.0, 0.37, 1.0):
        out = render(dg, _cams(time=t), language=True, depth=True)
        for name in ("rgb", "alpha", "depth", "lang"):
            assert torch.equal(getattr(out, name), getattr(ref, name)), (kind, t, name, "time_opacity")


def test_temporal_opacity_gates_gaussians_in_time():
    from langfield.dynamic import DeformableGaussians, DeformConfig
    from langfield.dynamic.model import time_gate
    from langfield.render import render

    g = _tiny_gaussians()
    dg = DeformableGaussians.from_gaussians(g, DeformConfig(resolutions=(8,), time_resolution=4, features=4, hidden=16))
    bins = torch.zeros(dg.num, 3)
    bins[: dg.num // 2, 1:] = -30.0  # the first half exists at t = 0 only, fading out by t = 0.5
    dg.set_time_opacity(bins)
    base = torch.sigmoid(dg.splats["opacities"].detach())
    assert torch.equal(dg.activated(0.0).opacities.detach(), base)  # its peak bin: the canonical opacity
    a = dg.activated(1.0).opacities.detach()
    h = dg.num // 2
    assert float(a[:h].max()) < 1e-12 and torch.equal(a[h:], base[h:])
    # halfway to bin 1 the gates mix linearly: 0.5 (interpolating the logs gave exp(-15), so a
    # Gaussian gated to one frame time vanished between frame times)
    mid = dg.activated(0.25).opacities.detach()
    assert torch.allclose(mid[:h], base[:h] * 0.5, rtol=1e-6) and torch.equal(mid[h:], base[h:])
    g1 = time_gate(bins, 0.4)[:h]  # 80 % of the way: 0.2 * 1 + 0.8 * exp(-30)
    assert torch.allclose(g1, torch.full((h,), 0.2 + 0.8 * math.exp(-30.0)), rtol=1e-6)
    b2 = torch.tensor([[0.0, -2.0, 1.0]])  # exactly the bins' gates at the bin times
    assert torch.allclose(torch.stack([time_gate(b2, t) for t in (0.0, 0.5, 1.0)])[:, 0],
                          torch.exp(b2[0] - 1.0), rtol=1e-7)
    # gradients reach the bins around t (zero bins: the gate is 1 and still learns)
    dg.set_time_opacity(torch.zeros(dg.num, 3))
    render(dg, _cams(time=0.3)).rgb.sum().backward()
    gb = dg.splats["time_opacity"].grad
    assert gb is not None and float(gb[:, :2].abs().sum()) > 0
    # plain Gaussians of the model leave the bins out (gsplat names only)
    assert "time_opacity" not in dg.to_dict() and dg.select(torch.arange(5)).num == 5
    with pytest.raises(ValueError, match="time_opacity"):
        dg.set_time_opacity(torch.zeros(dg.num, 1))


def test_deformation_moves_and_gradients_reach_the_field():
    from langfield.dynamic import DeformableGaussians, DeformConfig
    from langfield.render import render

    g = _tiny_gaussians()
    dg = DeformableGaussians.from_gaussians(g, DeformConfig(resolutions=(8,), time_resolution=4, features=4, hidden=16))
    with torch.no_grad():
        dg.deform.out.bias[0] = 0.1  # a uniform shift along x at every time
    a = dg.activated(0.5)
    assert torch.allclose(a.means - dg.means, torch.tensor([0.1, 0.0, 0.0]).expand_as(a.means))
    dg.deform.out.bias.data.zero_()
    out = render(dg, _cams(time=0.5))
    out.rgb.sum().backward()
    grads = [p.grad for p in dg.deform.parameters()]
    assert dg.deform.out.weight.grad is not None and float(dg.deform.out.weight.grad.abs().sum()) > 0
    # the planes get gradients once the head is non-zero
    with torch.no_grad():
        dg.deform.out.weight.normal_(0, 0.01)
    dg.zero_grad()
    render(dg, _cams(time=0.5)).rgb.sum().backward()
    assert all(p.grad is not None for p in dg.deform.planes)
    assert float(sum(p.grad.abs().sum() for p in dg.deform.planes)) > 0
    # the xt/yt/zt planes make the deformation depend on time
    with torch.no_grad():
        for p in dg.deform.planes:
            p.normal_(0, 1)
    a0, a1 = dg.activated(0.1).means, dg.activated(0.9).means
    assert float((a0 - a1).detach().abs().max()) > 1e-4
    del grads


def test_checkpoint_round_trip_and_model_kind():
    from langfield.dynamic import DeformableGaussians, DeformConfig
    from langfield.io.checkpoint import load_checkpoint, save_checkpoint
    from langfield.run import model_from_checkpoint

    g = _tiny_gaussians(lang_dim=3)
    dg = DeformableGaussians.from_gaussians(g, DeformConfig(resolutions=(8, 16), time_resolution=5, features=4,
                                                            hidden=16))
    with torch.no_grad():
        dg.deform.out.weight.normal_(0, 0.05)
        for p in dg.deform.planes:
            p.normal_(0, 1)
    dg.set_states(torch.randn(dg.num, 2, 3))
    dg.set_time_opacity(torch.randn(dg.num, 4))
    with torch.no_grad():
        for p in dg.mixer.parameters():
            p.normal_(0, 0.3)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ck.safetensors"
        save_checkpoint(path, {"splats": dg.to_dict(), **dg.model_tensors()}, {"model": dg.model_config()}, 7)
        ck = load_checkpoint(path)
        back = model_from_checkpoint({"model": dg.model_config()}, ck, torch.device("cpu"))
    assert isinstance(back, DeformableGaussians)
    for t in (0.0, 0.6):
        a, b = dg.activated(t), back.activated(t)
        for name in ("means", "quats", "scales", "opacities", "sh", "lang"):
            assert torch.equal(getattr(a, name).detach(), getattr(b, name)), name
    assert back.lang_dim == 6 and not any(p.requires_grad for p in back.parameters())
    assert torch.equal(back.time_opacity, dg.time_opacity.detach())


# ------------------------------------------------------------------------------------------ trainer

def _look_at(eye, target=(0.0, 0.0, 0.0)):
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    up = np.array([0.0, 0.0, 1.0])
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world (OpenCV: x right, y down, z forward)
    vm = np.eye(4)
    vm[:3, :3] = R
    vm[:3, 3] = -R @ eye
    return vm


def make_moving_scene(root: Path, size=32, n_times=12, n_cams=3, seed=0):
    """A nerfstudio dataset with time: a red ball moving along x over a checker floor, seen by
    ``n_cams`` fixed cameras at ``n_times`` times, rendered by langfield's own renderer from a
    moving teacher. Held out: camera 0 at every third time (a (view, time) pair not trained)."""
    from PIL import Image

    from langfield.render import Cameras, render
    from langfield.scene import Gaussians

    g = torch.Generator().manual_seed(seed)
    # floor: a grid of flat Gaussians in z = 0 with a checker colour
    u = torch.linspace(-1, 1, 24)
    gx, gy = torch.meshgrid(u, u, indexing="ij")
    fl = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.zeros(gx.numel())], -1)
    chk = (((gx.reshape(-1) * 3).floor() + (gy.reshape(-1) * 3).floor()) % 2)[:, None]
    fl_rgb = 0.25 + 0.5 * chk.expand(-1, 3)
    ball = torch.randn(300, 3, generator=g)
    ball = ball / ball.norm(dim=-1, keepdim=True) * 0.18 * torch.rand(300, 1, generator=g) ** (1 / 3)
    ball_rgb = torch.tensor([0.9, 0.15, 0.1]).expand(300, 3) + 0.05 * torch.rand(300, 3, generator=g)
    pts = torch.cat([fl, ball + torch.tensor([0.0, 0.0, 0.2])])
    rgb = torch.cat([fl_rgb, ball_rgb]).clamp(0, 1)
    teacher = Gaussians.from_points(pts, rgb, sh_degree=0, init_opacity=0.99)
    with torch.no_grad():
        teacher.splats["scales"][: fl.shape[0], 2] = math.log(0.005)
        teacher.splats["scales"][: fl.shape[0], :2] = math.log(0.06)
        teacher.splats["scales"][fl.shape[0]:] = math.log(0.05)
    nfl = fl.shape[0]
    (root / "images").mkdir(parents=True, exist_ok=True)
    f = size * 1.1
    K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    eyes = [(2.2 * math.cos(a), 2.2 * math.sin(a), 1.6) for a in np.linspace(-2.2, -0.9, n_cams)]
    frames, train, test = [], [], []
    for ti in range(n_times):
        t = ti / (n_times - 1)
        with torch.no_grad():
            moved = teacher.clone()
            moved.splats["means"][nfl:, 0] += -0.5 + 1.0 * t  # the ball moves 1 m along x
        for c, eye in enumerate(eyes):
            vm = _look_at(eye, (0, 0, 0.1))
            img = render(moved, Cameras.of(vm, K, size, size), background=[1.0, 1.0, 1.0]).rgb[0].detach().clamp(0, 1)
            name = f"images/c{c}_t{ti:02d}.png"
            Image.fromarray((img.numpy() * 255 + 0.5).astype(np.uint8)).save(root / name)
            c2w = np.linalg.inv(vm)
            c2w[:3, 1:3] *= -1  # OpenCV -> OpenGL axes
            frames.append({"file_path": name, "transform_matrix": c2w.tolist(), "time": t})
            (test if (c == 0 and ti % 3 == 1) else train).append(name)
    # surface points (as SfM would give): the teacher's centres at t = 0.5, jittered
    with torch.no_grad():
        mid = teacher.means.detach().clone()
        mid[nfl:, 0] += 0.0
        mid += 0.01 * torch.randn(mid.shape, generator=g)
    cols = (rgb * 255).round().to(torch.uint8).numpy()
    lines = ["ply", "format ascii 1.0", f"element vertex {mid.shape[0]}", "property float x", "property float y",
             "property float z", "property uchar red", "property uchar green", "property uchar blue", "end_header"]
    lines += [f"{x:.5f} {y:.5f} {z:.5f} {r} {gg} {b}" for (x, y, z), (r, gg, b) in zip(mid.tolist(), cols.tolist())]
    (root / "points3d.ply").write_text("\n".join(lines) + "\n")
    doc = {"camera_model": "OPENCV", "ply_file_path": "points3d.ply", "fl_x": f, "fl_y": f, "cx": size / 2, "cy": size / 2, "w": size, "h": size,
           "frames": frames, "train_filenames": train, "test_filenames": test, "val_filenames": test}
    (root / "transforms.json").write_text(json.dumps(doc))
    return root


SMALL = dict(steps=500, init_random=3000, sh_degree=0, ckpt_every=250, progress=False, save_renders=False,
             device="cpu", backend="cpu", densify=False)


def _small_dynamic(**kw):
    from langfield.dynamic.train import DynamicConfig

    d = dict(resolutions=(16,), time_resolution=12, features=8, hidden=32, warmup=100, grid_lr=1e-2, mlp_lr=1e-3)
    d.update(kw)
    return DynamicConfig(**d)


@pytest.fixture(scope="module")
def moving_scene(tmp_path_factory):
    return make_moving_scene(tmp_path_factory.mktemp("moving"))


def test_dynamic_trainer_fits_a_moving_object_on_held_out_times(moving_scene, tmp_path):
    from langfield.dynamic.train import train_dynamic
    from langfield.eval.views import evaluate_views
    from langfield.run import load_run

    run = tmp_path / "run"
    m = train_dynamic(moving_scene, run, dynamic=_small_dynamic(), **{**SMALL, "steps": 450})
    doc = json.loads((run / "config.json").read_text())
    assert doc["model"]["kind"] == "deformable" and doc["dynamic"]["warmup"] == 100
    assert m["n_views"] == 4 and m["psnr"] >= 21.0, m["psnr"]
    # the run reads back through the model kinds; switching the deformation off loses the motion
    _doc, g, ds, _ck = load_run(run, device="cpu")
    test = ds.indices("test")
    on = evaluate_views(g, ds, test, background=(0.0, 0.0, 0.0), sh_degree=0, backend="cpu")
    assert on["psnr"] == pytest.approx(m["psnr"], abs=1e-4)
    g.deform_enabled = False
    off = evaluate_views(g, ds, test, background=(0.0, 0.0, 0.0), sh_degree=0, backend="cpu")
    print("held-out PSNR", on["psnr"], "deformation off", off["psnr"])
    assert on["psnr"] > off["psnr"] + 2.0, (on["psnr"], off["psnr"])


@pytest.mark.parametrize("bins", [0, 4])
def test_dynamic_resume_is_exact(moving_scene, tmp_path, bins):
    from langfield.dynamic.train import train_dynamic
    from langfield.io.checkpoint import load_checkpoint

    opts = {**SMALL, "steps": 40, "ckpt_every": 20, "init_random": 500, "densify": True, "refine_start_iter": 10,
            "refine_every": 10, "refine_stop_iter": 35}
    dyn = _small_dynamic(warmup=15, time_opacity_bins=bins)
    train_dynamic(moving_scene, tmp_path / "a", dynamic=dyn, evaluate=False, **opts)

    class Stop(Exception):
        pass

    def stop(tr):
        if tr.step == 20:
            raise Stop

    with pytest.raises(Stop):
        train_dynamic(moving_scene, tmp_path / "b", dynamic=dyn, evaluate=False, hooks=[stop], **opts)
    train_dynamic(moving_scene, tmp_path / "b", resume=True, evaluate=False)
    a = load_checkpoint(sorted((tmp_path / "a" / "checkpoints").glob("*.safetensors"))[-1])
    b = load_checkpoint(sorted((tmp_path / "b" / "checkpoints").glob("*.safetensors"))[-1])
    assert a.step == b.step == 40
    groups = ("splats", "deform", "deform_optim", "optim") + (("temporal",) if bins else ())
    if bins:  # the bins were trained, densified with the Gaussians, and stored apart from splats
        n = a.tensors["splats"]["means"].shape[0]
        assert "time_opacity" not in a.tensors["splats"] and a.tensors["temporal"]["opacity"].shape == (n, bins)
        assert float(a.tensors["temporal"]["opacity"].abs().max()) > 0 and "time_opacity" in a.tensors["optim"]
    for group in groups:
        fa, fb = a.tensors[group], b.tensors[group]
        assert fa.keys() == fb.keys()
        for k in fa:
            va, vb = fa[k], fb[k]
            if isinstance(va, dict):
                for n in va:
                    assert torch.equal(va[n], vb[n]), (group, k, n)
            else:
                assert torch.equal(va, vb), (group, k)


# ------------------------------------------------------------------------------------------ language over time

def test_time_sensitive_metrics_follow_4d_langsplat():
    from langfield.dynamic.language import time_sensitive_metrics

    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:1] = True
    recs = [  # query holds (truth) at frames 1, 2; predicted at 2, 3
        {"text": "q", "time": 0.0, "pred": False, "gt": False, "pred_mask": None, "gt_mask": None},
        {"text": "q", "time": 0.3, "pred": False, "gt": True, "pred_mask": None, "gt_mask": a},
        {"text": "q", "time": 0.6, "pred": True, "gt": True, "pred_mask": b, "gt_mask": a},
        {"text": "q", "time": 0.9, "pred": True, "gt": False, "pred_mask": b, "gt_mask": None},
    ]
    m = time_sensitive_metrics(recs)
    assert m["acc"] == pytest.approx(0.5)
    assert m["viou"] == pytest.approx((0.0 + 0.5 + 0.0) / 3)  # IoU 0 where only one side holds
    assert m["queries"]["q"]["frames_gt"] == [0.3, 0.6]


def test_scene_holdout_times_split(tmp_path):
    """``holdout="times"``: at each time one of cameras 1..N-1 in turn is held out (test, the
    queries of queries.json): held-out frames of cameras seen in training, as 4D LangSplat
    evaluates; camera 0 is never trained on (val, queries_val.json); the loader reads the
    three splits back."""
    from langfield.data import load_dataset
    from langfield.scenes.make import make_scene

    res = make_scene("dynamic", tmp_path / "d", kind="dynamic", camera="static", views=4, frames=6, size=(16, 16),
                     aa=1, workers=1, holdout="times")
    fr = res["frames"]
    assert {f["split"] for f in fr if f["camera"] == 0} == {"val"}
    test = [(f["camera"], f["time"]) for f in fr if f["split"] == "test"]
    assert [c for c, _ in test] == [1, 2, 3, 1, 2, 3] and len({t for _, t in test}) == 6
    for c in (1, 2, 3):  # every test camera also trains, at the other times
        assert sum(f["split"] == "train" for f in fr if f["camera"] == c) == 4
    ds = load_dataset(tmp_path / "d")
    assert (len(ds.indices("train")), len(ds.indices("test")), len(ds.indices("val"))) == (12, 6, 6)
    q = json.loads((tmp_path / "d" / "queries.json").read_text())
    qv = json.loads((tmp_path / "d" / "queries_val.json").read_text())
    names = {f["name"]: f for f in fr}
    assert [names[v["name"]]["split"] for v in q["views"]] == ["test"] * 6
    assert [names[v["name"]]["split"] for v in qv["views"]] == ["val"] * 6 and "time_sensitive" in qv
    assert json.loads((tmp_path / "d" / "scene.json").read_text())["holdout"] == "times"
    with pytest.raises(ValueError, match="holdout 'times'"):
        make_scene("dynamic", tmp_path / "e", kind="dynamic", camera="static", views=2, frames=2, size=(16, 16),
                   aa=1, workers=1, holdout="times")


@pytest.fixture(scope="module")
def dynamic_language_run(tmp_path_factory):
    """langfield's dynamic scene (5 static cameras, 12 times, 48x48; held-out times of cameras
    1-4 as the test split, camera 0 never trained on), deformable Gaussians, then the
    time-agnostic and time-sensitive language fields from labels features."""
    from langfield.dynamic.language import train_dynamic_language
    from langfield.dynamic.train import train_dynamic
    from langfield.scenes.make import make_scene

    root = tmp_path_factory.mktemp("dynlang")
    data = root / "scene"
    make_scene("dynamic", data, kind="dynamic", camera="static", views=5, frames=12, size=(48, 48), fov=40.0,
               max_points=3000, holdout="times")
    run = root / "run"
    train_dynamic(data, run, dynamic=_small_dynamic(warmup=60, deform_color=True),
                  **{**SMALL, "steps": 400, "init_random": 2000})
    res = train_dynamic_language(run, states=2, steps=300, features="labels", text_encoder="offline", ae_steps=1000,
                                 ae_lr=3e-3, device="cpu", backend="cpu", progress=False, lr=0.01, log=lambda *_: None)
    return data, run, res


STATES = {"red light", "green light", "open box", "closed box", "parked toy car", "moving toy car"}


def test_dynamic_language_stage_and_its_metrics(dynamic_language_run):
    """The language stage over time on the synthetic dynamic scene: 4D LangSplat's time-sensitive
    Acc / vIoU (relative hold rule against the other states of the same object), recorded."""
    data, run, res = dynamic_language_run
    m = res["metrics"]
    ts, ta = m["time_sensitive"], m["time_agnostic"]
    print("time-sensitive", ts["acc"], ts["viou"], "time-agnostic", ta["miou"], ta["loc"], "rgb", m["rgb"]["psnr"])
    assert ts["n_frames"] == 12 and set(ts["queries"]) == STATES
    gt = {q: v["frames_gt"] for q, v in ts["queries"].items()}  # truth from the scene's schedule
    assert all(t < 0.5 for t in gt["red light"]) and all(t >= 0.5 for t in gt["green light"])
    assert all(0.35 <= t < 0.8 for t in gt["open box"]) and all(0.25 <= t < 0.75 for t in gt["moving toy car"])
    # held-out times of seen cameras: measured Acc / vIoU 0.90 / 0.53-0.55 in this test (session 7,
    # one thread: 0.90 / 0.53; per query vIoU box 0.80-0.84, lights 0.62-0.75, and the small car
    # at 48x48, which the RGB stage barely reconstructs, 0.02-0.18); session 8 (extra initial points
    # on the travelling objects, background target on the time-agnostic levels): 0.94 / 0.58,
    # time-agnostic mIoU 0.29; bars about 0.1 below
    assert ts["acc"] >= 0.8 and ts["viou"] >= 0.47, (ts["acc"], ts["viou"])
    assert ta["miou"] >= 0.18, ta["miou"]
    assert ts["hold_rule"]["competitors"]["open box"] == ["closed box"]
    assert m["rgb"]["n_views"] == 12 and m["rgb"]["psnr"] > 19.0  # measured 21.4 dB
    # camera 0, never trained on, reported apart (measured RGB 10.9 dB, Acc / vIoU 0.93 / 0.49)
    un = m["unseen_camera"]
    assert un["rgb"]["n_views"] == 12 and un["rgb"]["psnr"] > 8.0
    assert un["time_sensitive"]["n_frames"] == 12 and un["time_sensitive"]["acc"] >= 0.8
    assert un["time_sensitive"]["viou"] >= 0.39, un["time_sensitive"]["viou"]
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["dynamic"]["time_sensitive"]["acc"] == ts["acc"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["language"]["levels"][-1] == "state" and cfg["model"]["states"]["k"] == 2
    assert cfg["model"]["states"]["time_bins"] == 12
    # the state latents change with time; the time-agnostic ones do not
    from langfield.field import LanguageField

    f = LanguageField.load(run, device="cpu")
    a0, a1 = f.gaussians.activated(0.1).lang, f.gaussians.activated(0.9).lang
    L = cfg["language"]["latent_dim"]
    assert torch.equal(a0[:, :-L], a1[:, :-L]) and not torch.equal(a0[:, -L:], a1[:, -L:])
    # queries.json / labels.json carry the per-query intervals the metrics follow
    q = json.loads((data / "queries.json").read_text())["time_sensitive"]
    assert q["open box"]["intervals"] == [[0.35, 0.8]] and q["closed box"]["intervals"] == [[0.0, 0.35], [0.8, 1.0]]
    lab = {o["name"]: o for o in json.loads((data / "labels.json").read_text())["objects"]}
    assert [s["text"] for s in lab["toy car"]["state_queries"]] == ["parked toy car", "moving toy car"]
    assert lab["traffic light"]["state_queries"][0]["level"] == "whole"


def test_eval_between_frame_times_on_another_capture(dynamic_language_run, tmp_path):
    """`langfield eval RUN --data OTHER --new-times`: the same scene and cameras captured at 23
    times (the run's 12 and the 11 midpoints) is put in the run's world (its poses agree with
    the run's cameras) and only the midpoints are evaluated."""
    from langfield.field import LanguageField, dataset_cameras
    from langfield.run import RunFolder, open_dataset_in_run_world
    from langfield.scenes.make import make_scene

    data, run, _res = dynamic_language_run
    mid = tmp_path / "mid"
    make_scene("dynamic", mid, kind="dynamic", camera="static", views=5, frames=23, size=(48, 48), fov=40.0,
               max_points=3000, holdout="times")
    doc = RunFolder(run).read_config()
    cams = dataset_cameras(open_dataset_in_run_world(doc, mid))
    own = LanguageField.load(run, device="cpu").cameras
    assert len(cams) == 5 * 23 and len(own) == 5 * 12
    for c in own:  # the same camera at the same time in both captures, in one world
        twin = [d for d in cams if abs(d.time - c.time) < 1e-6 and np.abs(d.viewmat - c.viewmat).max() < 1e-5]
        assert twin, (c.name, c.time)
    seen = sorted({c.time for c in own})
    p = subprocess.run([sys.executable, "-m", "langfield.cli", "eval", str(run), "--data", str(mid), "--new-times",
                        "--device", "cpu"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    m = json.loads((run / "metrics.json").read_text())["dynamic_other"]
    assert m["data"] == str(mid) and m["new_times_only"] and summary["acc"] == m["time_sensitive"]["acc"]
    ts = m["time_sensitive"]
    times = {t for q in ("red light", "green light") for t in ts["queries"][q]["frames_gt"]}  # one holds at each
    assert ts["n_frames"] == 11 and len(times) == 11  # one held-out view per midpoint
    assert all(min(abs(t - s) for s in seen) > 1e-3 for t in times)
    assert m["rgb"]["n_views"] == 11 and m["rgb"]["psnr"] > 15.0
    assert 0.0 <= ts["acc"] <= 1.0 and m["unseen_camera"]["time_sensitive"]["n_frames"] == 11
    print("between frame times: Acc / vIoU", ts["acc"], ts["viou"], "PSNR", m["rgb"]["psnr"])
    p = subprocess.run([sys.executable, "-m", "langfield.cli", "eval", str(run), "--data", str(tmp_path / "nope"),
                        "--device", "cpu"], capture_output=True, text=True)
    assert p.returncode != 0 and "--data" in p.stderr and "Traceback" not in p.stderr
    # the run's own capture has no held-out view at a new time: an error, not an empty success
    from langfield.dynamic.language import evaluate_dynamic_run
    from langfield.run import RunError

    with pytest.raises(RunError, match="no held-out view"):
        evaluate_dynamic_run(run, new_times_only=True, device="cpu", log=lambda *_: None, write=False)
    # language metrics alone on another capture (no RGB pass)
    m2 = evaluate_dynamic_run(run, data=mid, new_times_only=True, rgb=False, device="cpu", log=lambda *_: None,
                              write=False)
    assert "rgb" not in m2 and m2["time_sensitive"]["acc"] == ts["acc"]
    # times on the run's axis: a capture whose raw times span twice the run's range maps into [0, 2]
    # of it, which is outside the run: refused; a run config recording a raw range maps raw times
    doc2 = {**doc, "dataset": {**doc["dataset"], "time_raw_range": [0.0, 0.5]}}
    with pytest.raises(RunError, match="outside the run's range"):
        open_dataset_in_run_world(doc2, mid)
    doc3 = {**doc, "dataset": {**doc["dataset"], "time_raw_range": [0.0, 2.0]}}
    half = dataset_cameras(open_dataset_in_run_world(doc3, mid))
    assert max(c.time for c in half) == pytest.approx(0.5) and min(c.time for c in half) == 0.0
    doc4 = {**doc, "dataset": {k: v for k, v in doc["dataset"].items() if k != "transform"}}
    with pytest.raises(RunError, match="dataset.transform"):
        open_dataset_in_run_world(doc4, mid)


def test_state_competitors_and_hold_rule_fallbacks(tmp_path):
    from langfield.dynamic.language import state_competitors, state_groups

    (tmp_path / "labels.json").write_text(json.dumps({"objects": [{"name": "box", "states": ["open box", "closed box"]},
                                                                  {"name": "x", "states": []}]}))
    c = state_competitors(tmp_path, ["open box", "closed box", "lamp on"], None)
    assert c == {"open box": ["closed box"], "closed box": ["open box"], "lamp on": ["open box", "closed box"]}
    c = state_competitors(tmp_path, ["open box"], {"time_sensitive": {"open box": {"competitors": ["shut box"]}}})
    assert c == {"open box": ["shut box"]}
    # the declared states (what `langfield query` treats by the hold rule): a time-sensitive text
    # without competitors takes its labels.json object's, one in neither file is not a state
    g = state_groups(tmp_path, {"time_sensitive": {"closed box": {}, "lamp on": {"competitors": "bad"}}})
    assert g == {"closed box": ["open box"], "lamp on": None, "open box": ["closed box"]}
    (tmp_path / "labels.json").write_text("{not json")
    assert state_groups(tmp_path, None) == {} and state_competitors(tmp_path, ["a", "b"]) == {"a": ["b"], "b": ["a"]}


def test_query_cli_with_time(dynamic_language_run):
    _data, run, _res = dynamic_language_run
    out = run.parent / "q"
    p = subprocess.run([sys.executable, "-m", "langfield.cli", "query", str(run), "green light", "--time", "0.7",
                        "--level", "state", "--out", str(out), "--device", "cpu"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rep = json.loads((out / "query.json").read_text())
    assert rep["time"] == pytest.approx(0.7) and rep["queries"][0]["level"] == "state"
    # states at one time: the relative rule (the light is green from t = 0.5), an empty mask where a state
    # does not hold, whichever level is chosen
    for tt, on in ((0.7, "green light"), (0.2, "red light")):
        p = subprocess.run([sys.executable, "-m", "langfield.cli", "query", str(run), "green light", "red light",
                            "--time", str(tt), "--out", str(out / "states"), "--device", "cpu"],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        qs = {q["text"]: q for q in json.loads((out / "states" / "query.json").read_text())["queries"]}
        for t, q in qs.items():
            assert q["level"] == "state" and q["rule"]["competitors"] == [c for c in qs if c != t]
            assert q["holds"] == (t == on), (tt, t, q["holds"], q["state_score"])
            assert (q["mask_pixels"] > 0) == q["holds"]
    p = subprocess.run([sys.executable, "-m", "langfield.cli", "query", str(run), "green light", "--over-time",
                        "--level", "state", "--out", str(out), "--device", "cpu"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ot = json.loads((out / "query_over_time.json").read_text())
    q = ot["queries"][0]
    assert len(q["curve"]) == 12 and (out / q["plot"]).is_file()
    # a state of the traffic light: the relative rule of `langfield eval` (it beats "red light")
    assert q["rule"]["kind"] == "relative" and q["rule"]["competitors"] == ["red light"]
    assert all(c["holds"] == (c["mask_pixels"] > 0) and (c["score"] > 0.1 or not c["holds"]) for c in q["curve"])
    truth = [c["time"] >= 0.5 for c in q["curve"]]  # green from t = 0.5 in the scene's schedule
    agree = sum(c["holds"] == g for c, g in zip(q["curve"], truth))
    assert agree >= 9, [(round(c["time"], 2), c["holds"], round(c["score"], 3)) for c in q["curve"]]
    assert all((out / c["mask"]).is_file() for c in q["curve"])
    # a text that is no state keeps the absolute hold threshold
    p = subprocess.run([sys.executable, "-m", "langfield.cli", "query", str(run), "box", "--over-time",
                        "--out", str(out / "plain"), "--device", "cpu"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    q = json.loads((out / "plain" / "query_over_time.json").read_text())["queries"][0]
    assert q["rule"] == {"kind": "threshold", "hold_threshold": 0.55}
    assert all(0.0 <= c["score"] <= 1.0 and c["holds"] == (c["score"] >= 0.55) for c in q["curve"])
    p = subprocess.run([sys.executable, "-m", "langfield.cli", "query", str(run), "box", "--time", "1.5",
                        "--device", "cpu"], capture_output=True, text=True)
    assert p.returncode == 2 and "--time 1.5" in p.stderr and "Traceback" not in p.stderr


def test_lattice_query_matches_the_exact_decode(dynamic_language_run):
    """Repeated queries over time read the text's relevancy from a lattice over the latent space
    (one decode per text, independent of t): within 0.05 of the exact per-pixel decode, the same
    chosen score, and the same masks wherever the exact normalised heatmap is not within 0.1 of
    the mask threshold (LangSplat's min-max normalisation makes masks of a low-contrast map
    sensitive there: measured at 64^3, mask IoU 0.94-1.0)."""
    from langfield.dynamic.query import LatticeQuery
    from langfield.field import LanguageField

    _data, run, _res = dynamic_language_run
    f = LanguageField.load(run, device="cpu")
    texts = ["open box", "closed box"]
    lq = LatticeQuery(f, texts, "state")
    assert lq.resolution == 64
    for cam in f.cameras[:12:5]:
        r = f.render_camera(cam)
        assert lq.max_error(r) < 0.05
        for a, b in zip(lq.query(r), f.query(r, texts, level="state")):
            assert abs(float(a.scores[0]) - float(b.scores[b.level_index])) < 0.02
            sure = (b.heatmaps[b.level_index] - b.threshold).abs() > 0.1
            differ = (a.mask != b.mask) & sure
            assert float(differ.sum()) <= 0.01 * max(float(b.mask.sum()), 1.0) + 2, (
                int(differ.sum()), int(a.mask.sum()), int(b.mask.sum()), cam.name)
