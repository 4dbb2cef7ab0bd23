"""Online mapping benchmark (`langfield slam`): ATE, PSNR, frames/s, tracking ms/frame, mapping
ms/keyframe, Gaussians and peak memory on

* the synthetic room (`langfield scenes make room --kind rgbd`), exact depth and ``--noise``;
* the real 7-Scenes redkitchen frames (its KinectFusion poses as the reference);
* the ICL-NUIM living-room frames (Open3D's *estimated* trajectory as the reference);

without and (room) with ``labels`` language. Prints a table and writes JSON.

    python bench/slam.py --frames 60 --size 320x240 [--cases room,room-noise,7scenes,icl,room-labels]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, print_table, write_json  # noqa: E402

DATA = Path("/work/shared/data")
CASES = ("room", "room-noise", "7scenes", "icl", "room-labels")


def _room(tmp: Path, noise: bool, size, frames: int) -> Path:
    from langfield.scenes.make import make_scene

    out = tmp / ("room-noise" if noise else "room")
    if not (out / "tum").is_dir():
        # the default 200-frame walk (about 1.5 cm between frames, as a hand-held camera at 30 Hz);
        # only the first `frames` are rendered into the benchmark
        make_scene("room", out, kind="rgbd", frames=200, size=size, noise=noise, workers=2)
    return out


def run_case(name: str, tmp: Path, frames: int, size, threads: int) -> dict:
    import torch

    from langfield.slam.evaluate import evaluate_slam_run
    from langfield.slam.run import run_slam

    torch.set_num_threads(threads)
    features = "none"
    lang_opts = None
    if name in ("room", "room-labels"):
        data = _room(tmp, False, size, frames)
    elif name == "room-noise":
        data = _room(tmp, True, size, frames)
    elif name == "7scenes":
        data = DATA / "rgbd_7scenes_redkitchen_200"
    elif name == "icl":
        data = DATA / "rgbd_icl_livingroom1_micro"
    else:
        raise SystemExit(f"unknown case {name!r}; use {', '.join(CASES)}")
    if name == "room-labels":
        features = "labels"
        lang_opts = dict(text_encoder="offline", ae_steps=500, warmup=3)
    run = tmp / f"run-{name}"
    t0 = time.perf_counter()
    res = run_slam(data, run, size=size, max_frames=frames, features=features, overwrite=True, quiet=False,
                   language_options=lang_opts, progress_mode="log")
    wall = time.perf_counter() - t0
    ev = evaluate_slam_run(run, max_views=10)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": name, "frames": res["frames"], "size": f"{size[0]}x{size[1]}", "features": features,
            "ate_cm": 100 * ev["ate_rmse"] if "ate_rmse" in ev else None,
            "rpe_cm": 100 * ev["rpe"]["trans"]["rmse"] if "rpe" in ev else None,
            "psnr_kf": ev.get("keyframes", {}).get("psnr"), "psnr_other": ev.get("other", {}).get("psnr"),
            "depth_l1_cm_kf": 100 * ev["keyframes"]["depth_l1"] if ev.get("keyframes", {}).get("depth_l1") else None,
            "fps": res["frames_per_s"], "track_ms": res["track_ms_per_frame"],
            "map_ms_kf": res["map_ms_per_keyframe"], "keyframes": res["keyframes"], "gaussians": res["gaussians"],
            "peak_mb": peak_mb, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=1, help="torch/renderer threads (1: best on a busy 2-core box)")
    ap.add_argument("--work", type=Path, default=None, help="folder for scenes and runs (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/slam.json"))
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.lower().split("x"))
    tmp = a.work or Path(tempfile.mkdtemp(prefix="lf-bench-slam-"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.cases.split(","):
        # each case in a fresh process would give exact peak memory; one process keeps it simple (ru_maxrss is
        # the process peak so far, reported as measured)
        rows.append(run_case(name.strip(), tmp, a.frames, (w, h), a.threads))
        print_table(rows[-1:], list(rows[-1].keys()))
    cols = ["case", "frames", "size", "features", "ate_cm", "rpe_cm", "psnr_kf", "psnr_other", "depth_l1_cm_kf", "fps",
            "track_ms", "map_ms_kf", "keyframes", "gaussians", "peak_mb"]
    print()
    table = print_table(rows, cols)
    write_json(a.json, {"machine": machine(), "frames": a.frames, "size": a.size, "threads": a.threads, "rows": rows,
                        "table": table, "targets": {"ate_cm": {"room": 1.0, "room-noise": 2.0, "7scenes": 3.0},
                                                    "fps_labels": 1.0}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
