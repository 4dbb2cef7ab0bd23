"""Render a scene along a camera path and write every ground-truth format.

:func:`make_scene` is what ``langfield scenes make`` runs; see scenes/README.md for the
output layout.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from langfield.scenes import cameras as cams
from langfield.scenes import writers as W
from langfield.scenes.builtin import get_scene
from langfield.scenes.model import LEVELS, Scene

KINDS = ("multiview", "rgbd", "dynamic")
#: what make_scene writes into its folder (cleared by ``overwrite=True``, nothing else is touched)
SCENE_OUTPUTS = ("images", "depth", "labels", "queries", "tum", "replica", "transforms.json", "transforms_train.json",
                 "transforms_val.json", "transforms_test.json", "labels.json", "queries.json", "queries_val.json",
                 "points3d.ply", "scene.json")


class SceneExistsError(FileExistsError):
    """The output folder already holds (part of) a scene and ``overwrite`` was not given."""


def existing_outputs(out: Union[str, Path]) -> List[str]:
    """The names of :data:`SCENE_OUTPUTS` present in ``out``."""
    out = Path(out)
    return [n for n in SCENE_OUTPUTS if os.path.lexists(out / n)]


def clear_outputs(out: Union[str, Path]) -> List[str]:
    """Remove a previous scene's files and folders (only :data:`SCENE_OUTPUTS`) from ``out``."""
    import shutil

    out = Path(out)
    gone = existing_outputs(out)
    for n in gone:
        p = out / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return gone
#: dynamic static-camera splits: "camera" (camera 0 held out at every time) or "times" (held-out
#: times of seen cameras as ``test``, camera 0 never trained as ``val``)
HOLDOUTS = ("camera", "times")
DEFAULT_FOV = {"multiview": 50.0, "rgbd": 65.0, "dynamic": 50.0}


MIN_SIZE = 8  # pixels per side: smaller images are of no use to train on (and 1x1 breaks the shadow rays)


def parse_size(size: Union[str, Sequence[int]]) -> Tuple[int, int]:
    """'256x192' (width x height) or (w, h) -> (w, h); ValueError on anything else."""
    if isinstance(size, str):
        parts = size.lower().replace("*", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bad size {size!r}: expected WIDTHxHEIGHT, e.g. 256x256")
        w, h = int(parts[0]), int(parts[1])
    else:
        w, h = (int(v) for v in size)
    if w < MIN_SIZE or h < MIN_SIZE or w > 8192 or h > 8192:
        raise ValueError(f"bad size {w}x{h}: width and height must be in {MIN_SIZE}..8192")
    return w, h


# ----------------------------------------------------------------------------- rendering
def _render_block(args):
    """Worker: render a block of views sharing one time. Returns [(index, arrays)]."""
    from langfield.scenes.raycast import TorchScene, render_view

    flat, jobs, w, h, aa = args
    sc = TorchScene(flat)
    out = []
    for idx, K, vm in jobs:
        r = render_view(sc, K, vm, w, h, aa=aa)
        out.append((idx, {
            "rgb": np.round(r["rgb"].numpy().clip(0, 1) * 255).astype(np.uint8),
            "depth": r["depth"].numpy().astype(np.float32),
            "labels": r["labels"].numpy().astype(np.int32),
        }))
    return out


def render_frames(scene: Scene, frames: List[dict], w: int, h: int, aa: int = 2, workers: int = 1,
                  progress: bool = False, block: int = 4) -> List[dict]:
    """Render every frame (dicts with viewmat, K, time); same result for any ``workers``."""
    times = sorted({float(f["time"] or 0.0) for f in frames})
    flats = {t: scene.flatten(t) for t in times}
    blocks = []
    for t in times:
        idx = [i for i, f in enumerate(frames) if float(f["time"] or 0.0) == t]
        for s in range(0, len(idx), block):
            blocks.append((flats[t], [(i, frames[i]["K"], frames[i]["viewmat"]) for i in idx[s:s + block]], w, h, aa))
    results: List[Optional[dict]] = [None] * len(frames)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(frames), desc=f"render {scene.name}", unit="view")
        except ImportError:  # pragma: no cover
            bar = None
    if workers > 1 and len(blocks) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            for res in ex.map(_render_block, blocks):
                for i, r in res:
                    results[i] = r
                if bar is not None:
                    bar.update(len(res))
    else:
        for b in blocks:
            for i, r in _render_block(b):
                results[i] = r
            if bar is not None:
                bar.update(len(b[1]))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- cameras
def plan_cameras(scene: Scene, kind: str, views: Optional[int], frames: Optional[int], w: int, h: int,
                 seed: int, fov: Optional[float], camera: str, test_every: int,
                 holdout: str = "camera") -> Tuple[np.ndarray, List[dict]]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if holdout not in HOLDOUTS:
        raise ValueError(f"unknown holdout {holdout!r}; use one of {', '.join(HOLDOUTS)}")
    for label, v in (("views", views), ("frames", frames)):
        if v is not None and v < 1:
            raise ValueError(f"--{label} must be at least 1 (got {v})")
    K = cams.intrinsics(w, h, fov or DEFAULT_FOV[kind])
    split = (lambda i: "test" if test_every > 0 and i % test_every == test_every - 1 else "train")
    out: List[dict] = []
    if kind == "multiview":
        n = views or 64
        for i, vm in enumerate(cams.hemisphere(scene.center, scene.radius, n, seed=seed)):
            out.append({"viewmat": vm, "time": None, "split": split(i)})
    elif kind == "rgbd":
        n = frames or views or 200
        if scene.room is not None:
            vms = cams.handheld(scene.room, n, seed=seed)
        else:
            cx, cy, cz = scene.center
            r = scene.radius
            vms = cams.handheld((cx - r, cy - r, cx + r, cy + r, 0.0, 3.0), n, seed=seed, margin=0.0,
                                height=cz + 0.45 * r)
        for i, vm in enumerate(vms):
            out.append({"viewmat": vm, "time": None, "split": split(i)})
    else:
        nf = frames or 24
        t0, t1 = scene.time_range
        times = [t0 + (t1 - t0) * i / max(nf - 1, 1) for i in range(nf)]
        nv = (views or 4) if camera == "static" else 1
        if holdout == "times" and (camera != "static" or nv < 3 or test_every <= 0):
            raise ValueError("holdout 'times' needs static cameras (camera 'static'), at least 3 views and "
                             "test_every > 0")
        vms, fidx = cams.dynamic_cameras(scene.center, scene.radius, nf, nv, mode=camera, seed=seed)
        for i, (vm, fi) in enumerate(zip(vms, fidx)):
            cam = i % nv if camera == "static" else None
            if camera == "static" and nv > 1 and test_every > 0 and holdout == "times":
                # held-out times of seen cameras (as 4D LangSplat evaluates on frames of the
                # training videos): at each time one of cameras 1..nv-1 in turn is held out
                # (test); camera 0 is never trained on (val: the unseen-camera numbers)
                sp = "val" if cam == 0 else ("test" if int(fi) % (nv - 1) == cam - 1 else "train")
            elif camera == "static" and nv > 1 and test_every > 0:
                sp = "test" if cam == 0 else "train"
            else:
                sp = split(i)
            out.append({"viewmat": vm, "time": times[int(fi)], "split": sp, "camera": cam})
    for i, f in enumerate(out):
        f["K"] = K
        f["name"] = f"frame_{i:05d}"
    return K, out


# ----------------------------------------------------------------------------- ground truth
def label_table(scene: Scene) -> dict:
    tables = scene.label_tables()
    states = state_table(scene)
    objects = []
    _, prim_ids = scene._labels()
    for oi, obj in enumerate(scene.objects):
        parts = {}
        for p, (_, pid, sid) in zip(obj.prims, prim_ids[oi]):
            _, part, sub = obj.labels_of(p)
            e = parts.setdefault(pid, {"id": pid, "name": part, "subparts": {}})
            e["subparts"][sid] = sub
        objects.append({
            "id": oi + 1, "name": obj.name, "queries": [obj.name, *obj.queries], "queryable": obj.queryable,
            "parts": [{"id": e["id"], "name": e["name"], "subparts": [{"id": k, "name": v} for k, v in e["subparts"].items()]}
                      for e in parts.values()],
            "states": [s.name for s in obj.states],
            "schedule": [[float(t), s] for t, s in obj.schedule],
            "moving": bool(obj.keyframes),
        })
        if obj.states:  # objects without states keep the old record (other scenes' bytes unchanged)
            objects[-1]["state_queries"] = [{"text": k, **{f: v[f] for f in ("level", "ids", "intervals")}}
                                            for k, v in states.items() if v["object"] == obj.name]
    return {"levels": list(LEVELS), "background": 0,
            "names": {lv: {str(k): v for k, v in tables[lv].items()} for lv in LEVELS}, "objects": objects}


def state_intervals(obj, time_range=(0.0, 1.0)) -> dict:
    """State name -> ``[[t0, t1], ...]``: the half-open time intervals ``[t0, t1)`` (the last one
    closed at the end of ``time_range``) where ``obj`` is in that state."""
    lo, hi = float(time_range[0]), float(time_range[1])
    sched = sorted(((float(t), n) for t, n in obj.schedule), key=lambda x: x[0])
    out = {st.name: [] for st in obj.states}
    if not sched:
        return out
    starts = [lo] + [t for t, _ in sched[1:]]
    ends = [t for t, _ in sched[1:]] + [hi]
    for (_, name), a, b in zip(sched, starts, ends):
        a, b = max(a, lo), min(b, hi)
        if b <= a:
            continue
        iv = out.setdefault(name, [])
        if iv and abs(iv[-1][1] - a) < 1e-12:
            iv[-1][1] = b
        else:
            iv.append([a, b])
    return out


def state_table(scene: Scene) -> dict:
    """The time-sensitive queries of ``scene``: text -> ``{"object", "level", "ids",
    "intervals", "competitors"}`` (``level``/``ids``: what the query's mask selects while the
    state holds; ``intervals``: where it holds, see :func:`state_intervals`; ``competitors``:
    the other states of the same object, against which a prediction is judged)."""
    out = {}
    for obj in scene.objects:
        if not obj.states:
            continue
        iv = state_intervals(obj, scene.time_range)
        for st in obj.states:
            level, ids = "whole", []
            for a, b in iv.get(st.name, []):
                per_level = scene.state_queries(0.5 * (a + b)).get(st.name, {})
                level = next((lv for lv in LEVELS if lv in per_level), level)
                ids = sorted(per_level.get(level, []))
                break
            out[st.name] = {"object": obj.name, "level": level, "ids": ids, "intervals": iv.get(st.name, []),
                            "competitors": [o.name for o in obj.states if o.name != st.name]}
    return out


def query_masks(scene: Scene, labels: np.ndarray, t: Optional[float]):
    """For one rendered view: [(text, level, ids, mask, time_sensitive)] (mask may be empty)."""
    vocab = scene.vocabulary()
    states = scene.state_queries(t if t is not None else 0.0) if any(o.states for o in scene.objects) else {}
    out = []
    for text, per_level, sensitive in [(k, v, False) for k, v in vocab.items()] + [(k, v, True) for k, v in states.items()]:
        level = next((lv for lv in LEVELS if lv in per_level), None)
        if level is None:
            ids: List[int] = []
            mask = np.zeros(labels.shape[1:], dtype=bool)
            level = "whole"
        else:
            ids = sorted(per_level[level])
            mask = np.isin(labels[LEVELS.index(level)], ids)
        out.append((text, level, ids, mask, sensitive))
    return out


def _travelling_ids(scene: Scene) -> List[int]:
    """``whole`` label ids of the objects whose keyframes move them (not only turn them)."""
    out = []
    for oi, obj in enumerate(scene.objects):
        pos = np.array([k.pos for k in obj.keyframes], dtype=np.float64).reshape(-1, 3)
        if len(pos) > 1 and float(np.ptp(pos, axis=0).max()) > 1e-6:
            out.append(oi + 1)
    return out


def _unproject(frame: dict, result: dict, vs: np.ndarray, us: np.ndarray):
    """World points and colours of the pixels (vs, us) of one rendered frame (depth > 0 there)."""
    z = result["depth"][vs, us].astype(np.float64)
    K = np.asarray(frame["K"])
    x = ((us + 0.5) - K[0, 2]) / K[0, 0] * z
    y = ((vs + 0.5) - K[1, 2]) / K[1, 1] * z
    pc = np.stack([x, y, z, np.ones_like(x)], -1)
    return (pc @ np.linalg.inv(frame["viewmat"]).T)[:, :3], result["rgb"][vs, us]


def _at_most(xyz: list, rgb: list, n: int, seed: int):
    """The concatenated points, a sorted random subset of ``n`` where there are more."""
    xyz = np.concatenate(xyz) if xyz else np.zeros((0, 3))
    rgb = np.concatenate(rgb) if rgb else np.zeros((0, 3), np.uint8)
    if len(xyz) > n:
        keep = np.sort(np.random.default_rng(seed).choice(len(xyz), n, replace=False))
        xyz, rgb = xyz[keep], rgb[keep]
    return xyz, rgb


def _moving_points(frames, results, ids: Sequence[int], budget: int, seed: int):
    """Extra initial points on the objects ``ids`` (``whole`` labels): every such pixel of the
    training frames (at their times, so along each object's path), at most ``budget``. A
    deformable model needs Gaussians where a small object drives far: from the uniform sample
    alone the toy car got 71 of 20k points."""
    xyz, rgb = [], []
    wi = LEVELS.index("whole")
    for i, f in enumerate(frames):
        if f["split"] != "train":
            continue
        lab = np.asarray(results[i]["labels"][wi])
        vs, us = np.nonzero(np.isin(lab, list(ids)) & (results[i]["depth"] > 0))
        if len(vs):
            p, c = _unproject(f, results[i], vs, us)
            xyz.append(p)
            rgb.append(c)
    return _at_most(xyz, rgb, budget, seed + 1)


def _points(frames, results, max_points: int, seed: int):
    xyz, rgb = [], []
    train = [i for i, f in enumerate(frames) if f["split"] == "train"] or list(range(len(frames)))
    per = max(1, max_points * 4 // max(len(train), 1))
    for i in train:
        dep = results[i]["depth"]
        h, w = dep.shape
        stride = max(1, int(math.sqrt(h * w / per)))
        vs, us = np.mgrid[stride // 2:h:stride, stride // 2:w:stride]
        ok = dep[vs, us] > 0
        p, c = _unproject(frames[i], results[i], vs[ok], us[ok])
        xyz.append(p)
        rgb.append(c)
    return _at_most(xyz, rgb, max_points, seed)


def _queries_doc(scene: Scene, kind: str, frs: List[dict], results: List[dict], split: str, out: Path) -> dict:
    qviews = []
    for f, r in zip(frs, results):
        if f["split"] != split:
            continue
        entries, absent, used = [], [], set()
        for text, level, ids, mask, sensitive in query_masks(scene, r["labels"], f["time"]):
            if not mask.any():
                absent.append(text)
                continue
            s = W.slug(text)
            while s in used:
                s += "_"
            used.add(s)
            mpath = f"queries/{f['name']}/{s}.png"
            W.save_rgb(out / mpath, mask.astype(np.uint8) * 255)  # 8-bit greyscale
            entries.append({"text": text, "level": level, "ids": ids, "mask": mpath, "pixels": int(mask.sum()),
                            "time_sensitive": sensitive})
        v = {"file_path": f["file_path"], "name": f["name"], "queries": entries, "absent": absent}
        if f["time"] is not None:
            v["time"] = float(f["time"])
        qviews.append(v)
    qdoc = {
        "scene": scene.name, "levels": list(LEVELS),
        "mask_format": "8-bit PNG, 255 = pixel belongs to the query; equals isin(labels/<level>, ids)",
        "views": qviews,
    }
    if kind == "dynamic" and any(o.states for o in scene.objects):
        # per time-sensitive query: where it holds ([t0, t1) intervals of the scene's time) and
        # which other states of the same object it competes with (4D LangSplat's Acc / vIoU)
        qdoc["time_sensitive"] = state_table(scene)
    return qdoc


# ----------------------------------------------------------------------------- main entry
def make_scene(scene: Union[str, Scene], out: Union[str, Path], kind: Optional[str] = None,
               views: Optional[int] = None, frames: Optional[int] = None,
               size: Union[str, Sequence[int]] = (256, 256), seed: int = 0, fov: Optional[float] = None,
               aa: int = 2, camera: str = "orbit", test_every: int = 8, formats: Optional[Sequence[str]] = None,
               workers: Optional[int] = None, max_points: int = 20_000, progress: bool = False,
               noise: bool = False, overwrite: bool = False, holdout: str = "camera") -> dict:
    """Render ``scene`` (a built-in name or a :class:`Scene`) and write it under ``out``.

    ``kind``: multiview (hemisphere of ``views`` cameras, default 64), rgbd (hand-held walk
    of ``frames`` (or ``views``) frames, default 200), dynamic (``frames`` time steps,
    default 24, seen by one moving camera (``camera='orbit'``) or ``views`` fixed cameras
    (``camera='static'``, default 4)). ``formats``: extra writers among tum, replica,
    dnerf (default: tum+replica for rgbd, dnerf for dynamic); the nerfstudio layout,
    labels, queries and points are always written. ``workers``: render processes (default:
    2 when there are at least 16 views and 2+ CPUs; the result is identical for any value).
    ``noise``: the TUM / Replica copies get Kinect-like sensor depth (``writers.sensor_depth``:
    noise growing with distance, holes at depth edges and on dark surfaces; seeded by
    ``seed`` and the frame index) while ``depth/*.npy`` stays exact; off by default (the
    exact output is unchanged). ``holdout`` (dynamic, static cameras): ``camera`` holds camera 0
    out at every time (split test); ``times`` holds out, at each time, one of cameras 1..N-1 in
    turn (split test: held-out times of seen cameras, with queries.json) and keeps camera 0 out
    of training altogether (split val, with queries_val.json: the unseen-camera numbers). A folder that already holds scene files
    (:data:`SCENE_OUTPUTS`) raises :class:`SceneExistsError` unless ``overwrite``, which
    removes them first.

    Returns a dict with ``K``, ``width``, ``height``, ``frames`` (name, viewmat (OpenCV
    world-to-camera), K, time, split) and ``timings``.
    """
    t_start = time.perf_counter()
    if isinstance(scene, str):
        scene = get_scene(scene, seed)
    kind = kind or scene.default_kind
    w, h = parse_size(size)
    if aa < 1:
        raise ValueError("aa must be >= 1")
    K, frs = plan_cameras(scene, kind, views, frames, w, h, seed, fov, camera, test_every, holdout)
    if formats is None:
        formats = {"multiview": (), "rgbd": ("tum", "replica"), "dynamic": ("dnerf",)}[kind]
    bad = [f for f in formats if f not in ("tum", "replica", "dnerf", "nerfstudio")]
    if bad:
        raise ValueError(f"unknown format(s) {bad}; known: tum, replica, dnerf (nerfstudio is always written)")
    if noise and not ({"tum", "replica"} & set(formats)):
        raise ValueError("--noise applies to the RGB-D copies (formats tum, replica); none is written")
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if len(frs) >= 16 else 1
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    old = existing_outputs(out) if out.is_dir() else []
    if old and not overwrite:
        raise SceneExistsError(f"{out} already holds a scene ({', '.join(old[:4])}{', ...' if len(old) > 4 else ''}); "
                               "pass --overwrite to replace it")
    if old:
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    results = render_frames(scene, frs, w, h, aa=aa, workers=workers, progress=progress)
    t_render = time.perf_counter() - t0

    t0 = time.perf_counter()
    for f, r in zip(frs, results):
        name = f["name"]
        f["file_path"] = f"images/{name}.png"
        f["depth_file_path"] = f"depth/{name}.npy"
        f["label_paths"] = {lv: f"labels/{lv}/{name}.png" for lv in LEVELS}
        f["instance_path"] = f["label_paths"]["whole"]
        W.save_rgb(out / f["file_path"], r["rgb"])
        (out / "depth").mkdir(exist_ok=True)
        np.save(out / f["depth_file_path"], r["depth"])
        for li, lv in enumerate(LEVELS):
            W.save_u16(out / f["label_paths"][lv], r["labels"][li])

    xyz, rgb = _points(frs, results, max_points, seed)
    moving = _travelling_ids(scene) if kind == "dynamic" else []
    if moving:  # dynamic scenes only: the other kinds' points are unchanged, byte for byte
        mx, mc = _moving_points(frs, results, moving, max_points // 4, seed)
        xyz, rgb = np.concatenate([xyz, mx]), np.concatenate([rgb, mc]).astype(rgb.dtype)
    W.write_points_ply(out / "points3d.ply", xyz, rgb)
    W.write_nerfstudio(out, frs, K, w, h, ply="points3d.ply",
                       extra={"scene": scene.name, "kind": kind, "seed": seed, "depth_format": "npy float32 z-depth (m)"})
    W.write_json(out / "labels.json", label_table(scene))

    # queries on held-out views (test: queries.json; val, the never-trained camera of holdout
    # "times": queries_val.json)
    for split, qname in (("test", "queries.json"), ("val", "queries_val.json")):
        if split == "val" and not any(f["split"] == "val" for f in frs):
            continue
        W.write_json(out / qname, _queries_doc(scene, kind, frs, results, split, out))

    images = [r["rgb"] for r in results]
    depths = [r["depth"] for r in results]
    if noise:  # sensor depth for the RGB-D copies; one generator per frame (independent of workers)
        depths = [W.sensor_depth(d, im, np.random.default_rng([seed, i, 0x5E115])) for i, (d, im)
                  in enumerate(zip(depths, images))]
    if "tum" in formats:
        W.write_tum(out / "tum", frs, images, depths, K, w, h)
    if "replica" in formats:
        W.write_replica(out / "replica", frs, images, depths, K, w, h)
    if "dnerf" in formats:
        W.write_dnerf(out, frs, K, w, h)

    meta = {
        "scene": scene.name, "description": scene.description, "kind": kind, "seed": seed, "width": w, "height": h,
        "aa": aa, "camera": camera if kind == "dynamic" else None, "time_range": list(scene.time_range),
        "formats": ["nerfstudio", *formats], "levels": list(LEVELS),
        "conventions": "viewmat: OpenCV world-to-camera (x right, y down, z forward), world z up, metres; "
                       "depth: camera z-depth; pixel centres at +0.5",
        "frames": [{"name": f["name"], "file_path": f["file_path"], "split": f["split"], "time": f["time"],
                    "camera": f.get("camera"), "viewmat": np.asarray(f["viewmat"]).tolist(),
                    "K": np.asarray(f["K"]).tolist()} for f in frs],
    }
    if holdout != "camera":  # only written when not the default (other scenes' bytes unchanged)
        meta["holdout"] = holdout
    if noise:
        meta["sensor_noise"] = {"applies_to": [f for f in formats if f in ("tum", "replica")], **W.KINECT_NOISE}
    W.write_json(out / "scene.json", meta)
    t_write = time.perf_counter() - t0
    return {"scene": scene, "out": out, "kind": kind, "K": K, "width": w, "height": h, "frames": frs,
            "timings": {"render_s": t_render, "write_s": t_write, "total_s": time.perf_counter() - t_start,
                        "workers": workers, "views": len(frs)}}
