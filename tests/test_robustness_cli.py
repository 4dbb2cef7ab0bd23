"""CLI robustness (#12 items 8, 9, 11, 12): one-line errors with exit status 2 before any work,
no traceback, nothing left behind, existing checkpoints intact when a write fails.

Each test fails on the code before the fix (fa7f3d0): ``scenes make --size 1x1`` died in
``torch.cat`` (exit 1), a NaN PLY stopped at step 1 with "try lower learning rates",
``--features labels`` on data without label maps trained the whole RGB stage then raised a
ValueError traceback, a failed checkpoint write was an ``OSError`` traceback, ``render --out
FILE`` rendered nothing with exit 0, sam-clip without weights failed after the RGB stage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from langfield.cli import main


def _exit2(argv, capsys, *match) -> str:
    """Run the CLI in-process: exit status 2 and a one-line error naming every ``match``."""
    with pytest.raises(SystemExit) as ei:
        rc = main([str(a) for a in argv])
        raise SystemExit(rc)
    err = capsys.readouterr().err
    assert ei.value.code == 2, (ei.value.code, err)
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("langfield"), err
    assert "Traceback" not in err
    for m in match:
        assert m in last, (m, last)
    return last


def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from langfield.scenes import make_scene

    out = tmp_path_factory.mktemp("rc") / "tab"
    make_scene("tabletop", out, views=4, size=(16, 16), aa=1, workers=1, test_every=2)
    return out


@pytest.fixture(scope="module")
def unlabelled(scene, tmp_path_factory):
    """The scene without its label maps (as any COLMAP or nerfstudio capture)."""
    out = tmp_path_factory.mktemp("nl") / "nolabels"
    shutil.copytree(scene, out)
    doc = json.loads((out / "transforms.json").read_text())
    for f in doc["frames"]:
        f.pop("label_paths", None)
        f.pop("instance_path", None)
    (out / "transforms.json").write_text(json.dumps(doc))
    shutil.rmtree(out / "labels")
    (out / "labels.json").unlink()
    return out


# ---------------------------------------------------------------------------------- scenes make (#12.12)
@pytest.mark.parametrize("size,why", [("1x1", "8..8192"), ("0x5", "8..8192"), ("abc", "WIDTHxHEIGHT")])
def test_scenes_make_bad_size(tmp_path, capsys, size, why):
    out = tmp_path / "s"
    last = _exit2(["scenes", "make", "tabletop", "--out", out, "--views", "2", "--size", size], capsys, why)
    assert "--size" not in last or size in last
    assert not out.exists()


def test_scenes_make_smallest_size_renders(tmp_path):
    from langfield.scenes import make_scene

    res = make_scene("tabletop", tmp_path / "s", views=2, size=(8, 8), aa=1, workers=1)
    assert (res["width"], res["height"]) == (8, 8)
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 2


# ---------------------------------------------------------------------------------- train: early refusals
def test_init_ply_nan_names_property_and_count(scene, tmp_path, capsys):
    from langfield.io import write_ply
    from langfield.scene import Gaussians

    g = Gaussians.from_points(torch.randn(50, 3) * 0.3, torch.rand(50, 3), sh_degree=1, init_opacity=0.5)
    with torch.no_grad():
        g.splats["means"][:7, 0] = float("nan")
        g.splats["means"][3, 2] = float("inf")
        g.splats["shN"][:2, 1, 2] = float("nan")  # band 1, channel 2 -> f_rest_{2 * 3 + 1}
    write_ply(tmp_path / "nan.ply", g)
    out = tmp_path / "run"
    last = _exit2(["train", scene, "--out", out, "--steps", "3", "--device", "cpu", "--init-ply",
                   tmp_path / "nan.ply", "--quiet"], capsys, "nan.ply", "x in 7", "z in 1", "f_rest_7 in 2",
                  "of its 50 Gaussians")
    assert "learning rate" not in last
    assert not out.exists()


def test_nonfinite_ply_properties_layout():
    from langfield.scene import Gaussians
    from langfield.train.rgb import nonfinite_ply_properties

    g = Gaussians.from_points(torch.zeros(4, 3), torch.rand(4, 3), sh_degree=2, init_opacity=0.5)
    with torch.no_grad():
        g.splats["quats"][1, 3] = float("nan")
        g.splats["opacities"][:3] = float("inf")
        g.splats["shN"][0, 4, 1] = float("nan")  # K = 8 rest coefficients: f_rest_{1 * 8 + 4}
    assert nonfinite_ply_properties(g) == [("f_rest_12", 1), ("opacity", 3), ("rot_3", 1)]


def test_features_labels_without_label_maps_refused_before_rgb(unlabelled, tmp_path, capsys):
    out = tmp_path / "run"
    _exit2(["train", unlabelled, "--out", out, "--steps", "3", "--device", "cpu", "--features", "labels",
            "--quiet"], capsys, "--features labels", "label_paths", "dense-clip", "sam-clip")
    assert not out.exists()  # refused before the RGB stage
    _exit2(["extract", "--data", unlabelled, "--run", out, "--extractor", "labels", "--text-encoder", "offline"],
           capsys, "label_paths", "dense-clip")
    assert not out.exists()


def test_labels_problem_names_missing_files(scene, tmp_path):
    from langfield.data import load_dataset
    from langfield.features.cli import labels_problem

    assert labels_problem(load_dataset(scene)) is None
    d = shutil.copytree(scene, tmp_path / "d")
    victim = sorted((d / "labels" / "part").glob("*.png"))[1]
    victim.unlink()
    msg = labels_problem(load_dataset(d))
    assert msg is not None and "1 label map file(s) missing" in msg and victim.name in msg
    (d / "labels.json").unlink()
    assert "labels.json: not found" in labels_problem(load_dataset(d))


def test_sam_clip_without_weights_refused_before_rgb(scene, tmp_path, capsys):
    out = tmp_path / "run"
    _exit2(["train", scene, "--out", out, "--steps", "3", "--device", "cpu", "--features", "sam-clip", "--quiet"],
           capsys, "--sam-checkpoint")
    _exit2(["train", scene, "--out", out, "--steps", "3", "--device", "cpu", "--features", "dense-clip",
            "--clip-checkpoint", tmp_path / "none.pt", "--quiet"], capsys, "--clip-checkpoint", "none.pt")
    assert not out.exists()


def test_init_ply_folder(scene, tmp_path, capsys):
    _exit2(["train", scene, "--out", tmp_path / "r", "--steps", "3", "--init-ply", tmp_path, "--quiet"], capsys,
           "--init-ply", "is a folder")


# ---------------------------------------------------------------------------------- writes that fail (#12.11)
@pytest.fixture(scope="module")
def run(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(scene), "--out", str(out), "--steps", "4", "--ckpt-every", "2", "--device", "cpu",
                 "--quiet", "--no-densify", "--no-renders"]) == 0
    return out


_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG (as on a full disk)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from langfield.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="RLIMIT_FSIZE")
def test_full_disk_checkpoint_write_one_line_and_checkpoints_intact(scene, run, tmp_path):
    r2 = shutil.copytree(run, tmp_path / "run")
    ckpts = _digests(r2 / "checkpoints")
    # config.json (a few KB) still fits; a checkpoint (tens of KB) does not
    limit = max(p.stat().st_size for p in (r2 / "checkpoints").glob("*.json")) * 8
    assert limit < min(p.stat().st_size for p in (r2 / "checkpoints").glob("*.safetensors"))
    r = subprocess.run([sys.executable, "-c", _FSIZE, str(limit), "train", str(scene), "--out", str(r2), "--resume",
                        "--steps", "6", "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "checkpoint of step 6" in last and str(r2 / "checkpoints") in last and "step 4 is intact" in last, last
    assert _digests(r2 / "checkpoints") == ckpts  # no partial file left, nothing rotated away


def test_lock_or_config_write_failure_is_one_line(scene, run, tmp_path, capsys, monkeypatch):
    from langfield.run import RunLock

    r2 = shutil.copytree(run, tmp_path / "run")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(RunLock, "acquire", denied)
    _exit2(["train", scene, "--out", r2, "--resume", "--device", "cpu", "--quiet"], capsys, "--out", "lock",
           "Permission denied")


def test_render_out_is_a_file(run, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("precious")
    _exit2(["render", run, "--out", f, "--device", "cpu"], capsys, "--out", "afile", "is a file")
    assert f.read_text() == "precious"


def test_export_unwritable_is_one_line(run, tmp_path, capsys, monkeypatch):
    import langfield.io as lio

    def full(path, g, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lio, "write_ply", full)
    _exit2(["export", run, "--ply", tmp_path / "x.ply"], capsys, "--ply", "x.ply", "No space left on device")


def test_demo_refuses_bad_options_before_work(tmp_path, capsys):
    _exit2(["demo", "--out", tmp_path / "d", "--size", "1x1"], capsys, "--size", "1x1")
    _exit2(["demo", "--out", tmp_path / "d", "--steps", "0"], capsys, "--steps")
    (tmp_path / "f").write_text("x")
    _exit2(["demo", "--out", tmp_path / "f"], capsys, "is a file")
    assert not (tmp_path / "d").exists()


def test_os_path_names_the_target_not_the_temporary_file(tmp_path):
    from langfield.train.rgb import os_path, os_reason

    e = PermissionError(13, "Permission denied", str(tmp_path / ".config.json.xdokli3c.tmp"))
    assert os_path(e, tmp_path) == tmp_path / "config.json"
    e = OSError(27, "File too large", str(tmp_path / ".ckpt_0000010.safetensors.a_b9.tmp"))
    assert os_path(e, tmp_path) == tmp_path / "ckpt_0000010.safetensors"
    assert "disk is full" in os_reason(e)
    assert os_path(OSError(28, "No space left on device"), tmp_path / "run") == tmp_path / "run"
    assert os_path(PermissionError(13, "x", str(tmp_path / "plain.json")), tmp_path) == tmp_path / "plain.json"
