"""The CUDA backend against the CPU native backend and the torch reference: `pytest -m gpu`.

Every test runs on two devices: "cuda" (marked ``gpu``: the real check, skipped without a CUDA
device) and "cpu", a dry run of the same test code in which the CPU native backend stands in for
CUDA (and the torch reference for gsplat), so that the comparisons themselves are exercised on
machines without a GPU. Forward (renders, alphas, radii, last contributors) and backward (means,
quats, scales, opacities, colours, features, backgrounds, viewmats, screen-space means2d and
absgrad) are compared with every render mode, D in {1, 3, 12, 64, 128} (``features=``), C in
{1, 3}, SH degrees 0-3, antialiasing, packed/absgrad, plus the self-test and gsplat parity.
"""

import functools

import pytest
import torch
from test_render_native import _assert_close_grads, _loss_weights, assert_same_render

from langfield.render import RENDER_MODES, rasterization, resolve_backend
from langfield.render import selftest as st
from langfield.render.synthetic import random_scene

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"), pytest.param("cpu", id="cpu-dryrun")]
# CUDA vs CPU: the tolerance of scripts/gpu_check.py (different FMA contraction and blending
# arithmetic); the CPU dry run keeps test_render_native's tighter CPU-vs-reference bound
FWD_TOL = {"cuda": 1e-4, "cpu": 2e-5}
GRAD_RTOL = 1e-3
LEAVES = ("means", "quats", "scales", "opacities", "colors", "features", "viewmats", "backgrounds")


def backend_of(dev: str) -> str:
    return "cuda" if dev == "cuda" else "cpu"


def run(params, backend, device, *, grads=True, **kw):
    """Forward (+ backward of a fixed random loss); results on the CPU: ((renders, alphas, meta), grads)."""
    p = {k: (v.detach().to(device).clone().requires_grad_(grads and k in LEAVES) if isinstance(v, torch.Tensor)
             else v) for k, v in params.items()}
    out, alpha, meta = rasterization(**p, **kw, backend=backend)
    res = (out.detach().cpu(), alpha.detach().cpu(),
           {"radii": meta["radii"].cpu(), "backend": meta["backend"],
            "last_ids": meta["last_ids"].cpu() if meta.get("last_ids") is not None else None})
    if not grads:
        return res, None
    meta["means2d"].retain_grad()
    wo, wa = _loss_weights(res[0], res[1])
    ((out * wo.to(out.device)).sum() + (alpha * wa.to(alpha.device)).sum()).backward()
    g = {k: (p[k].grad.cpu() if p[k].grad is not None else None) for k in LEAVES if isinstance(p.get(k), torch.Tensor)}
    g["means2d"] = meta["means2d"].grad.cpu() if meta["means2d"].grad is not None else None
    if kw.get("absgrad"):
        g["absgrad"] = meta["means2d"].absgrad.cpu()
    return res, g


def check_three_ways(params, dev, **kw):
    """The backend under test on ``dev`` vs the CPU native backend and the torch reference (both on the CPU)."""
    test, g_test = run(params, backend_of(dev), dev, **kw)
    assert test[2]["backend"] == backend_of(dev)
    assert torch.isfinite(test[0]).all() and torch.isfinite(test[1]).all()
    for ref_be in ("cpu", "torch"):
        ref, g_ref = run(params, ref_be, "cpu", **kw)
        assert_same_render(test, ref, tol=FWD_TOL[dev])
        _assert_close_grads(g_test, g_ref, rtol=GRAD_RTOL)
    return test, g_test


def scene_params(N=150, C=2, W=36, H=28, D=3, sh_degree=None, seed=0, bg=True):
    s = random_scene(N, C=C, width=W, height=H, D=D, sh_degree=sh_degree, seed=seed)
    p = s.params()
    if bg:
        p["backgrounds"] = torch.rand(C, 3 if sh_degree is not None else D,
                                      generator=torch.Generator().manual_seed(seed + 1))
    return p


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("mode", RENDER_MODES)
def test_render_modes(dev, mode):
    p = scene_params(seed=3)
    (out, _, _), g = check_three_ways(p, dev, render_mode=mode)
    assert out.shape[-1] == {"RGB": 3, "D": 1, "ED": 1, "RGB+D": 4, "RGB+ED": 4}[mode]
    assert g["viewmats"] is not None and g["viewmats"].abs().sum() > 0
    assert (g["colors"] is None) == (mode in ("D", "ED"))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("D", [1, 3, 12, 64, 128])
def test_channels_through_features(dev, C, D):
    """D channels in one pass: colours (1 or 3) + ``features`` for the rest, depth appended."""
    p = scene_params(N=120, C=C, W=29, H=23, D=min(D, 3), seed=D + 10 * C)
    if D > 3:
        p["features"] = torch.randn(120, D - 3, generator=torch.Generator().manual_seed(D)) * 0.5
    (out, _, _), g = check_three_ways(p, dev, render_mode="RGB+ED")
    assert out.shape == (C, 23, 29, D + 1)
    if D > 3:
        assert g["features"].shape == (120, D - 3) and g["features"].abs().sum() > 0


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("deg", [0, 1, 2, 3])
def test_sh_degrees(dev, deg):
    p = scene_params(N=120, C=2, W=32, H=24, sh_degree=deg, seed=deg)
    _, g = check_three_ways(p, dev, sh_degree=deg, render_mode="RGB+D")
    assert g["colors"].shape == (120, (deg + 1) ** 2, 3)


@pytest.mark.parametrize("dev", DEVICES)
def test_antialiased_packed_absgrad(dev):
    p = scene_params(N=150, C=2, W=40, H=30, D=5, seed=11)
    (_, _, meta), g = check_three_ways(p, dev, rasterize_mode="antialiased", packed=True, absgrad=True)
    assert torch.all(g["absgrad"] >= g["means2d"].abs() - 1e-6)
    assert g["absgrad"].abs().sum() > 0


@pytest.mark.parametrize("dev", DEVICES)
def test_viewmat_gradients_against_float64_finite_differences(dev):
    """Camera-pose gradients (tracking needs them) on the device vs central differences of the float64
    reference, in random directions of the 3x4 part, per camera."""
    p = scene_params(N=60, C=2, W=24, H=20, D=3, seed=4)
    p["opacities"] = p["opacities"].clamp(0.2, 0.8)
    (out, alpha, _), g = run(p, backend_of(dev), dev)
    wo, wa = _loss_weights(out, alpha)
    p64 = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}

    def loss(vm):
        o, a, _ = rasterization(**{**p64, "viewmats": vm}, backend="torch")
        return ((o * wo.double()).sum() + (a * wa.double()).sum()).item()

    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        d = torch.randn(p64["viewmats"].shape, generator=gen, dtype=torch.float64)
        d[:, 3, :] = 0.0
        eps = 1e-6
        fd = (loss(p64["viewmats"] + eps * d) - loss(p64["viewmats"] - eps * d)) / (2 * eps)
        an = (g["viewmats"].double() * d).sum().item()
        assert abs(fd - an) <= 2e-3 * max(1.0, abs(fd)), f"fd {fd:.6f} vs {dev} {an:.6f}"


@pytest.mark.parametrize("dev", DEVICES)
def test_selftest_passes_and_auto_picks_the_native_backend(dev, tmp_path, monkeypatch):
    kind = backend_of(dev)
    res = st.selftest(kind, dev)
    assert res.passed, res.summary()
    assert max(e / t for e, t in res.errors.values()) < 0.5  # a margin, not a near miss
    monkeypatch.delenv("LANGFIELD_SKIP_SELFTEST", raising=False)
    monkeypatch.setenv("LANGFIELD_FORCE_SELFTEST", "1")
    monkeypatch.setattr(st, "record_path", lambda k, d: tmp_path / f"selftest-{k}.json")
    st.clear_cache()
    try:
        rec = st.ensure_selftest(kind, dev, run=True)
        assert rec is not None and rec.passed and (tmp_path / f"selftest-{kind}.json").exists()
        monkeypatch.delenv("LANGFIELD_FORCE_SELFTEST")
        assert resolve_backend("auto", torch.device(dev), torch.float32) == kind
    finally:
        st.clear_cache()


def _gsplat_or_skip(dev):
    """gsplat's rasterizer on CUDA (only when already built: no JIT build inside the tests); the torch
    reference stands in on the CPU."""
    if dev == "cpu":
        return "torch"
    pytest.importorskip("gsplat")
    try:
        from torch.utils.cpp_extension import _get_build_directory
        from pathlib import Path
        import importlib.util

        built = importlib.util.find_spec("gsplat.csrc") is not None or \
            (Path(_get_build_directory("gsplat_cuda", verbose=False)) / "gsplat_cuda.so").exists()
    except Exception:
        built = False
    if not built:
        pytest.skip("gsplat's CUDA extension is not built (scripts/gpu_check.sh builds it)")
    return "gsplat"


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("case", ["sh3-RGB+ED", "D12-RGB", "aa-absgrad"])
def test_gsplat_parity(dev, case):
    other = _gsplat_or_skip(dev)
    kw = {}
    if case == "sh3-RGB+ED":
        p, kw = scene_params(N=200, C=2, W=40, H=30, sh_degree=3, seed=21), dict(sh_degree=3, render_mode="RGB+ED")
    elif case == "D12-RGB":
        p = scene_params(N=200, C=3, W=40, H=30, D=12, seed=22)
    else:
        p, kw = scene_params(N=200, C=1, W=40, H=30, seed=23), dict(rasterize_mode="antialiased", absgrad=True)
    test, g_test = run(p, backend_of(dev), dev, **kw)
    ref, g_ref = run(p, other, dev, **kw)
    assert ref[2]["backend"] == other
    # gsplat is built with -use_fast_math: the forward tolerance of scripts/gpu_check.py
    (ra, aa, ma), (rb, ab, mb) = test, ref
    assert torch.equal(ma["radii"], mb["radii"])
    assert (ra - rb).abs().max().item() <= 1e-4 * max(1.0, rb.abs().max().item())
    assert (aa - ab).abs().max().item() <= 1e-4
    _assert_close_grads(g_test, g_ref, rtol=GRAD_RTOL)
