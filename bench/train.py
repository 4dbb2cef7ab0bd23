"""RGB training benchmark: held-out PSNR and seconds per step against steps.

For each available dataset (../shared/data/colmap_beer, ../shared/data/blender_lego_200;
missing ones are skipped), one run configured for the largest milestone (so the learning-rate
decay and densification window are those of a run of that length) is evaluated on the
held-out views at every milestone. Prints a table and writes bench/results/train.json.

    python bench/train.py                       # milestones 500,1000,2000,4000,7000
    python bench/train.py --quick               # a short smoke run (50,100 steps)
    python bench/train.py --datasets lego --steps 500,1000,2000 --max-minutes 20

Seconds per step exclude evaluation. ``--max-minutes`` stops after the first milestone past
the budget (the JSON says so) so a slow machine still reports the trend.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _util import machine, print_table, write_json  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
DATASETS = {
    # name: (folder, downscale)
    "beer": ("colmap_beer", 8),
    "lego": ("blender_lego_200", 1),
}
COLS = ["dataset", "step", "psnr", "ssim", "s_per_step", "train_s", "gaussians"]


def run_dataset(name: str, folder: Path, downscale: int, milestones, max_minutes: float, workdir: Path, extra):
    from langfield.train.config import TrainConfig
    from langfield.train.rgb import RGBTrainer

    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(steps=max(milestones), downscale=downscale, progress=False, save_renders=False,
                      ckpt_every=10 ** 9, keep_checkpoints=1, **extra)
    tr = RGBTrainer.create(folder, out, cfg)
    print(f"{name}: {len(tr.train_idx)} train / {len(tr.test_idx)} test views, {tr.gaussians.num} initial Gaussians, "
          f"background {tr.background}, backend {tr.backend}", flush=True)
    rows = []
    t_start = time.perf_counter()
    for m in milestones:
        s0, t0 = tr.step, tr.train_time
        tr.train(stop_at=m)
        ev = tr.evaluate(write_renders=False)
        row = {"dataset": name, "step": tr.step, "psnr": ev["psnr"], "ssim": ev["ssim"],
               "s_per_step": (tr.train_time - t0) / max(tr.step - s0, 1), "train_s": tr.train_time,
               "gaussians": tr.gaussians.num}
        rows.append(row)
        print(f"  step {row['step']}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}, "
              f"{row['s_per_step']:.3f} s/step, {row['gaussians']} Gaussians", flush=True)
        if max_minutes and (time.perf_counter() - t_start) / 60 > max_minutes and m != milestones[-1]:
            rows[-1]["stopped"] = f"time budget of {max_minutes} min reached"
            print(f"  stopping: time budget of {max_minutes} min reached", flush=True)
            break
    return rows, {"train_views": len(tr.train_idx), "test_views": len(tr.test_idx), "background": tr.background,
                  "backend": tr.backend, "config": tr.cfg.to_dict()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="beer,lego", help="comma-separated: " + ",".join(DATASETS))
    ap.add_argument("--steps", default="500,1000,2000,4000,7000", help="milestones (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="smoke run: milestones 50,100")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="per dataset; 0 = no limit")
    ap.add_argument("--workdir", default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--out", default=str(HERE / "results" / "train.json"))
    args = ap.parse_args(argv)
    milestones = [50, 100] if args.quick else sorted(int(s) for s in args.steps.split(","))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="langfield-bench-train-"))
    rows, info = [], {}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if name not in DATASETS:
            print(f"unknown dataset {name!r}; choose from {list(DATASETS)}", file=sys.stderr)
            return 2
        folder, ds = DATASETS[name]
        path = DATA / folder
        if not path.exists():
            print(f"{name}: {path} not found, skipped")
            continue
        r, i = run_dataset(name, path, ds, milestones, args.max_minutes, work, {})
        rows += r
        info[name] = i
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if not rows:
        print("no dataset available; nothing to benchmark")
        return 0
    print()
    table = print_table(rows, COLS)
    write_json(Path(args.out), {"machine": machine(), "milestones": milestones, "rows": rows, "datasets": info,
                                "table": table, "quick": args.quick})
    return 0


if __name__ == "__main__":
    sys.exit(main())
