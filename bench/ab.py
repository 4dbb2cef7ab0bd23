"""A/B two builds of the native CPU library on the rasterizer kernels, in one process.

    python bench/ab.py OLD.so NEW.so [--D 12] [--N 20000] [--size 256x256] [--runs 25]

Builds live in the cache (``langfield build`` prints the path; ``git stash && langfield build``
gives the old one). The two libraries are called alternately on the same projected scene (the
``bench/render.py`` 20k case by default), forward and backward, and the medians are compared,
which is stable on a noisy shared machine where absolute timings are not. It also reports
whether both builds give bit-identical outputs and gradients.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render import scene_for  # noqa: E402

from langfield.render import native  # noqa: E402
from langfield.render._build import _SIGNATURES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--D", type=int, default=3)
    ap.add_argument("--N", type=int, default=20_000)
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--runs", type=int, default=25)
    args = ap.parse_args()
    W, H = (int(v) for v in args.size.lower().split("x"))
    libs = [ctypes.CDLL(str(p)) for p in (args.old, args.new)]
    for lib in libs:
        for name, sig in _SIGNATURES.items():
            getattr(lib, name).argtypes = sig
    p = scene_for(args.N, W, H, args.D).params()
    radii, m2, dep, con, _ = native.project(p["means"], p["quats"], p["scales"], p["opacities"], p["viewmats"],
                                            p["Ks"], W, H, 0.3, 0.01, 1e10, 0.0, False)
    offsets, flat, _ = native.isect(radii, m2, dep, W, H, 16)
    m2, con = m2.detach().contiguous(), con.detach().contiguous()
    cols = p["colors"].unsqueeze(0).contiguous()
    op = p["opacities"].unsqueeze(0).contiguous()
    P = native._p
    tw, th = offsets.shape[2], offsets.shape[1]
    D, N, n = args.D, args.N, flat.numel()
    outs = [(torch.empty(1, H, W, D), torch.empty(1, H, W), torch.empty(1, H, W, dtype=torch.int32)) for _ in libs]
    g = torch.Generator().manual_seed(0)
    v_out, v_alpha = torch.randn(1, H, W, D, generator=g), torch.randn(1, H, W, generator=g)
    grads = [[torch.zeros_like(x) for x in (m2, con, cols, op)] for _ in libs]

    def fwd(i):
        r, a, last = outs[i]
        rc = libs[i].lf_rasterize_fwd(1, N, D, W, H, 16, tw, th, P(m2), P(con), P(cols), P(op), None, P(offsets),
                                      P(flat), n, P(r), P(a), P(last), None)
        assert rc == 0, libs[i].lf_last_error()

    def bwd(i):
        _, a, last = outs[i]
        v = grads[i]
        for x in v:
            x.zero_()
        rc = libs[i].lf_rasterize_bwd(1, N, D, W, H, 16, tw, th, P(m2), P(con), P(cols), P(op), None, P(offsets),
                                      P(flat), n, P(a), P(last), P(v_out), P(v_alpha), P(v[0]), None, P(v[1]),
                                      P(v[2]), P(v[3]), None, None)
        assert rc == 0, libs[i].lf_last_error()

    times = {(i, k): [] for i in range(2) for k in ("fwd", "bwd")}
    for _ in range(args.runs):
        for i in range(2):
            for k, f in (("fwd", fwd), ("bwd", bwd)):
                t = time.perf_counter()
                f(i)
                times[(i, k)].append((time.perf_counter() - t) * 1e3)
    print(f"{N} Gaussians, {W}x{H}, D={D}, {n} intersections, {args.runs} alternating runs")
    for k in ("fwd", "bwd"):
        a, b = statistics.median(times[(0, k)]), statistics.median(times[(1, k)])
        print(f"{k}: old {a:.2f} ms  new {b:.2f} ms  new/old {b / a:.3f}  (min {min(times[(0, k)]):.2f} / "
              f"{min(times[(1, k)]):.2f})")
    same_fwd = all(torch.equal(x, y) for x, y in zip(outs[0], outs[1]))
    diff = max(float((x - y).abs().max() / x.abs().max().clamp(min=1e-30)) for x, y in zip(grads[0], grads[1]))
    print(f"forward outputs identical: {same_fwd}; gradients: max relative difference {diff:.2e}")


if __name__ == "__main__":
    main()
