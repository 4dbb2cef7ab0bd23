"""Evaluation of a mapping run: ``evaluate_slam_run(run) -> dict``.

ATE RMSE (SE(3) Umeyama alignment, all frames, metres, as ``evo_ape tum --align``) and RPE
(consecutive frames) of ``RUN/trajectory.txt`` against the sequence's ground truth (or
reference) poses, and PSNR and depth L1 of the map rendered at the estimated poses on the
keyframes and on the frames that were not keyframes, at the run's working size.
``langfield eval RUN`` calls it for runs with a "slam" section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from langfield.run import RunError, RunFolder

__all__ = ["evaluate_slam_run", "is_slam_run", "format_slam_eval"]


def is_slam_run(run) -> bool:
    """True when ``RUN/config.json`` has a "slam" section (a ``langfield slam`` run)."""
    p = Path(run) / "config.json"
    try:
        return bool(json.loads(p.read_text("utf-8")).get("slam"))
    except (OSError, ValueError):
        return False


def evaluate_slam_run(run, *, max_views: int = 40, device: str = "auto", write: bool = True) -> Dict[str, Any]:
    """Trajectory and image metrics of a mapping run (see the module docstring); ``max_views``
    keyframes and as many other frames (evenly spaced) are rendered. With ``write`` the result
    goes into metrics.json under "slam_eval"."""
    from langfield.data.rgbd import BadFrameError
    from langfield.eval.trajectory import Trajectory, TrajectoryError, associate, ate, read_tum_trajectory, rpe
    from langfield.maths import inv_rigid_np
    from langfield.render.model import Cameras, render
    from langfield.run import model_from_checkpoint, scene_checkpoint, update_metrics
    from langfield.slam.online import prepare_frame
    from langfield.slam.run import open_sequence

    rf = RunFolder(run)
    doc = rf.read_config()
    sl = doc.get("slam")
    if not sl:
        raise RunError(f"{rf.config}: not a mapping run (no 'slam' section)")
    tpath = rf.root / "trajectory.txt"
    if not tpath.is_file():
        raise RunError(f"{tpath}: missing (the run has not saved a trajectory yet)")
    try:
        est = read_tum_trajectory(tpath)
    except TrajectoryError as e:
        raise RunError(str(e)) from None
    cfg = sl.get("config") or {}
    w, h = cfg.get("width"), cfg.get("height")
    seq, _ = open_sequence(doc["data"], w, h, int(sl.get("stride", 1)), sl.get("max_frames"))
    out: Dict[str, Any] = {"frames": len(est)}
    has = seq.has_gt
    if has.any():
        ref = Trajectory(seq.timestamps[has], seq.gt_poses[has])
        ie, ir = associate(est.timestamps, ref.timestamps, 0.01)
        if len(ie) >= 3:
            out["ate"] = ate(est.poses[ie], ref.poses[ir])
            out["ate_rmse"] = out["ate"]["rmse"]
            try:
                out["rpe"] = rpe(est.poses[ie], ref.poses[ir], delta=1)
            except TrajectoryError:
                pass
            out["matched"] = int(len(ie))
    # image metrics at the estimated poses
    stage, _path, ck = scene_checkpoint(rf.root)
    if ck is None:
        raise RunError(f"{rf.root}: no readable checkpoint")
    from langfield.run import resolve_device

    g = model_from_checkpoint(doc, ck, resolve_device(device))
    kf_names = set()
    kp = rf.root / "keyframes.json"
    if kp.is_file():
        kf_names = {round(float(k["timestamp"]), 6) for k in json.loads(kp.read_text("utf-8"))["keyframes"]}
    ts_seq = seq.timestamps
    groups: Dict[str, list] = {"keyframes": [], "other": []}
    for j, t in enumerate(est.timestamps):
        groups["keyframes" if round(float(t), 6) in kf_names else "other"].append(j)
    for name, idx in groups.items():
        if not idx:
            continue
        pick = [idx[int(round(k))] for k in np.linspace(0, len(idx) - 1, min(max_views, len(idx)))]
        ps, dl = [], []
        for j in sorted(set(pick)):
            i = int(np.argmin(np.abs(ts_seq - est.timestamps[j])))
            try:
                fr = seq[i]
            except BadFrameError:
                continue
            image, depth, K = prepare_frame(fr, w, h)
            vm = torch.from_numpy(inv_rigid_np(est.poses[j])).float()
            with torch.no_grad():
                r = render(g, Cameras(vm[None], K[None], image.shape[1], image.shape[0]), depth=True,
                           background=(0.0, 0.0, 0.0))
            mse = float(((r.rgb[0].clamp(0, 1) - image) ** 2).mean())
            ps.append(10 * np.log10(1.0 / max(mse, 1e-12)))
            v = depth > 0
            if v.any():
                dl.append(float((r.depth[0] - depth).abs()[v].mean()))
        out[name] = {"views": len(ps), "psnr": float(np.mean(ps)) if ps else None,
                     "depth_l1": float(np.mean(dl)) if dl else None}
    if write:
        update_metrics(rf.root, out, key="slam_eval")
    return out


def format_slam_eval(rep: Dict[str, Any]) -> str:
    """A few lines for a terminal."""
    lines = []
    if "ate_rmse" in rep:
        a = rep["ate"]
        lines.append(f"ATE RMSE {100 * a['rmse']:.2f} cm (mean {100 * a['mean']:.2f}, max {100 * a['max']:.2f}; "
                     f"{rep.get('matched')} of {rep['frames']} frames)")
    if "rpe" in rep:
        lines.append(f"RPE {100 * rep['rpe']['trans']['rmse']:.2f} cm, {rep['rpe']['rot']['rmse']:.3f} deg per frame")
    for k in ("keyframes", "other"):
        if k in rep:
            v = rep[k]
            lines.append(f"{k}: PSNR {v['psnr']:.2f} dB, depth L1 {100 * v['depth_l1']:.2f} cm over {v['views']} views"
                         if v["psnr"] is not None and v["depth_l1"] is not None else f"{k}: no views")
    return "\n".join(lines)
