"""Tests of the pure-torch reference backend (langfield/render/reference.py).

The reference is checked against straightforward per-element Python ports of
cuda/include/lf_math.h (projection, its analytic vjp, tile bounds, blending), against
gsplat 1.5.3's own torch implementation where the two define the same thing, and against
finite differences (float64 gradcheck).
"""

import math
import struct

import numpy as np
import pytest
import torch

from langfield.render import reference as ref

ALPHA_THRESHOLD = 1.0 / 255.0


# --------------------------------------------------------------------- scenes
def _cameras(C, W, H, dtype=torch.float64):
    viewmats = torch.eye(4, dtype=dtype).repeat(C, 1, 1)
    Ks = torch.zeros(C, 3, 3, dtype=dtype)
    for c in range(C):
        # a small rotation about y and a translation per camera
        a = 0.1 * c
        viewmats[c, 0, 0] = math.cos(a)
        viewmats[c, 0, 2] = math.sin(a)
        viewmats[c, 2, 0] = -math.sin(a)
        viewmats[c, 2, 2] = math.cos(a)
        viewmats[c, :3, 3] = torch.tensor([0.2 * c, -0.1 * c, 0.3 * c], dtype=dtype)
        f = 0.8 * W + 5 * c
        Ks[c] = torch.tensor([[f, 0, W / 2 + c], [0, f, H / 2 - c], [0, 0, 1]], dtype=dtype)
    return viewmats, Ks


def _gaussians(N, seed=0, dtype=torch.float64, spread=1.0, scale=0.15):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(N, 3, generator=g, dtype=dtype) * spread
    means[:, 2] += 4.0
    quats = torch.randn(N, 4, generator=g, dtype=dtype)
    scales = torch.rand(N, 3, generator=g, dtype=dtype) * scale + 0.02
    opacities = torch.rand(N, generator=g, dtype=dtype) * 0.9 + 0.05
    return means, quats, scales, opacities


# ------------------------------------------- per-element port of lf_math.h
def _rotmat(q):
    n = math.sqrt(sum(v * v for v in q))
    inv = 1.0 / max(n, 1e-12)
    w, x, y, z = (v * inv for v in q)
    R = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    return R, (w, x, y, z), inv


def _lims(K, W, H):
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tfx, tfy = 0.5 * W / fx, 0.5 * H / fy
    return ((W - cx) / fx + 0.3 * tfx, cx / fx + 0.3 * tfx, (H - cy) / fy + 0.3 * tfy, cy / fy + 0.3 * tfy)


def _jacobian(p, K, W, H):
    fx, fy = K[0, 0], K[1, 1]
    lxp, lxn, lyp, lyn = _lims(K, W, H)
    rz = 1.0 / p[2]
    tx = p[2] * min(lxp, max(-lxn, p[0] * rz))
    ty = p[2] * min(lyp, max(-lyn, p[1] * rz))
    J = np.array([[fx * rz, 0, -fx * tx * rz * rz], [0, fy * rz, -fy * ty * rz * rz]])
    return J, tx, ty


def naive_project_one(mean, quat, scale, opacity, viewmat, K, W, H, eps2d, near, far, rclip, with_comp):
    """lf::project_one, element by element. Returns None when culled."""
    Rw, t = viewmat[:3, :3], viewmat[:3, 3]
    p = Rw @ mean + t
    if not (near <= p[2] <= far):
        return None
    R, _, _ = _rotmat(quat)
    M = R * scale[None, :]
    cov_c = Rw @ (M @ M.T) @ Rw.T
    J, _, _ = _jacobian(p, K, W, H)
    cov2d = J @ cov_c @ J.T
    det_orig = cov2d[0, 0] * cov2d[1, 1] - cov2d[0, 1] * cov2d[1, 0]
    cov2d = cov2d + eps2d * np.eye(2)
    det = cov2d[0, 0] * cov2d[1, 1] - cov2d[0, 1] * cov2d[1, 0]
    if not det > 0:
        return None
    comp = math.sqrt(max(0.0, det_orig / det))
    conic = (cov2d[1, 1] / det, -cov2d[0, 1] / det, cov2d[0, 0] / det)
    extend = 3.33
    if opacity is not None:
        op = opacity * comp if with_comp else opacity
        if not op >= ALPHA_THRESHOLD:
            return None
        extend = min(extend, math.sqrt(2 * math.log(op / ALPHA_THRESHOLD)))
    rx = math.ceil(extend * math.sqrt(cov2d[0, 0]))
    ry = math.ceil(extend * math.sqrt(cov2d[1, 1]))
    if rx <= rclip and ry <= rclip:
        return None
    m2 = (K[0, 0] * p[0] / p[2] + K[0, 2], K[1, 1] * p[1] / p[2] + K[1, 2])
    if not (m2[0] + rx > 0 and m2[0] - rx < W and m2[1] + ry > 0 and m2[1] - ry < H):
        return None
    return (min(rx, 1e7), min(ry, 1e7)), m2, p[2], conic, comp


def naive_project_one_vjp(mean, quat, scale, viewmat, K, W, H, eps2d, conic, comp, v_m2, v_depth, v_conic, v_comp):
    """lf::project_one_vjp, literally (with numpy for the 3x3 products)."""
    inv = np.array([[conic[0], conic[1]], [conic[1], conic[2]]])
    v_inv = np.array([[v_conic[0], 0.5 * v_conic[1]], [0.5 * v_conic[1], v_conic[2]]])
    v_cov2d = -inv @ v_inv @ inv
    if v_comp is not None and comp > 0:  # add_blur_vjp
        sb = np.linalg.inv(inv)
        so = sb - eps2d * np.eye(2)
        v_cov2d += 0.5 * comp * v_comp * (np.linalg.inv(so) - inv)
    Rw, t = viewmat[:3, :3], viewmat[:3, 3]
    p = Rw @ mean + t
    Rq, (w, x, y, z), qinv = _rotmat(quat)
    covar = (Rq * scale[None]) @ (Rq * scale[None]).T
    cov_c = Rw @ covar @ Rw.T
    # persp_proj_vjp
    fx, fy = K[0, 0], K[1, 1]
    lxp, lxn, lyp, lyn = _lims(K, W, H)
    J, tx, ty = _jacobian(p, K, W, H)
    rz = 1.0 / p[2]
    rz2, rz3 = rz * rz, rz * rz * rz
    ux, uy = p[0] * rz, p[1] * rz
    in_x = -lxn <= ux <= lxp
    in_y = -lyn <= uy <= lyp
    v_cov_c = J.T @ v_cov2d @ J
    vJ = (v_cov2d + v_cov2d.T) @ J @ cov_c
    v_p = np.array([fx * rz * v_m2[0], fy * rz * v_m2[1], -(fx * p[0] * v_m2[0] + fy * p[1] * v_m2[1]) * rz2])
    v_p[2] += -fx * rz2 * vJ[0, 0] - fy * rz2 * vJ[1, 1]
    if in_x:
        v_p[0] += -fx * rz2 * vJ[0, 2]
        v_p[2] += 2 * fx * tx * rz3 * vJ[0, 2]
    else:
        v_p[2] += fx * tx * rz3 * vJ[0, 2]
    if in_y:
        v_p[1] += -fy * rz2 * vJ[1, 2]
        v_p[2] += 2 * fy * ty * rz3 * vJ[1, 2]
    else:
        v_p[2] += fy * ty * rz3 * vJ[1, 2]
    v_p[2] += v_depth
    v_mean = Rw.T @ v_p
    vRw = np.outer(v_p, mean) + v_cov_c @ Rw @ covar.T + v_cov_c.T @ Rw @ covar
    v_covar = Rw.T @ v_cov_c @ Rw
    # quat_scale_to_covar_vjp
    Mq = Rq * scale[None]
    vM = (v_covar + v_covar.T) @ Mq
    vR = vM * scale[None]
    v_scale = (Rq * vM).sum(0)
    g = vR.reshape(-1)
    vw = 2 * (x * (g[7] - g[5]) + y * (g[2] - g[6]) + z * (g[3] - g[1]))
    vx = 2 * (-2 * x * (g[4] + g[8]) + y * (g[1] + g[3]) + z * (g[2] + g[6]) + w * (g[7] - g[5]))
    vy = 2 * (x * (g[1] + g[3]) - 2 * y * (g[0] + g[8]) + z * (g[5] + g[7]) + w * (g[2] - g[6]))
    vz = 2 * (x * (g[2] + g[6]) + y * (g[5] + g[7]) - 2 * z * (g[0] + g[4]) + w * (g[3] - g[1]))
    dot = w * vw + x * vx + y * vy + z * vz
    v_quat = np.array([vw - w * dot, vx - x * dot, vy - y * dot, vz - z * dot]) * qinv
    v_view = np.zeros((4, 4))
    v_view[:3, :3] = vRw
    v_view[:3, 3] = v_p
    return v_mean, v_quat, v_scale, v_view


# ----------------------------------------------------------------- projection
PROJ_ARGS = dict(eps2d=0.3, near_plane=0.01, far_plane=1e10, radius_clip=0.0)


def _culling_scene():
    """Random Gaussians plus hand-made ones exercising every culling rule."""
    means, quats, scales, opac = _gaussians(40, seed=1, spread=1.5)
    extra_m = torch.tensor(
        [
            [0.0, 0.0, -1.0],  # behind the camera
            [0.0, 0.0, 0.005],  # nearer than the near plane
            [50.0, 0.0, 4.0],  # far outside the image
            [0.0, 0.1, 4.0],  # too transparent
            [2.8, 0.3, 3.0],  # outside the frustum clamp but overlapping the image
            [0.1, 0.1, 4.0],  # zero quaternion (identity)
        ],
        dtype=torch.float64,
    )
    extra_q = torch.tensor([[1.0, 0, 0, 0]] * 5 + [[0.0, 0, 0, 0]], dtype=torch.float64)
    extra_s = torch.tensor([[0.1, 0.1, 0.1]] * 4 + [[1.5, 1.0, 0.5], [0.1, 0.2, 0.3]], dtype=torch.float64)
    extra_o = torch.tensor([0.5, 0.5, 0.5, 0.003, 0.9, 0.5], dtype=torch.float64)
    return (
        torch.cat([means, extra_m]),
        torch.cat([quats, extra_q]),
        torch.cat([scales, extra_s]),
        torch.cat([opac, extra_o]),
    )


@pytest.mark.parametrize("with_opacity", [True, False])
@pytest.mark.parametrize("with_comp", [True, False])
def test_project_matches_naive(with_opacity, with_comp):
    W, H = 64, 48
    viewmats, Ks = _cameras(2, W, H)
    means, quats, scales, opac = _culling_scene()
    op = opac if with_opacity else None
    radii, m2, depths, conics, comps = ref.project(
        means, quats, scales, op, viewmats, Ks, W, H, calc_compensations=with_comp, **PROJ_ARGS
    )
    assert radii.dtype == torch.int32 and radii.shape == (2, len(means), 2)
    assert (comps is not None) == with_comp
    n_vis = 0
    for c in range(2):
        for n in range(len(means)):
            exp = naive_project_one(
                means[n].numpy(), quats[n].tolist(), scales[n].numpy(),
                None if op is None else float(op[n]), viewmats[c].numpy(), Ks[c].numpy(),
                W, H, 0.3, 0.01, 1e10, 0.0, with_comp,
            )
            if exp is None:
                assert radii[c, n].tolist() == [0, 0]
                assert m2[c, n].abs().sum() == 0 and depths[c, n] == 0 and conics[c, n].abs().sum() == 0
                if with_comp:
                    assert comps[c, n] == 0
                continue
            n_vis += 1
            r, mm, d, con, cp = exp
            assert radii[c, n].tolist() == list(r)
            np.testing.assert_allclose(m2[c, n].numpy(), mm, rtol=1e-12, atol=1e-10)
            np.testing.assert_allclose(float(depths[c, n]), d, rtol=1e-12)
            np.testing.assert_allclose(conics[c, n].numpy(), con, rtol=1e-10, atol=1e-12)
            if with_comp:
                np.testing.assert_allclose(float(comps[c, n]), cp, rtol=1e-10)
    assert n_vis > 40
    # the hand-made cases
    N0 = 40
    # (camera 0 sits at the origin; camera 1 is moved and rotated)
    assert (radii[0, N0 + 0] == 0).all() and (radii[0, N0 + 1] == 0).all() and (radii[:, N0 + 2] == 0).all()
    assert ((radii[0, N0 + 3] == 0).all()) == with_opacity
    assert (radii[0, N0 + 4] > 0).all() and (radii[0, N0 + 5] > 0).all()
    lxp = _lims(Ks[0].numpy(), W, H)[0]
    assert float(means[N0 + 4, 0] / means[N0 + 4, 2]) > lxp  # really outside the clamp


def test_project_radius_clip_and_float32():
    W, H = 64, 48
    viewmats, Ks = _cameras(1, W, H)
    means, quats, scales, opac = _gaussians(30, seed=2)
    r0 = ref.project(means, quats, scales, opac, viewmats, Ks, W, H, 0.3, 0.01, 1e10, 0.0, False)[0]
    r1 = ref.project(means, quats, scales, opac, viewmats, Ks, W, H, 0.3, 0.01, 1e10, 3.0, False)[0]
    keep = (r0 > 3).any(-1)
    assert (r1.bool().all(-1) == keep).all()
    out32 = ref.project(means.float(), quats.float(), scales.float(), opac.float(),
                        viewmats.float(), Ks.float(), W, H, 0.3, 0.01, 1e10, 0.0, True)
    assert out32[1].dtype == torch.float32
    vis = (out32[0] > 0).all(-1) & (r0 > 0).all(-1)
    out64 = ref.project(means, quats, scales, opac, viewmats, Ks, W, H, 0.3, 0.01, 1e10, 0.0, True)
    assert torch.allclose(out32[1][vis].double(), out64[1][vis], atol=1e-3)


def test_project_vs_gsplat_torch_impl():
    """gsplat's torch projection: no opacity-aware radius, no frustum-clamp differences inside
    the image; compare where both call the pair visible."""
    gs = pytest.importorskip("gsplat.cuda._torch_impl")
    W, H = 64, 48
    viewmats, Ks = _cameras(2, W, H)
    means, quats, scales, _ = _gaussians(50, seed=3, spread=1.5)
    radii, m2, depths, conics, comps = ref.project(
        means, quats, scales, None, viewmats, Ks, W, H, calc_compensations=True, **PROJ_ARGS
    )
    R = ref._quat_to_rotmat(quats)
    M = R * scales[:, None, :]
    covars = M @ M.transpose(-1, -2)
    g_radii, g_m2, g_d, g_con, g_comp = gs._fully_fused_projection(
        means, covars, viewmats, Ks, W, H, eps2d=0.3, near_plane=0.01, far_plane=1e10, calc_compensations=True
    )
    both = (radii > 0).all(-1) & (g_radii > 0).all(-1)
    assert both.sum() > 50
    assert (radii[both] == g_radii[both]).all()
    assert torch.allclose(m2[both], g_m2[both], atol=1e-9)
    assert torch.allclose(depths[both], g_d[both])
    assert torch.allclose(conics[both], g_con[both], rtol=1e-9, atol=1e-12)
    assert torch.allclose(comps[both], g_comp[both], rtol=1e-9)


def _proj_grad_scene():
    W, H = 40, 30
    viewmats, Ks = _cameras(2, W, H)
    means = torch.tensor(
        [[0.1, -0.2, 3.0], [-0.4, 0.3, 4.0], [0.0, 0.1, 2.5], [2.8, 0.2, 3.0], [-0.2, -2.5, 3.5]],
        dtype=torch.float64,
    )  # the last two are outside the frustum clamp (x/z resp. y/z) but overlap the image
    g = torch.Generator().manual_seed(4)
    quats = torch.randn(5, 4, generator=g, dtype=torch.float64)
    scales = torch.tensor(
        [[0.1, 0.2, 0.15], [0.3, 0.1, 0.2], [0.05, 0.1, 0.2], [1.2, 0.8, 0.6], [0.9, 1.1, 0.7]], dtype=torch.float64
    )
    opac = torch.full((5,), 0.8, dtype=torch.float64)
    return W, H, viewmats, Ks, means, quats, scales, opac


def test_project_gradcheck():
    W, H, viewmats, Ks, means, quats, scales, opac = _proj_grad_scene()
    radii = ref.project(means, quats, scales, opac, viewmats, Ks, W, H, 0.3, 0.01, 1e10, 0.0, True)[0]
    assert (radii > 0).all()
    lxp, lxn, lyp, lyn = _lims(Ks[0].numpy(), W, H)
    assert means[3, 0] / means[3, 2] > lxp and means[4, 1] / means[4, 2] < -lyn

    def f(m, q, s, v):
        _, m2, d, con, comp = ref.project(m, q, s, opac, v, Ks, W, H, 0.3, 0.01, 1e10, 0.0, True)
        return m2, d, con, comp

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, quats, scales, viewmats))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_project_grad_matches_lf_math_vjp():
    W, H, viewmats, Ks, means, quats, scales, opac = _proj_grad_scene()
    # add a culled Gaussian: it must get exactly zero gradient
    means = torch.cat([means, torch.tensor([[0.0, 0.0, -2.0]], dtype=torch.float64)])
    quats = torch.cat([quats, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)])
    scales = torch.cat([scales, torch.full((1, 3), 0.1, dtype=torch.float64)])
    opac = torch.cat([opac, torch.tensor([0.8], dtype=torch.float64)])
    N = len(means)
    ins = [t.clone().requires_grad_(True) for t in (means, quats, scales, viewmats)]
    radii, m2, d, con, comp = ref.project(*ins[:3], opac, ins[3], Ks, W, H, 0.3, 0.01, 1e10, 0.0, True)
    g = torch.Generator().manual_seed(5)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (m2, d, con, comp)]
    grads = torch.autograd.grad((m2, d, con, comp), ins, cot)
    exp = [np.zeros(t.shape) for t in ins]
    for c in range(2):
        for n in range(N):
            if not (radii[c, n] > 0).all():
                continue
            vm, vq, vs, vv = naive_project_one_vjp(
                means[n].numpy(), quats[n].tolist(), scales[n].numpy(), viewmats[c].numpy(), Ks[c].numpy(),
                W, H, 0.3, con[c, n].detach().numpy(), float(comp[c, n].detach()),
                cot[0][c, n].numpy(), float(cot[1][c, n]), cot[2][c, n].numpy(), float(cot[3][c, n]),
            )
            exp[0][n] += vm
            exp[1][n] += vq
            exp[2][n] += vs
            exp[3][c] += vv
    assert (radii[:, N - 1] == 0).all()
    for got, e in zip(grads, exp):
        np.testing.assert_allclose(got.numpy(), e, rtol=1e-7, atol=1e-9)
    assert grads[0][N - 1].abs().sum() == 0 and grads[2][N - 1].abs().sum() == 0


# ---------------------------------------------------------------------- SH
def _sh_independent(degree, d, coeffs):
    """Real SH from the textbook closed forms (as in 3DGS), one element at a time."""
    x, y, z = d / np.linalg.norm(d)
    b = [0.5 * math.sqrt(1 / math.pi)]
    c1 = math.sqrt(3 / (4 * math.pi))
    b += [-c1 * y, c1 * z, -c1 * x]
    c2a, c2b, c2c = 0.5 * math.sqrt(15 / math.pi), 0.25 * math.sqrt(5 / math.pi), 0.25 * math.sqrt(15 / math.pi)
    b += [c2a * x * y, -c2a * y * z, c2b * (3 * z * z - 1), -c2a * x * z, c2c * (x * x - y * y)]
    k1, k2, k3 = 0.25 * math.sqrt(35 / (2 * math.pi)), 0.5 * math.sqrt(105 / math.pi), 0.25 * math.sqrt(21 / (2 * math.pi))
    k4, k5 = 0.25 * math.sqrt(7 / math.pi), 0.25 * math.sqrt(105 / math.pi)
    b += [
        -k1 * y * (3 * x * x - y * y), k2 * x * y * z, -k3 * y * (5 * z * z - 1),
        k4 * z * (5 * z * z - 3), -k3 * x * (5 * z * z - 1), k5 * z * (x * x - y * y),
        -k1 * x * (x * x - 3 * y * y),
    ]
    nb = (degree + 1) ** 2
    return np.array(b[:nb]) @ coeffs[:nb]


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_independent(degree):
    g = torch.Generator().manual_seed(degree)
    M, K = 25, 16
    dirs = torch.randn(5, 5, 3, generator=g, dtype=torch.float64) * 3
    coeffs = torch.randn(5, 5, K, 3, generator=g, dtype=torch.float64)
    masks = torch.rand(5, 5, generator=g) > 0.3
    out = ref.sh(degree, dirs, coeffs, masks)
    assert out.shape == (5, 5, 3)
    for i in range(5):
        for j in range(5):
            e = _sh_independent(degree, dirs[i, j].numpy(), coeffs[i, j].numpy()) if masks[i, j] else np.zeros(3)
            np.testing.assert_allclose(out[i, j].numpy(), e, rtol=1e-12, atol=1e-12)
    # gsplat's torch implementation agrees too (no masks there)
    gs = pytest.importorskip("gsplat.cuda._torch_impl")
    nb = (degree + 1) ** 2
    exp = gs._spherical_harmonics(degree, dirs.reshape(M, 3), coeffs.reshape(M, K, 3)[:, :nb])
    assert torch.allclose(ref.sh(degree, dirs, coeffs).reshape(M, 3), exp, atol=1e-6)
    # only the first (degree+1)^2 coefficients are used
    assert torch.equal(ref.sh(degree, dirs, coeffs[..., :nb, :], masks), out)


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_sh_gradcheck(degree):
    g = torch.Generator().manual_seed(10 + degree)
    dirs = torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    coeffs = torch.randn(6, 16, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    masks = torch.tensor([True, False, True, True, False, True])
    assert torch.autograd.gradcheck(lambda d, c: ref.sh(degree, d, c, masks), (dirs, coeffs))
    assert torch.autograd.gradcheck(lambda d, c: ref.sh(degree, d, c, None), (dirs, coeffs))


# ------------------------------------------------------------ intersection
def _float_bits(x):
    return struct.unpack("<i", struct.pack("<f", float(x)))[0] & 0xFFFFFFFF


def _naive_isects(radii, means2d, depths, W, H, ts):
    C, N = radii.shape[:2]
    tw, th = -(-W // ts), -(-H // ts)
    bits = (tw * th).bit_length()
    out = []  # (key, flatten id) in generation order
    m32 = means2d.float().numpy()
    for c in range(C):
        for n in range(N):
            rx, ry = int(radii[c, n, 0]), int(radii[c, n, 1])
            if rx <= 0 or ry <= 0:
                continue
            mx, my = m32[c, n]
            t_x, t_y = np.float32(mx) / np.float32(ts), np.float32(my) / np.float32(ts)
            r_x, r_y = np.float32(rx) / np.float32(ts), np.float32(ry) / np.float32(ts)
            x0 = int(min(max(np.floor(t_x - r_x), 0), tw))
            x1 = int(min(max(np.ceil(t_x + r_x), 0), tw))
            y0 = int(min(max(np.floor(t_y - r_y), 0), th))
            y1 = int(min(max(np.ceil(t_y + r_y), 0), th))
            for ty in range(y0, y1):
                for tx in range(x0, x1):
                    key = (c << (32 + bits)) | ((ty * tw + tx) << 32) | _float_bits(depths[c, n])
                    out.append((key, c * N + n))
    return sorted(out, key=lambda kv: kv[0])  # Python's sort is stable


def _projected(N, C, W, H, seed=0, dtype=torch.float32, scale=0.15):
    viewmats, Ks = _cameras(C, W, H, dtype=dtype)
    means, quats, scales, opac = _gaussians(N, seed=seed, dtype=dtype, scale=scale)
    out = ref.project(means, quats, scales, opac, viewmats, Ks, W, H, 0.3, 0.01, 1e10, 0.0, False)
    return out, opac


@pytest.mark.parametrize("W,H,ts", [(37, 29, 8), (64, 48, 16), (1, 1, 16), (20, 13, 4)])
def test_isect_matches_naive(W, H, ts):
    C, N = 2, 40
    (radii, m2, depths, _, _), _ = _projected(N, C, W, H, seed=W)
    # two Gaussians with an equal depth: ties keep the Gaussian order
    depths = depths.clone()
    vis = torch.nonzero((radii[0] > 0).all(-1)).reshape(-1)
    if len(vis) >= 2:
        depths[0, vis[1]] = depths[0, vis[0]]
    offs, fids, iids = ref.isect(radii, m2, depths, W, H, ts)
    tw, th = -(-W // ts), -(-H // ts)
    assert offs.shape == (C, th, tw) and offs.dtype == torch.int32
    assert fids.dtype == torch.int32 and iids.dtype == torch.int64
    exp = _naive_isects(radii, m2, depths, W, H, ts)
    assert iids.tolist() == [k for k, _ in exp]
    assert fids.tolist() == [f for _, f in exp]
    # offsets: tile t spans [offs[t], offs[t+1]) (the last one ends at n_isects)
    bits = (tw * th).bit_length()
    flat = offs.reshape(-1).tolist() + [len(fids)]
    for t in range(C * tw * th):
        seg = iids[flat[t] : flat[t + 1]]
        assert flat[t] <= flat[t + 1]
        c, tile = divmod(t, tw * th)
        assert ((seg >> (32 + bits)) == c).all() and (((seg >> 32) & ((1 << bits) - 1)) == tile).all()
        dseg = depths.reshape(-1)[fids[flat[t] : flat[t + 1]].long()]
        assert (dseg[1:] >= dseg[:-1]).all()
    # counts per Gaussian = the tile rectangle areas
    counts = torch.bincount(fids.long(), minlength=C * N)
    assert counts.sum() == len(fids)


def test_isect_vs_gsplat_torch_impl():
    gs = pytest.importorskip("gsplat.cuda._torch_impl")
    W, H, ts, C, N = 50, 35, 16, 2, 30
    (radii, m2, depths, _, _), _ = _projected(N, C, W, H, seed=7)
    offs, fids, iids = ref.isect(radii, m2, depths, W, H, ts)
    tw, th = -(-W // ts), -(-H // ts)
    _, g_iids, g_fids = gs._isect_tiles(m2, radii, depths, ts, tw, th)
    g_offs = gs._isect_offset_encode(g_iids, C, tw, th)
    assert torch.equal(iids, g_iids)
    assert torch.equal(offs, g_offs)
    assert torch.equal(torch.sort(fids).values, torch.sort(g_fids).values)


def test_isect_edge_cases():
    # N = 0
    offs, fids, iids = ref.isect(torch.zeros(3, 0, 2, dtype=torch.int32), torch.zeros(3, 0, 2),
                                 torch.zeros(3, 0), 33, 17, 16)
    assert offs.shape == (3, 2, 3) and (offs == 0).all() and fids.numel() == 0 and iids.numel() == 0
    # everything culled
    radii = torch.zeros(2, 5, 2, dtype=torch.int32)
    offs, fids, _ = ref.isect(radii, torch.rand(2, 5, 2), torch.rand(2, 5) + 1, 16, 16, 16)
    assert offs.shape == (2, 1, 1) and (offs == 0).all() and fids.numel() == 0
    # 1x1 image, one visible Gaussian in the second camera: offsets [0, 0] -> camera 0 empty
    radii = torch.tensor([[[0, 0]], [[2, 3]]], dtype=torch.int32)
    offs, fids, iids = ref.isect(radii, torch.full((2, 1, 2), 0.5), torch.ones(2, 1), 1, 1, 16)
    assert offs.reshape(-1).tolist() == [0, 0] and fids.tolist() == [1]
    assert iids.tolist() == [(1 << (32 + 1)) | _float_bits(1.0)]


# ------------------------------------------------------------ rasterization
def naive_rasterize(means2d, conics, colors, opac, bgs, W, H, ts, offs, fids):
    C, N, D = colors.shape
    tw = offs.shape[2]
    flat = offs.reshape(-1).tolist() + [len(fids)]
    m2, con, col, op = (t.detach().double().numpy().reshape(C * N, -1) for t in (means2d, conics, colors, opac))
    out = np.zeros((C, H, W, D))
    alphas = np.zeros((C, H, W, 1))
    last_ids = np.full((C, H, W), -1)
    for c in range(C):
        for y in range(H):
            for x in range(W):
                t = (c * offs.shape[1] + y // ts) * tw + x // ts
                T, acc = 1.0, np.zeros(D)
                for k in range(flat[t], flat[t + 1]):
                    g = int(fids[k])
                    dx, dy = m2[g, 0] - (x + 0.5), m2[g, 1] - (y + 0.5)
                    a, b, cc = con[g]
                    sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
                    if sigma < 0:
                        continue
                    alpha = min(0.999, op[g, 0] * math.exp(-sigma))
                    if alpha < ALPHA_THRESHOLD:
                        continue
                    nT = T * (1 - alpha)
                    if nT <= 1e-4:
                        break
                    acc += alpha * T * col[g]
                    T = nT
                    last_ids[c, y, x] = k
                if bgs is not None:
                    acc = acc + T * bgs[c].double().numpy()
                out[c, y, x] = acc
                alphas[c, y, x, 0] = 1 - T
    return out, alphas, last_ids


def _raster_inputs(C, N, W, H, D, ts, seed=0, dtype=torch.float32, scale=0.15, opac_scale=1.0):
    (radii, m2, depths, conics, _), opac = _projected(N, C, W, H, seed=seed, dtype=dtype, scale=scale)
    offs, fids, _ = ref.isect(radii, m2, depths, W, H, ts)
    g = torch.Generator().manual_seed(seed + 100)
    colors = torch.rand(C, N, D, generator=g, dtype=dtype)
    bgs = torch.rand(C, D, generator=g, dtype=dtype)
    opacs = (opac * opac_scale)[None].expand(C, N).contiguous()
    return m2, conics, colors, opacs, bgs, offs, fids


@pytest.mark.parametrize(
    "C,N,W,H,D,ts,bg",
    [(2, 30, 20, 13, 4, 16, True), (2, 30, 20, 13, 4, 4, False), (1, 60, 37, 21, 1, 8, True), (3, 20, 9, 7, 3, 4, True)],
)
def test_rasterize_matches_naive(C, N, W, H, D, ts, bg):
    m2, con, col, op, bgs, offs, fids = _raster_inputs(C, N, W, H, D, ts, seed=N + W, scale=0.4)
    bgs = bgs if bg else None
    rc, ra, li = ref.rasterize(m2, con, col, op, bgs, W, H, ts, offs, fids)
    assert rc.shape == (C, H, W, D) and ra.shape == (C, H, W, 1) and li.shape == (C, H, W)
    assert li.dtype == torch.int32 and rc.dtype == torch.float32
    e_rc, e_ra, e_li = naive_rasterize(m2, con, col, op, bgs, W, H, ts, offs, fids)
    np.testing.assert_allclose(rc.numpy(), e_rc, atol=1e-5)
    np.testing.assert_allclose(ra.numpy(), e_ra, atol=1e-5)
    assert (li.numpy() == e_li).all()
    assert (li >= 0).sum() > 0 and (ra > 0.5).any()


def test_rasterize_saturates():
    """Many opaque Gaussians: the T <= 1e-4 stop is hit."""
    C, N, W, H, D, ts = 1, 80, 12, 10, 2, 4
    m2, con, col, op, bgs, offs, fids = _raster_inputs(C, N, W, H, D, ts, seed=3, scale=1.0)
    op = torch.full_like(op, 0.99)
    rc, ra, li = ref.rasterize(m2, con, col, op, bgs, W, H, ts, offs, fids)
    e_rc, e_ra, e_li = naive_rasterize(m2, con, col, op, bgs, W, H, ts, offs, fids)
    np.testing.assert_allclose(rc.numpy(), e_rc, atol=1e-5)
    np.testing.assert_allclose(ra.numpy(), e_ra, atol=1e-5)
    assert (li.numpy() == e_li).all()
    counts = (offs.reshape(-1).diff(append=torch.tensor([len(fids)], dtype=torch.int32)))
    assert (ra > 1 - 1e-3).any()
    # some pixel stopped before the end of its tile's list
    flat_end = torch.cat([offs.reshape(-1)[1:], torch.tensor([len(fids)], dtype=torch.int32)])
    assert counts.max() > 1
    tiles = torch.arange(H)[:, None] // ts * offs.shape[2] + torch.arange(W)[None] // ts
    assert (li[0] < flat_end[tiles] - 1).any()


@pytest.mark.parametrize("D", [1, 128])
def test_rasterize_channels_and_batches(D, monkeypatch):
    C, N, W, H, ts = 2, 50, 33, 18, 16
    m2, con, col, op, bgs, offs, fids = _raster_inputs(C, N, W, H, D, ts, seed=D, scale=0.4)
    rc, ra, li = ref.rasterize(m2, con, col, op, bgs, W, H, ts, offs, fids)
    # many tiny batches give the same result
    monkeypatch.setattr(ref, "_BATCH_ELEMS", 1)
    rc2, ra2, li2 = ref.rasterize(m2, con, col, op, bgs, W, H, ts, offs, fids)
    assert torch.allclose(rc, rc2, atol=1e-6) and torch.allclose(ra, ra2, atol=1e-6) and torch.equal(li, li2)
    if D == 1:
        e_rc, e_ra, e_li = naive_rasterize(m2, con, col, op, bgs, W, H, ts, offs, fids)
        np.testing.assert_allclose(rc.numpy(), e_rc, atol=1e-5)


def test_rasterize_edge_cases():
    # N = 0
    C, W, H, D, ts = 2, 17, 5, 3, 16
    bgs = torch.rand(C, D, requires_grad=True)
    offs = torch.zeros(C, 1, 2, dtype=torch.int32)
    rc, ra, li = ref.rasterize(torch.zeros(C, 0, 2), torch.zeros(C, 0, 3), torch.zeros(C, 0, D), torch.zeros(C, 0),
                               bgs, W, H, ts, offs, torch.zeros(0, dtype=torch.int32))
    assert torch.allclose(rc, bgs[:, None, None, :].expand(C, H, W, D)) and (ra == 0).all() and (li == -1).all()
    rc.sum().backward()
    assert torch.allclose(bgs.grad, torch.full((C, D), float(H * W)))
    # no intersections (all culled), no background
    m2, con, col, op, _, _, _ = _raster_inputs(1, 5, 16, 16, 2, 16)
    rc, ra, li = ref.rasterize(m2, con, col, op, None, 16, 16, 16, torch.zeros(1, 1, 1, dtype=torch.int32),
                               torch.zeros(0, dtype=torch.int32))
    assert (rc == 0).all() and (ra == 0).all() and (li == -1).all()
    # 1x1 image
    W = H = 1
    m2 = torch.tensor([[[0.5, 0.5], [0.7, 0.2]]])
    con = torch.tensor([[[1.0, 0.0, 1.0], [2.0, 0.1, 1.0]]])
    col = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    op = torch.tensor([[0.5, 0.5]])
    radii = torch.ones(1, 2, 2, dtype=torch.int32)
    depths = torch.tensor([[2.0, 1.0]])
    offs, fids, _ = ref.isect(radii, m2, depths, W, H, 16)
    assert fids.tolist() == [1, 0]
    rc, ra, li = ref.rasterize(m2, con, col, op, None, W, H, 16, offs, fids)
    e_rc, e_ra, e_li = naive_rasterize(m2, con, col, op, None, W, H, 16, offs, fids)
    np.testing.assert_allclose(rc.numpy(), e_rc, atol=1e-6)
    assert li.tolist() == [[[1]]]


def _rast_grad_scene():
    """Tiny float64 scene away from every discontinuity."""
    C, N, W, H, D, ts = 2, 6, 10, 7, 3, 4
    g = torch.Generator().manual_seed(21)
    m2 = torch.stack([torch.rand(C, N, generator=g, dtype=torch.float64) * W,
                      torch.rand(C, N, generator=g, dtype=torch.float64) * H], -1)
    s = torch.rand(C, N, 2, generator=g, dtype=torch.float64) * 2 + 4.0
    rho = (torch.rand(C, N, generator=g, dtype=torch.float64) - 0.5) * 0.6
    cov = torch.stack([s[..., 0] ** 2, rho * s[..., 0] * s[..., 1], s[..., 1] ** 2], -1)
    det = cov[..., 0] * cov[..., 2] - cov[..., 1] ** 2
    con = torch.stack([cov[..., 2] / det, -cov[..., 1] / det, cov[..., 0] / det], -1)
    col = torch.rand(C, N, D, generator=g, dtype=torch.float64)
    op = torch.rand(C, N, generator=g, dtype=torch.float64) * 0.5 + 0.2
    bgs = torch.rand(C, D, generator=g, dtype=torch.float64)
    radii = torch.full((C, N, 2), 12, dtype=torch.int32)
    depths = torch.rand(C, N, generator=g, dtype=torch.float64) + 1
    offs, fids, _ = ref.isect(radii, m2, depths, W, H, ts)
    # stay away from the 1/255 threshold and the 0.999 clamp
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    dx = m2[..., 0, None, None] - xs
    dy = m2[..., 1, None, None] - ys
    sig = 0.5 * (con[..., 0, None, None] * dx**2 + con[..., 2, None, None] * dy**2) + con[..., 1, None, None] * dx * dy
    alpha = op[..., None, None] * torch.exp(-sig)
    assert ((alpha - ALPHA_THRESHOLD).abs() > 1e-7).all() and (alpha < 0.9).all()
    return (m2, con, col, op, bgs), (W, H, ts, offs, fids)


def test_rasterize_gradcheck():
    tensors, (W, H, ts, offs, fids) = _rast_grad_scene()
    ins = tuple(t.clone().requires_grad_(True) for t in tensors)

    def f(*a):
        rc, ra, _ = ref.rasterize(*a, W, H, ts, offs, fids)
        return rc, ra

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_rasterize_alpha_clamp_has_no_gradient():
    m2 = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64, requires_grad=True)
    con = torch.tensor([[[1.0, 0.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    op = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    col = torch.ones(1, 1, 1, dtype=torch.float64)
    offs, fids, _ = ref.isect(torch.ones(1, 1, 2, dtype=torch.int32), m2, torch.ones(1, 1), 1, 1, 16)
    rc, ra, _ = ref.rasterize(m2, con, col, op, None, 1, 1, 16, offs, fids)
    assert abs(float(ra.detach()) - 0.999) < 1e-12
    (rc.sum() + ra.sum()).backward()
    assert op.grad.abs().sum() == 0 and con.grad.abs().sum() == 0 and m2.grad.abs().sum() == 0


def test_rasterize_absgrad(monkeypatch):
    tensors, (W, H, ts, offs, fids) = _rast_grad_scene()
    m2, con, col, op, bgs = (t.clone().requires_grad_(True) for t in tensors)
    g = torch.Generator().manual_seed(3)
    wc = torch.randn(2, H, W, 3, generator=g, dtype=torch.float64)
    wa = torch.randn(2, H, W, 1, generator=g, dtype=torch.float64)
    rc, ra, _ = ref.rasterize(m2, con, col, op, bgs, W, H, ts, offs, fids, absgrad=True)
    per_pixel = rc * wc + ra * wa  # [C,H,W,3]
    assert torch.equal(m2.absgrad, torch.zeros_like(m2))  # nothing before a backward pass
    # expected: sum over pixels of |d loss_pixel / d means2d|, one pixel at a time
    exp = torch.zeros_like(m2)
    pix = per_pixel.sum(-1)
    for c in range(2):
        for y in range(H):
            for x in range(W):
                (gr,) = torch.autograd.grad(pix[c, y, x], m2, retain_graph=True)
                exp += gr.abs()
    m2.absgrad.zero_()  # the per-pixel passes above accumulated into it
    per_pixel.sum().backward()
    assert torch.allclose(m2.absgrad, exp, rtol=1e-10, atol=1e-12)
    assert (m2.absgrad >= m2.grad.abs() - 1e-12).all()
    # same gradients and absgrad with activation checkpointing and one tile per batch
    monkeypatch.setattr(ref, "_CKPT_ELEMS", 0)
    monkeypatch.setattr(ref, "_BATCH_ELEMS", 1)
    ins2 = [t.detach().clone().requires_grad_(True) for t in tensors]
    rc2, ra2, _ = ref.rasterize(*ins2, W, H, ts, offs, fids, absgrad=True)
    assert torch.allclose(rc2, rc) and torch.allclose(ra2, ra)
    (rc2 * wc + ra2 * wa).sum().backward()
    for a, b in zip((m2, con, col, op, bgs), ins2):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ins2[0].absgrad, exp, rtol=1e-10, atol=1e-12)


def test_pipeline_float32_end_to_end():
    """project -> isect -> rasterize with gradients flowing to the 3D parameters."""
    W, H, C = 45, 31, 2
    viewmats, Ks = _cameras(C, W, H, dtype=torch.float32)
    means, quats, scales, opac = (t.float().requires_grad_(True) for t in _gaussians(80, seed=9, scale=0.3))
    viewmats.requires_grad_(True)
    radii, m2, d, con, comp = ref.project(means, quats, scales, opac, viewmats, Ks, W, H, 0.3, 0.01, 1e10, 0.0, True)
    offs, fids, _ = ref.isect(radii, m2, d, W, H, 16)
    colors = ref.sh(1, means[None] - viewmats.detach().inverse()[:, None, :3, 3], torch.rand(C, 80, 4, 3))
    rc, ra, li = ref.rasterize(m2, con, colors, (opac * comp), torch.zeros(C, 3), W, H, 16, offs, fids)
    (rc.square().sum() + ra.sum()).backward()
    for t in (means, quats, scales, opac, viewmats):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_clamp_boundaries_pass_gradient():
    """At exactly the clamp values the gradient passes (lf_math.h tests with '>' / '<=')."""
    m2 = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64, requires_grad=True)
    con = torch.tensor([[[1.0, 0.0, 1.0]]], dtype=torch.float64)
    op = torch.tensor([[0.999]], dtype=torch.float64, requires_grad=True)
    offs, fids, _ = ref.isect(torch.ones(1, 1, 2, dtype=torch.int32), m2, torch.ones(1, 1), 1, 1, 16)
    _, ra, _ = ref.rasterize(m2, con, torch.ones(1, 1, 1, dtype=torch.float64), op, None, 1, 1, 16, offs, fids)
    ra.sum().backward()
    assert float(op.grad) == 1.0
    x = torch.tensor([-1.0, 0.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = ref._clamp_inclusive(x, torch.tensor(-1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    y.sum().backward()
    assert y.tolist() == [-1.0, 0.0, 2.0, 2.0] and x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]
