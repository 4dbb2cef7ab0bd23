"""The native CPU renderer against the pure-torch reference and finite differences."""

import math

import pytest
import torch

from langfield.render import rasterization
from langfield.render.synthetic import random_scene

FWD_TOL = 1e-5


def render(scene, backend, **kw):
    p = scene.params()
    p.update(kw)
    return rasterization(**p, backend=backend)


def assert_same_render(a, b, tol=FWD_TOL):
    (ra, aa, ma), (rb, ab, mb) = a, b
    assert torch.equal(ma["radii"], mb["radii"])
    assert ra.shape == rb.shape and aa.shape == ab.shape
    assert (ra - rb).abs().max().item() <= tol * max(1.0, rb.abs().max().item())
    assert (aa - ab).abs().max().item() <= tol
    # the last contributor may only differ where a blend sits exactly on a threshold
    assert (ma["last_ids"] != mb["last_ids"]).float().mean().item() < 1e-3


@pytest.mark.parametrize("D", [1, 3, 12, 64, 128])
@pytest.mark.parametrize("C", [1, 3])
def test_forward_parity_channels(D, C):
    s = random_scene(400, C=C, width=53, height=37, D=D, seed=D + 10 * C)
    assert_same_render(render(s, "cpu"), render(s, "torch"))


@pytest.mark.parametrize("mode", ["RGB", "D", "ED", "RGB+D", "RGB+ED"])
def test_forward_parity_render_modes(mode):
    s = random_scene(300, C=2, width=40, height=33, D=3, seed=3)
    bg = torch.rand(2, 3)
    out = render(s, "cpu", render_mode=mode, backgrounds=bg)
    ref = render(s, "torch", render_mode=mode, backgrounds=bg)
    assert_same_render(out, ref, tol=2e-5)
    D_out = {"RGB": 3, "D": 1, "ED": 1, "RGB+D": 4, "RGB+ED": 4}[mode]
    assert out[0].shape[-1] == D_out


@pytest.mark.parametrize("deg", [0, 1, 2, 3])
def test_forward_parity_sh(deg):
    s = random_scene(300, C=2, width=40, height=30, sh_degree=deg, seed=deg)
    assert_same_render(render(s, "cpu", sh_degree=deg), render(s, "torch", sh_degree=deg))


def test_forward_parity_antialiased_and_packed_flag():
    s = random_scene(300, C=2, width=40, height=30, seed=5)
    out = render(s, "cpu", rasterize_mode="antialiased", packed=True)
    ref = render(s, "torch", rasterize_mode="antialiased")
    assert_same_render(out, ref)
    assert "compensations" in out[2]


def test_dense_scene_saturates_and_stops():
    # many opaque Gaussians: most pixels reach T <= 1e-4 and stop early
    s = random_scene(3000, C=1, width=48, height=48, seed=9, scale_range=(0.1, 0.4), opacity_range=(0.9, 1.0))
    out, ref = render(s, "cpu"), render(s, "torch")
    assert_same_render(out, ref)
    assert (out[1] > 0.99).float().mean().item() > 0.3


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (16, 16), (31, 1)])
def test_odd_image_sizes(size):
    W, H = size
    s = random_scene(200, C=2, width=W, height=H, seed=W * H)
    s.Ks[:, 0, 0] = s.Ks[:, 1, 1] = 2.0 * max(W, H)
    assert_same_render(render(s, "cpu"), render(s, "torch"))


def test_zero_gaussians():
    s = random_scene(0, C=2, width=20, height=10)
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    r, a, m = render(s, "cpu", backgrounds=bg)
    assert r.shape == (2, 10, 20, 3) and torch.all(a == 0)
    assert torch.allclose(r, bg[:, None, None, :].expand_as(r))
    assert torch.all(m["last_ids"] == -1)


def test_behind_camera_and_near_plane():
    s = random_scene(50, C=1, width=32, height=32, seed=1)
    # put Gaussians behind the camera, exactly on and just before the near plane
    V = s.viewmats[0]
    R, t = V[:3, :3], V[:3, 3]
    cam_pts = torch.tensor([[0.0, 0.0, -1.0], [0.1, 0.0, 0.01], [0.0, 0.1, 0.0099], [0.0, 0.0, 1e-7], [0.0, 0.0, 2.0]])
    world = (R.T @ (cam_pts - t).T).T
    s.means[:5] = world
    out, ref = render(s, "cpu", near_plane=0.01), render(s, "torch", near_plane=0.01)
    assert_same_render(out, ref)
    radii = out[2]["radii"][0, :5]
    assert radii[0].sum() == 0 and radii[2].sum() == 0 and radii[3].sum() == 0
    assert radii[4].sum() > 0


def test_degenerate_and_huge_scales():
    s = random_scene(100, C=1, width=40, height=30, seed=2)
    s.scales[:10] = 1e-9  # sub-pixel: eps2d keeps them renderable
    s.scales[10:15] = 1e4  # covers everything
    s.scales[15:20, 0] = 0.0  # flat disks
    s.quats[20:25] = 0.0  # zero quaternion: identity rotation
    out, ref = render(s, "cpu"), render(s, "torch")
    assert_same_render(out, ref, tol=5e-5)
    assert torch.isfinite(out[0]).all()


def test_bad_inputs_give_clear_errors():
    s = random_scene(10, C=1)
    p = s.params()
    with pytest.raises(ValueError, match="means has 1 non-finite"):
        q = dict(p); q["means"] = p["means"].clone(); q["means"][3, 1] = float("nan")
        rasterization(**q, backend="cpu")
    with pytest.raises(ValueError, match="opacities"):
        q = dict(p); q["opacities"] = p["opacities"].clone(); q["opacities"][0] = float("inf")
        rasterization(**q, backend="cpu")
    with pytest.raises(ValueError, match="quats must be"):
        q = dict(p); q["quats"] = p["quats"][:, :3]
        rasterization(**q, backend="cpu")
    with pytest.raises(ValueError, match="viewmats must be"):
        q = dict(p); q["viewmats"] = p["viewmats"][0]
        rasterization(**q, backend="cpu")
    with pytest.raises(ValueError, match="floating-point"):
        q = dict(p); q["colors"] = (p["colors"] * 255).long()
        rasterization(**q, backend="cpu")
    with pytest.raises(ValueError, match="width and height"):
        rasterization(**{**p, "width": 0}, backend="cpu")
    with pytest.raises(ValueError, match="render_mode"):
        rasterization(**p, render_mode="RGBD", backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        rasterization(**p, backend="vulkan")
    with pytest.raises(ValueError, match="CUDA"):
        rasterization(**p, backend="cuda")
    with pytest.raises(ValueError, match="sh_degree"):
        rasterization(**p, sh_degree=2)


# ------------------------------------------------------------------ gradients
def _grad_inputs(scene, sh_degree=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in scene.params().items()}
    bg = torch.rand(scene.viewmats.shape[0], 3 if sh_degree is not None else scene.colors.shape[-1], generator=g)
    p["backgrounds"] = bg.requires_grad_(True)
    return p


def _loss_weights(out, alpha, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(out.shape, generator=g), torch.randn(alpha.shape, generator=g)


GRAD_KEYS = ["means", "quats", "scales", "opacities", "colors", "viewmats", "backgrounds"]


def _grads(params, backend, mode="RGB", sh_degree=None, absgrad=False):
    p = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
    out, alpha, meta = rasterization(**p, render_mode=mode, sh_degree=sh_degree, absgrad=absgrad, backend=backend)
    meta["means2d"].retain_grad()
    wo, wa = _loss_weights(out, alpha)
    ((out * wo).sum() + (alpha * wa).sum()).backward()
    grads = {k: p[k].grad for k in GRAD_KEYS}
    grads["means2d"] = meta["means2d"].grad
    if absgrad:
        grads["absgrad"] = meta["means2d"].absgrad
    return grads


def _assert_close_grads(ga, gb, rtol=1e-3):
    for k in gb:
        a, b = ga[k], gb[k]
        if a is None and b is None:  # input unused in this mode (e.g. colors in "D")
            continue
        assert a is not None and b is not None, k
        scale = b.abs().max().item() + 1e-8
        err = (a - b).abs().max().item()
        assert err <= rtol * scale + 1e-6, f"{k}: max err {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("mode", ["RGB", "RGB+ED", "D"])
@pytest.mark.parametrize("D", [3, 12])
def test_gradients_match_reference(mode, D):
    s = random_scene(150, C=2, width=36, height=28, D=D, seed=D)
    p = _grad_inputs(s)
    _assert_close_grads(_grads(p, "cpu", mode), _grads(p, "torch", mode))


@pytest.mark.parametrize("with_bg", [False, True])
def test_frozen_geometry_backward_gives_the_same_colour_gradients(with_bg):
    """Only colours/features need gradients (the language stage on a fixed scene): the CPU skips the
    geometry gradients, and the colour and background gradients equal the full backward's exactly."""
    s = random_scene(400, C=2, width=45, height=37, D=12, seed=5)
    p = s.params()
    bg = torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) if with_bg else None

    def run(backend, geometry_grads):
        q = {k: (v.detach().clone().requires_grad_(geometry_grads or k == "colors")
                 if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
        b = bg.clone().requires_grad_(True) if bg is not None else None
        out, alpha, _ = rasterization(**q, backgrounds=b, render_mode="RGB+ED", backend=backend)
        wo, wa = _loss_weights(out, alpha)
        ((out * wo).sum() + (alpha * wa).sum()).backward()
        return q["colors"].grad, (b.grad if b is not None else None), q["means"].grad

    col_fast, bg_fast, m_fast = run("cpu", False)
    col_full, bg_full, m_full = run("cpu", True)
    col_ref, bg_ref, _ = run("torch", False)
    assert m_fast is None and m_full is not None
    assert torch.equal(col_fast, col_full)
    _assert_close_grads({"colors": col_fast}, {"colors": col_ref})  # the tolerance of every gradient test
    if with_bg:
        assert torch.equal(bg_fast, bg_full)
        _assert_close_grads({"bg": bg_fast}, {"bg": bg_ref})


@pytest.mark.parametrize("deg", [1, 3])
def test_sh_gradients_match_reference(deg):
    s = random_scene(120, C=2, width=32, height=24, sh_degree=deg, seed=deg)
    p = _grad_inputs(s, sh_degree=deg)
    _assert_close_grads(_grads(p, "cpu", sh_degree=deg), _grads(p, "torch", sh_degree=deg))


def test_absgrad_and_antialiased_gradients():
    s = random_scene(120, C=1, width=32, height=24, seed=11)
    p = _grad_inputs(s)
    ga = _grads(p, "cpu", absgrad=True)
    gb = _grads(p, "torch", absgrad=True)
    _assert_close_grads(ga, gb)
    assert torch.all(ga["absgrad"] >= ga["means2d"].abs() - 1e-6)
    pa = dict(p, rasterize_mode="antialiased")
    _assert_close_grads(_grads(pa, "cpu"), _grads(pa, "torch"))


def test_gradients_against_float64_finite_differences():
    """Directional derivatives of the float64 reference vs the native float32 gradients."""
    s = random_scene(60, C=2, width=24, height=20, D=3, seed=4, opacity_range=(0.2, 0.8))
    p = _grad_inputs(s)
    g_native = _grads(p, "cpu")
    wo, wa = _loss_weights(torch.zeros(2, 20, 24, 3), torch.zeros(2, 20, 24, 1))
    p64 = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}

    def loss(q):
        out, alpha, _ = rasterization(**q, backend="torch")
        return ((out * wo.double()).sum() + (alpha * wa.double()).sum()).item()

    gen = torch.Generator().manual_seed(1)
    for key in GRAD_KEYS:
        for _ in range(2):
            d = torch.randn(p64[key].shape, generator=gen, dtype=torch.float64)
            if key == "viewmats":
                d[:, 3, :] = 0.0
            eps = 1e-6
            fd = (loss({**p64, key: p64[key] + eps * d}) - loss({**p64, key: p64[key] - eps * d})) / (2 * eps)
            an = (g_native[key].double() * d).sum().item()
            assert abs(fd - an) <= 2e-3 * max(1.0, abs(fd)), f"{key}: fd {fd:.6f} vs native {an:.6f}"


def test_backward_is_deterministic():
    s = random_scene(500, C=2, width=48, height=40, D=5, seed=8)
    p = _grad_inputs(s)
    g1, g2 = _grads(p, "cpu"), _grads(p, "cpu")
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_means2d_grad_feeds_gsplat_default_strategy():
    gsplat = pytest.importorskip("gsplat")
    from gsplat.strategy import DefaultStrategy

    s = random_scene(200, C=1, width=40, height=30, seed=6)
    params = torch.nn.ParameterDict({
        "means": s.means, "scales": torch.log(s.scales), "quats": s.quats,
        "opacities": torch.logit(s.opacities), "colors": s.colors})
    opts = {k: torch.optim.Adam([params[k]], lr=1e-3) for k in params}
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=2, reset_every=1000, grow_grad2d=1e-9, verbose=False)
    strategy.check_sanity(params, opts)
    state = strategy.initialize_state(scene_scale=1.0)
    n0 = params["means"].shape[0]
    for step in range(3):
        out, alpha, info = rasterization(params["means"], params["quats"], torch.exp(params["scales"]),
                                         torch.sigmoid(params["opacities"]), params["colors"], s.viewmats, s.Ks,
                                         s.width, s.height, backend="cpu")
        strategy.step_pre_backward(params, opts, state, step, info)
        out.mean().backward()
        strategy.step_post_backward(params, opts, state, step, info)
        for o in opts.values():
            o.step(); o.zero_grad()
    assert params["means"].shape[0] > n0  # grew from our screen-space gradients


def test_device_and_dtype_rules():
    s = random_scene(20, C=1)
    p = s.params()
    with pytest.raises(ValueError, match="is on meta but means is on cpu"):
        rasterization(**{**p, "colors": p["colors"].to("meta")}, backend="cpu")
    p64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    with pytest.raises(ValueError, match="float32"):
        rasterization(**p64, backend="cpu")
    out, _, meta = rasterization(**p64, backend="auto")  # float64 goes to the reference
    assert meta["backend"] == "torch" and out.dtype == torch.float64
    ref, _, _ = rasterization(**p, backend="cpu")
    assert (out.float() - ref).abs().max().item() < 1e-5


def test_per_camera_colors_and_backgrounds():
    s = random_scene(200, C=3, width=30, height=20, D=5, seed=13)
    cols = torch.rand(3, 200, 5)
    bg = torch.rand(3, 5)
    out = render(s, "cpu", colors=cols, backgrounds=bg)
    ref = render(s, "torch", colors=cols, backgrounds=bg)
    assert_same_render(out, ref)
    # camera 1 rendered alone with its own colours equals slice 1
    one = rasterization(s.means, s.quats, s.scales, s.opacities, cols[1], s.viewmats[1:2], s.Ks[1:2],
                        s.width, s.height, backgrounds=bg[1:2], backend="cpu")
    assert torch.allclose(one[0][0], out[0][1], atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_features_one_pass_equals_separate_passes(backend):
    """The ``features`` extension renders SH colours + extra channels in one pass, equal to two
    separate renders (colours with SH; features as plain colours on a zero background)."""
    from langfield.render import rasterization
    from langfield.render.synthetic import random_scene

    s = random_scene(300, C=2, D=3, sh_degree=2, seed=3)
    feats = torch.randn(300, 9, generator=torch.Generator().manual_seed(0))
    bg = torch.tensor([[0.2, 0.3, 0.4], [1.0, 1.0, 1.0]])
    args = (s.means, s.quats, s.scales, s.opacities)
    one, a1, _ = rasterization(*args, s.colors, s.viewmats, s.Ks, s.width, s.height, sh_degree=2, backgrounds=bg,
                               features=feats, render_mode="RGB+ED", backend=backend)
    rgb, a2, _ = rasterization(*args, s.colors, s.viewmats, s.Ks, s.width, s.height, sh_degree=2, backgrounds=bg,
                               render_mode="RGB+ED", backend=backend)
    lat, _, _ = rasterization(*args, feats, s.viewmats, s.Ks, s.width, s.height, backend=backend)
    assert one.shape[-1] == 3 + 9 + 1
    assert torch.allclose(one[..., :3], rgb[..., :3], atol=1e-5)
    assert torch.allclose(one[..., 3:12], lat, atol=1e-5)
    assert torch.allclose(one[..., 12], rgb[..., 3], atol=1e-4)
    assert torch.equal(a1, a2)
    with pytest.raises(ValueError, match="features must be"):
        rasterization(*args, s.colors, s.viewmats, s.Ks, s.width, s.height, sh_degree=2, features=feats[:10],
                      backend=backend)
