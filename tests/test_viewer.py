"""The browser viewer (``langfield view``, package ``langfield.viewer`` in ``viewer/``).

Headless tests of the engine (camera conversion, every mode, queries that cannot be answered,
the render worker's scheduling), the server without a browser (binding, reloading a run that
is still training), and one real-browser test: Chromium (headless, SwiftShader WebGL) driven
by Playwright loads the page, types a query, and the screenshot's heatmap must light the
queried object's pixels and not the others', while a second client stays connected.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _viewer():
    import langfield.viewer as v

    return v


viewer = _viewer()
from langfield.viewer.render import (MAX_QUERY_CHARS, MODES, CameraState, Cancelled, FrameRenderer,  # noqa: E402
                                     RenderWorker, Settings, camera_from_viser, camera_target, fov_of,
                                     frame_size, viser_pose_of)
from langfield.viewer.synthetic import OBJECTS, blob_field  # noqa: E402

GREY = [(0.5, 0.5, 0.5)] * 3  # all objects alike: only a heatmap tells them apart
N_OBJ = 400


@pytest.fixture(scope="module")
def field():
    return blob_field(N_OBJ, colors=GREY)


@pytest.fixture(scope="module")
def renderer(field):
    return FrameRenderer(field)


def cam_state(c, width=None, height=None) -> CameraState:
    wxyz, pos = viser_pose_of(c.viewmat)
    return CameraState(tuple(wxyz), tuple(pos), fov_of(c.K, c.height), width or c.width, height or c.height)


def object_masks(field, viewmat, K, w, h, thresh=0.9):
    """Per object, the pixels it covers (occlusion-aware coverage above ``thresh``)."""
    out = []
    for k in range(len(OBJECTS)):
        sel = torch.zeros(field.num, dtype=torch.bool)
        sel[k * N_OBJ:(k + 1) * N_OBJ] = True
        out.append((field.render_selection(sel, viewmat, K, w, h) > thresh).cpu().numpy())
    return out


def warmth(img: np.ndarray) -> np.ndarray:
    """Red minus blue in [−1, 1]: the turbo colour map runs from blue (0) to red (1)."""
    f = img.astype(np.float32) / 255.0
    return f[..., 0] - f[..., 2]


# ------------------------------------------------------------------------------------------ cameras

def test_camera_round_trip(field):
    for c in field.cameras[:4]:
        vm, K = camera_from_viser(cam_state(c), c.width, c.height)
        np.testing.assert_allclose(vm, c.viewmat, atol=1e-9)
        np.testing.assert_allclose(K, c.K, atol=1e-9)


def test_clicking_a_camera_puts_the_view_on_it(field):
    """What goto_camera sends (fov, position, look_at, up) is the dataset camera's exact pose."""
    for c in field.cameras:
        fov, pos, look_at, up = camera_target(c.viewmat, c.K, c.height, np.zeros(3), 1.0)
        z = (look_at - pos) / np.linalg.norm(look_at - pos)  # viser: +z forward, -y up (OpenCV)
        y = -(up - np.dot(up, z) * z)
        y /= np.linalg.norm(y)
        R = np.stack([np.cross(y, z), y, z], 1)
        c2w = np.linalg.inv(c.viewmat)
        np.testing.assert_allclose(R, c2w[:3, :3], atol=1e-9)
        np.testing.assert_allclose(pos, c2w[:3, 3], atol=1e-9)
        assert fov == pytest.approx(2 * math.atan(c.height / 2 / c.K[1, 1]))


def test_frame_size_keeps_aspect_and_cap():
    cam = CameraState((1, 0, 0, 0), (0, 0, 0), 1.0, 1600, 900)
    assert frame_size(cam, 640) == (640, 360)
    assert frame_size(cam, 4000) == (1600, 900)  # never above the canvas
    assert frame_size(cam, 640, 0.5) == (320, 180)
    assert min(frame_size(CameraState((1, 0, 0, 0), (0, 0, 0), 1.0, 4, 3), 640)) >= 16


# ------------------------------------------------------------------------------------------ frames

@pytest.mark.parametrize("quality", ["rest", "motion"])
def test_every_mode_renders(renderer, field, quality):
    c = field.cameras[0]
    for mode in MODES:
        fr = renderer.render(cam_state(c), Settings(mode=mode, query="red mug", select=True), 96, 72, quality=quality)
        assert fr.image.shape == (72, 96, 3) and fr.image.dtype == np.uint8
        assert fr.mode == mode and fr.message == ""
        assert fr.selected == N_OBJ  # 3D selection: exactly the red mug's Gaussians
        if mode in ("relevancy", "mask"):
            assert fr.path == ("exact" if quality == "rest" else "fast")
    # PCA tells the objects apart: their mean colours differ
    fr = renderer.render(cam_state(c), Settings(mode="pca"), 128, 96)
    masks = object_masks(field, fr.viewmat, fr.K, 128, 96)
    means = [fr.image[m].mean(0) for m in masks]
    assert min(np.abs(means[i] - means[j]).max() for i in range(3) for j in range(i)) > 40


@pytest.mark.parametrize("quality", ["rest", "motion"])
@pytest.mark.parametrize("k", [0, 2])
def test_heatmap_and_mask_find_the_queried_object(renderer, field, quality, k):
    c = field.cameras[0]
    w, h = 160, 120
    name = OBJECTS[k][0]
    heat = renderer.render(cam_state(c), Settings(mode="relevancy", query=name), w, h, quality=quality)
    masks = object_masks(field, heat.viewmat, heat.K, w, h)
    hot = warmth(heat.image)
    assert all(m.sum() > 50 for m in masks)
    on = hot[masks[k]].mean()
    off = max(hot[m].mean() for i, m in enumerate(masks) if i != k)
    assert on > 0.15 and on - off > 0.2, (on, off)
    fr = renderer.render(cam_state(c), Settings(mode="mask", query=name), w, h, quality=quality)
    green = fr.image[..., 1].astype(float) - fr.image[..., 0]
    inside = (green[masks[k]] > 40).mean()
    outside = max((green[m] > 40).mean() for i, m in enumerate(masks) if i != k)
    assert inside > 0.9 and outside < 0.05, (inside, outside)


def test_level_and_threshold(renderer, field):
    c = field.cameras[0]
    fr = renderer.render(cam_state(c), Settings(mode="relevancy", query="green ball", level="whole"), 96, 72)
    assert fr.level == "whole"
    lo = renderer.render(cam_state(c), Settings(mode="mask", query="green ball", threshold=0.05), 96, 72)
    hi = renderer.render(cam_state(c), Settings(mode="mask", query="green ball", threshold=0.95), 96, 72)
    g = lambda im: int(((im[..., 1].astype(int) - im[..., 0]) > 40).sum())  # noqa: E731
    assert g(lo.image) >= g(hi.image)
    s_lo = renderer.selection_mask(field.gaussians, "green ball", None, 0.05).sum()
    s_hi = renderer.selection_mask(field.gaussians, "green ball", None, 0.95).sum()
    assert s_lo >= s_hi and s_hi > 0


def test_empty_long_and_odd_queries(renderer, field):
    c = field.cameras[1]
    for q in ["", "   ", "\n\t"]:
        fr = renderer.render(cam_state(c), Settings(mode="relevancy", query=q), 64, 48)
        assert fr.mode == "rgb" and "type a query" in fr.message
        fr = renderer.render(cam_state(c), Settings(mode="rgb", query=q, select=True), 64, 48)
        assert fr.selected is None and fr.message == ""
    long = "red mug " * 5000
    for quality in ("rest", "motion"):
        fr = renderer.render(cam_state(c), Settings(mode="mask", query=long, select=True), 64, 48, quality=quality)
        assert fr.mode == "mask" and str(MAX_QUERY_CHARS) in fr.message
    for q in ["🙂 ☕ 杯子", "a" * 50, "%s {} \\ ' \"", "\x00"]:
        fr = renderer.render(cam_state(c), Settings(mode="relevancy", query=q), 64, 48)
        assert fr.image.shape == (48, 64, 3)


def test_scene_without_language_gives_a_message(field):
    from langfield.field import LanguageField
    from langfield.scene import Gaussians

    sp = {k: v.detach() for k, v in field.gaussians.splats.items() if k != "lang"}
    plain = LanguageField(Gaussians(**sp, requires_grad=False), cameras=field.cameras)
    r = FrameRenderer(plain)
    c = plain.cameras[0]
    rgb = r.render(cam_state(c), Settings(mode="rgb"), 64, 48)
    assert rgb.message == ""
    for mode in ("pca", "relevancy", "mask"):
        fr = r.render(cam_state(c), Settings(mode=mode, query="red mug", select=True), 64, 48)
        assert fr.mode == "rgb" and "no language field" in fr.message
        np.testing.assert_array_equal(fr.image, rgb.image)
    fr = r.render(cam_state(c), Settings(mode="rgb", query="red mug", select=True), 64, 48)
    assert "no language field" in fr.message and fr.selected is None


def test_plain_ply_opens_for_rgb(field, tmp_path):
    from langfield.field import LanguageField
    from langfield.io import write_ply

    p = tmp_path / "scene.ply"
    write_ply(p, field.gaussians, lang=False)
    f = LanguageField.load(p, device="cpu")
    assert not f.has_language
    r = FrameRenderer(f)
    c = field.cameras[0]
    fr = r.render(cam_state(c), Settings(mode="rgb"), 64, 48)
    ref = FrameRenderer(field).render(cam_state(c), Settings(mode="rgb"), 64, 48)
    assert np.abs(fr.image.astype(int) - ref.image).max() <= 2
    fr = r.render(cam_state(c), Settings(mode="relevancy", query="red mug"), 64, 48)
    assert "no language field" in fr.message


def test_exact_decode_is_abandoned_between_bands(field):
    r = FrameRenderer(field, band_rows=64)  # one band per image row
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(Cancelled):
        r.render(cam_state(field.cameras[0]), Settings(mode="relevancy", query="red mug"), 64, 48,
                 cancelled=cancelled)


# ------------------------------------------------------------------------------------------ the worker

class FakeRender:
    def __init__(self, seconds=0.01, fail_on=None):
        self.seconds, self.fail_on = seconds, fail_on
        self.jobs, self.delivered, self.errors = [], [], []
        self.lock = threading.Lock()

    def render(self, job, cancelled):
        with self.lock:
            self.jobs.append(job)
        if self.fail_on is not None and job.settings.query == self.fail_on:
            raise ValueError("boom")
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            time.sleep(0.002)
            if cancelled():
                raise Cancelled()
        return job

    def deliver(self, job, frame):
        with self.lock:
            self.delivered.append(job)

    def error(self, job, exc):
        self.errors.append(exc)


def cam_at(x: float, w=640, h=480) -> CameraState:
    return CameraState((1.0, 0.0, 0.0, 0.0), (float(x), 0.0, -3.0), 0.8, w, h)


def test_worker_newest_camera_wins_and_rests_at_full_resolution():
    fake = FakeRender(seconds=0.02)
    wk = RenderWorker(fake.render, fake.deliver, rest_delay=0.15)
    try:
        n = 200
        for i in range(n):  # a drag: 200 camera updates in ~0.4 s
            wk.update_camera(cam_at(i * 0.01))
            time.sleep(0.002)
        assert wk.wait_idle(10)
        assert len(fake.jobs) < n / 2  # coalesced: far fewer renders than updates
        motion = [j for j in fake.delivered if j.quality == "motion"]
        assert motion and all(j.width < 640 for j in motion)  # lower resolution while moving
        last = fake.delivered[-1]
        assert last.quality == "rest" and (last.width, last.height) == (640, 480)
        assert last.camera == cam_at((n - 1) * 0.01)  # the newest camera
        assert wk.fps.fps() > 0
    finally:
        wk.stop()
    assert not wk.alive


def test_worker_abandons_stale_renders():
    fake = FakeRender(seconds=0.3)
    wk = RenderWorker(fake.render, fake.deliver, rest_delay=0.0)
    try:
        wk.update_camera(cam_at(0))
        time.sleep(0.1)  # a rest frame is rendering ...
        wk.update_settings(mode="depth")  # ... and is now stale: abandoned
        assert wk.wait_idle(10)
        assert wk.stats["abandoned"] >= 1
        assert [j.settings.mode for j in fake.delivered] == ["depth"]
        # a rest frame whose camera moves is abandoned too
        wk.update_camera(cam_at(1))
        time.sleep(0.1)
        wk.update_camera(cam_at(2))
        assert wk.wait_idle(10)
        assert fake.delivered[-1].camera == cam_at(2)
        assert cam_at(1) not in [j.camera for j in fake.delivered]
    finally:
        wk.stop()


def test_worker_survives_errors():
    fake = FakeRender(seconds=0.0, fail_on="bad")
    wk = RenderWorker(fake.render, fake.deliver, on_error=fake.error, rest_delay=0.0)
    try:
        wk.update_settings(query="bad")
        wk.update_camera(cam_at(0))
        deadline = time.perf_counter() + 5
        while not fake.errors and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert fake.errors and wk.alive
        wk.update_settings(query="good")
        assert wk.wait_idle(5) and fake.delivered[-1].settings.query == "good"
    finally:
        wk.stop()


def test_several_clients_share_one_renderer(renderer, field):
    """Three render threads, one FrameRenderer (shared caches), rapid cameras and mode changes."""
    delivered = {i: [] for i in range(3)}
    errors = []
    workers = []
    for i in range(3):
        def render(job, cancelled):
            return renderer.render(job.camera, job.settings, job.width, job.height, quality=job.quality,
                                   cancelled=cancelled)
        workers.append(RenderWorker(render, lambda job, fr, i=i: delivered[i].append((job, fr)),
                                    on_error=lambda job, e: errors.append(e), rest_delay=0.05))
    try:
        modes = ["relevancy", "mask", "pca", "depth", "rgb"]
        for step in range(30):
            for i, wk in enumerate(workers):
                c = field.cameras[(step + i) % len(field.cameras)]
                wk.update_camera(cam_state(c, 80, 60))
                if step % 10 == 0:
                    wk.update_settings(mode=modes[(step // 10 + i) % len(modes)], query=OBJECTS[i][0],
                                       select=bool(i % 2), max_res=80)
            time.sleep(0.01)
        for wk in workers:
            assert wk.wait_idle(60)
    finally:
        for wk in workers:
            wk.stop()
    assert not errors
    for i, wk in enumerate(workers):
        job, fr = delivered[i][-1]
        assert job.quality == "rest" and fr.image.shape == (60, 80, 3) and fr.mode == job.settings.mode


def test_worker_motion_scale_adapts():
    fake = FakeRender(seconds=0.08)
    wk = RenderWorker(fake.render, fake.deliver, rest_delay=10.0, motion_seconds=0.02, min_motion_scale=0.2)
    try:
        for i in range(5):
            wk.update_camera(cam_at(i))
            time.sleep(0.12)
        assert wk.motion_scale < 0.5  # slow frames -> smaller motion frames
    finally:
        wk.stop()


# ------------------------------------------------------------------------------------------ the server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_viser = pytest.mark.skipif(importlib.util.find_spec("viser") is None, reason="viser is not installed")


def test_app_binds_localhost_by_default():
    import inspect

    assert inspect.signature(viewer.ViewerApp).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(viewer.cli_view).parameters["host"].default == "127.0.0.1"


def test_cli_view_help():
    import tyro

    with pytest.raises(SystemExit) as e:
        tyro.cli(viewer.cli_view, args=["--help"], prog="langfield view")
    assert e.value.code == 0


@needs_viser
def test_cli_view_serves_a_plain_ply(field, tmp_path):
    """``cli_view`` on a 3DGS PLY without language: it prints the address and serves the page."""
    import subprocess
    import urllib.request

    from langfield.io import write_ply

    p = tmp_path / "plain.ply"
    write_ply(p, field.gaussians, lang=False)
    code = ("import sys; sys.path.insert(0, %r); import test_viewer as t; "
            "t.viewer.cli_view(%r, port=0, device='cpu')" % (str(Path(__file__).parent), str(p)))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(ROOT))
    try:
        url, lines = None, []
        deadline = time.perf_counter() + 120
        while url is None and time.perf_counter() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "open http://" in line:
                url = line.split("open ", 1)[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        assert any("RGB only" in ln for ln in lines)
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _write_run(run: Path, g, step: int) -> None:
    from langfield.io.checkpoint import save_checkpoint

    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"format": "langfield-run", "train": {}, "data": None}))
    sp = {k: v.detach() for k, v in g.splats.items() if k != "lang"}
    save_checkpoint(run / "checkpoints", {"splats": sp}, {"rgb_step": step}, step=step)


@needs_viser
def test_app_follows_a_run_that_is_still_training(field, tmp_path, capsys):
    from langfield.scene import Gaussians

    run = tmp_path / "run"
    half = Gaussians(**{k: v.detach()[: field.num // 2] for k, v in field.gaussians.splats.items() if k != "lang"},
                     requires_grad=False)
    _write_run(run, half, 100)
    app = viewer.ViewerApp(run, port=_free_port(), reload_every=0.1, verbose=False)
    try:
        assert app.host == "127.0.0.1"
        assert app.field.num == field.num // 2 and app.field.step == 100
        _write_run(run, field.gaussians, 200)
        deadline = time.perf_counter() + 10
        while app.field.step != 200 and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert app.field.step == 200 and app.field.num == field.num
    finally:
        app.stop()


@needs_viser
def test_app_follows_a_run_that_is_still_mapping(tmp_path):
    """`langfield view RUN` on a `langfield slam` run: each poll (the viewer's timer calls
    reload_state) picks up the newer map and cameras.json; new keyframes get frustums, the
    frustums of keyframes whose pose mapping refined move, the camera list grows."""
    from langfield.scenes.make import make_scene
    from langfield.slam.run import run_slam

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        room = tmp_path / "room"
        make_scene("room", room, kind="rgbd", frames=10, size=(64, 48), workers=1)
        run = tmp_path / "run"
        run_slam(room, run, size=None, max_frames=3, quiet=True)
        app = viewer.ViewerApp(run, port=_free_port(), reload_every=0, verbose=False)
        try:
            cams0 = len(app.field.cameras)
            n0, step0 = app.field.num, app.field.step
            assert cams0 >= 1 and len(app._frustums) == cams0
            assert app.reload_state() == {"map": False, "cameras": False}  # nothing new yet
            run_slam(room, run, resume=True, max_frames=10, quiet=True)
            assert app.reload_state() == {"map": True, "cameras": True}
            cams = json.loads((run / "cameras.json").read_text())["cameras"]
            assert len(app.field.cameras) == len(cams) > cams0
            assert len(app._frustums) == len(cams)
            for h, c in zip(app._frustums, cams):  # every frustum at its keyframe's current pose
                wxyz, pos = viser_pose_of(np.asarray(c["viewmat"]))
                np.testing.assert_allclose(np.asarray(h.position), pos, atol=1e-5)
            assert app.field.step == 10 and app.field.step != step0 and app.field.num != n0
            assert app.reload_state() == {"map": False, "cameras": False}
        finally:
            app.stop()
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ a real browser

CHROMIUM = os.environ.get("LANGFIELD_CHROMIUM", "/usr/bin/chromium")


def _browser_missing() -> str:
    if importlib.util.find_spec("viser") is None:
        return "viser is not installed (a dependency of langfield: pip install -e .)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright==1.65.2; .ci/run installs it)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which("chromium"):
        return f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    return ""


QUERY_XPATH = "xpath=//*[normalize-space(text())='Query']/ancestor::div[.//input][1]//input"
GOTO_XPATH = ("xpath=//*[normalize-space(text())='Go to camera']/ancestor::div[.//input][1]"
              "//input[not(@type='hidden')]")


def _overlay_boxes(page):
    """Boxes of the GUI panel and any notification drawn over the canvas."""
    boxes = []
    for sel in (".mantine-Paper-root", ".mantine-Notification-root", ".mantine-Notifications-root > *"):
        for el in page.locator(sel).all():
            try:
                b = el.bounding_box()
            except Exception:  # noqa: BLE001 - gone meanwhile
                b = None
            if b and b["width"] > 0 and b["height"] > 0:
                boxes.append(b)
    return boxes


def _heat_in_screenshot(png: bytes, field, frame, boxes, view_w, view_h):
    """Mean warmth of each object's visible pixels in a page screenshot (canvas = viewport)."""
    import io

    from PIL import Image

    shot = Image.open(io.BytesIO(png)).convert("RGB").resize((frame.width, frame.height), Image.BILINEAR)
    img = np.asarray(shot)
    free = np.ones((frame.height, frame.width), dtype=bool)
    sx, sy = frame.width / view_w, frame.height / view_h
    for b in boxes:
        x0, y0 = int(b["x"] * sx) - 2, int(b["y"] * sy) - 2
        x1, y1 = int(math.ceil((b["x"] + b["width"]) * sx)) + 2, int(math.ceil((b["y"] + b["height"]) * sy)) + 2
        free[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = False
    masks = [m & free for m in object_masks(field, frame.viewmat, frame.K, frame.width, frame.height)]
    hot = warmth(img)
    return [float(hot[m].mean()) if m.sum() else float("nan") for m in masks], [int(m.sum()) for m in masks]


@pytest.mark.slow
def test_browser_heatmap_lights_the_queried_object(field):
    missing = _browser_missing()
    if missing:
        if os.environ.get("LANGFIELD_REQUIRE_BROWSER") == "1":  # CI (.ci/run) installs them
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    t_start = time.perf_counter()
    view_w, view_h = 1280, 600  # wide: the GUI panel (right) leaves the three objects in view
    app = viewer.ViewerApp(field, port=_free_port(), verbose=False, max_res=640)
    try:
        with sync_playwright() as p:
            exe = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
            browser = p.chromium.launch(executable_path=exe, headless=True,
                                        args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                                              "--ignore-gpu-blocklist", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": view_w, "height": view_h})
                page.goto(app.url)
                first = app.wait_for_clients(1, 60)[0]
                other_page = browser.new_context().new_page()  # a second client, connected throughout
                other_page.set_viewport_size({"width": 400, "height": 300})
                other_page.goto(app.url)
                sessions = app.wait_for_clients(2, 60)
                second = next(s for s in sessions if s is not first)
                assert first.worker.wait_idle(30) and second.worker.wait_idle(30)
                assert first.last_frame.mode == "rgb"
                # the second client moves around while the first one queries
                stop = threading.Event()

                def wander():
                    i = 0
                    while not stop.is_set():
                        app.goto_camera(second.client, i % len(field.cameras))
                        i += 1
                        stop.wait(0.15)

                mover = threading.Thread(target=wander, daemon=True)
                mover.start()
                results = {}
                for k in (0, 2):
                    name = OBJECTS[k][0]
                    box = page.locator(QUERY_XPATH)
                    box.fill(name)
                    box.press("Enter")
                    deadline = time.perf_counter() + 30
                    while time.perf_counter() < deadline:  # the frame for this query, at rest
                        fr, job = first.last_frame, first.last_job
                        if (job is not None and job.settings.query == name and job.quality == "rest"
                                and first.worker.wait_idle(0.05)):
                            break
                        time.sleep(0.05)
                    fr = first.last_frame
                    assert fr.mode == "relevancy" and fr.quality == "rest" and fr.message == ""
                    heat = counts = None
                    for _ in range(10):  # until the browser shows it
                        time.sleep(0.4)
                        heat, counts = _heat_in_screenshot(page.screenshot(), field, fr, _overlay_boxes(page),
                                                           view_w, view_h)
                        others = [h for i, h in enumerate(heat) if i != k]
                        if heat[k] > 0.15 and heat[k] - max(others) > 0.2:
                            break
                    results[name] = (heat, counts)
                    others = [h for i, h in enumerate(heat) if i != k]
                    assert min(counts) > 100, f"objects hidden by the GUI: {counts}"
                    assert heat[k] > 0.15 and heat[k] - max(others) > 0.2, (
                        f"query {name!r}: warmth per object {heat} (pixels {counts})")
                stop.set()
                mover.join(5)
                # a new checkpoint (a run still training): every client renders again
                n1, n2 = first.frames, second.frames
                app.notify_reload()
                assert first.worker.wait_idle(30) and second.worker.wait_idle(30)
                assert first.frames > n1 and second.frames > n2
                # rapid camera motion from the browser itself: drag across the canvas
                n0 = dict(first.worker.stats)
                page.mouse.move(200, 450)
                page.mouse.down()
                for i in range(25):
                    page.mouse.move(200 + 12 * i, 450 - 3 * i)
                page.mouse.up()
                assert first.worker.wait_idle(30)
                assert first.worker.stats["delivered"] > n0["delivered"] + 1
                assert first.worker.stats["motion"] > n0["motion"]  # lower resolution while it moved
                assert first.last_job.quality == "rest" and first.last_frame.width == 640
                assert first.last_frame.mode == "relevancy" and first.last_frame.message == ""
                # the dataset's cameras: pick one in the "Go to camera" menu, the view jumps onto it
                target = 2
                page.locator(GOTO_XPATH).click()
                page.get_by_role("option", name=app.camera_label(target)).click()
                want = np.linalg.inv(field.cameras[target].viewmat)[:3, 3]
                deadline = time.perf_counter() + 20
                while time.perf_counter() < deadline:
                    job = first.last_job
                    if job.quality == "rest" and np.allclose(job.camera.position, want, atol=1e-3):
                        break
                    time.sleep(0.05)
                np.testing.assert_allclose(first.last_job.camera.position, want, atol=1e-3)
                # the second client: still connected, still rendering, its own controls untouched
                assert second.client.client_id in app.sessions and second.worker.alive and not second.closed
                assert second.frames >= 2 and second.worker.settings.mode == "rgb"
                assert second.worker.stats["errors"] == 0 and first.worker.stats["errors"] == 0
                print(f"browser test: {results} in {time.perf_counter() - t_start:.1f} s")
            finally:
                browser.close()
    finally:
        app.stop()


# ------------------------------------------------------------------------------------------ codebook fields

@pytest.fixture(scope="module")
def cb_field():
    return blob_field(N_OBJ, colors=GREY, decoder="codebook")


@pytest.mark.parametrize("quality", ["rest", "motion"])
def test_codebook_field_frames_come_from_render_query(cb_field, quality):
    """A codebook field's relevancy and mask frames are ``field.render_query`` (one sparse pass):
    the image equals the overlay of ``field.query(field.render(...))``'s heatmap / mask, pixel for
    pixel, and the heatmap lights the queried object; the 3D selection is highlighted on top."""
    from langfield.query import heatmap_overlay

    renderer = FrameRenderer(cb_field, exact_budget=0 if quality == "motion" else None)
    c = cb_field.cameras[0]
    w, h = 160, 120
    for k in (0, 2):
        name = OBJECTS[k][0]
        for mode in ("relevancy", "mask"):
            fr = renderer.render(cam_state(c), Settings(mode=mode, query=name), w, h, quality=quality)
            assert fr.path == "fused" and fr.mode == mode and fr.message == ""
            r = cb_field.render(fr.viewmat, fr.K, w, h, background=renderer.background)
            q = cb_field.query(r, name)
            assert fr.level == q.level
            if mode == "relevancy":
                want = heatmap_overlay(r.rgb, q.heatmap, alpha=0.6)
            else:
                m = q.mask[..., None]
                want = torch.where(m, 0.45 * r.rgb + 0.55 * torch.tensor([0.1, 1.0, 0.3]), 0.3 * r.rgb)
            want = (want.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()
            assert int(np.abs(fr.image.astype(int) - want.astype(int)).max()) <= 1
        heat = renderer.render(cam_state(c), Settings(mode="relevancy", query=name), w, h, quality=quality)
        masks = object_masks(cb_field, heat.viewmat, heat.K, w, h)
        hot = warmth(heat.image)
        on, off = hot[masks[k]].mean(), max(hot[m].mean() for i, m in enumerate(masks) if i != k)
        assert on > 0.15 and on - off > 0.2, (on, off)
    # a fixed level, the threshold and the 3D selection
    fr = renderer.render(cam_state(c), Settings(mode="mask", query="green ball", level="whole", select=True), w, h,
                         quality=quality)
    assert fr.level == "whole" and fr.selected == N_OBJ and fr.path == "fused"
    r = cb_field.render(fr.viewmat, fr.K, w, h, background=renderer.background)
    q = cb_field.query(r, "green ball", level="whole")
    sel = cb_field.select("green ball")
    assert int(sel.mask.sum()) == N_OBJ
    m = q.mask[..., None]
    want = torch.where(m, 0.45 * r.rgb + 0.55 * torch.tensor([0.1, 1.0, 0.3]), 0.3 * r.rgb)
    cov = cb_field.render_selection(sel.mask, fr.viewmat, fr.K, w, h).clamp(0, 1)[..., None] * 0.7
    want = want * (1 - cov) + cov * torch.tensor([1.0, 0.15, 0.85])
    want = (want.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()
    assert int(np.abs(fr.image.astype(int) - want.astype(int)).max()) <= 1
    assert fr.image[masks[1]][:, 0].mean() > 100  # the selected (green ball) Gaussians are highlighted in magenta
