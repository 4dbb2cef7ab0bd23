"""The foundation: one render path, one run folder (lock, checkpoint rule, corrupt checkpoints,
metrics), layers that read downward (no import cycles), the codec interface, frames as a
stream, and the defects found while reading the old code."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tiny_gaussians(n=400, lang_dim=6, deg=1, seed=0):
    from langfield.scene import Gaussians

    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    gs = Gaussians.from_points(pts, torch.rand(n, 3, generator=g), sh_degree=deg, lang_dim=lang_dim)
    with torch.no_grad():
        gs.splats["shN"].normal_(0, 0.1, generator=g)
        gs.splats["scales"].add_(torch.randn(n, 3, generator=g) * 0.5)  # anisotropic: rotations matter
        gs.splats["quats"].add_(torch.randn(n, 4, generator=g) * 0.3)
        if lang_dim:
            gs.splats["lang"].normal_(0, 1, generator=g)
    return gs


def _cams(C=2, size=48):
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
    return Cameras(torch.stack(vms), K.expand(C, 3, 3).clone(), size, size)


# ------------------------------------------------------------------------------------------ render path

def test_render_path_equals_rasterization_in_one_pass():
    from langfield.render import rasterization, render

    g, cams = _tiny_gaussians(), _cams()
    extra = torch.rand(g.num, 2)
    out = render(g, cams, language=True, extra=extra, depth=True, background=[0.2, 0.3, 0.4])
    sp = g.splats
    r, a, _ = rasterization(sp["means"], sp["quats"], torch.exp(sp["scales"]), torch.sigmoid(sp["opacities"]),
                            torch.cat([sp["sh0"], sp["shN"]], 1), cams.viewmats, cams.Ks, 48, 48, sh_degree=1,
                            backgrounds=torch.tensor([[0.2, 0.3, 0.4]]).expand(2, 3),
                            features=torch.cat([sp["lang"], extra], 1), render_mode="RGB+ED")
    assert out.rgb.shape == (2, 48, 48, 3) and out.lang.shape == (2, 48, 48, 6) and out.extra.shape == (2, 48, 48, 2)
    assert torch.equal(out.rgb, r[..., :3]) and torch.equal(out.lang, r[..., 3:9])
    assert torch.equal(out.extra, r[..., 9:11]) and torch.equal(out.alpha, a[..., 0])
    d = r[..., -1]
    assert torch.equal(out.depth, torch.where(a[..., 0] > 1e-4, d, torch.zeros_like(d)))
    # features only (the frozen language stage): the same latents as in the colour pass
    only = render(g, cams, colors=False, language=True)
    assert only.rgb is None and torch.allclose(only.lang, out.lang, atol=1e-6)
    # SH degree capped by the model's; the fast path gives the same pixels on the CPU
    assert torch.equal(render(g, cams, sh_degree=3, validate=False).rgb, render(g, cams, sh_degree=1).rgb)


def test_render_path_gradients_reach_parameters_and_camera_pose():
    from langfield.render import Cameras, render

    g, cams = _tiny_gaussians(), _cams(C=1)
    vm = cams.viewmats.clone().requires_grad_(True)
    out = render(g, Cameras(vm, cams.Ks, 48, 48), language=True, depth=True)
    (out.rgb.sum() + out.lang.square().sum() + out.depth.sum()).backward()
    for k in ("means", "quats", "scales", "opacities", "sh0", "lang"):
        assert g.splats[k].grad is not None and g.splats[k].grad.abs().sum() > 0, k
    assert vm.grad is not None and vm.grad.abs().sum() > 0


class _Shifted:
    """A toy time-dependent scene model: the Gaussians moved by (t, 0, 0)."""

    def __init__(self, g):
        self.g = g

    def activated(self, t=None):
        a = self.g.activated()
        a.means = a.means + torch.tensor([float(t or 0.0), 0.0, 0.0])
        return a


def test_render_path_time_reaches_the_model_and_static_models_ignore_it():
    from langfield.render import Cameras, render

    g, cams = _tiny_gaussians(), _cams(C=2)
    static = render(g, cams).rgb
    assert torch.equal(render(g, cams, t=0.7).rgb, static)  # static Gaussians look the same at any time
    m = _Shifted(g)
    assert torch.equal(render(m, cams, t=0.0).rgb, static)
    moved = render(m, cams, t=0.2).rgb
    assert (moved - static).abs().max() > 0.05
    # cameras at two times: each rendered at its own time
    timed = Cameras(cams.viewmats, cams.Ks, 48, 48, times=torch.tensor([0.0, 0.2]))
    both = render(m, timed).rgb
    assert torch.equal(both[0], static[0]) and torch.equal(both[1], moved[1])


# ------------------------------------------------------------------------------------------ a tiny run

@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """A tabletop scene (8 views at 40x40), 60 RGB steps, 40 joint language steps."""
    from langfield.scenes.cli import scenes_make
    from langfield.train.language import train_language
    from langfield.train.rgb import train_rgb

    root = tmp_path_factory.mktemp("foundation")
    data = root / "data"
    assert scenes_make("tabletop", out=data, views=8, size="40x40") in (0, None)
    run = root / "run"
    train_rgb(data, run, steps=60, device="cpu", progress=False, ckpt_every=30, save_renders=False)
    train_language(run, features="labels", steps=40, ae_steps=60, joint=True, device="cpu", progress=False,
                   text_encoder="offline", ckpt_every=20, evaluate=False, log=lambda m: None)
    return data, run


def test_joint_run_eval_psnr_is_the_exported_ply_psnr(joint_run, tmp_path):
    """render/eval/export/query/view agree on the checkpoint a run means (the language one)."""
    from langfield.cli import main
    from langfield.eval.views import eval_background, evaluate_views
    from langfield.io.ply import read_ply
    from langfield.run import load_run, scene_checkpoint

    data, run = joint_run
    stage, path, ck = scene_checkpoint(run)
    assert stage == "language" and ck.step == 40
    assert main(["eval", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    ply = tmp_path / "scene.ply"
    assert main(["export", str(run), "--ply", str(ply), "--normalized", "--no-language"]) == 0
    doc, g_run, ds, _ = load_run(run, device="cpu")
    g = read_ply(ply)
    # joint training moved the Gaussians away from the RGB checkpoint's
    from langfield.io.checkpoint import load_checkpoint
    from langfield.run import RunFolder

    rgb = load_checkpoint(RunFolder(run).latest_checkpoint()).tensors["splats"]["means"]
    assert not torch.equal(rgb, g_run.means)
    assert torch.allclose(g.means, g_run.means, atol=1e-6)
    bg = eval_background(doc["dataset"]["background"])
    from langfield.train.config import trained_sh_degree

    deg = trained_sh_degree(doc["train"], 60, g.sh_degree)
    res = evaluate_views(g, ds, ds.indices("test"), background=bg, sh_degree=deg)
    assert abs(res["psnr"] - m["psnr"]) < 1e-4, (res["psnr"], m["psnr"])


def test_language_resume_keeps_unset_options(joint_run):
    """#12.4: a resume with only --features given keeps every stored option."""
    from langfield.cli import main

    data, run = joint_run
    before = json.loads((run / "config.json").read_text())["language"]["config"]
    assert before["ae_steps"] == 60 and before["steps"] == 40
    rc = main(["train", str(data), "--out", str(run), "--features", "labels", "--resume", "--quiet"])
    assert rc == 0
    after = json.loads((run / "config.json").read_text())["language"]["config"]
    assert after == before
    # an option that differs is refused with a message naming it
    with pytest.raises(SystemExit) as e:
        main(["train", str(data), "--out", str(run), "--features", "labels", "--ae-steps", "99", "--quiet"])
    assert "ae_steps" in str(e.value)


def test_language_options_are_checked_before_any_work(tmp_path, joint_run):
    """#12.11: --latent-dim 0 fails at once, not after the whole RGB stage."""
    from langfield.cli import main

    data, _ = joint_run
    out = tmp_path / "r"
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(["train", str(data), "--out", str(out), "--features", "labels", "--latent-dim", "0", "--steps", "5000"])
    assert "latent-dim" in str(e.value) and time.perf_counter() - t0 < 20
    assert not out.exists()


# ------------------------------------------------------------------------------------------ lock

def _hold_lock(run: Path) -> subprocess.Popen:
    code = ("import sys, time; from langfield.run import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_is_refused_naming_the_pid_and_a_killed_holder_is_taken_over(joint_run, tmp_path):
    from langfield.run import RunError, RunLock
    from langfield.train.rgb import train_rgb

    data, _ = joint_run
    run = tmp_path / "run"
    p = _hold_lock(run)
    try:
        with pytest.raises(RunError) as e:
            train_rgb(data, run, steps=5, device="cpu", progress=False)
        assert str(p.pid) in str(e.value)
        assert not (run / "config.json").exists()  # the second writer wrote nothing
        # readers never take the lock
        assert RunLock(run).holder() == p.pid
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # kill -9 left the lock file behind: the next writer takes it over
    assert (run / ".lock").exists()
    res = train_rgb(data, run, steps=5, device="cpu", progress=False, save_renders=False)
    assert res["step"] == 5


# ------------------------------------------------------------------------------------------ checkpoints

def test_corrupt_newest_checkpoint_falls_back_with_a_warning(joint_run, tmp_path):
    import shutil

    from langfield.run import RunFolder, scene_checkpoint
    from langfield.train.rgb import train_rgb

    data, src = joint_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / ".lock").unlink(missing_ok=True)
    lang = RunFolder(run).store("language")
    newest = lang.path(lang.steps()[-1])
    newest.with_suffix(".safetensors").write_bytes(b"\x00garbage")  # truncated tensors
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stage, path, ck = scene_checkpoint(run)  # a reader: falls back, moves nothing
    assert stage == "language" and ck.step == 20 and any(str(newest.name) in str(x.message) for x in w)
    assert newest.exists()
    # eval, query and view open the run through the same rule
    from langfield.field import LanguageField

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = LanguageField.load(run, device="cpu", need_cameras=False)
    assert f.step == 20 and f.has_language
    # a writer (RGB resume) quarantines a corrupt RGB checkpoint and continues from the older one
    rgb = RunFolder(run).store("rgb")
    bad = rgb.path(rgb.steps()[-1])
    bad.write_text("{not json")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = train_rgb(data, run, resume=True, steps=60, progress=False, save_renders=False)
    assert res["step"] == 60
    assert (rgb.folder / "corrupt" / bad.name).exists()
    assert any("unreadable checkpoint" in str(x.message) for x in w)


def test_metrics_updates_keep_each_others_keys(tmp_path):
    from langfield.run import update_metrics

    update_metrics(tmp_path, {"psnr": 30.0, "views": []}, replace_top=True)
    update_metrics(tmp_path, {"miou": 0.8}, key="language")
    update_metrics(tmp_path, {"psnr": 31.0, "views": [1]}, replace_top=True)  # an RGB eval again
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["psnr"] == 31.0 and doc["language"] == {"miou": 0.8}


# ------------------------------------------------------------------------------------------ layers

def _modules():
    out = []
    for base, pkg in ((ROOT / "langfield", "langfield"), (ROOT / "scenes", "langfield.scenes"),
                      (ROOT / "viewer", "langfield.viewer")):
        for p in sorted(base.rglob("*.py")):
            rel = p.relative_to(base).with_suffix("")
            parts = [x for x in rel.parts if x != "__init__"]
            out.append((".".join([pkg, *parts]), p))
    return out


def _top_level_imports(path: Path, modname: str, is_pkg: bool):
    """langfield modules imported at module level (not inside functions)."""
    tree = ast.parse(path.read_text("utf-8"))
    pkg = modname if is_pkg else modname.rpartition(".")[0]
    found = set()
    for node in tree.body:
        nodes = [node]
        if isinstance(node, (ast.If, ast.Try)):
            nodes = list(ast.walk(node))
        for n in nodes:
            if isinstance(n, ast.Import):
                found.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    parts = pkg.split(".")
                    up = parts[: len(parts) - (n.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                for a in n.names:
                    found.add(f"{base}.{a.name}")
    return {f for f in found if f.startswith("langfield")}


def test_no_import_cycles_at_module_level():
    mods = _modules()
    names = {m for m, _ in mods}
    graph = {}
    for m, p in mods:
        deps = {d for d in _top_level_imports(p, m, p.name == "__init__.py") if d in names and d != m}
        graph[m] = deps
    # a package's __init__ re-exporting its own submodules is not a cycle of layers
    state, cycle = {}, []

    def visit(n, stack):
        state[n] = 1
        for d in graph.get(n, ()):
            if d.startswith(n + "."):
                continue
            if state.get(d) == 1 and not n.startswith(d + "."):
                cycle.append(stack[stack.index(d):] + [d] if d in stack else [n, d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert not cycle, cycle


def test_every_module_imports_on_its_own():
    names = [m for m, _ in _modules()]
    code = ("import importlib, sys\nbad = []\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad.append(f'{m}: {type(e).__name__}: {e}')\nprint('\\n'.join(bad))\n"
            "sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_module_imports_private_names_of_another():
    bad = []
    for m, p in _modules():
        tree = ast.parse(p.read_text("utf-8"))
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("langfield") or (
                    isinstance(n, ast.ImportFrom) and n.level):
                for a in n.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{m}: from {n.module} import {a.name}")
    assert not bad, bad


def test_io_does_not_know_training():
    for m, p in _modules():
        if m.startswith("langfield.io"):
            src = p.read_text("utf-8")
            assert "langfield.train" not in src and "from ..train" not in src, m


def test_one_copy_of_the_sh_constant_and_device_rule():
    hits = []
    for m, p in _modules():
        src = p.read_text("utf-8")
        if "0.28209479177387814" in src and m != "langfield.maths":
            hits.append(m)
        if "torch.cuda.is_available() else \"cpu\"" in src and m not in ("langfield.run", "langfield.features.base"):
            hits.append(m + " (device rule)")
    assert not hits, hits


# ------------------------------------------------------------------------------------------ codec

def test_the_autoencoder_is_a_language_codec_and_old_imports_work(tmp_path):
    from langfield.autoencoder import SceneAutoencoder as Old
    from langfield.codec import LanguageCodec, codec_file, load_codec
    from langfield.codec.autoencoder import SceneAutoencoder

    assert Old is SceneAutoencoder
    ae = SceneAutoencoder(in_dim=16, encoder_dims=(8,), latent_dim=3, decoder_dims=(8,))
    assert isinstance(ae, LanguageCodec) and ae.kind == "autoencoder" and ae.target_dim == 3
    x = torch.randn(5, 16)
    assert torch.allclose(ae.targets(x), ae.encode(x))
    path = tmp_path / codec_file("autoencoder")
    ae.save(path)
    back = load_codec(path, "autoencoder")
    z = torch.randn(7, 3)
    e = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    assert torch.allclose(back.decode_scores(z, e), ae.decode_scores(z, e), atol=1e-6)
    pred, tgt = torch.randn(4, 4, 3), torch.randn(4, 4, 3)
    valid = torch.zeros(4, 4, dtype=torch.bool)
    valid[:2] = True
    want = (pred - tgt).abs().sum(-1)[valid].sum() / (8 * 3)
    assert torch.allclose(ae.loss(pred, tgt, valid), want)


def test_the_run_records_its_codec(joint_run):
    data, run = joint_run
    lang = json.loads((run / "config.json").read_text())["language"]
    assert lang["codec"] == {"kind": "autoencoder", "file": "autoencoder.safetensors"}


# ------------------------------------------------------------------------------------------ stream

def test_sampler_stream_can_grow_and_fixed_lists_keep_their_order():
    from langfield.train.sampler import EpochSampler, exp_decay

    a, b = EpochSampler(range(5), seed=3), EpochSampler(range(5), seed=3)
    assert [a.next_index() for _ in range(12)] == [b.next_index() for _ in range(12)]
    s = EpochSampler([0, 1], seed=0)
    seen = [s.next_index() for _ in range(2)]
    s.add_views([2, 3])
    seen += [s.next_index() for _ in range(4)]
    assert sorted(seen[:2]) == [0, 1] and sorted(seen[2:]) == [0, 1, 2, 3]
    assert exp_decay(1.0, 0.01, 100, total=100) == pytest.approx(0.01)
    assert exp_decay(1.0, 0.01, 50, half_life=50) == pytest.approx(0.5)
    assert exp_decay(1.0, 0.01, 10_000, half_life=50) == pytest.approx(0.01)


def test_cameras_carry_time():
    from langfield.data.base import Frame
    from langfield.render import Cameras

    f = Frame(image_path="x.png", camtoworld=np.eye(4), K=np.array([[10, 0, 8], [0, 10, 8], [0, 0, 1.0]]), width=16,
              height=16, time=0.25)
    c = Cameras.from_frame(f)
    assert c.times is not None and float(c.times[0]) == 0.25


# ------------------------------------------------------------------------------------------ defects

def test_joint_training_composites_rgba_targets_on_the_render_background(monkeypatch):
    """The dataset composites RGBA on white; the joint stage renders on black: target = rgb * alpha."""
    from langfield.eval.views import composite_on

    rgb = torch.rand(4, 4, 3)
    alpha = torch.full((4, 4, 1), 0.5)
    on_white = rgb * alpha + (1 - alpha)
    target = composite_on(on_white, alpha, torch.zeros(3))
    assert torch.allclose(target, rgb * alpha, atol=1e-6)
    assert not torch.allclose(on_white * alpha, rgb * alpha, atol=1e-3)  # the old target


def test_training_without_gsplat_fails_before_any_work(tmp_path, monkeypatch, joint_run):
    from langfield.run import RunError
    from langfield.train.rgb import train_rgb

    data, _ = joint_run
    monkeypatch.setitem(sys.modules, "gsplat.strategy", None)
    with pytest.raises(RunError) as e:
        train_rgb(data, tmp_path / "r", steps=5, device="cpu", progress=False)
    assert "gsplat" in str(e.value) and "--no-densify" in str(e.value)
    assert not (tmp_path / "r").exists()
    res = train_rgb(data, tmp_path / "r2", steps=5, device="cpu", progress=False, densify=False,
                    save_renders=False)
    assert res["step"] == 5


def test_progress_prints_plain_lines_to_a_log(capsys):
    import io

    from langfield.train.progress import Progress

    buf = io.StringIO()
    p = Progress(20, desc="train", stream=buf, every_s=0.0)
    assert p.mode == "log"
    for i in range(20):
        p.update(1, loss=0.1, psnr=25.0, gaussians=1000)
    p.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 20 and "step 20/20" in lines[-1] and "psnr 25.00" in lines[-1] and "left" in lines[-1]


def test_training_logs_progress_when_stderr_is_a_file(joint_run, tmp_path):
    data, _ = joint_run
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        r = subprocess.run([sys.executable, "-m", "langfield.cli", "train", str(data), "--out", str(tmp_path / "r"),
                            "--steps", "12", "--device", "cpu", "--no-renders"], stdout=fh, stderr=subprocess.STDOUT,
                           timeout=300)
    assert r.returncode == 0
    text = log.read_text()
    assert "[train] step 12/12" in text and "psnr" in text and "gaussians" in text


def test_viewer_background_matches_eval_and_frustums_are_sized_from_spacing():
    from langfield.viewer.app import frustum_scale
    from langfield.viewer.render import FrameRenderer

    class F:
        device = torch.device("cpu")
        info = {"background": "random"}

    assert FrameRenderer(F()).background == (1.0, 1.0, 1.0)
    F.info = {"background": "black"}
    assert FrameRenderer(F()).background == (0.0, 0.0, 0.0)
    ang = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    pos = np.stack([3 * np.cos(ang), 3 * np.sin(ang), np.ones_like(ang)], 1)
    spacing = 2 * 3 * np.sin(np.pi / 64)
    s = frustum_scale(pos, radius=1.0)
    assert s <= 0.05 and s <= 0.5 * spacing + 1e-9
