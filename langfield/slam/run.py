"""``run_slam``: an RGB-D sequence -> a normal run folder, frame by frame, resumable.

The run folder (what ``langfield query | eval | view | export`` read)::

    RUN/config.json            "format": "langfield-run", "model": {"kind": "gaussians"}, "train",
                               "dataset", "slam" (settings, sequence, progress), "language" (when on)
    RUN/checkpoints/ckpt_*     the map's Gaussians (RunFolder.store("rgb"))
    RUN/language/checkpoints/  the map with its language latents (when language is on)
    RUN/cameras.json           the keyframes' cameras (estimated poses)
    RUN/trajectory.txt         TUM format, every frame, estimated camera-to-world
    RUN/keyframes.json         the keyframe list (frame index, name, time, camera-to-world)
    RUN/metrics.json           "slam": frames/s, tracking ms, mapping ms, keyframes, Gaussians, ATE
    RUN/slam/ckpt_*            the whole mapper state for --resume (map, Adam moments, keyframes,
                               trajectory, generator, next frame)

Everything is written under the run's write lock, atomically; ``--resume`` continues from the
last saved state and ends in the same state as an uninterrupted run (the state is saved every
``save_every`` frames and at the end).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from langfield.run import CheckpointStore, RunError, RunFolder, update_metrics

__all__ = ["run_slam", "write_outputs", "load_state", "state_store", "STATE_DIR"]

STATE_DIR = "slam"
SLAM_ARTEFACTS = (STATE_DIR, "trajectory.txt", "keyframes.json", "cameras.json", "language")
RUN_FORMAT = "langfield-run"


def open_sequence(data, width: Optional[int], height: Optional[int], stride: int, max_frames: Optional[int]):
    from langfield.data.rgbd import RGBDError, open_rgbd

    try:
        probe = open_rgbd(data, stride=stride, max_frames=max_frames)
        down = 1
        if width and height and probe.width % width == 0 and probe.height % height == 0 and \
                probe.width // width == probe.height // height and probe.width // width > 1:
            down = probe.width // width
        seq = open_rgbd(data, stride=stride, max_frames=max_frames, downscale=down) if down > 1 else probe
    except (RGBDError, FileNotFoundError) as e:
        raise RunError(f"cannot read the RGB-D sequence: {e}") from None
    except ValueError as e:
        raise RunError(f"{data}: {e}") from None
    return seq, down


def state_store(run) -> CheckpointStore:
    """The mapper states of a run (``RUN/slam/ckpt_*``), the newest two kept."""
    return CheckpointStore(Path(run) / STATE_DIR, keep=2)


def load_state(run, device="cpu", language=None):
    """``(Mapper, next_index, config)`` from a run's newest readable mapper state, or
    ``(None, 0, None)``."""
    from langfield.slam.online import Mapper

    store = state_store(run)
    path, ck = store.latest(quarantine=True)
    if ck is None:
        return None, 0, None
    m = Mapper.from_state(ck.tensors, ck.config["mapper"], language=language, device=device)
    return m, int(ck.config["next_index"]), ck.config


def write_outputs(rf: RunFolder, mapper, *, doc: Dict[str, Any], seq=None, final: bool = False,
                  metrics: Optional[Dict[str, Any]] = None) -> None:
    """Write the map checkpoint(s), cameras.json, trajectory.txt, keyframes.json and config.json
    (the caller holds the run lock)."""
    from langfield.eval.trajectory import write_tum_trajectory
    from langfield.io.checkpoint import atomic_write_json

    step = int(mapper.frames)
    g = mapper.gaussians(with_lang=False)
    ck_cfg = {"rgb_step": step, "source": "slam", "frames": step, "keyframes": len(mapper.keyframes)}
    rf.store("rgb").save({"splats": g.to_dict()}, ck_cfg, step)
    lang = mapper.language
    if lang is not None and lang.ready and "lang" in mapper.map.params:
        gl = mapper.gaussians(with_lang=True)
        rf.store("language").save({"splats": gl.to_dict()}, ck_cfg, step)
    w, h = mapper.size if mapper.size else (0, 0)
    K = mapper.K.double().cpu().numpy().tolist() if mapper.K is not None else None
    cams = [{"name": kf.name, "viewmat": kf.viewmat.double().cpu().numpy().tolist(), "K": K, "width": w,
             "height": h, "split": "train", "frame_index": kf.index} for kf in mapper.keyframes]
    atomic_write_json(rf.root / "cameras.json", {"cameras": cams})
    poses = mapper.poses_c2w()
    write_tum_trajectory(rf.root / "trajectory.txt", np.asarray(mapper.timestamps), poses,
                         header="langfield slam: estimated camera-to-world, every frame")
    kfs = [{"frame": kf.index, "name": kf.name, "timestamp": kf.timestamp,
            "camtoworld": poses[kf.index].tolist()} for kf in mapper.keyframes]
    atomic_write_json(rf.root / "keyframes.json", {"keyframes": kfs})
    if lang is not None and lang.ready:
        doc = dict(doc, language=lang.config_section())
    atomic_write_json(rf.config, doc)
    if metrics is not None:
        update_metrics(rf.root, metrics, key="slam")


def _config_doc(data, seq, down: int, cfg, features: str, old: Optional[dict], device: str,
                max_frames: Optional[int], stride: int) -> Dict[str, Any]:
    from langfield import __version__
    from langfield.train.config import TrainConfig

    history = list((old or {}).get("history", []))
    now = datetime.now().isoformat(timespec="seconds")
    history.append({"time": now, "event": "resumed" if old else "created"})
    train = TrainConfig(sh_degree=0, sh_degree_interval=1, seed=cfg.seed, device=device, backend=cfg.backend,
                        test_every=8).to_dict()
    return {
        "format": RUN_FORMAT,
        "version": 1,
        "stage": "slam",
        "langfield_version": __version__,
        "data": str(Path(data).resolve()),
        "model": {"kind": "gaussians"},
        "device": device,
        "backend": cfg.backend,
        "train": train,
        "dataset": {"format": f"rgbd-{seq.format}", "num_frames": len(seq), "scene_scale": 1.0,
                    "transform": np.eye(4).tolist(), "background": [0.0, 0.0, 0.0], "init": "slam"},
        "slam": {"config": cfg.to_dict(), "features": features, "sequence": str(seq.root), "format": seq.format,
                 "frames": len(seq), "stride": stride, "max_frames": max_frames, "downscale": down,
                 "intrinsics": seq.intrinsics, "has_gt": bool(seq.has_gt.any())},
        "history": history,
    }


def _running_ate(mapper, gt_by_index: Dict[int, np.ndarray], indices) -> Optional[float]:
    from langfield.eval.trajectory import ate

    P = mapper.poses_c2w()
    sel = [i for i, fi in enumerate(indices) if fi in gt_by_index]
    if len(sel) < 3:
        return None
    Q = np.stack([gt_by_index[indices[i]] for i in sel])
    return float(ate(P[sel], Q)["rmse"])


def run_slam(data, out, *, features: str = "none", max_frames: Optional[int] = None, stride: int = 1,
             size: Optional[Tuple[int, int]] = (320, 240), resume: bool = False, overwrite: bool = False,
             device: str = "cpu", save_every: int = 20, config=None, quiet: bool = False,
             on_frame: Optional[Callable[[Dict[str, Any]], None]] = None, language_options: Optional[dict] = None,
             progress_mode: Optional[str] = None) -> Dict[str, Any]:
    """Map the RGB-D sequence ``data`` into the run folder ``out`` (see the module docstring).

    ``size``: working (width, height), or None for the frames' own size. ``features``:
    ``none`` or an extractor name (``labels``, ``dense-clip``, ``sam-clip``) for online
    language. ``on_frame(info)`` is called after each frame (tests use it to stop a run as a
    kill would). Returns the summary written to metrics.json under "slam"."""
    from langfield.data.rgbd import BadFrameError
    from langfield.run import resolve_device
    from langfield.slam.online import Mapper, SlamConfig
    from langfield.train.progress import Progress

    if stride < 1:
        raise RunError(f"--stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise RunError(f"--max-frames must be >= 1, got {max_frames}")
    if save_every < 1:
        raise RunError(f"save_every must be >= 1, got {save_every}")
    if features not in ("none", "labels", "dense-clip", "sam-clip"):
        raise RunError(f"--features must be none, labels, dense-clip or sam-clip, got {features!r}")
    dev = resolve_device(device)
    rf = RunFolder(out)
    has_state = bool(state_store(rf.root).steps())
    if resume and not has_state:
        raise RunError(f"{rf.root}: nothing to resume (no mapper state in {rf.root / STATE_DIR})")
    if not resume and rf.root.exists() and not rf.is_empty_for_new_run():
        if not overwrite:
            raise RunError(f"{rf.root} already holds a run; pass --resume to continue it or --overwrite to replace it")
    old_doc = None
    if resume:
        old_doc = rf.read_config()
        sl = old_doc.get("slam") or {}
        if not sl:
            raise RunError(f"{rf.config}: not a mapping run (no 'slam' section); --resume continues `langfield slam`")
        cfg = SlamConfig.from_dict(sl["config"])
        features = str(sl.get("features", features))
        stride = int(sl.get("stride", stride))
        max_frames = sl.get("max_frames", max_frames) if max_frames is None else max_frames
    else:
        cfg = config or SlamConfig()
        if size is not None:
            cfg = replace(cfg, width=int(size[0]), height=int(size[1]))
        else:
            cfg = replace(cfg, width=None, height=None)
    seq, down = open_sequence(data, cfg.width, cfg.height, stride, max_frames)
    language = None
    if features != "none":
        from langfield.slam.language import OnlineLanguage

        language = OnlineLanguage.create(features, seq, device=dev, **(language_options or {}))
        language.run_dir = rf.root
    rf.root.mkdir(parents=True, exist_ok=True)
    with rf.lock():
        if not resume and overwrite and not rf.is_empty_for_new_run():
            from langfield.run import RUN_ARTEFACTS

            rf.move_aside(tuple(dict.fromkeys(tuple(RUN_ARTEFACTS) + SLAM_ARTEFACTS)))
        start = 0
        mapper = None
        if resume:
            mapper, start, _ = load_state(rf.root, device=dev, language=language)
        if mapper is None:
            mapper = Mapper(cfg, language=language, device=dev)
        doc = _config_doc(data, seq, down, cfg, features, old_doc, str(dev), max_frames, stride)
        if language is not None and old_doc and old_doc.get("language"):
            doc["language"] = old_doc["language"]
        from langfield.io.checkpoint import atomic_write_json

        atomic_write_json(rf.config, doc)
        gt = {i: p for i, p in enumerate(seq.gt_poses) if np.isfinite(p).all()}
        indices = list(range(start))  # sequence positions of the frames mapped so far
        if len(mapper.timestamps) != start:  # frames skipped as bad: map positions by timestamp
            ts = seq.timestamps
            indices = [int(np.argmin(np.abs(ts - t))) for t in mapper.timestamps]
        bar = Progress(len(seq), initial=start, desc="slam", unit="frame",
                       mode=progress_mode or ("off" if quiet else None))
        t_start = time.perf_counter()
        done = 0
        ate_now = None
        wall0 = mapper.timing.get("wall_s", 0.0)

        def summary() -> Dict[str, Any]:
            tm = mapper.timing
            wall = wall0 + (time.perf_counter() - t_start)
            tm["wall_s"] = wall
            out = {"frames": len(mapper.timestamps), "keyframes": len(mapper.keyframes), "gaussians": mapper.map.num,
                   "frames_per_s": len(mapper.timestamps) / wall if wall > 0 else None,
                   "track_ms_per_frame": 1000 * tm["track_s"] / max(1, tm["tracked"]),
                   "map_ms_per_keyframe": 1000 * tm["map_s"] / max(1, tm["mapped"]),
                   "wall_s": wall, "size": list(mapper.size) if mapper.size else None,
                   "skipped": [[int(i), m] for i, m in seq.skipped], "features": features}
            if ate_now is not None:
                out["ate_rmse_running"] = ate_now
            return out

        def save(next_index: int) -> None:
            tensors, mcfg = mapper.state()
            state_store(rf.root).save(tensors, {"mapper": mcfg, "next_index": next_index}, next_index)
            write_outputs(rf, mapper, doc=doc, seq=seq, metrics=summary())

        try:
            for i in range(start, len(seq)):
                try:
                    frame = seq[i]
                except BadFrameError as err:
                    seq.skipped.append((i, str(err)))
                    warnings.warn(str(err), stacklevel=2)
                    bar.update(1)
                    continue
                info = mapper.step(frame)
                indices.append(i)
                done += 1
                if gt and (done % 5 == 0 or i == len(seq) - 1):
                    ate_now = _running_ate(mapper, gt, indices)
                fig = {"fps": len(mapper.timestamps) / max(1e-9, wall0 + time.perf_counter() - t_start),
                       "kf": len(mapper.keyframes), "gauss": mapper.map.num}
                if ate_now is not None:
                    fig["ate_cm"] = 100 * ate_now
                bar.update(1, **fig)
                if (i + 1 - start) % save_every == 0 and i + 1 < len(seq):
                    save(i + 1)
                if on_frame is not None:
                    on_frame(info)
            if gt:
                ate_now = _running_ate(mapper, gt, indices)
            save(len(seq))
        finally:
            bar.close()
        return summary()
