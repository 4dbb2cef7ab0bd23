"""Query latency: text embedding -> relevancy heatmap, and 3D selection; both codecs.

    python bench/query.py [--quick] [--threads N] [--no-frame] [--quality]
                          [--out bench/results/query.json]

**Relevancy frames** (issue #15; default on, ``--no-frame`` skips): what the viewer and
``langfield query`` do per frame, colour + depth of one view and one text query (relevancy
against the canonical phrases, level choice, smoothing, mask), 100k Gaussians at 640x480, as a
ratio to the colour + depth frame of the same Gaussians in the same process (wall time, best of
the repeats, and CPU time of the process):

* ``rgb``: ``LanguageField.render(language=False)`` (the baseline);
* ``autoencoder``: ``render()`` + ``query()`` (3 levels x 3 latents, LangSplat's decoder shape);
* ``codebook render+query``: ``render()`` (colour pass, coefficients left for later) +
  ``query()`` (the fused sparse relevancy pass: coefficients blended and scored inside the tile);
* ``codebook render_query``: ``LanguageField.render_query()``: colour, depth, alpha and
  relevancy in one pass over the tiles;
* ``codebook dense maps``: the reference path (every level's L coefficients rendered as dense
  channels, then decoded without a decoder).

The codebook's coefficients are random top-4-of-64 weights per Gaussian and level (every tile
uses every entry: the worst case of the per-tile quadratic form), then object-coherent ones (per
object and level a dominant entry and a pool of 8, as trained fields have them: one to two
entries per Gaussian and level); ``--quality`` repeats the frame ratio on the trained tabletop
fields (their real coefficients) at 640x480.
**3D selection**: 100k Gaussians x 3 levels, both codecs. **Quality** (``--quality``): the
tabletop scene (labels features, offline text encoder; one RGB run, then the language stage with
each codec): held-out name-query mIoU, localisation, 3D mIoU and language-stage time.

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
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, print_table, timeit, write_json  # noqa: E402

from langfield.autoencoder import SceneAutoencoder  # noqa: E402
from langfield.data.base import scale_K  # noqa: E402
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
    ap.add_argument("--no-frame", action="store_true", help="skip the relevancy-frame comparison of the codecs")
    ap.add_argument("--no-micro", action="store_true", help="skip the autoencoder decode micro-benchmarks")
    ap.add_argument("--quality", action="store_true", help="train both codecs on the tabletop scene (minutes)")
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--codebook-size", type=int, default=64)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--train-size", default="96x96")
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--rgb-steps", type=int, default=300)
    ap.add_argument("--lang-steps", type=int, default=1000)
    ap.add_argument("--ae-steps", type=int, default=800)
    ap.add_argument("--train-codebook-size", type=int, nargs="*", default=[],
                    help="more codebook runs at these sizes (the first codebook run takes the defaults: L=64)")
    ap.add_argument("--codebook-lr", type=float, default=None, help="codebook lr (default: the stage's, 0.01)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "query.json")
    args = ap.parse_args()
    if args.quick:
        args.gaussians = min(args.gaussians, 20_000)
        args.rgb_steps, args.lang_steps, args.ae_steps = 100, 200, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = 1 if args.quick else 3
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def tm(fn, repeats):
        return timeit(fn, repeats=repeats, sync=sync)

    payload = {"machine": machine(), "device": str(dev), "threads": args.threads or torch.get_num_threads(),
               "load_before": _load()}
    if not args.no_micro:
        payload["micro"] = micro(args, dev, tm, rep)
    if not args.no_frame:
        payload["frame"] = frames(args, rep)
    if args.quality:
        payload["quality"] = quality(args)
    payload["load_after"] = _load()
    write_json(args.out, payload)


def _load():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def micro(args, dev, tm, rep):
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
    return {"chunk": args.chunk, "rows": rows, "fused_speedup": t_unf / t_dec, "table": table}




def timed(fn, repeats):
    """(best wall seconds, best process CPU seconds) over ``repeats`` runs after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def codebook_twin(field, L, k, seed=0, groups=None, pool=8):
    """The same Gaussians with a random codebook (unit rows) and random top-k weights per level.

    ``groups`` None: every Gaussian mixes k entries drawn uniformly from all L (every tile uses
    every entry: the worst case of the per-tile quadratic form). ``groups`` ``[N]`` (an object id
    per Gaussian): object-coherent coefficients, as a trained field has them: per object and
    level one dominant entry plus ``pool - 1`` others to mix in (simplex projection of the
    dominant's 1 + U(0, 1) and the pool's U(0, 1); the rest of the codebook unused)."""
    from langfield.codec.codebook import CodebookCodec, project_topk_simplex
    from langfield.field import LanguageField

    g = field.gaussians
    gen = torch.Generator().manual_seed(seed)
    D = field.text_encoder.encode(["x"]).shape[-1]
    codec = CodebookCodec(F.normalize(torch.randn(L, D, generator=gen), dim=-1), topk=k).eval()
    nl = len(field.levels)
    v = torch.rand(g.num, nl, L, generator=gen)
    if groups is not None:
        n_groups = int(groups.max()) + 1
        pools = torch.stack([torch.randperm(L, generator=gen)[:pool] for _ in range(n_groups * nl)]).reshape(
            n_groups, nl, pool)
        sel = pools[groups]  # [N, nl, pool]: the Gaussian's object's entries per level
        w = torch.zeros(g.num, nl, L)
        w.scatter_(-1, sel, v[..., :pool])
        w.scatter_add_(-1, sel[..., :1], torch.ones(g.num, nl, 1))
        v = w
    lang = project_topk_simplex(v, k).reshape(g.num, nl * L)
    return LanguageField(g.clone().set_lang(lang, requires_grad=False), decoder=codec, text_encoder=field.text_encoder,
                         levels=field.levels, latent_dim=L, cameras=field.cameras, kind="memory", stage="language")


def frame_rows(fields, cam, W, H, text, repeats, label=""):
    """Relevancy frames of ``fields`` ({"autoencoder": f, "codebook": f}) at W x H from ``cam``:
    rows with wall / CPU ms and the ratio to the colour frame of the same Gaussians. The cases
    run interleaved, one call of each per round (the colour frame among them), and each keeps
    its best round: a load change or a frequency step then touches every case alike, where
    timing the baseline once before the others let its own noise set every ratio."""
    from langfield.field import LanguageField
    from langfield.query import query_maps

    K = scale_K(cam.K, W / cam.width, H / cam.height)
    vm = cam.viewmat
    base = next(iter(fields.values()))
    rgb_only = LanguageField(base.gaussians, cameras=base.cameras, kind="memory")
    cases = [("rgb + depth frame (baseline)", lambda: rgb_only.render(vm, K, W, H, language=False), repeats)]
    if "autoencoder" in fields:
        fa = fields["autoencoder"]
        cases.append(("autoencoder: render + query", lambda: fa.query(fa.render(vm, K, W, H), text),
                      max(1, repeats // 2)))
    f = fields.get("codebook")
    if f is not None:
        def dense_maps():
            r = f.render(vm, K, W, H)
            z = {lv: r.latents[lv] for lv in f.levels}  # LazyLatents: the sparse pass, maps [H, W, L]
            tq = f.text_query
            return query_maps(z, f.codec, tq.embed(text), tq.canon, valid=r.alpha > 0.5)

        cases += [("codebook: render + query (fused sparse pass)", lambda: f.query(f.render(vm, K, W, H), text),
                   repeats),
                  ("codebook: render_query (one pass)", lambda: f.render_query(vm, K, W, H, text), repeats),
                  ("codebook: render + coefficient maps + decode (reference path)", dense_maps,
                   max(1, repeats // 2))]
    for _name, fn, _n in cases:  # warm-up
        fn()
    best = {name: [float("inf"), float("inf")] for name, _fn, _n in cases}
    for k in range(max(n for _name, _fn, n in cases)):
        for name, fn, n in cases:
            if k >= n:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            b = best[name]
            b[0], b[1] = min(b[0], time.perf_counter() - t0), min(b[1], time.process_time() - c0)
    t_rgb = best[cases[0][0]]
    rows = [{"case": f"{label}{name}", "wall_ms": 1e3 * best[name][0], "cpu_ms": 1e3 * best[name][1],
             "x_rgb_wall": best[name][0] / t_rgb[0], "x_rgb_cpu": best[name][1] / t_rgb[1]}
            for name, _fn, _n in cases]
    if f is not None:
        a = f.query(f.render(vm, K, W, H), text)
        b = f.render_query(vm, K, W, H, text)[1]
        c = dense_maps()
        rows[-1]["max_rel_diff_vs_fused"] = float((a.relevancy - c.relevancy).abs().max())
        rows[-2]["max_rel_diff_vs_fused"] = float((a.relevancy - b.relevancy).abs().max())
    return rows


def frames(args, rep):
    import langfield.viewer  # noqa: F401  (the viewer package, installed from viewer/)
    from langfield.viewer.synthetic import blob_field

    W, H = (int(v) for v in args.size.lower().split("x"))
    n_bg = args.gaussians // 10
    per = (args.gaussians - n_bg) // 3
    ae = blob_field(per, n_background=args.gaussians - 3 * per, decoder="mlp", text_dim=512, scale=0.02)
    cb = codebook_twin(ae, args.codebook_size, args.topk)
    groups = (torch.arange(ae.num) // per).clamp(max=3)  # blob_field: 3 objects of `per`, then the background
    co = codebook_twin(ae, args.codebook_size, args.topk, groups=groups)
    nz = float((co.gaussians.lang.reshape(co.num, len(co.levels), -1) != 0).sum(-1).float().mean())
    reps = 2 if args.quick else 5
    rows = frame_rows({"autoencoder": ae, "codebook": cb}, ae.cameras[0], W, H, "mug", reps,
                      label="random top-k (worst case): ")
    rows += frame_rows({"codebook": co}, ae.cameras[0], W, H, "mug", reps,
                       label=f"object-coherent ({nz:.2f} entries per Gaussian and level): ")
    # 3D selection
    sel = []
    for name, f in (("autoencoder", ae), ("codebook", cb)):
        t = timed(lambda: f.select("mug"), max(1, reps // 2))
        sel.append({"case": f"3D selection, {name} ({f.num:,} Gaussians x {len(f.levels)} levels)",
                    "wall_ms": 1e3 * t[0], "cpu_ms": 1e3 * t[1]})
    print(f"\nrelevancy frame: {ae.num:,} Gaussians, {W}x{H}, {torch.get_num_threads()} torch threads, "
          f"codebook L={args.codebook_size} k={args.topk} (random weights), load {_load()}")
    table = print_table(rows + sel, ["case", "wall_ms", "cpu_ms", "x_rgb_wall", "x_rgb_cpu", "max_rel_diff_vs_fused"])
    return {"gaussians": ae.num, "size": [W, H], "codebook_size": args.codebook_size, "topk": args.topk,
            "rows": rows, "selection": sel, "table": table}


def quality(args):
    """Both codecs on the tabletop scene: one RGB run, then the language stage per codec; the
    held-out name queries (mIoU, localisation, 3D mIoU), the stage's time, and the relevancy
    frame ratio of each trained field at --size."""
    import langfield.train.language as LL
    from langfield.field import LanguageField
    from langfield.scenes import make_scene
    from langfield.train.rgb import train_rgb

    tmp = Path(tempfile.mkdtemp(prefix="lf_bench_query_"))
    rows, fr = [], []
    W, H = (int(v) for v in args.size.lower().split("x"))
    try:
        data, base = tmp / "data", tmp / "rgb"
        t0 = time.perf_counter()
        make_scene("tabletop", data, views=args.views, size=args.train_size, progress=False, workers=1)
        train_rgb(data, base, steps=args.rgb_steps, device="cpu", progress=False, evaluate=False)
        print(f"\nquality: tabletop {args.train_size}, {args.views} views, RGB {args.rgb_steps} steps in "
              f"{time.perf_counter() - t0:.0f} s; language stage {args.lang_steps} steps per codec")
        # the autoencoder as tests/test_language.py's demo trains it; the codebook with the language
        # stage's defaults for it (L=64, k=4, lr 0.01, sparse training from the views), then any
        # --train-codebook-size extras
        lr = {} if args.codebook_lr is None else {"lr": args.codebook_lr}
        runs = [("autoencoder", dict(latent_dim=3, ae_steps=args.ae_steps)), ("codebook", dict(ae_steps=30, **lr))]
        runs += [("codebook", dict(latent_dim=L, ae_steps=30, **lr)) for L in args.train_codebook_size]
        fields = {}
        for codec, opts in runs:
            run = tmp / f"{codec}{opts.get('latent_dim', '')}"
            shutil.copytree(base, run)
            t1, c1 = time.perf_counter(), time.process_time()
            res = LL.train_language(run, features="labels", codec=codec, steps=args.lang_steps, text_encoder="offline",
                                    device="cpu", progress=False, log=lambda *_: None, **opts)
            m = res["metrics"]
            p = m[m["primary"]]
            lcfg = LL.stored_language_config(run)
            rows.append({"codec": codec, "latent": lcfg.latent_dim, "lr": lcfg.lr, "mIoU": p["miou"], "loc": p["loc"],
                         "mIoU_3d": p["miou_3d"], "queries": p["n"], "train_s": res["train_time_s"],
                         "stage_s": time.perf_counter() - t1, "stage_cpu_s": time.process_time() - c1})
            fields[f"{codec}{lcfg.latent_dim}"] = LanguageField.load(run, device="cpu")
        ae = fields["autoencoder3"]
        cam = next(c for c in ae.cameras if c.split == "test")
        for name, f in fields.items():
            kind = "autoencoder" if name.startswith("auto") else "codebook"
            fr += frame_rows({kind: f}, cam, W, H, "red mug", 2 if args.quick else 5, label=f"trained {name}: ")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, ["codec", "latent", "lr", "mIoU", "loc", "mIoU_3d", "queries", "train_s", "stage_s",
                       "stage_cpu_s"])
    print(f"\nrelevancy frames of the trained fields, {W}x{H}:")
    table = print_table(fr, ["case", "wall_ms", "cpu_ms", "x_rgb_wall", "x_rgb_cpu", "max_rel_diff_vs_fused"])
    return {"rows": rows, "frames": fr, "frames_table": table, "size": args.train_size, "views": args.views,
            "rgb_steps": args.rgb_steps, "lang_steps": args.lang_steps}


if __name__ == "__main__":
    main()
