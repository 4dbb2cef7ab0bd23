"""Text-query evaluation of a language field: the LERF-ovs protocol, plus a 3D protocol.

Per held-out view and per query (ground truth: a mask of the pixels the query names):

* **2D** (LERF-ovs as LangSplat evaluates it): every level's latents are rendered and decoded,
  relevancy is smoothed, the level with the highest smoothed maximum is chosen
  (:func:`langfield.query.result_from_maps`); **localization** is correct when that map's
  argmax falls inside the ground-truth box (``loc``; the box is the mask's bounding box, as
  LERF's annotations are boxes) and, stricter, inside the mask itself (``loc_mask``); **IoU**
  is that of the thresholded mask (0.4 after LangSplat's normalisation).
* **3D**: the Gaussians are selected from their own decoded latents
  (:meth:`LanguageField.select`: at the level chosen in 3D, relevancy normalised over the
  Gaussians like the 2D maps and thresholded at 0.4), rendered alone
  (occluded by the others), and the footprint (alpha > 0.5) is compared with the mask:
  ``iou_3d``. This measures what a user gets from "select in 3D", which a 2D metric cannot.

Queries come from a ``queries.json`` as ``langfield scenes make`` writes it (``views[].queries[]``
with ``text``, ``level``, ``mask`` (PNG path relative to the file) and ``ids``) or from a LERF-ovs
label folder (``<frame>.json`` files with ``objects[]`` of ``category`` + ``segmentation``
polygons; the images named in ``info.name``).

Subsets: with the dataset's ``labels.json``, a query is a **name** query when its text is the
exact name of a region (``red mug``), else a **synonym** (``coffee mug``, ``fruit``). The
offline text encoder (no CLIP weights) matches names word by word and knows no synonyms, so
with it the headline numbers are the name queries'; with CLIP, all queries'.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

__all__ = ["QuerySet", "QueryView", "GroundTruthQuery", "load_queries", "evaluate_field", "evaluate_run",
           "QueriesError", "format_summary"]

PathLike = Union[str, os.PathLike]


class QueriesError(ValueError):
    """A malformed queries file (the message names the file and the field)."""


@dataclass
class GroundTruthQuery:
    text: str
    mask: np.ndarray  # [H, W] bool
    level: Optional[str] = None
    name: Optional[bool] = None  # exact region name (True), synonym (False), unknown (None)


@dataclass
class QueryView:
    name: str  # frame name / file path as in the dataset
    queries: List[GroundTruthQuery]
    absent: List[str] = field(default_factory=list)


@dataclass
class QuerySet:
    source: Path
    views: List[QueryView]


def _read_mask(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise QueriesError(f"{where}: mask file {path} not found")
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except Exception as e:  # PIL raises many kinds
        raise QueriesError(f"{where}: cannot read mask {path} ({e})") from None
    if a.ndim == 3:
        a = a[..., 0]
    return a > 127 if a.dtype == np.uint8 else a > 0


def _label_names(root: Path) -> Optional[set]:
    p = root / "labels.json"
    if not p.is_file():
        return None
    try:
        names = json.loads(p.read_text("utf-8")).get("names", {})
        return {str(v) for lv in names.values() for v in lv.values()}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def load_queries(path: PathLike) -> QuerySet:
    """Read ``queries.json`` (langfield scenes) or a LERF-ovs label folder."""
    path = Path(path)
    if path.is_dir():
        if (path / "queries.json").is_file():
            path = path / "queries.json"
        else:
            return _load_lerf(path)
    if not path.is_file():
        raise QueriesError(f"{path}: queries file not found")
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QueriesError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("views"), list):
        raise QueriesError(f"{path}: expected an object with a 'views' list")
    names = _label_names(path.parent)
    views = []
    for vi, v in enumerate(doc["views"]):
        where = f"{path}: views[{vi}]"
        if not isinstance(v, dict):
            raise QueriesError(f"{where}: expected an object")
        name = v.get("file_path") or v.get("name")
        if not isinstance(name, str):
            raise QueriesError(f"{where}: missing 'file_path' (or 'name')")
        qs = []
        for qi, q in enumerate(v.get("queries", [])):
            w = f"{where}.queries[{qi}]"
            if not isinstance(q, dict) or not isinstance(q.get("text"), str) or not q["text"].strip():
                raise QueriesError(f"{w}: missing 'text'")
            if not isinstance(q.get("mask"), str):
                raise QueriesError(f"{w}: missing 'mask' (a PNG path relative to {path.parent})")
            mask = _read_mask(path.parent / q["mask"], f"{w}.mask")
            qs.append(GroundTruthQuery(q["text"], mask, q.get("level"),
                                       None if names is None else q["text"] in names))
        views.append(QueryView(name, qs, list(v.get("absent", []))))
    return QuerySet(path, views)


def _polygon_mask(h: int, w: int, polys) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    if polys and isinstance(polys[0], (int, float)):
        polys = [polys]
    if polys and polys[0] and isinstance(polys[0][0], (int, float)) and len(polys[0]) == 2:
        polys = [polys]  # one polygon given as [[x, y], ...]
    for poly in polys:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(pts) >= 3:
            d.polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(im) > 0


def _load_lerf(folder: Path) -> QuerySet:
    """LERF-ovs labels (as LangSplat distributes them): ``<frame>.json`` with ``info``
    (``name``, ``height``, ``width``) and ``objects`` (``category``, ``segmentation``)."""
    files = sorted(p for p in folder.glob("*.json"))
    if not files:
        raise QueriesError(f"{folder}: no queries.json and no LERF-ovs <frame>.json label files")
    views = []
    for p in files:
        try:
            doc = json.loads(p.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QueriesError(f"{p}: not valid JSON ({e})") from None
        info = doc.get("info") if isinstance(doc, dict) else None
        if not isinstance(info, dict) or not isinstance(doc.get("objects"), list):
            raise QueriesError(f"{p}: expected 'info' and 'objects' (LERF-ovs label format)")
        try:
            h, w = int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError):
            raise QueriesError(f"{p}: info.height / info.width missing") from None
        masks: Dict[str, np.ndarray] = {}
        for oi, o in enumerate(doc["objects"]):
            if not isinstance(o, dict) or "category" not in o or "segmentation" not in o:
                raise QueriesError(f"{p}: objects[{oi}] needs 'category' and 'segmentation'")
            m = _polygon_mask(h, w, o["segmentation"])
            c = str(o["category"])
            masks[c] = masks[c] | m if c in masks else m
        name = str(info.get("name") or p.stem)
        views.append(QueryView(name, [GroundTruthQuery(t, m) for t, m in masks.items()]))
    return QuerySet(folder, views)


# ------------------------------------------------------------------------------------------

def match_camera(field_cams, name: str):
    stem = Path(name).stem
    for c in field_cams:
        if c.name == name:
            return c
    for c in field_cams:
        if Path(c.name).stem == stem:
            return c
    return None


def resize_mask(m: np.ndarray, h: int, w: int) -> np.ndarray:
    if m.shape == (h, w):
        return m
    from PIL import Image

    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def _box_contains(m: np.ndarray, x: int, y: int) -> bool:
    ys, xs = np.nonzero(m)
    if not len(xs):
        return False
    return bool(xs.min() <= x <= xs.max() and ys.min() <= y <= ys.max())


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"n": len(rows), "miou": _mean(r["iou"] for r in rows), "loc": _mean(float(r["loc"]) for r in rows),
            "loc_mask": _mean(float(r["loc_mask"]) for r in rows),
            "miou_3d": _mean(r.get("iou_3d") for r in rows)}


@torch.no_grad()
def evaluate_field(field, queries: QuerySet, *, threshold: float = 0.4, three_d: bool = True,
                   select_threshold: float = 0.4, min_pixels: int = 0, tiny: float = 0.001,
                   out_dir: Optional[PathLike] = None, progress: bool = False, log=print) -> Dict[str, Any]:
    """Evaluate a :class:`~langfield.field.LanguageField` on ``queries`` (see the module
    docstring). Ground-truth masks smaller than ``min_pixels`` are skipped (counted); masks
    smaller than ``tiny`` of the image (0.1 %: 65 pixels at 256x256, a stem or a bulb) are
    evaluated but summarised apart (``tiny``), not in the headline subsets.
    ``out_dir``: heatmap overlays, predicted masks and 3D footprints per view and query."""
    from langfield.query import heatmap_overlay, save_png

    if not field.can_query:
        field._require_language()
    offline = bool((field.info.get("text") or {}).get("type") == "offline") or \
        getattr(field.text_encoder, "offline", False)
    rows: List[Dict[str, Any]] = []
    skipped_small = 0
    missing_views = []
    sel_cache: Dict[str, Any] = {}
    if three_d:  # one decode pass for every distinct text
        texts = list(dict.fromkeys(q.text for v in queries.views for q in v.queries))
        sels = field.select(texts, threshold=select_threshold) if texts else []
        sel_cache = dict(zip(texts, sels))
    t0 = time.perf_counter()
    t_query = 0.0
    it = queries.views
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(it), desc="eval queries", unit="view", leave=False)
    for v in it:
        cam = match_camera(field.cameras, v.name)
        if cam is None:
            missing_views.append(v.name)
            if bar is not None:
                bar.update(1)
            continue
        r = field.render_camera(cam)
        H, W = r.size
        qs = []
        for q in v.queries:
            gt = resize_mask(q.mask, H, W)
            if gt.sum() < max(1, min_pixels):
                skipped_small += 1
                continue
            qs.append((q, gt))
        if not qs:
            if bar is not None:
                bar.update(1)
            continue
        tq = time.perf_counter()
        results = field.query(r, [q.text for q, _ in qs], threshold=threshold)
        t_query += time.perf_counter() - tq
        feet = None
        if three_d:  # every query's 3D footprint in one render pass
            masks = torch.stack([sel_cache[q.text].mask for q, _ in qs], 1)
            feet = field.render_selection(masks, cam.viewmat, cam.K, W, H).cpu().numpy() > 0.5
        for k, ((q, gt), res) in enumerate(zip(qs, results)):
            pred = res.mask.cpu().numpy()
            x, y = res.point
            row = {"view": v.name, "text": q.text, "gt_level": q.level, "level": str(res.level),
                   "name_query": q.name, "pixels": int(gt.sum()), "tiny": bool(gt.sum() < tiny * H * W),
                   "iou": _iou(pred, gt),
                   "loc": _box_contains(gt, x, y), "loc_mask": bool(gt[y, x]), "point": [int(x), int(y)],
                   "score": float(res.scores[res.level_index])}
            if three_d:
                sel = sel_cache[q.text]
                foot = feet[..., k]
                row["iou_3d"] = _iou(foot, gt)
                row["selected_gaussians"] = int(sel.mask.sum())
                row["level_3d"] = field.levels[sel.level] if sel.level is not None else None
            rows.append(row)
            if out_dir is not None:
                from langfield.scenes.writers import slug

                d = Path(out_dir) / Path(v.name).stem
                s = slug(q.text)
                save_png(d / f"{s}_heatmap.png", heatmap_overlay(r.rgb, res.heatmap))
                pm = np.concatenate([gt, pred] + ([foot] if three_d else []), axis=1)
                save_png(d / f"{s}_gt_pred{'_3d' if three_d else ''}.png",
                         torch.from_numpy(pm.astype(np.float32))[..., None].expand(-1, -1, 3))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if missing_views:
        log(f"[eval] {len(missing_views)} query views are not cameras of this scene (e.g. {missing_views[0]!r}); "
            f"skipped")
    if not rows:
        raise QueriesError(f"{queries.source}: no query could be evaluated (views matched: "
                           f"{len(queries.views) - len(missing_views)} of {len(queries.views)})")
    main = [r for r in rows if not r["tiny"]] or rows
    tiny_rows = [r for r in rows if r["tiny"]]
    names = [r for r in main if r["name_query"]]
    syn = [r for r in main if r["name_query"] is False]
    levels = sorted({str(r["gt_level"]) for r in main if r["gt_level"]})
    out: Dict[str, Any] = {
        "all": _summary(main),
        "names": _summary(names) if names else None,
        "synonyms": _summary(syn) if syn else None,
        "tiny": _summary(tiny_rows) if tiny_rows else None,
        "with_tiny": _summary(rows),
        "tiny_fraction": tiny,
        "per_level": {lv: _summary([r for r in main if r["gt_level"] == lv]) for lv in levels},
        "level_accuracy": _mean(float(r["level"] == r["gt_level"]) for r in rows if r["gt_level"]),
        "text_encoder": "offline" if offline else "clip",
        "primary": "names" if (offline and names) else "all",
        "n_views": len(queries.views) - len(missing_views), "skipped_small": skipped_small,
        "min_pixels": int(min_pixels), "threshold": threshold, "select_threshold": select_threshold,
        "seconds": time.perf_counter() - t0, "query_seconds_per_view": t_query / max(1, len({r["view"] for r in rows})),
        "queries_file": str(queries.source), "rows": rows,
    }
    if offline:
        out["note"] = ("offline text encoder (hashed names, not CLIP): synonyms cannot match; the headline numbers are "
                       "the exact-name queries'")
    return out


def format_summary(m: Dict[str, Any]) -> str:
    def f(x):
        return "  -  " if x is None else f"{x:.3f}"

    lines = [f"{'queries':<22} {'n':>4} {'mIoU':>6} {'loc':>6} {'loc(mask)':>9} {'mIoU 3D':>8}"]
    for key in ("all", "names", "synonyms", "tiny", "with_tiny"):
        s = m.get(key)
        if s:
            star = " *" if m.get("primary") == key else ""
            lines.append(f"{key + star:<22} {s['n']:>4} {f(s['miou']):>6} {f(s['loc']):>6} {f(s['loc_mask']):>9} "
                         f"{f(s['miou_3d']):>8}")
    for lv, s in m.get("per_level", {}).items():
        lines.append(f"{'  level ' + lv:<22} {s['n']:>4} {f(s['miou']):>6} {f(s['loc']):>6} {f(s['loc_mask']):>9} "
                     f"{f(s['miou_3d']):>8}")
    if m.get("note"):
        lines.append(f"* {m['note']}")
    if m.get("tiny"):
        lines.append(f"tiny: ground-truth masks under {100 * m['tiny_fraction']:.1f} % of the image (not in all / names "
                     f"/ synonyms); with_tiny: every query")
    return "\n".join(lines)


def evaluate_run(run: PathLike, queries: PathLike, *, device: str = "auto", out_dir: Optional[PathLike] = "default",
                 log=print, progress: bool = False, **kw) -> Dict[str, Any]:
    """Evaluate a run's language field on ``queries`` and store the result in
    ``RUN/metrics.json`` under ``language`` (the RGB metrics stay). Returns the metrics."""
    from langfield.field import LanguageField
    from langfield.io.checkpoint import atomic_write_json

    run = Path(run)
    field = LanguageField.load(run, device=device)
    qs = load_queries(queries)
    if out_dir == "default":
        out_dir = run / "renders" / "queries"
    m = evaluate_field(field, qs, out_dir=out_dir, progress=progress, log=log, **kw)
    m["step"] = field.step
    m["time"] = __import__("datetime").datetime.now().isoformat(timespec="seconds")
    mp = run / "metrics.json"
    doc: Dict[str, Any] = {}
    if mp.is_file():
        try:
            doc = json.loads(mp.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = {}
    doc["language"] = m
    atomic_write_json(mp, doc)
    log(format_summary(m))
    if out_dir is not None:
        log(f"[eval] heatmaps and masks -> {out_dir}; metrics -> {mp}")
    return m

