"""Native CPU renderer vs the pure-torch reference, in one process.

    python bench/render.py [--quick] [--out bench/results/render.json]

Cases (issue: native >= 30x the reference forward+backward; 100k Gaussians at
640x480 RGB forward under 100 ms on 2 cores):
  20k Gaussians, 256x256, D=3 and D=12: forward and forward+backward
  100k Gaussians, 640x480, RGB: forward (reference forward for the ratio)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, print_table, timeit, write_json  # noqa: E402

from langfield.render import rasterization  # noqa: E402
from langfield.render.synthetic import random_scene  # noqa: E402


def scene_for(N, W, H, D, seed=0):
    # a dense cloud in front of the camera, sized like a trained scene's
    return random_scene(N, C=1, width=W, height=H, D=D, seed=seed, scale_range=(0.005, 0.04),
                        radius=3.0, extent=1.0)


def run_case(N, W, H, D, backward: bool, repeats: int, ref_repeats: int):
    s = scene_for(N, W, H, D)
    p = s.params()

    def step(backend):
        def f():
            q = {k: (v.detach().requires_grad_(backward) if isinstance(v, torch.Tensor) and k not in ("viewmats", "Ks")
                     else v) for k, v in p.items()}
            out, alpha, _ = rasterization(**q, backend=backend)
            if backward:
                (out.sum() + alpha.sum()).backward()
        return f

    t_native = timeit(step("cpu"), repeats=repeats)
    t_ref = timeit(step("torch"), repeats=ref_repeats, warmup=0 if ref_repeats == 1 else 1)
    return {"case": f"{N // 1000}k {W}x{H} D={D}", "pass": "fwd+bwd" if backward else "fwd",
            "native_ms": t_native * 1e3, "torch_ref_ms": t_ref * 1e3, "speedup": t_ref / t_native}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller repeats (CI smoke)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "render.json")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both sides (torch and LANGFIELD_NUM_THREADS); 0 = all CPUs")
    args = ap.parse_args()
    if args.threads:
        import os

        os.environ["LANGFIELD_NUM_THREADS"] = str(args.threads)  # read when the library loads
        torch.set_num_threads(args.threads)
    rep, ref_rep = (2, 1) if args.quick else (10, 3)
    rows = []
    for D in (3, 12):
        for bwd in (False, True):
            rows.append(run_case(20_000, 256, 256, D, bwd, rep, ref_rep))
    rows.append(run_case(100_000, 640, 480, 3, False, rep, 1))
    table = print_table(rows, ["case", "pass", "native_ms", "torch_ref_ms", "speedup"])
    write_json(args.out, {"machine": machine(), "threads": args.threads or "all", "rows": rows, "table": table})


if __name__ == "__main__":
    main()
