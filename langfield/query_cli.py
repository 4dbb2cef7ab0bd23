"""``langfield query RUN "text" ...``: text queries on a trained language field from the shell."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Literal, Optional

from typing_extensions import Annotated

import tyro

__all__ = ["cli_query", "query_stem"]

RunArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="RUN")]]
TextArg = tyro.conf.Positional[Annotated[List[str], tyro.conf.arg(metavar="TEXT")]]


class QueryExit(SystemExit):
    """A one-line usage or input error: printed to stderr, exit status 2."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def _fail(msg: str) -> SystemExit:
    msg = f"langfield query: {msg}"
    print(msg, file=sys.stderr)
    return QueryExit(msg)


def query_stem(text: str) -> str:
    """A file stem for the outputs of ``text``: a slug of the text (at most 40 characters)
    plus 8 hex digits of a hash of the exact text, so that different texts (``query`` and
    ``?``, texts differing in case or punctuation, texts sharing a long prefix) never share
    files and any text gives a short, safe name."""
    from langfield.scenes.writers import slug

    return f"{slug(text)[:40].rstrip('_') or 'query'}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _check_unit(name: str, v: float) -> None:
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise _fail(f"{name} {v}: must be a number in [0, 1]")


def _check_folder(opt: str, path: Path, shown: Optional[Path] = None) -> None:
    """``path`` is, or can be made, a folder (no file in the way); one-line error naming
    ``opt`` and ``shown`` (default ``path``) otherwise."""
    shown = path if shown is None else shown
    for q in [path, *path.parents]:
        if q.exists():
            if not q.is_dir():
                raise _fail(f"{opt} {shown}: {q} is a file, not a folder" if q != shown else
                            f"{opt} {shown}: is a file; expected a folder")
            return


def cli_query(
    run: RunArg,
    text: TextArg,
    view: Optional[str] = None,
    out: Optional[Path] = None,
    level: str = "auto",
    threshold: float = 0.4,
    select_3d: bool = False,
    select_threshold: float = 0.4,
    ply: Optional[Path] = None,
    overwrite: bool = False,
    data: Optional[Path] = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    time: Optional[float] = None,
    over_time: bool = False,
    hold_threshold: float = 0.55,
) -> int:
    """Query a language field with text: heatmap over the RGB render, mask and JSON per query
    (LERF relevancy, level chosen by the highest relevancy); optionally select the matching
    Gaussians in 3D.

    Args:
        run: the run folder (or a PLY with lang_* properties and an autoencoder next to it).
        text: one or more queries, e.g. "red mug" "handle of the blue mug".
        view: a camera: its index or name (default: the first held-out view).
        out: output folder (default RUN/queries/<view>; for a PLY, <stem>_queries/<view> beside it).
        level: auto (highest relevancy), or a level name (subpart, part, whole) or index.
        threshold: mask threshold on the normalised relevancy, in [0, 1] (LangSplat: 0.4).
        select_3d: also select the Gaussians matching each query (relevancy > --select-threshold) and render
            their footprint.
        select_threshold: threshold on the Gaussians' relevancy normalised like the 2D maps, in [0, 1].
        ply: with one query: write the scene as a 3DGS PLY with the selected Gaussians painted red.
        overwrite: replace an existing --ply file.
        data: a dataset folder whose held-out cameras to render from (a PLY has no cameras of its own; for a
            run folder, instead of the dataset the run recorded). Without it a PLY is seen from 6 views on a
            circle above the scene.
        device: auto, cpu or cuda.
        time: dynamic runs: the time in [0, 1] to render and query at (default: the view's own time).
        over_time: dynamic runs: query the view at every frame time of the run's dataset: a relevancy-over-time
            curve (PNG + JSON), the times where the query holds (best smoothed relevancy >= --hold-threshold) and
            a mask per time.
        hold_threshold: over time: the relevancy at which a query holds at a time, in [0, 1].
    """
    from langfield.field import FieldError, LanguageField, NoLanguageError
    from langfield.query import heatmap_overlay, recolor, save_png

    # ------------------------------------------------------------------ options, before any work
    texts = [t for t in text if t.strip()]
    if not texts:
        raise _fail("an empty query: pass some text, e.g. langfield query RUN \"red mug\"")
    _check_unit("--threshold", threshold)
    _check_unit("--select-threshold", select_threshold)
    _check_unit("--hold-threshold", hold_threshold)
    if time is not None:
        _check_unit("--time", time)
    if over_time and time is not None:
        raise _fail("--time and --over-time exclude each other")
    if over_time and ply is not None:
        raise _fail("--ply takes one time; use --time with it, not --over-time")
    if ply is not None:
        ply = Path(ply)
        if len(texts) != 1:
            raise _fail("--ply takes exactly one query")
        if ply.is_dir():
            raise _fail(f"--ply {ply}: is a folder; expected a .ply file name")
        if ply.exists() and not overwrite:
            raise _fail(f"--ply {ply} exists; pass --overwrite to replace it")
        _check_folder("--ply", ply.parent, ply)
    if out is not None:
        _check_folder("--out", Path(out))
    if data is not None and not Path(data).is_dir():
        raise _fail(f"--data {data}: not a dataset folder" + ("" if Path(data).exists() else " (not found)"))
    run = Path(run)
    is_ply = run.is_file() and run.suffix.lower() == ".ply"

    # ------------------------------------------------------------------ the field and its cameras
    try:
        field = LanguageField.load(run, device=device, need_cameras=data is None)
        li = field.level_index(level) if field.has_language else None
    except (FieldError, ValueError, OSError) as e:
        raise _fail(str(e)) from None
    if not field.has_language:
        raise _fail(f"{run} has no language field; train one with "
                    f"`langfield train DATA --out {run} --features labels|sam-clip|dense-clip`")
    dynamic = hasattr(field.gaussians, "deform")
    if (time is not None or over_time) and not dynamic:
        raise _fail(f"{'--time' if time is not None else '--over-time'}: {run} is not a dynamic run (its scene does "
                    f"not change over time)")
    cams = _cameras(field, run, is_ply, data)
    if view is None:
        cam = next((c for c in cams if c.split == "test"), cams[0])
    elif view.isdigit():
        k = int(view)
        if not 0 <= k < len(cams):
            raise _fail(f"--view {k}: there are views 0..{len(cams) - 1}")
        cam = cams[k]
    else:
        cam = next((c for c in cams if c.name == view or Path(c.name).stem == Path(view).stem), None)
        if cam is None:
            raise _fail(f"--view {view!r}: no such camera (e.g. {cams[0].name!r}, or an index)")
    if out is not None:
        dest = Path(out)
    elif is_ply:
        dest = run.parent / f"{run.stem}_queries" / Path(cam.name).stem
    else:
        dest = run / "queries" / Path(cam.name).stem
    _check_folder("--out" if out is not None else "output folder", dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fail(f"cannot create the output folder {dest}: {e.strerror or e}") from None

    if over_time:
        return _query_over_time(field, cams, cam, texts, dest, li, threshold, hold_threshold, run, data)
    # ------------------------------------------------------------------ render, query, write
    t_used = cam.time if time is None else float(time)
    if dynamic and t_used is not None:
        field.gaussians.set_time(t_used)  # 3D selection with time-sensitive latents follows the time
    try:  # one pass (a codebook field's fused kernel; render + query for the others)
        r, results = field.render_query(cam.viewmat, cam.K, cam.width, cam.height, texts,
                                        level="auto" if li is None else li, threshold=threshold, t=t_used)
    except (NoLanguageError, ValueError) as e:
        raise _fail(str(e)) from None
    from langfield.io.checkpoint import atomic_write_json

    # states of an object ("open box" / "closed box"): at one time they hold, or not, by the relative
    # rule of --over-time and `langfield eval` (the state level against the object's other states);
    # the mask is empty where the state does not hold (the state level alone would light up the object
    # in either state, since the texts share words)
    states, comp, state_level = {}, {}, None
    if dynamic:
        from langfield.dynamic.language import STATE_LEVEL as state_level, state_holds

        if li is None or field.levels[li] == state_level:
            comp = _state_texts(field, run, data, texts)
        if comp:
            states = {h["text"]: h for h in state_holds(field, r, list(comp), comp)}
    try:
        save_png(dest / "rgb.png", r.rgb)
        report = {"run": str(run), "view": cam.name, "view_index": cam.index, "step": field.step, "queries": []}
        if dynamic:
            report["time"] = t_used
        for t, res in zip(texts, results):
            s = query_stem(t)
            h = states.get(t)
            mask = res.mask if h is None else h["mask"] if h["holds"] else h["mask"] & False
            save_png(dest / f"{s}_heatmap.png", heatmap_overlay(r.rgb, res.heatmap))
            save_png(dest / f"{s}_mask.png", mask.float()[..., None].expand(-1, -1, 3))
            e = {"text": t, "level": str(res.level) if h is None else state_level, "point": list(res.point),
                 "level_scores": {str(k): float(v) for k, v in zip(res.levels, res.scores)},
                 "mask_pixels": int(mask.sum()), "heatmap": f"{s}_heatmap.png", "mask": f"{s}_mask.png"}
            if h is not None:
                e.update(holds=bool(h["holds"]), state_score=float(h["score"]),
                         rule={"kind": "relative", "competitors": comp[t]})
            if select_3d or ply is not None:
                sel = field.select(t, level="auto" if li is None else li, threshold=select_threshold)
                foot = field.render_selection(sel.mask, cam.viewmat, cam.K, cam.width, cam.height, t=t_used)
                save_png(dest / f"{s}_select3d.png", heatmap_overlay(r.rgb, foot, mask=foot > 0.5))
                e.update(selected_gaussians=int(sel.mask.sum()), select_level=None if sel.level is None else
                         field.levels[sel.level], select3d=f"{s}_select3d.png")
                if ply is not None:
                    from langfield.io import write_ply

                    g = field.gaussians.clone()
                    g.splats["sh0"].data = recolor(g.splats["sh0"].data, sel.mask.to(g.device), sh0=True)
                    g.set_lang(None)
                    ply.parent.mkdir(parents=True, exist_ok=True)
                    write_ply(ply, g)
                    e["ply"] = str(ply)
            report["queries"].append(e)
            msg = f"{_short(t)!r}: level {e['level']}, point (x={res.point[0]}, y={res.point[1]}), " \
                  f"mask {e['mask_pixels']} px" + ("" if h is None else f", {'holds' if h['holds'] else 'does not hold'}")
            if "selected_gaussians" in e:
                msg += f", {e['selected_gaussians']} of {field.num} Gaussians selected"
            print(msg)
        atomic_write_json(dest / "query.json", report)
    except OSError as e:
        raise _fail(f"cannot write {getattr(e, 'filename', None) or dest}: {e.strerror or e}") from None
    print(f"view {cam.name}" + (f" at t={t_used:.3f}" if dynamic and t_used is not None else "")
          + f" -> {dest} (heatmaps, masks, query.json)")
    return 0


def _state_texts(field, run: Path, data, texts) -> Dict[str, List[str]]:
    """The texts that are states of an object in the run's dataset (``queries.json``
    ``time_sensitive`` or ``labels.json`` objects' ``states``), with their competitors (the
    other states of the same object); empty when the field has no state level."""
    from langfield.dynamic.language import STATE_LEVEL, state_groups

    if STATE_LEVEL not in field.levels:
        return {}
    root = Path(data) if data is not None else None
    if root is None and run.is_dir():
        try:
            root = Path(json.loads((run / "config.json").read_text("utf-8")).get("data") or "")
        except (OSError, ValueError, AttributeError):
            root = None
    if root is None or not root.is_dir():
        return {}
    try:
        qp = root / "queries.json"
        qdoc = json.loads(qp.read_text("utf-8")) if qp.is_file() else None
    except (OSError, ValueError):
        qdoc = None
    qdoc = qdoc if isinstance(qdoc, dict) else None
    groups = state_groups(root, qdoc)
    st = [t for t in texts if t in groups]
    return {t: g if (g := groups[t]) is not None else [c for c in st if c != t] for t in st}


def _query_over_time(field, cams, cam, texts, dest: Path, li, threshold: float, hold: float, run: Path,
                     data=None) -> int:
    """``--over-time``: the view ``cam`` at every frame time of the run (see cli_query). Texts
    that are states of an object in the run's dataset (time-sensitive queries: "open box" /
    "closed box") hold by the relative rule of ``langfield eval`` (the state level's relevancy
    beats the object's other states by 0.1 on at least 0.1 % of the image, and the states of one
    object exclude each other: the one with the largest margin holds; the curve is that margin);
    other texts hold where their best smoothed relevancy reaches ``--hold-threshold``."""
    from langfield.dynamic.language import EXCLUSIVE, HOLD_FRACTION, HOLD_MARGIN, state_holds
    from langfield.io.checkpoint import atomic_write_json
    from langfield.query import save_png

    times = sorted({float(c.time) for c in cams if c.time is not None})
    if not times:
        times = [k / 23 for k in range(24)]
    comp = _state_texts(field, run, data, texts)
    plain = [t for t in texts if t not in comp]
    curves = {t: [] for t in texts}
    try:
        for k, tt in enumerate(times):
            r = field.render(cam.viewmat, cam.K, cam.width, cam.height, t=tt)
            rows = []
            if plain:
                for t, res in zip(plain, field.query(r, plain, level="auto" if li is None else li,
                                                      threshold=threshold)):
                    score = float(res.scores[res.level_index])
                    holds = score >= hold
                    rows.append((t, score, str(res.level), holds, res.mask if holds else res.mask & False))
            if comp:
                from langfield.dynamic.language import STATE_LEVEL

                for h in state_holds(field, r, list(comp), comp):
                    rows.append((h["text"], h["score"], STATE_LEVEL, bool(h["holds"]),
                                 h["mask"] if h["holds"] else h["mask"] & False))
            for t, score, lev, holds, m in rows:
                name = f"{query_stem(t)}_t{k:03d}_mask.png"
                save_png(dest / name, m.float()[..., None].expand(-1, -1, 3))
                curves[t].append({"time": tt, "score": score, "level": lev, "holds": holds,
                                  "mask_pixels": int(m.sum()), "mask": name})
        report = {"run": str(run), "view": cam.name, "step": field.step, "hold_threshold": hold, "times": times,
                  "queries": []}
        for t in texts:
            s = query_stem(t)
            _curve_png(dest / f"{s}_over_time.png", [c["time"] for c in curves[t]], [c["score"] for c in curves[t]],
                       HOLD_MARGIN if t in comp else hold)
            held = [c["time"] for c in curves[t] if c["holds"]]
            report["queries"].append({"text": t, "curve": curves[t], "holds_at": held, "intervals": _intervals(
                [c["holds"] for c in curves[t]], times), "plot": f"{s}_over_time.png",
                "rule": {"kind": "relative", "competitors": comp[t], "margin": HOLD_MARGIN, "min_fraction": HOLD_FRACTION,
                         "exclusive": EXCLUSIVE}
                if t in comp else {"kind": "threshold", "hold_threshold": hold}})
            print(f"{_short(t)!r}: holds at {len(held)} of {len(times)} times"
                  + (f" ({', '.join(f'{a:.2f}-{b:.2f}' for a, b in report['queries'][-1]['intervals'])})" if held else ""))
        atomic_write_json(dest / "query_over_time.json", report)
    except OSError as e:
        raise _fail(f"cannot write {getattr(e, 'filename', None) or dest}: {e.strerror or e}") from None
    print(f"view {cam.name} over {len(times)} times -> {dest} (curves, masks, query_over_time.json)")
    return 0


def _intervals(holds, times):
    out, start = [], None
    for h, t in zip(list(holds) + [False], list(times) + [None]):
        if h and start is None:
            start = t
            last = t
        elif h:
            last = t
        elif start is not None:
            out.append([start, last])
            start = None
    return out


def _curve_png(path: Path, ts, scores, hold: float, size=(320, 160)) -> None:
    """A small line plot of relevancy over time (PIL only): the curve, the hold threshold dashed."""
    from PIL import Image, ImageDraw

    W, H = size
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    m = 16

    def xy(t, s):
        return m + (W - 2 * m) * float(t), H - m - (H - 2 * m) * min(max(float(s), 0.0), 1.0)

    d.rectangle([m, m, W - m, H - m], outline=(180, 180, 180))
    y = xy(0, hold)[1]
    for x in range(m, W - m, 8):
        d.line([x, y, x + 4, y], fill=(200, 60, 60))
    if len(ts) > 1:
        d.line([xy(t, s) for t, s in zip(ts, scores)], fill=(30, 90, 200), width=2)
    for t, s in zip(ts, scores):
        x, yy = xy(t, s)
        d.ellipse([x - 2, yy - 2, x + 2, yy + 2], fill=(30, 90, 200))
    d.text((m, 2), "relevancy over time", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    im.save(tmp, format="PNG")
    tmp.replace(path)


def _cameras(field, run: Path, is_ply: bool, data: Optional[Path]):
    """The cameras to render from: ``--data``'s held-out views (in the frame of the field:
    a PLY from ``langfield export`` is in the dataset's own frame, a run's checkpoints in the
    normalised one), the run's recorded dataset, or views around the scene."""
    from langfield.cameras import dataset_cameras, orbit_for

    if data is not None:
        opts = _dataset_options(run, is_ply)
        try:
            return dataset_cameras(data, **opts)
        except (ValueError, OSError) as e:
            raise _fail(f"--data {data}: {e}") from None
    if field.cameras:
        return field.cameras
    why = "a PLY carries no cameras" if is_ply else "the run's dataset is missing"
    print(f"note: {why}; rendering from 6 views around the scene (pass --data DATA for the dataset's views)",
          file=sys.stderr)
    try:
        return orbit_for(field.gaussians, n=6, size=(512, 512))
    except ValueError as e:
        raise _fail(f"{run}: {e}") from None


def _dataset_options(run: Path, is_ply: bool) -> dict:
    """``dataset_cameras`` options matching how the field was trained (from the run config,
    or for an exported PLY from the run its ``<stem>.json`` names): downscale, held-out
    split, and the world frame."""
    doc = {}
    cfg_path = None
    if is_ply:
        side = run.with_suffix(".json")
        try:
            r = json.loads(side.read_text("utf-8")).get("run") if side.is_file() else None
            cfg_path = Path(r) / "config.json" if r else None
        except (ValueError, UnicodeDecodeError, AttributeError, OSError):
            cfg_path = None
    else:
        cfg_path = run / "config.json"
    try:
        if cfg_path is not None and cfg_path.is_file():
            doc = json.loads(cfg_path.read_text("utf-8")).get("train") or {}
    except (ValueError, UnicodeDecodeError, AttributeError, OSError):
        doc = {}
    opts = {"normalize": False if is_ply else bool(doc.get("normalize", True))}
    try:
        opts["downscale"] = max(1, int(doc.get("downscale") or 1))
        opts["test_every"] = int(doc.get("test_every") or 8)
    except (TypeError, ValueError):
        pass
    return opts
