"""Benchmark: time to make procedural scenes (render + write every format).

    python bench/scenes.py                      # tabletop 64 views 256x256, plus a few more
    python bench/scenes.py --quick              # smaller sizes, for CI
    python bench/scenes.py --out bench/results/scenes.json

Prints a table (seconds, seconds per view, views per second) and writes JSON. The same
process renders with 1 worker and with 2 so the ratio is measured on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def run(name, kind, views, size, workers, frames=None):
    from langfield.scenes.make import make_scene

    tmp = tempfile.mkdtemp(prefix="lf_bench_")
    try:
        t0 = time.perf_counter()
        res = make_scene(name, tmp, kind=kind, views=views, frames=frames, size=size, workers=workers)
        total = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = res["timings"]["views"]
    return {"scene": name, "kind": res["kind"], "views": n, "size": f"{size[0]}x{size[1]}", "workers": workers,
            "total_s": round(total, 3), "render_s": round(res["timings"]["render_s"], 3),
            "write_s": round(res["timings"]["write_s"], 3), "s_per_view": round(total / n, 4),
            "views_per_s": round(n / total, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/scenes.json")
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    args = ap.parse_args(argv)
    if args.quick:
        cases = [("tabletop", "multiview", 16, (128, 128), 1), ("tabletop", "multiview", 16, (128, 128), 2),
                 ("room", "rgbd", 16, (128, 96), 2), ("dynamic", "dynamic", 16, (128, 128), 2)]
    else:
        cases = [("tabletop", "multiview", 64, (256, 256), 1), ("tabletop", "multiview", 64, (256, 256), 2),
                 ("shelf", "multiview", 64, (256, 256), 2), ("room", "rgbd", 64, (256, 192), 2),
                 ("dynamic", "dynamic", 64, (256, 256), 2), ("large", "multiview", 16, (256, 256), 2)]
    rows = []
    hdr = f"{'scene':<9} {'kind':<9} {'views':>5} {'size':>8} {'wrk':>3} {'total s':>8} {'render s':>8} {'s/view':>7} {'views/s':>7}"
    print(hdr)
    print("-" * len(hdr))
    for name, kind, views, size, workers in cases:
        r = run(name, kind, views if kind != "dynamic" else None, size, workers, frames=views if kind == "dynamic" else None)
        rows.append(r)
        print(f"{r['scene']:<9} {r['kind']:<9} {r['views']:>5} {r['size']:>8} {r['workers']:>3} {r['total_s']:>8.2f} "
              f"{r['render_s']:>8.2f} {r['s_per_view']:>7.3f} {r['views_per_s']:>7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "scenes", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                                  "python": platform.python_version()},
                               "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
