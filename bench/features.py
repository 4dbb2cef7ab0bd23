"""Benchmark: feature extractors, images/s on this machine (CPU unless --device cuda).

    python bench/features.py                       # ViT-B-16 + SAM vit_b, 640x480, a few images
    python bench/features.py --quick               # fewer points / images (about a minute)
    python bench/features.py --out bench/results/features.json

Weights are randomly initialised (open_clip ``pretrained=None``, SAM ``checkpoint=None``):
the same architecture costs the same time as the real weights, and this machine has none.
Random SAM weights do not produce realistic masks, so sam-clip is timed in stages — SAM
image encoder, mask decoding of the point grid (two batches of prompts, scaled to the grid),
mask NMS, CLIP on the region crops — and the per-image time is composed for a realistic
region count (``--regions`` per level; LangSplat scenes give roughly 30-150). The tests run
sam-clip end to end.
Mask NMS is raced against the O(M^2) pairwise Python loop LangSplat uses (same machine, same
masks). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, print_table, timeit, write_json  # noqa: E402


def pairwise_nms_loop(masks, scores, iou_thr=0.8):
    """The O(M^2) pairwise loop (one tensor op per mask pair), as LangSplat computes its IoU
    matrix; the greedy step after it is negligible."""
    M = masks.shape[0]
    order = torch.argsort(scores, descending=True)
    m = masks[order]
    iou = torch.zeros(M, M)
    for i in range(M):
        for j in range(i, M):
            inter = torch.logical_and(m[i], m[j]).sum().float()
            union = torch.logical_or(m[i], m[j]).sum().float()
            iou[i, j] = inter / union
    return iou


def random_masks(M, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(M, H, W, dtype=torch.bool)
    for k in range(M):
        h, w = torch.randint(H // 10, H // 2, (2,), generator=g).tolist()
        y, x = torch.randint(0, H - h, (1,), generator=g).item(), torch.randint(0, W - w, (1,), generator=g).item()
        masks[k, y:y + h, x:x + w] = True
    return masks, torch.rand(M, generator=g)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/features.json")
    ap.add_argument("--quick", action="store_true", help="fewer points and images")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--clip", default="ViT-B-16")
    ap.add_argument("--sam", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--points", type=int, default=32, help="sam-clip points per side")
    ap.add_argument("--regions", type=int, default=100, help="regions per level for the composed sam-clip time")
    ap.add_argument("--nms-masks", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.points, args.regions, args.nms_masks = 2, 16, 50, 80
    W, H = (int(v) for v in args.size.lower().split("x"))
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    from langfield.features import FrameInfo, mask_nms
    from langfield.features.dense_clip import DenseClipExtractor
    from langfield.features.labels import LabelsExtractor
    from langfield.features.models import load_clip, load_sam
    from langfield.features.sam_clip import SamClipExtractor, SamClipParams, crop_regions
    from langfield.features.text import OfflineTextEncoder

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(H, W, 3, generator=g) for _ in range(args.images)]
    rows, extra = [], {}

    t0 = time.perf_counter()
    clip = load_clip(args.clip, device=dev, random_init=True)
    extra["clip_load_s"] = round(time.perf_counter() - t0, 2)

    # ---- dense-clip
    dense = DenseClipExtractor(clip)
    dense.extract(images[0])  # warm-up
    t = timeit(lambda: dense.extract_batch(images, [None] * len(images)), repeats=1, warmup=0, sync=sync)
    fm = dense.extract(images[0])
    rows.append({"extractor": "dense-clip", "what": f"{args.clip}, short side 448, {fm.meta['windows']} windows/img",
                 "s_per_img": t / len(images), "img_per_s": len(images) / t,
                 "out": "x".join(map(str, fm.levels["dense"].features.shape))})

    # ---- sam-clip stages
    t0 = time.perf_counter()
    sam = load_sam(args.sam, None, device=dev, random_init=True)
    extra["sam_load_s"] = round(time.perf_counter() - t0, 2)
    params = SamClipParams(points_per_side=args.points, pred_iou_thresh=-1e9, stability_score_thresh=-1.0,
                           nms_score_thresh=-1e9)
    ex = SamClipExtractor(sam, clip, params)
    img8 = (images[0] * 255).to(torch.uint8).numpy()
    t_enc = timeit(lambda: ex.predictor.set_image(img8), repeats=1, warmup=0, sync=sync)
    grid = ex.logits_grid(H, W)
    pts = torch.rand(params.points_per_batch, 2, generator=g) * ex.sam.image_encoder.img_size
    n_b = 2
    t_batch = timeit(lambda: ex.decode_points(pts.to(dev), grid), repeats=n_b, warmup=0, sync=sync)
    t_decode = t_batch * args.points ** 2 / params.points_per_batch
    n_crops = 32
    crops = torch.rand(n_crops, 3, *clip.image_size, generator=g)
    t_clip = timeit(lambda: clip.encode_image(crops, batch_size=32), repeats=1, warmup=0, sync=sync) / n_crops
    rmasks, rscores = random_masks(args.regions, H, W)
    t_crop = timeit(lambda: crop_regions(images[0].permute(2, 0, 1), rmasks, clip.image_size), repeats=2) / args.regions
    t_nms_level = timeit(lambda: mask_nms(rmasks.to(dev), rscores.to(dev), 0.8, 0.0, 0.85), repeats=2, sync=sync)
    composed = t_enc + t_decode + 3 * t_nms_level + 3 * args.regions * (t_clip + t_crop)
    rows.append({"extractor": "sam-clip (composed)",
                 "what": f"SAM {args.sam} + {args.clip}, {args.points}^2 points, {args.regions} regions x 3 levels",
                 "s_per_img": composed, "img_per_s": 1 / composed, "out": f"{3 * args.regions} regions"})
    extra["sam_clip_stages_s"] = {"sam_image_encoder": round(t_enc, 3),
                                  f"mask_decoding_{args.points}x{args.points}_points": round(t_decode, 3),
                                  "mask_nms_per_level": round(t_nms_level, 4),
                                  "clip_per_crop": round(t_clip, 4), "crop_per_region": round(t_crop, 5)}

    # ---- mask NMS: vectorised vs the pairwise loop
    M = args.nms_masks
    nm, ns = random_masks(M, H, W, seed=1)
    t_vec = timeit(lambda: mask_nms(nm.to(dev), ns.to(dev), 0.8, 0.0, 0.85), repeats=3, sync=sync)
    m_loop = min(M, 60)
    t_loop = timeit(lambda: pairwise_nms_loop(nm[:m_loop], ns[:m_loop]), repeats=1, warmup=0)
    t_loop_full = t_loop * (M * (M + 1) / 2) / (m_loop * (m_loop + 1) / 2)
    extra["nms"] = {"masks": M, "size": [H, W], "vectorised_s": round(t_vec, 4),
                    "pairwise_loop_s": round(t_loop_full, 3), "pairwise_loop_measured_on": m_loop,
                    "speedup": round(t_loop_full / t_vec, 1)}

    # ---- labels (ground-truth label maps of a procedural scene)
    from langfield.data import load_dataset
    from langfield.features import extract_dataset
    from langfield.scenes import make_scene

    tmp = Path(tempfile.mkdtemp(prefix="lf_bench_feat_"))
    try:
        n_lab = max(2, args.images)
        make_scene("tabletop", tmp / "scene", views=n_lab, size=(W, H), aa=1, workers=1)
        ds = load_dataset(tmp / "scene")
        lab = LabelsExtractor(OfflineTextEncoder(512))
        lab.extract(None, FrameInfo.from_dataset(ds, 0))
        t0 = time.perf_counter()
        extract_dataset(ds, lab, tmp / "features", progress=False, log=lambda *a: None)
        t = time.perf_counter() - t0
        rows.append({"extractor": "labels", "what": "offline text encoder, incl. cache writes", "s_per_img": t / len(ds),
                     "img_per_s": len(ds) / t, "out": "3 levels"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.size}, device {dev}, torch threads {torch.get_num_threads()} (random weights)")
    print_table(rows, ["extractor", "what", "s_per_img", "img_per_s", "out"])
    print(f"\nsam-clip stages: {extra['sam_clip_stages_s']}")
    print(f"mask NMS, {M} masks at {W}x{H}: vectorised {extra['nms']['vectorised_s']} s, pairwise loop "
          f"{extra['nms']['pairwise_loop_s']} s (extrapolated from {m_loop} masks): {extra['nms']['speedup']}x")
    write_json(Path(args.out), {"machine": machine(), "args": vars(args), "results": rows, **extra})


if __name__ == "__main__":
    main()
