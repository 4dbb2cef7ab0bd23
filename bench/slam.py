"""Online mapping benchmark (`langfield slam`): ATE, PSNR, frames/s, tracking ms/frame, mapping
ms/keyframe, Gaussians and peak memory on

* the synthetic room (`langfield scenes make room --kind rgbd`), exact depth and ``--noise``;
* the real 7-Scenes redkitchen frames (its KinectFusion poses as the reference);
* the ICL-NUIM living-room frames (Open3D's *estimated* trajectory as the reference);

without and (room) with ``labels`` language. Prints a table and writes JSON.

With language (``room-labels``) the name-query mIoU of the map (rendered at the frames'
estimated poses, the scene's held-out query views among the first ``--frames``) is compared
with per-scene training on the same frames (``langfield train --features labels`` on the
scene's multi-view copy restricted to those frames, a short schedule: ``--train-steps`` RGB and
language steps), evaluated on the same views with the same protocol.

    python bench/slam.py --frames 60 --size 320x240 [--cases room,room-noise,7scenes,icl,room-labels]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, print_table, write_json  # noqa: E402

DATA = Path("/work/shared/data")
CASES = ("room", "room-noise", "7scenes", "icl", "room-labels")
EXTRA_CASES = ("room-labels-concurrent",)  # --concurrent: mapping in a back-end thread (two cores busy)


def _room(tmp: Path, noise: bool, size, frames: int) -> Path:
    from langfield.scenes.make import make_scene

    out = tmp / ("room-noise" if noise else "room")
    if not (out / "tum").is_dir():
        # the default 200-frame walk (about 1.5 cm between frames, as a hand-held camera at 30 Hz);
        # only the first `frames` are rendered into the benchmark
        make_scene("room", out, kind="rgbd", frames=200, size=size, noise=noise, workers=2)
    return out


def _query_subset(scene: Path, frames: int):
    """The scene's query views among its first ``frames`` frames."""
    from langfield.eval.language import QuerySet, load_queries

    qs = load_queries(scene / "queries.json")
    views = [v for v in qs.views if int("".join(c for c in Path(v.name).stem if c.isdigit())) < frames]
    return QuerySet(qs.source, views)


def slam_query_miou(run: Path, scene: Path, frames: int) -> dict:
    """Name-query metrics of a mapping run at the query views' estimated poses."""
    import numpy as np

    from langfield.eval.language import evaluate_field
    from langfield.eval.trajectory import read_tum_trajectory
    from langfield.field import FieldCamera, LanguageField
    from langfield.maths import inv_rigid_np

    qs = _query_subset(scene, frames)
    tr = read_tum_trajectory(run / "trajectory.txt")
    field = LanguageField.load(run, device="cpu")
    cam0 = field.cameras[0]
    cams = []
    for v in qs.views:
        i = int("".join(c for c in Path(v.name).stem if c.isdigit()))
        j = int(np.argmin(np.abs(tr.timestamps - (1000.0 + i / 30.0))))  # the TUM copy's frame times
        cams.append(FieldCamera(name=Path(v.name).stem, viewmat=inv_rigid_np(tr.poses[j]), K=np.asarray(cam0.K),
                                width=cam0.width, height=cam0.height, split="test", index=i))
    field.cameras = cams
    return evaluate_field(field, qs, three_d=False, log=lambda m: None)


def train_query_miou(scene: Path, tmp: Path, frames: int, steps: int) -> dict:
    """Per-scene training (`langfield train --features labels`, ``steps`` RGB + ``steps`` language
    steps) on the scene's first ``frames`` frames; name-query metrics on the same views."""
    import json

    from langfield.cli import main as lf_main
    from langfield.eval.language import evaluate_field
    from langfield.field import LanguageField

    doc = json.loads((scene / "transforms.json").read_text())
    keep = {f"images/frame_{i:05d}.png" for i in range(frames)}
    doc["frames"] = [f for f in doc["frames"] if f["file_path"] in keep]
    for k in ("train_filenames", "val_filenames", "test_filenames"):
        if k in doc:
            doc[k] = [f for f in doc[k] if f in keep]
    sub = scene / f"first{frames}_frames.json"  # a nerfstudio transforms file (not transforms_*.json: Blender)
    sub.write_text(json.dumps(doc))
    run = tmp / f"run-train-labels-{frames}"
    t0 = time.perf_counter()
    c0 = time.process_time()
    rc = lf_main(["train", str(sub), "--out", str(run), "--steps", str(steps), "--features", "labels",
                  "--lang-steps", str(steps), "--ae-steps", "500", "--text-encoder", "offline", "--quiet",
                  "--no-renders", "--overwrite"])
    if rc not in (0, None):
        raise SystemExit(f"langfield train failed ({rc})")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    field = LanguageField.load(run, device="cpu")
    rep = evaluate_field(field, _query_subset(scene, frames), three_d=False, log=lambda m: None)
    rep["train_wall_s"], rep["train_cpu_s"] = wall, cpu
    return rep


def _names_miou(rep: dict):
    part = rep.get("names") or rep.get("all") or {}
    return part.get("miou"), part.get("n")


def run_case(name: str, tmp: Path, frames: int, size, threads: int, train_steps: int = 1500) -> dict:
    import torch

    from langfield.slam.evaluate import evaluate_slam_run
    from langfield.slam.run import run_slam

    torch.set_num_threads(threads)
    features = "none"
    lang_opts = None
    config = None
    if name == "room-labels-concurrent":
        from langfield.slam.online import SlamConfig

        config = SlamConfig(concurrent=True)
    if name in ("room", "room-labels", "room-labels-concurrent"):
        data = _room(tmp, False, size, frames)
    elif name == "room-noise":
        data = _room(tmp, True, size, frames)
    elif name == "7scenes":
        data = DATA / "rgbd_7scenes_redkitchen_200"
    elif name == "icl":
        data = DATA / "rgbd_icl_livingroom1_micro"
    else:
        raise SystemExit(f"unknown case {name!r}; use {', '.join(CASES + EXTRA_CASES)}")
    if name.startswith("room-labels"):
        features = "labels"
        lang_opts = dict(text_encoder="offline", warmup=3)  # the codec fit as `langfield slam` does it
    run = tmp / f"run-{name}"
    t0 = time.perf_counter()
    c0 = time.process_time()
    load0 = os.getloadavg()[0]
    res = run_slam(data, run, size=size, max_frames=frames, features=features, overwrite=True, quiet=False,
                   language_options=lang_opts, progress_mode="log", config=config)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    load1 = os.getloadavg()[0]
    ev = evaluate_slam_run(run, max_views=10)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = {}
    if name == "room-labels" and train_steps > 0:
        m_slam, n_slam = _names_miou(slam_query_miou(run, data, frames))
        tr = train_query_miou(data, tmp, frames, train_steps)
        m_train, _ = _names_miou(tr)
        extra = {"miou_names_slam": m_slam, "miou_names_train": m_train, "miou_queries": n_slam,
                 "train_steps": train_steps, "train_cpu_s": tr["train_cpu_s"]}
    return {"case": name, "frames": res["frames"], "size": f"{size[0]}x{size[1]}", "features": features,
            "ate_cm": 100 * ev["ate_rmse"] if "ate_rmse" in ev else None,
            "rpe_cm": 100 * ev["rpe"]["trans"]["rmse"] if "rpe" in ev else None,
            "psnr_kf": ev.get("keyframes", {}).get("psnr"), "psnr_other": ev.get("other", {}).get("psnr"),
            "depth_l1_cm_kf": 100 * ev["keyframes"]["depth_l1"] if ev.get("keyframes", {}).get("depth_l1") else None,
            "fps": res["frames_per_s"], "track_ms": res["track_ms_per_frame"],
            "map_ms_kf": res["map_ms_per_keyframe"], "keyframes": res["keyframes"], "gaussians": res["gaussians"],
            "peak_mb": peak_mb, "wall_s": wall, "cpu_s": cpu, "cpu_s_per_frame": cpu / max(1, res["frames"]),
            "load": round(0.5 * (load0 + load1), 2), "threads": threads, **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=1, help="torch/renderer threads (1: best on a busy 2-core box)")
    ap.add_argument("--train-steps", type=int, default=1500,
                    help="room-labels: RGB and language steps of the per-scene training it is compared with (0: skip)")
    ap.add_argument("--work", type=Path, default=None, help="folder for scenes and runs (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/slam.json"))
    ap.add_argument("--jobs", type=int, default=1, help="cases run at once, each in its own process")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.lower().split("x"))
    tmp = a.work or Path(tempfile.mkdtemp(prefix="lf-bench-slam-"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    names = [n.strip() for n in a.cases.split(",") if n.strip()]
    if a.jobs > 1:
        # each case in its own process (exact peak memory and CPU time per case), a.jobs at a time
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        for name in names:  # the scenes first, once
            if name.startswith("room"):
                _room(tmp, name == "room-noise", (w, h), a.frames)
        with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(run_case, name, tmp, a.frames, (w, h), a.threads, a.train_steps) for name in names]
            for fu in futs:
                rows.append(fu.result())
                print_table(rows[-1:], list(rows[-1].keys()))
    else:
        for name in names:
            # one process: ru_maxrss is the process peak so far, reported as measured (--jobs 2: one per case)
            rows.append(run_case(name, tmp, a.frames, (w, h), a.threads, a.train_steps))
            print_table(rows[-1:], list(rows[-1].keys()))
    cols = ["case", "frames", "size", "features", "ate_cm", "rpe_cm", "psnr_kf", "psnr_other", "depth_l1_cm_kf", "fps",
            "track_ms", "map_ms_kf", "cpu_s_per_frame", "load", "keyframes", "gaussians", "peak_mb", "miou_names_slam",
            "miou_names_train"]
    print()
    table = print_table(rows, cols)
    write_json(a.json, {"machine": machine(), "frames": a.frames, "size": a.size, "threads": a.threads, "jobs": a.jobs,
                        "command": "python bench/slam.py " + " ".join(sys.argv[1:]), "rows": rows,
                        "table": table, "targets": {"ate_cm": {"room": 1.0, "room-noise": 2.0, "7scenes": 3.0},
                                                    "fps_labels": 1.0, "miou_gap": 0.1}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
