"""Dynamic scenes (#14): deformable Gaussians, their trainer, language over time, queries with time."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tiny_gaussians(n=300, lang_dim=0, deg=1, seed=0):
    from langfield.scene import Gaussians

    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    gs = Gaussians.from_points(pts, torch.rand(n, 3, generator=g), sh_degree=deg, lang_dim=lang_dim)
    with torch.no_grad():
        gs.splats["shN"].normal_(0, 0.1, generator=g)
        gs.splats["scales"].add_(torch.randn(n, 3, generator=g) * 0.5)
        gs.splats["quats"].add_(torch.randn(n, 4, generator=g) * 0.3)
        if lang_dim:
            gs.splats["lang"].normal_(0, 1, generator=g)
    return gs


def _cams(C=2, size=40, time=None):
    from langfield.render import Cameras

    vms = []
    for k in range(C):
        a = 0.15 * k
        R = torch.tensor([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]], dtype=torch.float32)
        vm = torch.eye(4)
        vm[:3, :3] = R
        vm[:3, 3] = torch.tensor([0.05 * k, 0.0, 0.1 * k])
        vms.append(vm)
    K = torch.tensor([[50.0, 0, size / 2], [0, 50.0, size / 2], [0, 0, 1]])
    times = None if time is None else torch.full((C,), float(time))
    return Cameras(torch.stack(vms), K.expand(C, 3, 3).clone(), size, size, times)


# ------------------------------------------------------------------------------------------ model

@pytest.mark.parametrize("kind", ["hexplane", "mlp"])
def test_zero_deformation_renders_the_static_scene_exactly(kind):
    from langfield.dynamic import DeformableGaussians, DeformConfig
    from langfield.render import render

    g = _tiny_gaussians(lang_dim=4)
    dg = DeformableGaussians.from_gaussians(g, DeformConfig(kind=kind))
    assert dg.deform.is_zero()
    ref = render(g, _cams(), language=True, depth=True)
    for t in (0.0, 0.37, 1.0):
        out = render(dg, _cams(time=t), language=True, depth=True)
        for name in ("rgb", "alpha", "depth", "lang"):
            assert torch.equal(getattr(out, name), getattr(ref, name)), (kind, t, name)
        out2 = render(dg, _cams(), t=t, language=True)
        assert torch.equal(out2.rgb, ref.rgb)


def test_deformation_moves_and_gradients_reach_the_field():
    from langfield.dynamic import DeformableGaussians, DeformConfig
    from langfield.render import render

    g = _tiny_gaussians()
    dg = DeformableGaussians.from_gaussians(g, DeformConfig(resolutions=(8,), time_resolution=4, features=4, hidden=16))
    with torch.no_grad():
        dg.deform.out.bias[0] = 0.1  # a uniform shift along x at every time
    a = dg.activated(0.5)
    assert torch.allclose(a.means - dg.means, torch.tensor([0.1, 0.0, 0.0]).expand_as(a.means))
    dg.deform.out.bias.data.zero_()
    out = render(dg, _cams(time=0.5))
    out.rgb.sum().backward()
    grads = [p.grad for p in dg.deform.parameters()]
    assert dg.deform.out.weight.grad is not None and float(dg.deform.out.weight.grad.abs().sum()) > 0
    # the planes get gradients once the head is non-zero
    with torch.no_grad():
        dg.deform.out.weight.normal_(0, 0.01)
    dg.zero_grad()
    render(dg, _cams(time=0.5)).rgb.sum().backward()
    assert all(p.grad is not None for p in dg.deform.planes)
    assert float(sum(p.grad.abs().sum() for p in dg.deform.planes)) > 0
    # the xt/yt/zt planes make the deformation depend on time
    with torch.no_grad():
        for p in dg.deform.planes:
            p.normal_(0, 1)
    a0, a1 = dg.activated(0.1).means, dg.activated(0.9).means
    assert float((a0 - a1).detach().abs().max()) > 1e-4
    del grads


def test_checkpoint_round_trip_and_model_kind():
    from langfield.dynamic import DeformableGaussians, DeformConfig
    from langfield.io.checkpoint import load_checkpoint, save_checkpoint
    from langfield.run import model_from_checkpoint

    g = _tiny_gaussians(lang_dim=3)
    dg = DeformableGaussians.from_gaussians(g, DeformConfig(resolutions=(8, 16), time_resolution=5, features=4,
                                                            hidden=16))
    with torch.no_grad():
        dg.deform.out.weight.normal_(0, 0.05)
        for p in dg.deform.planes:
            p.normal_(0, 1)
    dg.set_states(torch.randn(dg.num, 2, 3))
    with torch.no_grad():
        for p in dg.mixer.parameters():
            p.normal_(0, 0.3)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ck.safetensors"
        save_checkpoint(path, {"splats": dg.to_dict(), **dg.model_tensors()}, {"model": dg.model_config()}, 7)
        ck = load_checkpoint(path)
        back = model_from_checkpoint({"model": dg.model_config()}, ck, torch.device("cpu"))
    assert isinstance(back, DeformableGaussians)
    for t in (0.0, 0.6):
        a, b = dg.activated(t), back.activated(t)
        for name in ("means", "quats", "scales", "opacities", "sh", "lang"):
            assert torch.equal(getattr(a, name).detach(), getattr(b, name)), name
    assert back.lang_dim == 6 and not any(p.requires_grad for p in back.parameters())
