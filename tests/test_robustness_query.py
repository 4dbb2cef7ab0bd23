"""`langfield query` robustness (#12 items 3, 5, 7, 11): PLY queries without a run's
dataset (views around the scene, or --data's held-out views), --ply refuses to replace a file,
distinct output names per text, thresholds checked, --out/--ply of the wrong kind refused
with a one-line error and exit status 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from langfield.cameras import look_at, orbit_cameras
from langfield.cli import main
from langfield.query_cli import query_stem

LEVELS = ["subpart", "part", "whole"]
L, D = 3, 64


def _language_ply(path: Path, means: torch.Tensor, seed: int = 0) -> Path:
    """A PLY with lang_* latents + the sidecars `langfield export` writes (autoencoder, JSON)."""
    from langfield.autoencoder import SceneAutoencoder
    from langfield.io import write_ply
    from langfield.scene import Gaussians

    torch.manual_seed(seed)
    n = means.shape[0]
    g = Gaussians.from_points(means, torch.rand(n, 3), sh_degree=0, init_opacity=0.8)
    g.set_lang(torch.randn(n, len(LEVELS) * L), requires_grad=False)
    write_ply(path, g)
    ae = SceneAutoencoder(in_dim=D, encoder_dims=(32, 16), latent_dim=L, decoder_dims=(16, 32)).eval()
    ae.save(path.with_name(path.stem + ".autoencoder.safetensors"))
    path.with_suffix(".json").write_text(json.dumps({"format": "langfield-ply", "language": {
        "levels": LEVELS, "latent_dim": L, "text": {"type": "offline", "dim": D}}}))
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from langfield.scenes import make_scene

    out = tmp_path_factory.mktemp("q") / "tab"
    make_scene("tabletop", out, views=4, size=(32, 32), aa=1, workers=1)
    return out


@pytest.fixture(scope="module")
def ply(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(400, 3, generator=g) * torch.tensor([1.0, 1.0, 0.2]) + torch.tensor([3.0, -1.0, 0.5])
    return _language_ply(tmp_path_factory.mktemp("ply") / "model.ply", means)


def _exit2(argv, match):
    with pytest.raises(SystemExit, match=match) as ei:
        main(argv)
    assert ei.value.code == 2, ei.value.code


def test_query_stems_are_distinct_short_and_stable():
    texts = ["query", "?", "Red mug", "red mug", "red  mug", "x" * 10_000, "x" * 9_999 + "y", "", "日本語"]
    stems = [query_stem(t) for t in texts]
    assert len(set(stems)) == len(texts)
    assert all(len(s) <= 49 and s.replace("-", "").replace("_", "").isalnum() for s in stems), stems
    assert query_stem("red mug") == query_stem("red mug") and query_stem("red mug").startswith("red_mug-")


def test_orbit_cameras_look_at_the_scene():
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(2000, 3, generator=g) * torch.tensor([2.0, 2.0, 0.3]) + torch.tensor([5.0, 1.0, -2.0])
    cams = orbit_cameras(pts, n=6, width=64, height=48, fov_deg=60)
    exact = orbit_cameras(pts, n=6, width=64, height=48, fov_deg=60, up=[0, 0, 1])
    x = pts.double().numpy()
    c = x.mean(0)
    up = np.array([0.0, 0.0, 1.0])  # the axis of least spread
    dists = []
    for cam, cam_exact in zip(cams, exact):
        R, t = cam_exact.viewmat[:3, :3], cam_exact.viewmat[:3, 3]
        e = -R.T @ t
        assert math.isclose(np.dot(e - c, up) / np.linalg.norm(e - c), 0.5, abs_tol=1e-9)
        R, t = cam.viewmat[:3, :3], cam.viewmat[:3, 3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(R), 1.0)
        eye = -R.T @ t
        dists.append(np.linalg.norm(eye - c))
        assert math.isclose(np.dot(eye - c, up) / dists[-1], 0.5, abs_tol=0.02)  # up found from the spread
        pc = (R @ c + t)
        uv = cam.K @ pc / pc[2]
        assert abs(uv[0] - 32) < 1e-9 and abs(uv[1] - 24) < 1e-9  # centre in the middle of the image
        p = x @ R.T + t
        assert (p[:, 2] > 0).all()
        uv = p @ cam.K.T
        uv = uv[:, :2] / uv[:, 2:]
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < 64) & (uv[:, 1] >= 0) & (uv[:, 1] < 48)
        assert inside.mean() > 0.9
        # image "up" (-y) is the world up, seen from above
        assert np.dot(-R[1], up) > 0
    assert np.allclose(dists, dists[0]) and cams[0].K[0, 0] == pytest.approx(32 / math.tan(math.radians(30)))
    assert np.allclose(look_at([0, 0, 0], [0, 0, 1], [0, -1, 0])[:3, :3], np.eye(3))


def test_query_a_ply_without_cameras_renders_views_around_it(ply, capsys):
    assert main(["query", str(ply), "query", "?", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "a PLY carries no cameras" in err and "--data" in err
    dest = ply.parent / "model_queries" / "orbit_00"
    rep = json.loads((dest / "query.json").read_text())
    assert rep["view"] == "orbit_00" and [q["text"] for q in rep["queries"]] == ["query", "?"]
    files = {q["heatmap"] for q in rep["queries"]} | {q["mask"] for q in rep["queries"]}
    assert len(files) == 4 and all((dest / f).is_file() for f in files)
    from PIL import Image

    rgb = np.asarray(Image.open(dest / "rgb.png"), dtype=np.float64) / 255
    assert (rgb.sum(-1) > 0.05).mean() > 0.2  # the scene is in view, not an empty frame
    assert main(["query", str(ply), "query", "--view", "3", "--device", "cpu"]) == 0
    assert json.loads((ply.parent / "model_queries" / "orbit_03" / "query.json").read_text())["view"] == "orbit_03"


def test_query_a_ply_from_a_datasets_held_out_views(scene, tmp_path, capsys):
    from langfield.data import load_dataset
    from langfield.scene import sample_points_in_frustums

    ds = load_dataset(scene, normalize=False)
    vm = torch.stack([torch.as_tensor(f.viewmat, dtype=torch.float32) for f in ds.frames])
    K = torch.stack([torch.as_tensor(f.K, dtype=torch.float32) for f in ds.frames])
    wh = torch.tensor([f.width for f in ds.frames]), torch.tensor([f.height for f in ds.frames])
    pts = sample_points_in_frustums(vm, K, *wh, 3000)[0]
    p = _language_ply(tmp_path / "scene.ply", pts)
    out = tmp_path / "out"
    assert main(["query", str(p), "red mug", "--data", str(scene), "--out", str(out), "--device", "cpu"]) == 0
    rep = json.loads((out / "query.json").read_text())
    test_names = [ds.frames[i].name for i in ds.indices("test")] or [ds.frames[0].name]
    assert rep["view"] == test_names[0]
    from PIL import Image

    rgb = np.asarray(Image.open(out / "rgb.png"))
    assert rgb.shape[:2] == (ds.frames[0].height, ds.frames[0].width) and rgb.mean() > 5
    _exit2(["query", str(p), "red mug", "--data", str(tmp_path / "nope")], r"--data .*nope: not a dataset folder")


def test_ply_output_is_not_replaced_without_overwrite(ply, tmp_path):
    target = tmp_path / "existing.ply"
    target.write_bytes(b"precious")
    _exit2(["query", str(ply), "red mug", "--ply", str(target), "--device", "cpu"],
           r"--ply .*existing\.ply exists; pass --overwrite")
    assert target.read_bytes() == b"precious"
    assert main(["query", str(ply), "red mug", "--ply", str(target), "--overwrite", "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) == 0
    from langfield.io import read_ply

    assert read_ply(target).num == 400


@pytest.mark.parametrize("opt,value", [("--threshold", "nan"), ("--threshold", "5"), ("--threshold", "-0.1"),
                                       ("--select-threshold", "inf"), ("--select-threshold", "1.5")])
def test_thresholds_outside_unit_interval_are_refused(ply, opt, value):
    _exit2(["query", str(ply), "red mug", opt, value], rf"{opt} {value if value != 'inf' else 'inf'}.*in \[0, 1\]")


def test_wrong_kinds_of_output_paths(ply, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    _exit2(["query", str(ply), "red mug", "--out", str(f)], r"--out .*afile: is a file; expected a folder")
    _exit2(["query", str(ply), "red mug", "--out", str(f / "sub")], r"afile is a file, not a folder")
    _exit2(["query", str(ply), "red mug", "--ply", str(tmp_path)], r"--ply .*: is a folder; expected a \.ply")
    _exit2(["query", str(ply), "red mug", "--ply", str(f / "x.ply")], r"afile is a file, not a folder")
    assert f.read_text() == "x"


def test_a_very_long_query_gets_a_safe_file_name(ply, tmp_path):
    long = "the red mug on the table " * 400  # 10,000 characters
    assert main(["query", str(ply), long, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    rep = json.loads((tmp_path / "o" / "query.json").read_text())
    assert rep["queries"][0]["text"] == long and len(rep["queries"][0]["heatmap"]) < 80
    assert (tmp_path / "o" / rep["queries"][0]["heatmap"]).is_file()
