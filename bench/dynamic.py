"""Dynamic scenes (#14): deformable Gaussians on D-NeRF, language over time on langfield's
dynamic scene, query latency at a new time and render frames/s with deformation.

    python bench/dynamic.py                      # full (D-NeRF 200x200 step sweep: long on a CPU)
    python bench/dynamic.py --quick              # small step counts and sizes
    python bench/dynamic.py --only dnerf --steps 1000,3000,6000 --scenes jumpingjacks

Prints a table and writes ``bench/results/dynamic.json``. Each D-NeRF scene is trained once to
the largest step count; held-out PSNR (the test split's (view, time) pairs) is measured at
each step count on the way, with the training time so far (evaluation excluded).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from _util import machine, print_table, write_json  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def bench_dnerf(scene: str, steps, work: Path, device: str, deform_kw: dict):
    from langfield.dynamic.train import DynamicConfig, DynamicTrainer
    from langfield.train.config import TrainConfig

    data = DATA / f"dnerf_{scene}_200"
    if not data.is_dir():
        return [{"bench": f"dnerf {scene}", "note": f"{data} missing"}]
    steps = sorted(steps)
    cfg = TrainConfig(steps=steps[-1], init_random=20_000, sh_degree=3, ckpt_every=10**9, progress=False,
                      save_renders=False, device=device)
    dyn = DynamicConfig(**deform_kw)
    tr = DynamicTrainer.create_dynamic(data, work / f"dnerf_{scene}", cfg, dyn, overwrite=True)
    rows = []
    for s in steps:
        tr.train(stop_at=s)
        r = tr.evaluate(write_renders=False)
        rows.append({"bench": f"dnerf {scene} 200x200", "steps": s, "psnr": r["psnr"], "ssim": r["ssim"],
                     "train_s": tr.train_time, "gaussians": tr.gaussians.num, "views": r["n_views"]})
        print(rows[-1], flush=True)
    tr.save_checkpoint()
    return rows


def bench_language(work: Path, device: str, size: int, frames: int, rgb_steps: int, lang_steps: int):
    from langfield.dynamic.language import train_dynamic_language
    from langfield.dynamic.train import DynamicConfig, train_dynamic
    from langfield.scenes.make import make_scene

    data = work / "dyn_scene"
    make_scene("dynamic", data, kind="dynamic", camera="static", views=4, frames=frames, size=(size, size),
               overwrite=True)
    run = work / "dyn_run"
    t0 = time.perf_counter()
    m = train_dynamic(data, run, dynamic=DynamicConfig(resolutions=(16, 32), time_resolution=frames, features=8,
                                                       hidden=32, grid_lr=1e-2, mlp_lr=1e-3, deform_color=True),
                      overwrite=True, steps=rgb_steps, sh_degree=0, progress=False, save_renders=False, device=device)
    t_rgb = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = train_dynamic_language(run, states=2, overwrite=True, steps=lang_steps, features="labels",
                               text_encoder="offline", ae_steps=500, device=device, progress=False, lr=0.01,
                               log=lambda *_: None)
    t_lang = time.perf_counter() - t0
    mt = r["metrics"]
    ta, ts = mt.get("time_agnostic") or {}, mt.get("time_sensitive") or {}
    return run, {"bench": f"dynamic scene {size}x{size}", "steps": f"{rgb_steps}+{lang_steps}",
                 "psnr": m["psnr"], "miou": ta.get("miou"), "loc": ta.get("loc"), "acc": ts.get("acc"),
                 "viou": ts.get("viou"), "train_s": t_rgb + t_lang}


def bench_query(run: Path, device: str, size: int = 256, repeats: int = 5):
    """Latency of render + one query at times the run never saw, and render frames/s with deformation."""
    import numpy as np

    from langfield.field import LanguageField

    f = LanguageField.load(run, device=device)
    cam = f.cameras[0]
    s = size / max(cam.width, cam.height)
    K = np.array(cam.K, dtype=np.float64)
    K[:2] *= s
    W = H = size
    times_q, times_r = [], []
    sync = (lambda: torch.cuda.synchronize()) if f.device.type == "cuda" else (lambda: None)
    f.query(f.render(cam.viewmat, K, W, H, t=0.5), "box")  # warm-up
    for k in range(repeats):
        t = 0.123 + 0.77 * k / max(repeats - 1, 1) + 1e-3  # new times
        t0 = time.perf_counter()
        r = f.render(cam.viewmat, K, W, H, t=t)
        f.query(r, "open box")
        sync()
        times_q.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        f.render(cam.viewmat, K, W, H, t=t, language=False)
        sync()
        times_r.append(time.perf_counter() - t0)
    return {"bench": f"query at a new time {W}x{H}", "query_ms": 1e3 * min(times_q),
            "render_fps": 1.0 / min(times_r), "gaussians": f.num}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["dnerf", "language", "all"], default="all")
    ap.add_argument("--steps", default=None, help="comma-separated D-NeRF step counts")
    ap.add_argument("--scenes", default="jumpingjacks,bouncingballs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dynamic.json"))
    ap.add_argument("--keep", default=None, help="keep the runs in this folder")
    a = ap.parse_args()
    steps = [int(s) for s in (a.steps or ("200,500" if a.quick else "2000,6000,14000")).split(",")]
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="lf_bench_dyn_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    deform_kw = dict(resolutions=(16, 32), time_resolution=16, features=8, hidden=32) if a.quick else {}
    try:
        if a.only in ("dnerf", "all"):
            for sc in a.scenes.split(","):
                rows += bench_dnerf(sc.strip(), steps, work, a.device, deform_kw)
        if a.only in ("language", "all"):
            size, frames = (48, 12) if a.quick else (96, 16)
            run, row = bench_language(work, a.device, size, frames, 300 if a.quick else 1500,
                                      200 if a.quick else 1000)
            rows.append(row)
            print(row, flush=True)
            rows.append(bench_query(run, a.device))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    cols = ["bench", "steps", "psnr", "ssim", "train_s", "gaussians", "miou", "loc", "acc", "viou", "query_ms",
            "render_fps"]
    print_table(rows, cols)
    write_json(Path(a.out), {"machine": machine(), "quick": a.quick, "rows": rows})


if __name__ == "__main__":
    main()
