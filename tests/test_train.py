"""RGB training: quality on a tiny procedural scene, exact resume, bad input, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from langfield.io.ply import write_ply

from langfield.cli import main
from langfield.io import load_checkpoint, read_ply
from langfield.train.config import TrainConfig
from langfield.train.rgb import NonFiniteError, RunError, train_rgb

PSNR_BAR = 18.0  # measured 20.6 dB after 300 steps; the initialisation scores ~9 dB


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from langfield.scenes import make_scene

    out = tmp_path_factory.mktemp("tabletop")
    make_scene("tabletop", out, views=12, size=(64, 48), test_every=6, max_points=2000)
    return out


# tiny, fast runs with densification active in the window
TINY = dict(steps=40, downscale=2, ckpt_every=20, keep_checkpoints=0, refine_start_iter=5, refine_every=10,
            refine_stop_iter=35, grow_grad2d=1e-4, background="random", progress=False, save_renders=False)


def test_train_cli_reaches_psnr_bar_and_writes_run(scene, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(scene), "--out", str(run), "--steps", "300", "--quiet", "--ckpt-every", "150"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_views"] == 2 and m["step"] == 300
    assert m["psnr"] >= PSNR_BAR, m["psnr"]
    assert 0 < m["ssim"] <= 1 and m["num_gaussians"] > 0 and m["s_per_step"] > 0
    assert len(m["views"]) == 2 and all(math.isfinite(v["psnr"]) for v in m["views"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["format"] == "langfield-run" and cfg["train"]["steps"] == 300 and cfg["data"] == str(scene.resolve())
    assert cfg["backend"] in ("cpu", "torch") and "langfield_version" in cfg
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("ckpt_*.json"))
    assert ckpts == ["ckpt_0000150.json", "ckpt_0000300.json"]
    pngs = sorted(p.name for p in (run / "renders" / "test").glob("*.png"))
    assert len(pngs) == 4 and sum(p.endswith("_gt_pred.png") for p in pngs) == 2

    # the initialisation is far below the bar: training did the work
    init = train_rgb(scene, tmp_path / "init", steps=1, densify=False, progress=False, save_renders=False)
    assert m["psnr"] > init["psnr"] + 6

    # export: back in the original world, same count
    ply = tmp_path / "out.ply"
    assert main(["export", str(run), "--ply", str(ply)]) == 0
    g = read_ply(ply)
    assert g.num == m["num_gaussians"]
    with pytest.raises(SystemExit, match="exists"):
        main(["export", str(run), "--ply", str(ply)])

    # import: a trained splat file as a new run's start (into the normalised frame, SH bands
    # rotated); --steps 0 keeps it as it is: the same held-out PSNR
    imp = tmp_path / "imported"
    assert main(["train", str(scene), "--out", str(imp), "--init-ply", str(ply), "--steps", "0", "--quiet",
                 "--no-renders"]) == 0
    mi = json.loads((imp / "metrics.json").read_text())
    assert mi["step"] == 0 and mi["num_gaussians"] == m["num_gaussians"]
    assert abs(mi["psnr"] - m["psnr"]) < 1e-3, (mi["psnr"], m["psnr"])
    ci = json.loads((imp / "config.json").read_text())["train"]
    assert ci["init_ply"] == str(ply.resolve()) and ci["sh_degree_start"] == 3
    # and fine-tuned from there (without densification: the file is already densified)
    ft = train_rgb(scene, tmp_path / "finetuned", steps=30, init_ply=str(ply), densify=False, progress=False,
                   save_renders=False)
    assert ft["psnr"] > m["psnr"] - 0.05  # measured +0.03 dB
    with pytest.raises(SystemExit, match="not found"):
        main(["train", str(scene), "--out", str(tmp_path / "x"), "--init-ply", str(tmp_path / "none.ply")])
    (tmp_path / "bad.ply").write_text("not a ply")
    with pytest.raises(SystemExit, match="not a readable PLY"):
        main(["train", str(scene), "--out", str(tmp_path / "y"), "--init-ply", str(tmp_path / "bad.ply")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a file in another world frame (here: moved 1 km away) is flagged
    far = g.transformed(torch.tensor([[1.0, 0, 0, 1000.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    write_ply(tmp_path / "far.ply", far)
    with pytest.warns(UserWarning, match="in view of any of the dataset's cameras"):
        train_rgb(scene, tmp_path / "far", steps=0, init_ply=str(tmp_path / "far.ply"), progress=False,
                  save_renders=False)
    # a splat in nerfstudio's dataparser frame (x' = s (R x + t)) comes back with its
    # dataparser_transforms.json: the same PSNR again
    c, sn = math.cos(0.5), math.sin(0.5)
    Rt = [[c, -sn, 0.0, 0.3], [sn, c, 0.0, -1.2], [0.0, 0.0, 1.0, 2.0]]
    T = torch.eye(4, dtype=torch.float64)
    T[:3] = torch.tensor(Rt, dtype=torch.float64)
    T[:3] *= 0.25
    write_ply(tmp_path / "ns.ply", g.transformed(T))
    (tmp_path / "dataparser_transforms.json").write_text(json.dumps({"transform": Rt, "scale": 0.25}))
    mn = train_rgb(scene, tmp_path / "ns", steps=0, init_ply=str(tmp_path / "ns.ply"), progress=False,
                   init_ply_transform=str(tmp_path / "dataparser_transforms.json"), save_renders=False)
    assert abs(mn["psnr"] - m["psnr"]) < 1e-3, (mn["psnr"], m["psnr"])
    # --overwrite with a broken --init-ply: the existing run stays where it is
    (tmp_path / "trunc.ply").write_bytes(ply.read_bytes()[:2000])
    with pytest.raises(SystemExit, match="--init-ply"):
        main(["train", str(scene), "--out", str(imp), "--overwrite", "--init-ply", str(tmp_path / "trunc.ply")])
    assert (imp / "metrics.json").is_file() and not list(imp.glob("replaced-*"))
    (tmp_path / "mirror.json").write_text(json.dumps({"matrix": [[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                                 [0, 0, 0, 1]]}))
    with pytest.raises(SystemExit, match="not a similarity"):
        main(["train", str(scene), "--out", str(tmp_path / "z"), "--init-ply", str(ply), "--init-ply-transform",
              str(tmp_path / "mirror.json")])
    # the exported means are the trained ones mapped by the inverse of the dataset transform
    import numpy as np

    ck = load_checkpoint(run / "checkpoints")
    Ti = np.linalg.inv(np.asarray(cfg["dataset"]["transform"]))
    back = ck.tensors["splats"]["means"].double() @ torch.from_numpy(Ti[:3, :3]).T + torch.from_numpy(Ti[:3, 3])
    assert torch.allclose(back.float(), g.means.detach(), atol=1e-4)

    # eval recomputes metrics.json; render writes chosen views
    (run / "metrics.json").unlink()
    assert main(["eval", str(run)]) == 0
    m2 = json.loads((run / "metrics.json").read_text())
    assert abs(m2["psnr"] - m["psnr"]) < 1e-3 and m2["train_time_s"] == pytest.approx(m["train_time_s"], rel=0.05)
    assert main(["render", str(run), "--views", "0,3", "--out", str(tmp_path / "r")]) == 0
    assert len(list((tmp_path / "r").glob("*.png"))) == 4
    with pytest.raises(SystemExit, match="--views"):
        main(["render", str(run), "--views", "0,99"])
    capsys.readouterr()


def _all_tensors(ckpt_dir: Path, step: int):
    ck = load_checkpoint(ckpt_dir / f"ckpt_{step:07d}.json")
    from langfield.io.checkpoint import flatten_tensors

    return flatten_tensors(ck.tensors), ck.config


def test_interrupted_and_resumed_equals_uninterrupted(scene, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    counts = []
    train_rgb(scene, a, evaluate=False, hooks=[lambda tr: counts.append(tr.gaussians.num)], **TINY)
    assert len(set(counts[20:])) > 1  # densification changed the scene after the checkpoint at 20

    class Stop(KeyboardInterrupt):
        pass

    def interrupt(tr):
        if tr.step == 27:
            raise Stop()

    with pytest.raises(Stop):
        train_rgb(scene, b, evaluate=False, hooks=[interrupt], **TINY)
    assert sorted(p.name for p in (b / "checkpoints").glob("*.json")) == ["ckpt_0000020.json"]
    train_rgb(scene, b, resume=True, evaluate=False)

    for step in (20, 40):
        ta, ca = _all_tensors(a / "checkpoints", step)
        tb, cb = _all_tensors(b / "checkpoints", step)
        assert sorted(ta) == sorted(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (step, k)
        assert ca["sampler_pos"] == cb["sampler_pos"]
    t20, _ = _all_tensors(a / "checkpoints", 20)
    # the strategy's running state, each Adam's state and both RNGs are in the checkpoint
    for k in ("strategy/grad2d", "strategy/count", "optim/means/exp_avg", "optim/means/step", "rng/torch",
              "rng/sampler", "sampler/perm"):
        assert k in t20, k

    # resuming a finished run with more steps continues; the same options are kept
    train_rgb(scene, b, resume=True, evaluate=False, steps=45)
    assert (b / "checkpoints" / "ckpt_0000045.json").exists()
    assert json.loads((b / "config.json").read_text())["train"]["steps"] == 45


def test_resume_refuses_changed_options_and_data(scene, tmp_path):
    run = tmp_path / "run"
    train_rgb(scene, run, evaluate=False, **{**TINY, "steps": 4, "ckpt_every": 2})
    with pytest.raises(RunError, match="sh_degree"):
        train_rgb(scene, run, resume=True, evaluate=False, sh_degree=1)
    with pytest.raises(RunError, match="same data"):
        train_rgb(tmp_path, run, resume=True, evaluate=False)
    with pytest.raises(RunError, match="below the checkpoint"):
        train_rgb(scene, run, resume=True, evaluate=False, steps=2)
    with pytest.raises(SystemExit, match="nothing to resume"):
        main(["train", str(scene), "--out", str(tmp_path / "nothing"), "--resume"])


def test_existing_output_refused_unless_resume_or_overwrite(scene, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--overwrite") as e:
        main(["train", str(scene), "--out", str(out), "--steps", "2", "--quiet"])
    assert "\n" not in str(e.value)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "config.json").exists()

    train_rgb(scene, out, overwrite=True, evaluate=False, **{**TINY, "steps": 2})
    first = (out / "config.json").read_text()
    with pytest.raises(RunError, match="--resume"):
        train_rgb(scene, out, evaluate=False, **{**TINY, "steps": 2})
    train_rgb(scene, out, overwrite=True, evaluate=False, **{**TINY, "steps": 3})
    moved = list(out.glob("replaced-*"))
    assert len(moved) == 1 and (moved[0] / "config.json").read_text() == first
    assert (moved[0] / "checkpoints" / "ckpt_0000002.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "ckpt_0000003.json").exists()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(scene, tmp_path, monkeypatch, capsys):
    import langfield.train.losses as losses

    real = losses.rgb_loss
    calls = {"n": 0}

    def bad_loss(pred, target, lam=0.2):
        calls["n"] += 1
        loss, l1, s = real(pred, target, lam)
        return (loss * float("nan") if calls["n"] > 13 else loss), l1, s

    monkeypatch.setattr(losses, "rgb_loss", bad_loss)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", str(scene), "--out", str(run), "--steps", "30", "--ckpt-every", "10", "--downscale", "2",
              "--quiet"])
    msg = str(e.value)
    assert "step 14" in msg and "not finite" in msg and "step 10" in msg and "\n" not in msg
    assert sorted(p.name for p in (run / "checkpoints").glob("*.json")) == ["ckpt_0000010.json"]
    ck = load_checkpoint(run / "checkpoints")
    assert all(torch.isfinite(t).all() for t in ck.tensors["splats"].values())
    assert not (run / "metrics.json").exists()


def test_nonfinite_parameters_stop_before_any_checkpoint_with_nans(scene, tmp_path):
    def poison(tr):
        if tr.step == 5:
            with torch.no_grad():
                tr.gaussians.splats["opacities"][0] = float("nan")

    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="parameters are not finite") as e:
        train_rgb(scene, run, evaluate=False, hooks=[poison], **{**TINY, "ckpt_every": 4})
    assert e.value.last_checkpoint_step == 4
    assert sorted(p.name for p in (run / "checkpoints").glob("*.json")) == ["ckpt_0000004.json"]


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="cannot load the dataset") as e:
        main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="steps"):
        main(["train", str(tmp_path), "--out", str(tmp_path / "run2"), "--steps", "0"])
    with pytest.raises(SystemExit, match="not a langfield run|not found"):
        main(["eval", str(tmp_path)])
    with pytest.raises(SystemExit, match="no checkpoint|not a langfield run|not found"):
        main(["export", str(tmp_path / "nope"), "--ply", str(tmp_path / "x.ply")])


def test_config_roundtrip_and_resolution():
    c = TrainConfig(steps=300).resolved()
    assert (c.refine_start_iter, c.refine_every, c.refine_stop_iter) == (75, 50, 150)
    c = TrainConfig().resolved()
    assert (c.refine_start_iter, c.refine_every, c.refine_stop_iter, c.grow_grad2d) == (500, 100, 15000, 2e-4)
    assert TrainConfig(absgrad=True).resolved().grow_grad2d == 8e-4
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"bogus": 1})
