"""``langfield query RUN "text" ...``: text queries on a trained language field from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Literal, Optional

from typing_extensions import Annotated

import tyro

__all__ = ["cli_query"]

RunArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="RUN")]]
TextArg = tyro.conf.Positional[Annotated[List[str], tyro.conf.arg(metavar="TEXT")]]


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"langfield query: {msg}")


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
    device: Literal["auto", "cpu", "cuda"] = "auto",
) -> int:
    """Query a language field with text: heatmap over the RGB render, mask and JSON per query
    (LERF relevancy, level chosen by the highest relevancy); optionally select the matching
    Gaussians in 3D.

    Args:
        run: the run folder (or a PLY with lang_* properties and an autoencoder next to it).
        text: one or more queries, e.g. "red mug" "handle of the blue mug".
        view: a camera of the dataset: its index or name (default: the first held-out view).
        out: output folder (default RUN/queries/<view>).
        level: auto (highest relevancy), or a level name (subpart, part, whole) or index.
        threshold: mask threshold on the normalised relevancy (LangSplat: 0.4).
        select_3d: also select the Gaussians matching each query (relevancy > --select-threshold) and render
            their footprint.
        select_threshold: threshold on the Gaussians' relevancy normalised like the 2D maps (0.4, as the
            2D mask threshold).
        ply: with one query: write the scene as a 3DGS PLY with the selected Gaussians painted red.
        device: auto, cpu or cuda.
    """
    from langfield.field import FieldError, LanguageField, NoLanguageError
    from langfield.query import heatmap_overlay, recolor, save_png

    texts = [t for t in text if t.strip()]
    if not texts:
        raise _fail("an empty query: pass some text, e.g. langfield query RUN \"red mug\"")
    if ply is not None and len(texts) != 1:
        raise _fail("--ply takes exactly one query")
    try:
        field = LanguageField.load(run, device=device)
        li = field.level_index(level) if field.has_language else None
    except (FieldError, ValueError) as e:
        raise _fail(str(e)) from None
    if not field.has_language:
        raise _fail(f"{run} has no language field; train one with "
                    f"`langfield train DATA --out {run} --features labels|sam-clip|dense-clip`")
    if not field.cameras:
        raise _fail(f"{run}: the run's dataset is missing, so there are no cameras to render from")
    cams = field.cameras
    if view is None:
        cam = next((c for c in cams if c.split == "test"), cams[0])
    elif view.isdigit():
        k = int(view)
        if not 0 <= k < len(cams):
            raise _fail(f"--view {k}: the dataset has views 0..{len(cams) - 1}")
        cam = cams[k]
    else:
        cam = next((c for c in cams if c.name == view or Path(c.name).stem == Path(view).stem), None)
        if cam is None:
            raise _fail(f"--view {view!r}: no such camera (e.g. {cams[0].name!r}, or an index)")
    dest = Path(out) if out is not None else Path(run) / "queries" / Path(cam.name).stem
    dest.mkdir(parents=True, exist_ok=True)
    r = field.render_camera(cam)
    try:
        results = field.query(r, texts, level="auto" if li is None else li, threshold=threshold)
    except (NoLanguageError, ValueError) as e:
        raise _fail(str(e)) from None
    from langfield.scenes.writers import slug

    save_png(dest / "rgb.png", r.rgb)
    report = {"run": str(run), "view": cam.name, "view_index": cam.index, "step": field.step, "queries": []}
    for t, res in zip(texts, results):
        s = slug(t)
        save_png(dest / f"{s}_heatmap.png", heatmap_overlay(r.rgb, res.heatmap))
        save_png(dest / f"{s}_mask.png", res.mask.float()[..., None].expand(-1, -1, 3))
        e = {"text": t, "level": str(res.level), "point": list(res.point),
             "level_scores": {str(k): float(v) for k, v in zip(res.levels, res.scores)},
             "mask_pixels": int(res.mask.sum()), "heatmap": f"{s}_heatmap.png", "mask": f"{s}_mask.png"}
        if select_3d or ply is not None:
            sel = field.select(t, level="auto" if li is None else li, threshold=select_threshold)
            foot = field.render_selection(sel.mask, cam.viewmat, cam.K, cam.width, cam.height)
            save_png(dest / f"{s}_select3d.png", heatmap_overlay(r.rgb, foot, mask=foot > 0.5))
            e.update(selected_gaussians=int(sel.mask.sum()), select_level=None if sel.level is None else
                     field.levels[sel.level], select3d=f"{s}_select3d.png")
            if ply is not None:
                from langfield.io import write_ply

                g = field.gaussians.clone()
                g.splats["sh0"].data = recolor(g.splats["sh0"].data, sel.mask.to(g.device), sh0=True)
                g.set_lang(None)
                Path(ply).parent.mkdir(parents=True, exist_ok=True)
                write_ply(ply, g)
                e["ply"] = str(ply)
        report["queries"].append(e)
        msg = (f"{t!r}: level {res.level}, point (x={res.point[0]}, y={res.point[1]}), mask {e['mask_pixels']} px")
        if "selected_gaussians" in e:
            msg += f", {e['selected_gaussians']} of {field.num} Gaussians selected"
        print(msg)
    (dest / "query.json").write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    print(f"view {cam.name} -> {dest} (heatmaps, masks, query.json)")
    return 0
