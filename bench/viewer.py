"""Frames per second the viewer delivers to a client, at rest and while the camera moves.

    python bench/viewer.py [--quick] [--seconds 5] [--modes rgb,depth,pca,relevancy,mask]
                           [--device auto] [--out bench/results/viewer.json]

Scene: 100k Gaussians (three labelled blobs of 30k and 10k scattered ones), language latents of
three levels decoded by a scene autoencoder of LangSplat's shape (512-d features; random weights:
the relevancy means nothing, the cost is the real one). Canvas 640x480, frames at most 640 px.

What runs is the viewer's own per-client path (``RenderWorker`` + ``FrameRenderer``) and the JPEG
encoding viser does before sending (``set_background_image``); only the websocket write is left
out. Per mode:

* ``frame_ms``: one full-resolution frame, rendered alone (best of N);
* ``rest_fps``: full-resolution frames per second when each one is asked for as soon as the last
  one was delivered (what a client at rest gets on every change);
* ``motion_fps``: frames delivered per second while the camera orbits with 60 updates per second
  (``--seconds``), with their mean size and how many renders were abandoned;
* ``settle_ms``: from the last camera update of the orbit to the full-resolution frame.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _util import machine, print_table, write_json  # noqa: E402


def _viewer():
    import langfield.viewer as v

    return v


def _encoder():
    try:
        from viser._scene_api import _encode_image_binary

        return lambda img, q: _encode_image_binary(img, "jpeg", jpeg_quality=q)[1]
    except Exception:  # noqa: BLE001 - viser missing or changed: PIL does the same work
        import io

        from PIL import Image

        def enc(img, q):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=q)
            return buf.getvalue()
        return enc


def orbit_camera(angle: float, width: int, height: int, CameraState, fov: float):
    from langfield.viewer.render import rotmat_to_wxyz

    pos = np.array([3.0 * math.sin(angle), -0.6, -3.0 * math.cos(angle)])
    z = -pos / np.linalg.norm(pos)
    x = np.cross(z, np.array([0.0, -1.0, 0.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z], 1)
    return CameraState(tuple(rotmat_to_wxyz(R)), tuple(pos), fov, width, height)


def run_mode(field, mode: str, seconds: float, rest_n: int, W: int, H: int, fov: float):
    from langfield.viewer.render import CameraState, FrameRenderer, RenderWorker, Settings

    enc = _encoder()
    renderer = FrameRenderer(field)
    settings = Settings(mode=mode, query="red mug", max_res=max(W, H))
    cam0 = orbit_camera(0.0, W, H, CameraState, fov)
    # one frame alone (the first call also fills the per-query caches)
    renderer.render(cam0, settings, W, H)
    frame_ms = []

    def alone():  # in a thread of its own, as the viewer renders (torch threads differ from the main thread's)
        for _ in range(rest_n):
            t0 = time.perf_counter()
            fr = renderer.render(cam0, settings, W, H)
            enc(fr.image, settings.jpeg_quality)
            frame_ms.append((time.perf_counter() - t0) * 1e3)

    th = threading.Thread(target=alone)
    th.start()
    th.join()
    renderer.render(cam0, settings, W // 2, H // 2, quality="motion")  # warm the fast path

    sent = []
    lock = threading.Lock()

    def deliver(job, frame):
        data = enc(frame.image, settings.jpeg_quality if job.quality == "rest" else 70)
        with lock:
            sent.append((time.perf_counter(), job.quality, frame.width, frame.height, len(data)))

    wk = RenderWorker(lambda job, cancelled: renderer.render(job.camera, job.settings, job.width, job.height,
                                                             quality=job.quality, cancelled=cancelled),
                      deliver, rest_delay=0.2)
    try:
        wk.update_settings(settings)
        wk.update_camera(cam0)
        assert wk.wait_idle(120), "no first frame"
        # at rest: every frame asked for once the previous one is delivered
        t0 = time.perf_counter()
        for _ in range(rest_n):
            wk.invalidate()
            assert wk.wait_idle(120)
        rest_fps = rest_n / (time.perf_counter() - t0)
        # moving: 60 camera updates a second along an orbit
        with lock:
            sent.clear()
        ab0 = wk.stats["abandoned"]
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            i += 1
            wk.update_camera(orbit_camera(i * math.radians(0.6), W, H, CameraState, fov))
            time.sleep(max(0.0, t0 + i / 60.0 - time.perf_counter()))
        t_end = time.perf_counter()
        with lock:
            moving = [s for s in sent if s[0] <= t_end + 0.05 and s[1] == "motion"]
        motion_fps = len(moving) / (t_end - t0)
        abandoned = wk.stats["abandoned"] - ab0
        assert wk.wait_idle(120)
        with lock:
            rest_frames = [s for s in sent if s[1] == "rest" and s[0] > t_end]
        settle_ms = (rest_frames[0][0] - t_end) * 1e3 if rest_frames else float("nan")
        mw = float(np.mean([s[2] for s in moving])) if moving else 0.0
        mh = float(np.mean([s[3] for s in moving])) if moving else 0.0
        kb = float(np.mean([s[4] for s in sent])) / 1024 if sent else 0.0
    finally:
        wk.stop()
    return {"mode": mode, "frame_ms": min(frame_ms), "rest_fps": rest_fps, "motion_fps": motion_fps,
            "motion_size": f"{mw:.0f}x{mh:.0f}", "abandoned": abandoned, "settle_ms": settle_ms,
            "jpeg_kB": kb, "camera_updates": i}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs (CI smoke)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds of camera motion per mode")
    ap.add_argument("--modes", default="rgb,depth,pca,relevancy,mask")
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--device", default="cpu", help="cpu (the issue's case), cuda or auto")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "viewer.json")
    args = ap.parse_args()
    _viewer()
    import torch

    from langfield.viewer.synthetic import blob_field

    W, H = (int(v) for v in args.size.lower().split("x"))
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    n_bg = args.gaussians // 10
    per = (args.gaussians - n_bg) // 3
    t0 = time.perf_counter()
    field = blob_field(per, n_background=args.gaussians - 3 * per, decoder="mlp", text_dim=512, scale=0.02,
                       device=dev)
    print(f"scene: {field.num:,} Gaussians, levels {field.levels}, decoder 3->512 (LangSplat's shape), "
          f"{W}x{H}, {dev} ({time.perf_counter() - t0:.1f} s to build)")
    seconds = min(args.seconds, 2.0) if args.quick else args.seconds
    rest_n = 2 if args.quick else 4
    fov = 2 * math.atan(0.5 * 96 / (1.1 * 128))  # the synthetic ring cameras' field of view
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        rows.append(run_mode(field, mode, seconds, rest_n, W, H, fov))
        print(f"  {mode}: done", flush=True)
    table = print_table(rows, ["mode", "frame_ms", "rest_fps", "motion_fps", "motion_size", "abandoned", "settle_ms",
                               "jpeg_kB"])
    write_json(args.out, {"machine": machine(), "device": dev, "gaussians": field.num, "size": [W, H],
                          "seconds": seconds, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
