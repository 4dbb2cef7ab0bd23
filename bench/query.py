"""Query latency: text embedding -> relevancy heatmap, and 3D selection.

    python bench/query.py [--quick] [--threads N] [--out bench/results/query.json]

Cases (LangSplat's autoencoder, 512 -> ... -> 3 -> ... -> 512, random weights; latent 3):
  640x480, 3 levels, 1 query: the decode pass (fused last layer, as query_maps runs it) and
      the same pass through decode() + matmul (the baseline), post-processing (29x29 mean
      filter, level choice, normalisation, mask), the heatmap overlay, and the total from a
      given text embedding to a QueryResult + overlay
  640x480, 3 levels, decoded at stride 2 (opt-in)
  640x480, 3 levels, 4 queries in one pass
  select_gaussians: 100k Gaussians x 3 levels (level chosen), 1M Gaussians at one level
The decode is ~240k multiply-adds per pixel per level: it dominates everything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, print_table, timeit, write_json  # noqa: E402

from langfield.autoencoder import SceneAutoencoder  # noqa: E402
from langfield.query import (heatmap_overlay, relevancy_maps, result_from_maps,  # noqa: E402
                             select_gaussians)


class Unfused(torch.nn.Module):
    """The baseline decoder path: full 512-D features, normalised, then matmul."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, z):
        return self.ae.decode(z)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no 1M case (CI smoke)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "query.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = 1 if args.quick else 3
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def tm(fn, repeats):
        return timeit(fn, repeats=repeats, sync=sync)

    torch.manual_seed(0)
    ae = SceneAutoencoder().eval().to(dev)
    for p in ae.parameters():
        p.requires_grad_(False)
    H, W, L, levels = 480, 640, 3, 3
    maps = {i: torch.randn(H, W, L, device=dev) for i in range(levels)}
    q = F.normalize(torch.randn(512, device=dev), dim=-1)
    q4 = F.normalize(torch.randn(4, 512, device=dev), dim=-1)
    canon = F.normalize(torch.randn(4, 512, device=dev), dim=-1)
    rgb = torch.rand(H, W, 3, device=dev)
    px = H * W
    rows = []

    def row(case, seconds, n_items, unit):
        r = {"case": case, "ms": seconds * 1e3, unit: n_items / seconds / 1e6}
        rows.append(r)
        return r

    t_dec = tm(lambda: relevancy_maps(maps, ae, q, canon, chunk=args.chunk), repeats=rep)
    row("640x480 x3 levels: decode+relevancy (fused)", t_dec, px * levels, "Mpix/s")
    t_unf = tm(lambda: relevancy_maps(maps, Unfused(ae), q, canon, chunk=args.chunk), repeats=rep)
    row("640x480 x3 levels: decode+relevancy (decode() + matmul)", t_unf, px * levels, "Mpix/s")
    rel, keys = relevancy_maps(maps, ae, q, canon, chunk=args.chunk)
    t_post = tm(lambda: result_from_maps(rel[0], keys), repeats=max(rep, 3))
    row("post: 29x29 filter, level, normalise, mask (3 levels)", t_post, px * levels, "Mpix/s")
    res = result_from_maps(rel[0], keys)
    t_over = tm(lambda: heatmap_overlay(rgb, res.heatmap, mask=res.mask), repeats=max(rep, 3))
    row("heatmap overlay", t_over, px, "Mpix/s")

    def total():
        r, k = relevancy_maps(maps, ae, q, canon, chunk=args.chunk)
        res = result_from_maps(r[0], k)
        heatmap_overlay(rgb, res.heatmap, mask=res.mask)

    t_total = tm(total, repeats=rep)
    row("TOTAL text emb -> QueryResult + overlay, 640x480, 3 levels", t_total, px * levels, "Mpix/s")
    t_s2 = tm(lambda: relevancy_maps(maps, ae, q, canon, chunk=args.chunk, stride=2), repeats=rep)
    row("640x480 x3 levels: decode+relevancy at stride 2 (opt-in, approximate)", t_s2, px * levels, "Mpix/s")
    t_q4 = tm(lambda: relevancy_maps(maps, ae, q4, canon, chunk=args.chunk), repeats=rep)
    row("640x480 x3 levels, 4 queries in one pass: decode+relevancy", t_q4, px * levels, "Mpix/s")

    lang = torch.randn(100_000, levels * L, device=dev)
    t_sel = tm(lambda: select_gaussians(lang, ae, q, canon, chunk=args.chunk), repeats=rep)
    row("select_gaussians 100k x 3 levels (level chosen)", t_sel, 100_000 * levels, "Mgauss/s")
    if not args.quick:
        lang = torch.randn(1_000_000, levels * L, device=dev)
        t_sel = tm(lambda: select_gaussians(lang, ae, q, canon, level=1, chunk=args.chunk), repeats=1)
        row("select_gaussians 1M, one level", t_sel, 1_000_000, "Mgauss/s")

    for r in rows:
        r.setdefault("Mpix/s", "")
        r.setdefault("Mgauss/s", "")
    table = print_table(rows, ["case", "ms", "Mpix/s", "Mgauss/s"])
    print(f"fused decode vs decode()+matmul: {t_unf / t_dec:.2f}x")
    write_json(args.out, {"machine": machine(), "device": str(dev), "threads": args.threads or torch.get_num_threads(),
                          "chunk": args.chunk, "rows": rows, "fused_speedup": t_unf / t_dec, "table": table})


if __name__ == "__main__":
    main()
