"""Online mapping (langfield.slam): tracking convergence, a short full run on the synthetic room
(ATE, query), kill-and-resume equals an uninterrupted run, the TUM trajectory reads back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from langfield.maths import inv_rigid, se3_exp


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the CPU renderer on a shared 2-core machine: one thread is faster and deterministic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """The synthetic room as an RGB-D walk, 96x72, 30 frames (about 10 cm between frames)."""
    from langfield.scenes.make import make_scene

    out = tmp_path_factory.mktemp("slam") / "room"
    make_scene("room", out, kind="rgbd", frames=30, size=(96, 72), workers=1)
    return out


def _frame_map(room, i=0):
    from langfield.data.rgbd import open_rgbd
    from langfield.slam.mapper import GaussianMap, MapperConfig, seed_gaussians
    from langfield.slam.online import prepare_frame

    f = open_rgbd(room)[i]
    image, depth, K = prepare_frame(f, None, None)
    vm = inv_rigid(torch.as_tensor(f.camtoworld, dtype=torch.float64)).float()
    g = GaussianMap()
    seed_gaussians(g, image, depth, K, vm, MapperConfig(add_stride=1, size_factor=0.5))
    return g, K, vm, f


@pytest.mark.parametrize("method", ["warp", "render"])
def test_tracking_converges_from_perturbed_starts(room, method):
    """Frames rendered from a known map: 3 cm + 2 degree perturbations in random directions
    come back to the true pose to sub-millimetre and < 0.1 degree, by both tracking methods
    (render once and warp, re-rendering as the pose moves; or a render per step)."""
    from langfield.render.model import Cameras, render
    from langfield.slam.tracker import TrackerConfig, pose_error, track

    g, K, vm, f = _frame_map(room)
    with torch.no_grad():
        out = render(g, Cameras(vm[None], K[None], f.width, f.height), depth=True)
    image = out.rgb[0].clamp(0, 1)
    depth = torch.where(out.alpha[0] > 0.5, out.depth[0], torch.zeros_like(out.depth[0]))
    gen = torch.Generator().manual_seed(0)
    for trial in range(3):
        xi = torch.randn(6, generator=gen)
        xi[:3] *= 0.03 / xi[:3].norm()
        xi[3:] *= math.radians(2.0) / xi[3:].norm()
        T0 = se3_exp(xi) @ vm
        t0, r0 = pose_error(T0, vm)
        assert t0 > 0.029 and r0 > 1.99
        cfg = TrackerConfig(method=method)
        res = track(g, image, depth, K, T0, cfg)
        t_err, r_err = pose_error(res.viewmat, vm)
        assert t_err < 1e-3, (trial, t_err, r_err)
        assert r_err < 0.1, (trial, t_err, r_err)
        assert res.iters <= sum(cfg.max_iters)
        if method == "warp":  # a few renders, not one per step
            assert res.renders <= len(cfg.levels) * cfg.max_renders and res.renders < res.iters
        R = res.viewmat[:3, :3].double()
        assert torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-6)  # still a rotation


def test_constant_velocity_stays_rigid():
    """Extrapolating slightly non-rigid poses must not amplify the error (it did, 2.4x a frame)."""
    from langfield.slam.tracker import constant_velocity

    T = se3_exp(torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.3]))
    T2 = se3_exp(torch.tensor([0.12, 0.2, 0.31, 0.1, 0.21, 0.3]))
    T2[:3, :3] *= 1.001  # not a rotation any more
    P = constant_velocity(T2, T)
    for _ in range(30):
        P, T2 = constant_velocity(P, T2), P
    R = P[:3, :3].double()
    assert float((R @ R.T - torch.eye(3, dtype=torch.float64)).abs().max()) < 1e-5


class _Kill(Exception):
    pass


def _state(run):
    from langfield.slam.run import state_store

    path, ck = state_store(run).latest()
    return ck


def test_kill_and_resume_equals_uninterrupted(room, tmp_path):
    from langfield.slam.run import run_slam

    kw = dict(size=None, max_frames=9, save_every=3, quiet=True)
    full = run_slam(room, tmp_path / "full", **kw)
    assert full["frames"] == 9

    def kill(info):
        if info["index"] == 4:  # frames 3 and 4 are lost: the last state was saved after frame 2
            raise _Kill()

    with pytest.raises(_Kill):
        run_slam(room, tmp_path / "killed", on_frame=kill, **kw)
    assert _state(tmp_path / "killed").config["next_index"] == 3
    res = run_slam(room, tmp_path / "killed", resume=True, quiet=True)
    assert res["frames"] == 9
    a, b = _state(tmp_path / "full"), _state(tmp_path / "killed")
    assert a.config["next_index"] == b.config["next_index"] == 9
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert a.config["mapper"]["keyframes"] == b.config["mapper"]["keyframes"]
    assert (tmp_path / "full" / "trajectory.txt").read_text() == (tmp_path / "killed" / "trajectory.txt").read_text()
    # a second plain run into the same folder is refused; --resume of a finished run changes nothing
    from langfield.run import RunError

    with pytest.raises(RunError, match="already holds a run"):
        run_slam(room, tmp_path / "full", **kw)
    # --overwrite moves the previous run aside and starts again
    res = run_slam(room, tmp_path / "full", size=None, max_frames=2, quiet=True, overwrite=True)
    assert res["frames"] == 2 and _state(tmp_path / "full").config["next_index"] == 2
    assert len(list((tmp_path / "full").glob("replaced-*/slam/ckpt_*.json"))) >= 1


def test_full_run_with_labels_language(room, tmp_path):
    """A short mapping run with online language (labels): the run folder (TUM trajectory that
    reads back, keyframes, cameras.json, checkpoints the run path loads, metrics), the ATE
    against the ground truth, and text queries on a frame's estimated view against the scene's
    ground-truth masks, through LanguageField and `langfield query`."""
    import json

    from PIL import Image

    from langfield.cli import main
    from langfield.data.rgbd import open_rgbd
    from langfield.eval.trajectory import ate, read_tum_trajectory
    from langfield.field import LanguageField
    from langfield.run import model_from_checkpoint, read_metrics, scene_checkpoint
    from langfield.slam.run import run_slam

    run = tmp_path / "run"
    n = 12
    res = run_slam(room, run, size=None, max_frames=n, quiet=True, features="labels",
                   language_options=dict(text_encoder="offline", ae_steps=300, warmup=2))
    seq = open_rgbd(room, max_frames=n)
    tr = read_tum_trajectory(run / "trajectory.txt")
    assert len(tr) == n
    np.testing.assert_array_equal(tr.timestamps, seq.timestamps)
    st = _state(run)
    from langfield.slam.online import Mapper

    # the state's poses: keyframes as refined by mapping, other frames kept relative to their keyframe
    P = Mapper.from_state(st.tensors, st.config["mapper"]).poses_c2w()
    np.testing.assert_allclose(tr.poses, P, atol=1e-7)  # through quaternions
    kf_pos = [int(i) for i in np.flatnonzero(st.tensors["keyframe_of_frame"].numpy() >= 0)]
    np.testing.assert_allclose(P[kf_pos], inv_rigid(st.tensors["viewmats"][kf_pos].double()).numpy(), atol=1e-12)
    err = ate(tr.poses, seq.gt_poses)
    assert err["rmse"] < 0.02, err  # 10 cm between frames at 96x72: a loose bar; bench/slam.py measures 320x240
    assert abs(res["ate_rmse_running"] - err["rmse"]) < 1e-9
    doc = json.loads((run / "config.json").read_text())
    assert doc["format"] == "langfield-run" and doc["model"]["kind"] == "gaussians" and "slam" in doc
    assert doc["language"]["levels"] and doc["language"]["latent_dim"] == 3
    kfs = json.loads((run / "keyframes.json").read_text())["keyframes"]
    cams = json.loads((run / "cameras.json").read_text())["cameras"]
    assert len(kfs) == len(cams) == res["keyframes"] >= 2
    assert kfs[0]["frame"] == 0
    stage, path, ck = scene_checkpoint(run)
    assert stage == "language"
    g = model_from_checkpoint(doc, ck, "cpu")
    assert g.num == res["gaussians"] and g.lang.shape[1] == 9
    assert read_metrics(run)["slam"]["frames"] == n

    # queries on frame 7 (held out by the scene, with ground-truth masks), at its estimated pose
    q = json.loads((room / "queries.json").read_text())
    view = next(v for v in q["views"] if v["name"] == "frame_00007")
    field = LanguageField.load(run)
    r = field.render(inv_rigid(torch.as_tensor(tr.poses[7])).numpy(), seq.K, seq.width, seq.height)
    ious, hits = [], []
    for e in view["queries"]:
        gt = np.asarray(Image.open(room / e["mask"])) > 127
        if gt.sum() < 40:
            continue
        res_q = field.query(r, e["text"])
        m = res_q.masks[res_q.level_index].numpy()
        ious.append((m & gt).sum() / max(1, (m | gt).sum()))
        x, y = res_q.point
        hits.append(bool(gt[y, x]))
    assert len(ious) >= 4
    assert np.mean(hits) >= 0.75, (hits, ious)
    assert np.mean(ious) >= 0.3, (hits, ious)  # measured 0.38 (offline text encoder: synonyms miss), points 1.0
    # the query command works on the mapping run unchanged
    assert main(["query", str(run), "sofa", "--view", "1", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "query.json").is_file()
    # the evaluation `langfield eval RUN` calls for a mapping run
    from langfield.slam.evaluate import evaluate_slam_run, is_slam_run

    assert is_slam_run(run)
    rep = evaluate_slam_run(run, max_views=4)
    assert abs(rep["ate_rmse"] - err["rmse"]) < 1e-6 and rep["matched"] == n
    assert rep["keyframes"]["psnr"] > 20 and rep["other"]["psnr"] > 18  # measured 26.5 / 24.9 dB
    assert rep["keyframes"]["depth_l1"] < 0.08
    assert read_metrics(run)["slam_eval"]["ate_rmse"] == rep["ate_rmse"]



def test_detached_language_does_not_move_the_geometry(room, tmp_path):
    """lang_pass="detached": the language loss trains the latents only (a second pass with the
    geometry detached), so the run has the trajectory and Gaussians of the same run without
    language, bit for bit, while its latents do train."""
    from dataclasses import replace

    from langfield.slam.online import SlamConfig
    from langfield.slam.run import run_slam

    n = 8
    cfg = SlamConfig()
    cfg = replace(cfg, mapper=replace(cfg.mapper, lang_pass="detached"))
    lang = run_slam(room, tmp_path / "lang", size=None, max_frames=n, quiet=True, features="labels", config=cfg,
                    language_options=dict(text_encoder="offline", ae_steps=100, warmup=2))
    plain = run_slam(room, tmp_path / "plain", size=None, max_frames=n, quiet=True, config=cfg)
    assert plain["keyframes"] == lang["keyframes"] >= 3 and plain["gaussians"] == lang["gaussians"]
    assert (tmp_path / "plain" / "trajectory.txt").read_text() == (tmp_path / "lang" / "trajectory.txt").read_text()
    sp, sl = _state(tmp_path / "plain"), _state(tmp_path / "lang")
    for k in ("map.means", "map.scales", "map.opacities", "map.sh0", "viewmats"):
        assert torch.equal(sp.tensors[k], sl.tensors[k]), k
    assert float(sl.tensors["map.lang"].abs().sum()) > 0  # ... while the latents did train


def test_concurrent_mode_maps_in_a_back_end_thread(room, tmp_path):
    """SlamConfig(concurrent=True): keyframes are mapped in a thread while the next frames are
    tracked; the run ends with every keyframe mapped (state saved after the back end finished),
    an ATE like the sequential run's, and it resumes."""
    from langfield.data.rgbd import open_rgbd
    from langfield.eval.trajectory import ate, read_tum_trajectory
    from langfield.slam.online import SlamConfig
    from langfield.slam.run import run_slam

    n = 12
    res = run_slam(room, tmp_path / "conc", size=None, max_frames=n, quiet=True, save_every=5,
                   config=SlamConfig(concurrent=True))
    st = _state(tmp_path / "conc")
    assert st.config["mapper"]["slam"]["concurrent"] is True
    assert res["frames"] == n and res["keyframes"] >= 2
    assert st.config["mapper"]["timing"]["mapped"] == res["keyframes"]  # none left unmapped
    tr = read_tum_trajectory(tmp_path / "conc" / "trajectory.txt")
    err = ate(tr.poses, open_rgbd(room, max_frames=n).gt_poses)["rmse"]
    assert err < 0.02, err
    more = run_slam(room, tmp_path / "conc", resume=True, max_frames=n + 3, quiet=True)
    assert more["frames"] == n + 3
