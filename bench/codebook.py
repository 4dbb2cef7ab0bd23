"""Sparse-codebook language mode (issue #15) against the scene autoencoder, in one process.

    python bench/codebook.py [--quick] [--no-train] [--gaussians 100000] [--size 640x480]
                             [--out bench/results/codebook.json]

1. Relevancy frame (what the viewer and ``langfield query`` do per frame: colour + depth +
   every level's language channels of one view, then one text query: relevancy against the
   canonical phrases, level choice, smoothing, mask), 100k Gaussians at 640x480 on the CPU:
   * ``rgb``: the colour + depth frame alone (the baseline of the ratios);
   * ``autoencoder``: 3 levels x 3 latents rendered with the colour, decoded through LangSplat's
     decoder shape (random weights; the cost is the real one);
   * ``codebook dense``: 3 levels x L=64 coefficients rendered as dense channels (what a
     consumer that renders ``lang`` as-is does), scores from the codebook's similarities;
   * ``codebook sparse``: the colour + depth pass, then the sparse pass (k=4 pairs per level)
     reusing its projection and tile lists (the path a field takes with
     :func:`langfield.render.sparse.render_sparse`), same scores.
2. Sparse vs dense rendering of the same coefficients (language channels only), forward and
   forward + backward (the weights' gradient).
3. Training quality on the tabletop scene (labels features, offline text encoder; one RGB run,
   then the language stage with each codec): held-out name-query mIoU, localisation, 3D mIoU,
   language-stage time (the language stage projects the codebook's weights onto the k-sparse
   simplex after every step, ``CodebookCodec.project_``).

Prints tables and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine, print_table, timeit, write_json  # noqa: E402


def sparse_field_render(field, viewmat, K, width, height, *, background=(0.0, 0.0, 0.0)):
    """``LanguageField.render`` of a codebook field: the colour + depth pass; the coefficients
    through the sparse pass when ``latents`` is read, a query through the fused sparse relevancy
    pass (kept for older callers: the field does it itself now)."""
    return field.render(viewmat, K, width, height, background=background)


def dense_field_render(field, viewmat, K, width, height):
    """The reference: colour, depth and every level's L coefficients as dense channels in one pass."""
    from langfield.field import FieldRender
    from langfield.render.model import Cameras, render

    g = field.gaussians
    out = render(g, Cameras.of(viewmat, K, width, height, device=g.device), sh_degree=field.sh_degree, language=True,
                 depth=True, backend=field.backend)
    z, L = out.lang[0], field.latent_dim
    lat = {lv: z[..., i * L:(i + 1) * L] for i, lv in enumerate(field.levels)}
    return FieldRender(rgb=out.rgb[0].clamp(0, 1), depth=out.depth[0], alpha=out.alpha[0], latents=lat)


def latency(args, rows_out):
    from langfield.codec.codebook import CodebookCodec, project_topk_simplex
    from langfield.field import LanguageField
    from langfield.data.base import scale_K
    from langfield.render.model import Cameras, render
    from langfield.render.sparse import render_sparse, sparse_topk
    import langfield.viewer  # noqa: F401  (the viewer package, installed from viewer/)
    from langfield.viewer.synthetic import blob_field

    W, H = (int(v) for v in args.size.lower().split("x"))
    n_bg = args.gaussians // 10
    per = (args.gaussians - n_bg) // 3
    ae_field = blob_field(per, n_background=args.gaussians - 3 * per, decoder="mlp", text_dim=512, scale=0.02)
    g = ae_field.gaussians
    N, L, k, nl = g.num, args.codebook_size, args.topk, len(ae_field.levels)
    gen = torch.Generator().manual_seed(0)
    codec = CodebookCodec(F.normalize(torch.randn(L, 512, generator=gen), dim=-1), topk=k).eval()
    lang = project_topk_simplex(torch.rand(N, nl, L, generator=gen), k).reshape(N, nl * L)
    cb_field = LanguageField(g.clone().set_lang(lang, requires_grad=False), decoder=codec,
                             text_encoder=ae_field.text_encoder, levels=ae_field.levels, latent_dim=L,
                             cameras=ae_field.cameras, kind="memory", stage="language")
    cam = ae_field.cameras[0]
    K = scale_K(cam.K, W / cam.width, H / cam.height)
    text = "mug"
    reps = 2 if args.quick else 5

    def frame(field, sparse=False):
        def run():
            r = field.render(cam.viewmat, K, W, H) if sparse or field.decoder is None or field is ae_field else \
                dense_field_render(field, cam.viewmat, K, W, H)
            return field.query(r, text) if field.decoder is not None else r
        return run

    rgb_only = LanguageField(g, cameras=ae_field.cameras, kind="memory")
    t_rgb = timeit(frame(rgb_only), repeats=reps)
    t_ae = timeit(frame(ae_field), repeats=reps)
    t_cbd = timeit(frame(cb_field), repeats=reps)
    t_cbs = timeit(frame(cb_field, sparse=True), repeats=reps)
    # the same answer from the dense and the sparse pass
    a = cb_field.query(dense_field_render(cb_field, cam.viewmat, K, W, H), text)
    b = cb_field.query(cb_field.render(cam.viewmat, K, W, H), text)
    agree = float((a.relevancy - b.relevancy).abs().max())
    rows = [{"case": "rgb + depth frame", "ms": 1e3 * t_rgb, "x_rgb": 1.0},
            {"case": "relevancy, autoencoder (3 levels x 3)", "ms": 1e3 * t_ae, "x_rgb": t_ae / t_rgb},
            {"case": f"relevancy, codebook dense (3 x L={L})", "ms": 1e3 * t_cbd, "x_rgb": t_cbd / t_rgb},
            {"case": f"relevancy, codebook sparse (3 x k={k})", "ms": 1e3 * t_cbs, "x_rgb": t_cbs / t_rgb}]
    print(f"\n1. relevancy frame: {N:,} Gaussians, {W}x{H}, CPU ({torch.get_num_threads()} torch threads); "
          f"sparse vs dense query result max difference {agree:.2e}")
    print_table(rows, ["case", "ms", "x_rgb"])
    rows_out["latency"] = {"rows": rows, "codebook_over_autoencoder": t_cbs / t_ae, "sparse_dense_heatmap_diff": agree}

    # 2. sparse vs dense render of the same coefficients
    cams = Cameras.of(cam.viewmat, K, W, H)
    gl = cb_field.gaussians
    idx, w = sparse_topk(gl.lang, L, k)

    def dense_fwd():
        with torch.no_grad():
            render(gl, cams, colors=False, language=True)

    def sparse_fwd():
        with torch.no_grad():
            render_sparse(gl, cams, idx, w, gl.lang_dim)

    lang_p = gl.lang.detach().clone().requires_grad_(True)
    w_p = w.detach().clone().requires_grad_(True)
    gd = gl.clone().set_lang(lang_p.detach(), requires_grad=True)

    def dense_fb():
        out = render(gd, cams, colors=False, language=True)
        out.lang.sum().backward()
        gd.splats["lang"].grad = None

    def sparse_fb():
        out = render_sparse(gl, cams, idx, w_p, gl.lang_dim)
        out.lang.sum().backward()
        w_p.grad = None

    # one warm-up and one to three timed runs: the dense backward of 3 x 64 channels over 100k Gaussians
    # at 640x480 takes many seconds on a CPU
    t = {name: timeit(fn, repeats=1 if args.quick else 3) for name, fn in
         (("dense_fwd", dense_fwd), ("sparse_fwd", sparse_fwd), ("dense_fwd_bwd", dense_fb),
          ("sparse_fwd_bwd", sparse_fb))}
    rows2 = [{"pass": "forward", "dense_ms": 1e3 * t["dense_fwd"], "sparse_ms": 1e3 * t["sparse_fwd"],
              "speedup": t["dense_fwd"] / t["sparse_fwd"]},
             {"pass": "forward + backward", "dense_ms": 1e3 * t["dense_fwd_bwd"], "sparse_ms": 1e3 * t["sparse_fwd_bwd"],
              "speedup": t["dense_fwd_bwd"] / t["sparse_fwd_bwd"]}]
    print(f"\n2. language channels only: dense {nl * L} channels vs sparse {nl * k} pairs per Gaussian")
    print_table(rows2, ["pass", "dense_ms", "sparse_ms", "speedup"])
    rows_out["render"] = {"rows": rows2, "channels": nl * L, "pairs": nl * k}


def quality(args, rows_out):
    import langfield.train.language as LL
    from langfield.scenes import make_scene
    from langfield.train.rgb import train_rgb

    tmp = Path(tempfile.mkdtemp(prefix="lf_bench_codebook_"))
    rows = []
    try:
        data, base = tmp / "data", tmp / "rgb"
        t0 = time.perf_counter()
        make_scene("tabletop", data, views=args.views, size=args.train_size, progress=False, workers=1)
        train_rgb(data, base, steps=args.rgb_steps, device="cpu", progress=False, evaluate=False)
        print(f"\n3. tabletop {args.train_size}, {args.views} views, RGB {args.rgb_steps} steps in "
              f"{time.perf_counter() - t0:.0f} s; language stage {args.lang_steps} steps per codec")
        cb = dict(ae_steps=30)  # the language stage's codebook defaults (L=64, lr 0.01) unless given
        if args.train_codebook_size is not None:
            cb["latent_dim"] = args.train_codebook_size
        if args.codebook_lr is not None:
            cb["lr"] = args.codebook_lr
        for codec, opts in (("autoencoder", dict(latent_dim=3, ae_steps=args.ae_steps)), ("codebook", cb)):
            run = tmp / codec
            shutil.copytree(base, run)
            t1 = time.perf_counter()
            res = LL.train_language(run, features="labels", codec=codec, steps=args.lang_steps,
                                    text_encoder="offline", device="cpu", progress=False, log=lambda *_: None,
                                    **opts)
            m = res["metrics"]
            p = m[m["primary"]]
            rows.append({"codec": codec, "latent": LL.stored_language_config(run).latent_dim, "mIoU": p["miou"],
                         "loc": p["loc"],
                         "mIoU_3d": p["miou_3d"], "queries": p["n"], "train_s": res["train_time_s"],
                         "stage_s": time.perf_counter() - t1})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, ["codec", "latent", "mIoU", "loc", "mIoU_3d", "queries", "train_s", "stage_s"])
    rows_out["quality"] = {"rows": rows, "size": args.train_size, "views": args.views, "rgb_steps": args.rgb_steps,
                           "lang_steps": args.lang_steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller training (smoke)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-quality part")
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--codebook-size", type=int, default=64)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--train-size", default="96x96")
    ap.add_argument("--train-codebook-size", type=int, default=None, help="codebook size of the training run "
                    "(default: the language stage's, 64)")
    ap.add_argument("--codebook-lr", type=float, default=None, help="language lr of the codebook run (default: the "
                    "stage's, 0.01)")
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--rgb-steps", type=int, default=300)
    ap.add_argument("--lang-steps", type=int, default=1000)
    ap.add_argument("--ae-steps", type=int, default=800)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "codebook.json")
    args = ap.parse_args()
    if args.quick:
        args.gaussians = min(args.gaussians, 20_000)
        args.rgb_steps, args.lang_steps, args.ae_steps = 100, 200, 200
    res = {"machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    latency(args, res)
    if not args.no_train:
        quality(args, res)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
