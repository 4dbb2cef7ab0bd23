"""Gaussians (langfield.scene), 3DGS PLY files and checkpoints (langfield.io)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from langfield.io.checkpoint import load_gaussians, save_gaussians
from plyfile import PlyData, PlyElement

from langfield.io import (CheckpointError, PlyError, latest_checkpoint, load_checkpoint, load_gsplat_ckpt, read_ply,
                          read_points_ply, save_checkpoint, write_ply, write_points_ply)
from langfield.scene import Gaussians, eval_sh_bases, knn_distances, sample_points_in_frustums, sh_rotation_matrices

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GUITAR = DATA / "splats" / "guitar.ply"


def _params(n, degree, lang_dim=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    k1 = (degree + 1) ** 2 - 1
    p = {
        "means": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.randn(n, 3, generator=g) - 3,
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        # distinct, recognisable values: shN[n, k, c] = n * 1000 + k * 10 + c
        "shN": (torch.arange(n)[:, None, None] * 1000.0 + torch.arange(k1)[None, :, None] * 10.0
                + torch.arange(3)[None, None, :]).float(),
    }
    if lang_dim:
        p["lang"] = torch.randn(n, lang_dim, generator=g)
    return p


def save_ply_like_3dgs(path, xyz, features_dc, features_rest, opacities, scale, rotation):
    """The vertex layout the original 3DGS ``GaussianModel.save_ply`` writes (re-stated here, not
    copied): float32 properties x y z nx ny nz f_dc_* f_rest_* opacity scale_* rot_*, with the
    SH features [N, K, 3] transposed to [N, 3, K] before flattening (channel-major)."""
    n = xyz.shape[0]
    normals = np.zeros_like(xyz)
    f_dc = features_dc.transpose(0, 2, 1).reshape(n, -1)
    f_rest = features_rest.transpose(0, 2, 1).reshape(n, -1)
    names = ["x", "y", "z", "nx", "ny", "nz"]
    names += [f"f_dc_{i}" for i in range(f_dc.shape[1])]
    names += [f"f_rest_{i}" for i in range(f_rest.shape[1])]
    names += ["opacity"] + [f"scale_{i}" for i in range(scale.shape[1])]
    names += [f"rot_{i}" for i in range(rotation.shape[1])]
    elements = np.empty(n, dtype=[(a, "f4") for a in names])
    attributes = np.concatenate((xyz, normals, f_dc, f_rest, opacities, scale, rotation), axis=1)
    elements[:] = list(map(tuple, attributes))
    PlyData([PlyElement.describe(elements, "vertex")]).write(str(path))


# ------------------------------------------------------------------------------------------
# PLY

@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_3dgs_layout_roundtrip_bit_exact(tmp_path, degree):
    n = 37
    p = _params(n, degree)
    src = tmp_path / "3dgs.ply"
    save_ply_like_3dgs(src, p["means"].numpy(), p["sh0"].numpy(), p["shN"].numpy(), p["opacities"].numpy()[:, None],
                       p["scales"].numpy(), p["quats"].numpy())
    g = read_ply(src)
    assert g.num == n and g.sh_degree == degree and g.lang is None
    for k, v in p.items():
        assert torch.equal(g.splats[k].detach(), v), k  # shN comes back in gsplat's [N, K-1, 3] order
    if degree:
        assert g.shN[5, 2, 1].item() == 5 * 1000 + 2 * 10 + 1
    out = tmp_path / "out.ply"
    write_ply(out, g)
    assert out.read_bytes() == src.read_bytes()
    # names of the written file, in order
    names = [pr.name for pr in PlyData.read(str(out))["vertex"].properties]
    k1 = (degree + 1) ** 2 - 1
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:9 + 3 * k1] == [f"f_rest_{i}" for i in range(3 * k1)]
    assert names[9 + 3 * k1:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def test_ply_gsplat_exporter_roundtrip(tmp_path):
    exporter = pytest.importorskip("gsplat.exporter")
    p = _params(50, 3)
    data = exporter.export_splats(p["means"], p["scales"], p["quats"], p["opacities"], p["sh0"], p["shN"],
                                  format="ply", save_to=str(tmp_path / "gs.ply"))
    g = read_ply(tmp_path / "gs.ply")
    for k, v in p.items():
        assert torch.equal(g.splats[k].detach(), v), k
    write_ply(tmp_path / "again.ply", g, layout="gsplat")
    assert (tmp_path / "again.ply").read_bytes() == data
    _, layout = read_ply(tmp_path / "gs.ply", return_layout=True)
    write_ply(tmp_path / "again2.ply", g, layout=layout)
    assert (tmp_path / "again2.ply").read_bytes() == data


def test_ply_compressed_gsplat(tmp_path):
    exporter = pytest.importorskip("gsplat.exporter")
    p = _params(300, 1)
    p["opacities"] = p["opacities"].abs() + 1.0  # all above the exporter's opacity cut
    p["shN"] = torch.randn(300, 3, 3) * 0.5
    exporter.export_splats(p["means"], p["scales"], p["quats"], p["opacities"], p["sh0"], p["shN"],
                           format="ply_compressed", save_to=str(tmp_path / "c.ply"))
    g = read_ply(tmp_path / "c.ply")
    assert g.num == 300 and g.sh_degree == 1
    # the exporter reorders (Morton); match by position
    d = torch.cdist(g.means.detach(), p["means"])
    idx = d.argmin(1)
    assert len(set(idx.tolist())) == 300
    ext = (p["means"].max(0).values - p["means"].min(0).values).max()
    assert (g.means.detach() - p["means"][idx]).abs().max() < ext / 500
    assert (g.scales.detach() - p["scales"][idx]).abs().max() < 0.05
    q0 = torch.nn.functional.normalize(p["quats"][idx], dim=-1)
    assert ((g.quats_act.detach() * q0).sum(-1).abs() > 0.99).all()
    assert (g.opacities_act.detach() - torch.sigmoid(p["opacities"][idx])).abs().max() < 3 / 255
    assert (g.rgb.detach() - (p["sh0"][idx, 0] * 0.28209479177387814 + 0.5)).abs().max() < 0.05
    assert (g.shN.detach() - p["shN"][idx]).abs().max() < 8 / 256 + 1e-6


def test_ply_lang_roundtrip_and_layouts(tmp_path):
    p = _params(20, 2, lang_dim=5)
    g = Gaussians.from_dict(p)
    write_ply(tmp_path / "l.ply", g)
    names = [pr.name for pr in PlyData.read(str(tmp_path / "l.ply"))["vertex"].properties]
    assert names[-5:] == [f"lang_{i}" for i in range(5)]
    g2 = read_ply(tmp_path / "l.ply")
    assert g2.lang_dim == 5
    for k in p:
        assert torch.equal(g2.splats[k].detach(), p[k]), k
    write_ply(tmp_path / "nolang.ply", g, lang=False)
    assert read_ply(tmp_path / "nolang.ply").lang is None


def test_ply_foreign_layout_preserved(tmp_path):
    """A SuperSplat-like file: other property order, no normals, an unknown extra property and
    a comment; re-saving with its layout gives the same bytes."""
    n = 16
    p = _params(n, 1)
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(9)]
    names += ["opacity", "rot_0", "rot_1", "rot_2", "rot_3", "scale_0", "scale_1", "scale_2", "filter_3D"]
    arr = np.empty(n, dtype=[(a, "<f4") for a in names])
    for i, c in enumerate("xyz"):
        arr[c] = p["means"][:, i]
    for i in range(3):
        arr[f"f_dc_{i}"] = p["sh0"][:, 0, i]
        arr[f"scale_{i}"] = p["scales"][:, i]
    rest = p["shN"].permute(0, 2, 1).reshape(n, -1)
    for i in range(9):
        arr[f"f_rest_{i}"] = rest[:, i]
    for i in range(4):
        arr[f"rot_{i}"] = p["quats"][:, i]
    arr["opacity"] = p["opacities"]
    arr["filter_3D"] = np.arange(n)
    src = tmp_path / "ss.ply"
    PlyData([PlyElement.describe(arr, "vertex")], byte_order="<", comments=["Generated by SuperSplat"]).write(str(src))
    g, layout = read_ply(src, return_layout=True)
    for k in p:
        assert torch.equal(g.splats[k].detach(), p[k]), k
    assert layout.names == names and layout.comments == ["Generated by SuperSplat"]
    write_ply(tmp_path / "re.ply", g, layout=layout)
    assert (tmp_path / "re.ply").read_bytes() == src.read_bytes()
    # fewer Gaussians: the extra property is dropped with a warning
    with pytest.warns(UserWarning, match="filter_3D"):
        write_ply(tmp_path / "sub.ply", g.select(torch.arange(4)), layout=layout)
    assert read_ply(tmp_path / "sub.ply").num == 4


def test_ply_errors(tmp_path):
    # plain point cloud: clear error, and it loads as points
    pts = tmp_path / "points.ply"
    xyz = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    rgb = np.arange(30, dtype=np.uint8).reshape(10, 3)
    write_points_ply(pts, xyz, rgb)
    with pytest.raises(PlyError, match="plain point cloud") as e:
        read_ply(pts)
    assert str(pts) in str(e.value) and "read_points_ply" in str(e.value)
    x2, c2 = read_points_ply(pts)
    assert np.array_equal(x2, xyz) and np.allclose(c2, rgb / 255.0)
    # not a PLY at all
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"this is not a ply file\n" * 3)
    with pytest.raises(PlyError, match="bad.ply"):
        read_ply(bad)
    # truncated binary body
    p = _params(10, 0)
    good = tmp_path / "good.ply"
    write_ply(good, Gaussians.from_dict(p))
    trunc = tmp_path / "trunc.ply"
    trunc.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(PlyError, match="trunc.ply"):
        read_ply(trunc)
    # f_rest count that is no SH degree
    props = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(6)] + ["opacity"]
    props += ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    arr = np.zeros(3, dtype=[(a, "<f4") for a in props])
    odd = tmp_path / "odd.ply"
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(odd))
    with pytest.raises(PlyError, match="SH degree"):
        read_ply(odd)
    with pytest.raises(FileNotFoundError):
        read_ply(tmp_path / "missing.ply")
    # empty point cloud for initialisation
    empty = tmp_path / "empty.ply"
    write_points_ply(empty, np.zeros((0, 3)))
    with pytest.raises(PlyError, match="empty"):
        read_points_ply(empty)


@pytest.mark.skipif(not GUITAR.exists(), reason="shared data (splats/guitar.ply) not present")
def test_guitar_ply(tmp_path):
    g, layout = read_ply(GUITAR, return_layout=True)
    assert g.num == 90854 and g.sh_degree == 0 and g.lang is None
    write_ply(tmp_path / "g.ply", g, layout=layout)
    assert (tmp_path / "g.ply").read_bytes() == GUITAR.read_bytes()
    write_ply(tmp_path / "std.ply", g)
    g2 = read_ply(tmp_path / "std.ply")
    for k, v in g.to_dict().items():
        assert torch.equal(v, g2.splats[k].detach()), k


# ------------------------------------------------------------------------------------------
# Gaussians

def test_gaussians_basics():
    p = _params(12, 3, lang_dim=4)
    g = Gaussians.from_dict(p)
    assert g.num == len(g) == 12 and g.sh_degree == 3 and g.lang_dim == 4
    assert g.colors.shape == (12, 16, 3)
    assert torch.allclose(g.scales_act, p["scales"].exp())
    assert torch.allclose(g.opacities_act, torch.sigmoid(p["opacities"]))
    assert torch.allclose(g.quats_act.norm(dim=-1), torch.ones(12))
    assert all(v.requires_grad for v in g.splats.values())
    g0 = Gaussians(p["means"], p["quats"], p["scales"], p["opacities"], p["sh0"])
    assert g0.sh_degree == 0 and g0.shN.shape == (12, 0, 3) and g0.lang is None and "lang" not in g0.splats
    g0.set_lang(torch.zeros(12, 3))
    assert g0.lang_dim == 3
    g0.set_lang(None)
    assert g0.lang is None
    with pytest.raises(ValueError, match="quats"):
        Gaussians(p["means"], p["quats"][:, :3], p["scales"], p["opacities"], p["sh0"])
    with pytest.raises(KeyError, match="features"):
        Gaussians.from_dict({k: v for k, v in p.items() if k not in ("sh0", "shN")} | {"features": torch.zeros(12, 8)})
    # prefixed state dict (nn.Module.state_dict of a Gaussians)
    g2 = Gaussians.from_dict(g.state_dict())
    assert torch.equal(g2.means, g.means)


def test_knn_exact():
    torch.manual_seed(0)
    clouds = [torch.rand(300, 3), torch.cat([torch.randn(4000, 3) * 0.01, torch.randn(2000, 3) * 10,
                                             torch.zeros(20, 3)]), torch.randn(5000, 3) * torch.tensor([50.0, 1, 0.01])
              + 1000]
    for x in clouds:
        d = knn_distances(x, 3)
        xd = (x - x.mean(0)).double()
        ref = torch.cdist(xd, xd).topk(4, largest=False).values[:, 1:]
        assert torch.allclose(d.double(), ref, rtol=1e-4, atol=1e-6)
    assert torch.isinf(knn_distances(torch.rand(2, 3), 3)[:, 1:]).all()


def test_from_points_3dgs_init():
    g_ = torch.Generator().manual_seed(1)
    xyz = torch.randn(500, 3, generator=g_)
    rgb = torch.rand(500, 3, generator=g_)
    g = Gaussians.from_points(xyz, rgb, sh_degree=2, lang_dim=3)
    ref = torch.cdist(xyz.double(), xyz.double()).topk(4, largest=False).values[:, 1:]
    want = torch.log(torch.sqrt((ref ** 2).mean(-1))).float()
    assert torch.allclose(g.scales[:, 0], want, atol=1e-5) and torch.equal(g.scales[:, 0], g.scales[:, 2])
    assert torch.allclose(g.opacities_act, torch.full((500,), 0.1))
    assert torch.equal(g.quats, torch.tensor([1.0, 0, 0, 0]).expand(500, 4))
    assert torch.allclose(g.sh0[:, 0], (rgb - 0.5) / 0.28209479177387814)
    assert torch.allclose(g.rgb, rgb, atol=1e-6)
    assert g.shN.shape == (500, 8, 3) and not g.shN.any()
    assert g.lang.shape == (500, 3)
    g8 = Gaussians.from_points(xyz.numpy(), (rgb.numpy() * 255).astype(np.uint8), sh_degree=0)
    assert torch.allclose(g8.rgb, (rgb * 255).floor() / 255, atol=1e-6)
    with pytest.raises(ValueError, match="empty point cloud"):
        Gaussians.from_points(np.zeros((0, 3)))
    assert Gaussians.from_points(np.zeros((1, 3))).num == 1


def _look_at(eye, target):
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0, 0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, y, z], 1)
    c2w[:3, 3] = eye
    return np.linalg.inv(c2w)


def test_random_in_frustums():
    views = np.stack([_look_at([4 * math.cos(a), 4 * math.sin(a), 1.5], [0, 0, 0]) for a in np.linspace(0, 6, 10)])
    K = np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]])
    Ks = np.broadcast_to(K, (10, 3, 3))
    xyz, cnt = sample_points_in_frustums(views, Ks, 64, 48, 2000, generator=torch.Generator().manual_seed(0))
    assert xyz.shape == (2000, 3) and (cnt >= 5).all()
    # recount independently
    pw = np.concatenate([xyz.double().numpy(), np.ones((2000, 1))], 1)
    seen = 0
    for V in views:
        pc = pw @ V.T
        uv = pc[:, :3] @ K.T
        u, v = uv[:, 0] / pc[:, 2], uv[:, 1] / pc[:, 2]
        seen = seen + ((pc[:, 2] > 0) & (u >= 0) & (u < 64) & (v >= 0) & (v < 48))
    assert (seen >= 5).all()
    g = Gaussians.random_in_frustums(views, Ks, 64, 48, n=300, sh_degree=1)
    assert g.num == 300 and g.sh_degree == 1 and torch.isfinite(g.scales).all()


def test_sh_basis_matches_gsplat():
    impl = pytest.importorskip("gsplat.cuda._torch_impl")
    d = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    assert torch.allclose(eval_sh_bases(3, d), impl._eval_sh_bases_fast(16, d), atol=1e-6)


def _rand_similarity(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(4, generator=g, dtype=torch.float64), dim=0)
    w, x, y, z = q
    R = torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = 2.5 * R
    T[:3, 3] = torch.tensor([0.3, -1.0, 2.0])
    return T, R, 2.5


def _covariance(g):
    q = g.quats_act.detach().double()
    w, x, y, z = q.unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    S = torch.diag_embed(g.scales_act.detach().double())
    M = R @ S
    return M @ M.transpose(1, 2)


def test_transformed_similarity():
    p = _params(30, 3, lang_dim=2)
    p["shN"] = torch.randn(30, 15, 3)
    g = Gaussians.from_dict(p)
    T, R, s = _rand_similarity()
    h = g.transformed(T)
    assert torch.allclose(h.means.double(), g.means.detach().double() @ (s * R).T + T[:3, 3], atol=1e-5)
    assert torch.allclose(_covariance(h), s * s * R @ _covariance(g) @ R.T, atol=1e-4)
    # colour seen along R d after == colour along d before
    d = torch.nn.functional.normalize(torch.randn(30, 3, dtype=torch.float64), dim=-1)
    before = (eval_sh_bases(3, d)[:, :, None] * g.colors.detach().double()).sum(1)
    after = (eval_sh_bases(3, d @ R.T)[:, :, None] * h.colors.detach().double()).sum(1)
    assert torch.allclose(before, after, atol=1e-4)
    assert torch.equal(h.lang, g.lang) and torch.equal(h.opacities, g.opacities)
    back = h.transformed(torch.linalg.inv(T))
    for k in ("means", "scales", "shN"):
        assert torch.allclose(back.splats[k], g.splats[k], atol=1e-4), k
    for D in sh_rotation_matrices(R, 3):
        assert torch.allclose(D @ D.T, torch.eye(D.shape[0], dtype=torch.float64), atol=1e-8)


def test_gsplat_strategy_ops_on_splats():
    ops = pytest.importorskip("gsplat.strategy.ops")
    from gsplat.strategy import DefaultStrategy

    g = Gaussians.from_dict(_params(40, 1, lang_dim=3))
    optimizers = {k: torch.optim.Adam([{"params": g.splats[k], "lr": 1e-3, "name": k}]) for k in g.splats}
    strategy = DefaultStrategy()
    strategy.check_sanity(g.splats, optimizers)
    state = strategy.initialize_state()
    loss = sum(v.sum() for v in g.splats.values())
    loss.backward()
    for o in optimizers.values():
        o.step()
    mask = torch.zeros(40, dtype=torch.bool)
    mask[:5] = True
    ops.duplicate(g.splats, optimizers, state, mask)
    assert g.num == 45 and g.lang.shape == (45, 3) and isinstance(g.splats["lang"], torch.nn.Parameter)
    ops.remove(g.splats, optimizers, state, torch.arange(45) < 10)
    assert g.num == 35 and g.sh_degree == 1


# ------------------------------------------------------------------------------------------
# checkpoints

def test_checkpoint_roundtrip(tmp_path):
    t = {"splats": {"means": torch.randn(5, 3), "opacities": torch.randn(5)},
         "optim": {"means": {"exp_avg": torch.zeros(5, 3)}}, "bytes": torch.arange(4, dtype=torch.uint8)}
    cfg = {"lr": 1e-3, "name": "x", "nested": {"a": [1, 2]}, "path": Path("/tmp/a")}
    f = save_checkpoint(tmp_path / "run" / "checkpoints", t, cfg, step=120)
    assert f.endswith("ckpt_0000120.safetensors")
    save_checkpoint(tmp_path / "run" / "checkpoints", t, cfg, step=7)
    files = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert files == ["ckpt_0000007.json", "ckpt_0000007.safetensors", "ckpt_0000120.json", "ckpt_0000120.safetensors"]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "ckpt_0000120.json"
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints", f, f.replace(".safetensors", ".json")):
        ck = load_checkpoint(where)
        assert ck.step == 120 and ck.config["lr"] == 1e-3 and ck.config["path"] == "/tmp/a"
        assert torch.equal(ck.tensors["splats"]["means"], t["splats"]["means"])
        assert torch.equal(ck.tensors["optim"]["means"]["exp_avg"], t["optim"]["means"]["exp_avg"])
        assert ck.tensors["bytes"].dtype == torch.uint8
    doc = json.loads(Path(f.replace(".safetensors", ".json")).read_text())
    assert doc["format"] == "langfield-checkpoint" and doc["step"] == 120
    # explicit file name; shared storage and views are fine
    base = torch.randn(10)
    save_checkpoint(tmp_path / "one.safetensors", {"a": base[:5], "b": base[5:], "c": base}, {}, 3)
    ck = load_checkpoint(tmp_path / "one.safetensors")
    assert torch.equal(ck.tensors["b"], base[5:]) and ck.step == 3
    with pytest.raises(TypeError, match="not a tensor"):
        save_checkpoint(tmp_path / "x.safetensors", {"a": 3}, {}, 0)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "y.safetensors", {"a": torch.zeros(1)}, {"bad": object()}, 0)
    assert not (tmp_path / "y.safetensors").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_checkpoint_errors(tmp_path):
    f = Path(save_checkpoint(tmp_path / "c.safetensors", {"a": torch.zeros(3)}, {"k": 1}, 1))
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="c.safetensors"):
        load_checkpoint(f)
    j = tmp_path / "c.json"
    j.write_text("{not json")
    with pytest.raises(CheckpointError, match="c.json"):
        load_checkpoint(j)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "empty_dir_that_is_missing")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "emptydir")


def test_gaussians_save_load(tmp_path):
    g = Gaussians.from_dict(_params(9, 2, lang_dim=4))
    path = save_gaussians(tmp_path / "ck", g, config={"note": "hi"}, step=5)
    ck = load_checkpoint(path)
    assert ck.config["sh_degree"] == 2 and ck.config["lang_dim"] == 4 and ck.config["note"] == "hi"
    g2 = load_gaussians(tmp_path / "ck")
    for k, v in g.to_dict().items():
        assert torch.equal(v, g2.splats[k].detach()), k


def test_load_gsplat_ckpt(tmp_path):
    p = _params(11, 3)
    splats = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in p.items()})
    torch.save({"step": 2999, "splats": splats.state_dict()}, tmp_path / "ckpt_2999_rank0.pt")
    g, step = load_gsplat_ckpt(tmp_path / "ckpt_2999_rank0.pt")
    assert step == 2999 and g.sh_degree == 3
    for k, v in p.items():
        assert torch.equal(g.splats[k].detach(), v)
    assert load_gaussians(tmp_path / "ckpt_2999_rank0.pt").num == 11
    # appearance-optimised checkpoints have features/colors instead of sh0/shN
    app = {k: v for k, v in p.items() if k not in ("sh0", "shN")}
    app.update(features=torch.zeros(11, 32), colors=torch.zeros(11, 3))
    torch.save({"step": 1, "splats": app}, tmp_path / "app.pt")
    with pytest.raises(CheckpointError, match="appearance"):
        load_gsplat_ckpt(tmp_path / "app.pt")
    # arbitrary pickled objects are refused (weights_only=True)
    torch.save({"step": 1, "splats": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_gsplat_ckpt(tmp_path / "evil.pt")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())
