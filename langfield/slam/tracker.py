"""Camera tracking through the renderer.

A frame's world-to-camera pose is optimised as ``se3_exp(delta) @ T_init`` (left update on
SE(3), so rotations stay rotations) with Levenberg-Marquardt steps on the 6-vector ``delta``,
minimising

    L1(rgb) + w_depth * L1(depth)      (Huber cores: quadratic below 0.02 / 1 cm)

over the pixels the map already explains (rendered alpha above ``alpha_thresh`` and a valid
measured depth; residuals beyond ``cap_rgb`` / ``cap_depth`` are outliers and cost the cap),
coarse to fine over an image pyramid. Each level stops on a convergence test (the update
size, after the step size has been halved on every non-improving step, falls below
``tol_trans`` metres and ``tol_rot`` radians, or the loss stops changing) instead of a fixed
iteration count; the best pose seen is kept.

Two methods (``TrackerConfig.method``):

* ``"warp"`` (default, :func:`track_warp`): the map is rendered at the current pose once per
  linearisation point; the frame's depth points are warped into that render by the pose being
  solved for, so a step costs a bilinear lookup, not a render. The map is rendered again when
  the pose has moved more than ``rerender_trans`` / ``rerender_rot`` (at most ``max_renders``
  per level). The render is taken once at the working size and pooled for the coarser levels
  (``pool_renders``), and reused while the pose stays within the re-render distance: about 2
  renders per frame (5 with a render per level, 20-30 with a render per step). Points the render
  does not cover cost the mean cost of an explained pixel, so moving points into or out of
  the mapped area is neutral (a flat cap there pulled every pose back towards the keyframes).
* ``"render"`` (:func:`track_render`): a render and its backward per step; the gradient on
  the twist is exact (the renderer's camera-pose gradient), the Gauss-Newton matrix comes from
  the rendered images' warp Jacobian.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from langfield.maths import inv_rigid, se3_exp
from langfield.render.model import Cameras, render
from langfield.scene import FixedModel

__all__ = ["TrackerConfig", "TrackResult", "track", "track_warp", "track_render", "pyramid", "constant_velocity",
           "pose_error"]


@dataclass
class TrackerConfig:
    """Tracking settings. ``levels``: downsampling factors, coarse to fine; ``max_iters`` per
    level (a safety cap; levels normally stop on the convergence test)."""

    levels: Tuple[int, ...] = (4, 2, 1)
    max_iters: Tuple[int, ...] = (20, 15, 20)
    tol_scale: Tuple[float, ...] = (20.0, 5.0, 1.0)  # coarser levels stop on looser step / loss-change tests
    w_depth: float = 1.0
    huber_rgb: float = 0.02  # L1 beyond these residuals, quadratic inside
    huber_depth: float = 0.01  # metres
    alpha_thresh: float = 0.9
    coverage_alpha: float = 0.5  # coverage = share of valid-depth pixels with alpha above this
    cap_rgb: float = 0.2  # per-pixel costs are truncated here (outliers, and pixels the map does not cover,
    cap_depth: float = 0.1  # cost the cap: metres)
    tol_trans: float = 1e-5
    tol_rot: float = 1e-5
    rel_tol: float = 3e-4  # a level ends after two accepted steps that lower the loss by less than this share
    abs_tol: float = 1e-7  # ... or by less than this
    max_rejects: int = 4  # a level ends after this many rejected steps in a row
    min_pixels: int = 30
    h_pixels: int = 8192  # pixels used for the Gauss-Newton matrix ("render" method)
    method: str = "warp"  # "warp": render once, align by warping (re-render when moved); "render": every step
    max_points: int = 8192  # live points per level ("warp"; 16384: 1.14x the tracking CPU, no better pose)
    max_renders: int = 3  # renders per level ("warp")
    rerender_trans: float = 0.002  # metres / degrees moved since the level's last render that call for
    rerender_rot: float = 0.2  # a new render at the new pose ("warp")
    pool_renders: bool = True  # "warp": render at the working size and pool it for the coarser levels, reusing
    # the last render while the pose stays within the level's re-render distance (False: a render per level)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["levels"], d["max_iters"], d["tol_scale"] = list(self.levels), list(self.max_iters), list(self.tol_scale)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrackerConfig":
        d = dict(d)
        for k, typ in (("levels", int), ("max_iters", int), ("tol_scale", float)):
            if k in d:
                d[k] = tuple(typ(v) for v in d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class TrackResult:
    viewmat: Tensor  # [4, 4] world-to-camera
    loss: float
    iters: int
    iters_per_level: List[int] = field(default_factory=list)
    converged: bool = True
    coverage: float = 0.0  # share of valid-depth pixels the map explained at the end
    renders: int = 0  # renderer calls


def pyramid(image: Tensor, depth: Tensor, factor: int) -> Tuple[Tensor, Tensor]:
    """``image`` [H, W, 3] box-averaged and ``depth`` [H, W] averaged over valid pixels (a
    block with any invalid pixel becomes invalid, 0) by an integer ``factor``."""
    if factor == 1:
        return image, depth
    H, W = depth.shape
    h, w = H // factor, W // factor
    im = image[:h * factor, :w * factor].permute(2, 0, 1)[None]
    im = F.avg_pool2d(im, factor)[0].permute(1, 2, 0).contiguous()
    d = depth[:h * factor, :w * factor][None, None]
    valid = (d > 0).float()
    cnt = F.avg_pool2d(valid, factor)
    dm = F.avg_pool2d(d * valid, factor) / cnt.clamp_min(1e-8)
    dm = torch.where(cnt > 0.999, dm, torch.zeros_like(dm))
    return im, dm[0, 0].contiguous()


def scale_K(K: Tensor, factor: int) -> Tensor:
    """Intrinsics of an image downsampled by ``factor`` (pixel centres at +0.5: K / factor)."""
    Kf = K.clone()
    Kf[:2] = Kf[:2] / factor
    return Kf


def rigid(T: Tensor) -> Tensor:
    """The nearest rigid transform (rotation projected on SO(3) by SVD, in float64) of
    [..., 4, 4]: products of float poses drift off SO(3), and extrapolating a pose that is not
    rigid amplifies the drift frame after frame."""
    Td = T.double()
    U, _, Vh = torch.linalg.svd(Td[..., :3, :3])
    d = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.ones(Td.shape[:-2] + (3,), dtype=Td.dtype, device=Td.device)
    D[..., 2] = d
    out = torch.zeros_like(Td)
    out[..., :3, :3] = U @ torch.diag_embed(D) @ Vh
    out[..., :3, 3] = Td[..., :3, 3]
    out[..., 3, 3] = 1.0
    return out.to(T.dtype)


def constant_velocity(prev: Optional[Tensor], prev2: Optional[Tensor]) -> Optional[Tensor]:
    """Constant-velocity prediction of the next world-to-camera pose from the last two
    (rigid by construction)."""
    if prev is None:
        return None
    if prev2 is None:
        return rigid(prev)
    p, p2 = rigid(prev).double(), rigid(prev2).double()
    rel = p @ inv_rigid(p2)  # motion from prev2 to prev (in the camera frame of prev)
    return rigid(rel @ p).to(prev.dtype)


def pose_error(T_est: Tensor, T_ref: Tensor) -> Tuple[float, float]:
    """(translation error in metres of the camera centre, rotation error in degrees) between
    two world-to-camera poses."""
    E = T_est.double() @ inv_rigid(T_ref.double())
    c_est = inv_rigid(T_est.double())[:3, 3]
    c_ref = inv_rigid(T_ref.double())[:3, 3]
    R = E[:3, :3]
    vee = torch.stack([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    ang = torch.atan2(0.5 * vee.norm(), 0.5 * (R.trace() - 1))
    return float((c_est - c_ref).norm()), math.degrees(float(ang))


def _grad_xy(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Central differences (one-sided at the borders) along x (width) and y (height) of
    [H, W, ...] images."""
    gx = torch.zeros_like(x)
    gy = torch.zeros_like(x)
    gx[:, 1:-1] = 0.5 * (x[:, 2:] - x[:, :-2])
    gx[:, 0] = x[:, 1] - x[:, 0]
    gx[:, -1] = x[:, -1] - x[:, -2]
    gy[1:-1] = 0.5 * (x[2:] - x[:-2])
    gy[0] = x[1] - x[0]
    gy[-1] = x[-1] - x[-2]
    return gx, gy


def _huber(r: Tensor, delta: float) -> Tensor:
    """Huber loss scaled to equal ``|r| - delta / 2`` beyond ``delta`` (an L1 loss with a
    quadratic core, so Gauss-Newton steps converge near the optimum)."""
    a = r.abs()
    return torch.where(a < delta, 0.5 * r * r / delta, a - 0.5 * delta)


def _evaluate(model, T: Tensor, K: Tensor, w: int, h: int, image: Tensor, depth: Tensor, cfg: "TrackerConfig",
              backend: str, need_grad: bool):
    """Loss at pose ``T`` (and, with ``need_grad``, its exact gradient on the twist through
    the renderer and a Gauss-Newton matrix from the rendered images' warp Jacobian)."""
    delta = torch.zeros(6, device=T.device, requires_grad=need_grad)
    Tp = se3_exp(delta) @ T if need_grad else T
    with torch.set_grad_enabled(need_grad):
        out = render(model, Cameras(Tp[None], K[None], w, h), depth=True, backend=backend, validate=False)
        rgb, alpha, dr = out.rgb[0], out.alpha[0], out.depth[0]
        with torch.no_grad():
            valid = depth > 0
            nvalid = max(1, int(valid.sum()))
            cov = float(((alpha > cfg.coverage_alpha) & valid).sum()) / nvalid
            cover = (alpha > cfg.alpha_thresh) & valid
        r_rgb = rgb - image
        r_d = dr - depth
        e_c = _huber(r_rgb, cfg.huber_rgb).mean(-1)
        e_d = _huber(r_d, cfg.huber_depth)
        with torch.no_grad():
            mask = cover & (e_c < cfg.cap_rgb) & (e_d < cfg.cap_depth)  # pixels that carry a gradient
            n = int(mask.sum())
        if n < cfg.min_pixels:
            return None
        # truncated costs: an uncovered or outlying pixel costs the cap, so no pose gains by hiding pixels
        cost = torch.where(mask, e_c + cfg.w_depth * e_d, torch.full_like(e_c, cfg.cap_rgb + cfg.w_depth * cfg.cap_depth))
        loss = (cost * valid).sum() / nvalid
    if not need_grad:
        return float(loss), None, None, cov
    loss.backward()
    g = delta.grad.detach().double()
    with torch.no_grad():
        # warp Jacobian of the rendered images w.r.t. a left twist on the world-to-camera pose (H is only
        # the step's metric: the gradient is exact), on at most h_pixels of the pixels with a gradient
        vv, uu = torch.nonzero(mask, as_tuple=True)
        if vv.numel() > cfg.h_pixels:
            sel = torch.arange(0, vv.numel(), vv.numel() / cfg.h_pixels, device=vv.device).long()
            vv, uu = vv[sel], uu[sel]
        scale = n / vv.numel()
        Z = dr.detach()[vv, uu].clamp_min(1e-6)
        fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
        X = (uu.float() + 0.5 - cx) / fx * Z
        Y = (vv.float() + 0.5 - cy) / fy * Z
        zeros = torch.zeros_like(Z)
        ones = torch.ones_like(Z)
        # dP/dxi = [I | -[P]x]  -> rows for X, Y, Z: [N, 6]
        dX = torch.stack([ones, zeros, zeros, zeros, Z, -Y], -1)
        dY = torch.stack([zeros, ones, zeros, -Z, zeros, X], -1)
        dZ = torch.stack([zeros, zeros, ones, Y, -X, zeros], -1)
        du = (fx / Z)[:, None] * dX - (fx * X / (Z * Z))[:, None] * dZ
        dv = (fy / Z)[:, None] * dY - (fy * Y / (Z * Z))[:, None] * dZ
        gxi, gyi = _grad_xy(rgb.detach())
        gxd, gyd = _grad_xy(dr.detach())
        Jc = -(gxi[vv, uu][:, :, None] * du[:, None, :] + gyi[vv, uu][:, :, None] * dv[:, None, :])  # [N, 3, 6]
        Jd = dZ - (gxd[vv, uu][:, None] * du + gyd[vv, uu][:, None] * dv)  # [N, 6]
        wc = scale / (3 * nvalid * r_rgb.detach()[vv, uu].abs().clamp_min(cfg.huber_rgb))  # IRLS weights (Huber)
        wd = scale * cfg.w_depth / (nvalid * r_d.detach()[vv, uu].abs().clamp_min(cfg.huber_depth))
        Jc2 = Jc.reshape(-1, 6)
        H = (Jc2 * wc.reshape(-1, 1)).T @ Jc2 + (Jd * wd[:, None]).T @ Jd
        H = H.double()
    return float(loss.detach()), g, H, cov


def _warp_normal_equations(A: Tensor, mask: Tensor, q: Tensor, s: Tensor, r_c: Tensor, r_d: Tensor, R: Tensor,
                           fx: float, fy: float, n_all: int, cfg: "TrackerConfig") -> Tuple[Tensor, Tensor]:
    """Gradient [6] and Gauss-Newton matrix [6, 6] (float64) of :func:`track_warp`'s cost on the
    left twist, over the ``mask``ed points: ``A`` [N, 3, 6] d(exp(xi) p)/dxi of the frame's points,
    ``q`` [N, 3] the points in the rendered view, ``s`` [N, 13] the samples of the rendered maps
    (colour, depth, alpha, colour and depth image gradients), ``r_c`` / ``r_d`` the residuals,
    ``R`` the rotation of the warp; IRLS (Huber) weights."""
    m = mask
    Pm, qm, sm = A[m], q[m], s[m]
    zq = qm[:, 2].clamp_min(1e-6)
    dq = -torch.einsum("ij,njk->nik", R, Pm)  # [n, 3, 6]: d q / d xi (T = exp(xi) T_cur)
    du = (fx / zq)[:, None] * dq[:, 0] - (fx * qm[:, 0] / (zq * zq))[:, None] * dq[:, 2]
    dv = (fy / zq)[:, None] * dq[:, 1] - (fy * qm[:, 1] / (zq * zq))[:, None] * dq[:, 2]
    Jc = sm[:, 5:8, None] * du[:, None, :] + sm[:, 8:11, None] * dv[:, None, :]  # [n, 3, 6]
    Jd = sm[:, 11:12] * du + sm[:, 12:13] * dv - dq[:, 2]  # [n, 6]
    rc, rd = r_c[m], r_d[m]
    wc = 1.0 / (3 * n_all * rc.abs().clamp_min(cfg.huber_rgb))  # IRLS (Huber) weights: w * r = rho'
    wd = cfg.w_depth / (n_all * rd.abs().clamp_min(cfg.huber_depth))
    Jc2 = Jc.reshape(-1, 6)
    wc2 = wc.reshape(-1)
    g = Jc2.T @ (wc2 * rc.reshape(-1)) + Jd.T @ (wd * rd)
    H = (Jc2 * wc2[:, None]).T @ Jc2 + (Jd * wd[:, None]).T @ Jd
    return g.double(), H.double()


def _levenberg_marquardt(evaluate, T: Tensor, ev, it: int, max_it: int, tol_t: float, tol_r: float, rel_tol: float,
                         need_flat: int, cfg: "TrackerConfig"):
    """Levenberg-Marquardt steps on the left twist of the world-to-camera pose ``T`` (one
    pyramid level of both tracking methods). ``evaluate(T)`` returns None (too few pixels) or
    ``(loss, coverage, grad)`` with ``grad()`` giving ``(g, H)``, called only at the poses that
    are accepted (a rejected step costs its loss alone); ``ev`` is its value at ``T``. A step
    that raises the loss is undone and lambda raised. Stops when the step falls below ``tol_t``
    / ``tol_r``, after ``need_flat`` accepted steps in a row that lower the loss by less than
    ``rel_tol`` (relative) or ``cfg.abs_tol``, after ``cfg.max_rejects`` rejections in a row, or at
    ``max_it`` iterations (counted from ``it``). Returns ``(T, loss, coverage, it, converged)``."""
    loss, coverage, grad = ev
    g, H = grad()
    lam = 1e-3
    flat = rejected = 0
    while it < max_it:
        Amat = H + lam * torch.diag(H.diagonal().clamp_min(1e-12))
        step = -torch.linalg.solve(Amat, g)
        T_new = rigid(se3_exp(step) @ T.double()).float()
        small = float(step[:3].norm()) < tol_t and float(step[3:].norm()) < tol_r
        ev = evaluate(T_new)
        it += 1
        if ev is not None and ev[0] <= loss:
            rel = (loss - ev[0]) / max(loss, 1e-12)
            if loss - ev[0] < cfg.abs_tol:
                rel = 0.0
            T = T_new
            loss, coverage, grad = ev
            lam = max(lam / 3.0, 1e-4)
            rejected = 0
            flat = flat + 1 if rel < rel_tol else 0
            if small or flat >= need_flat:
                return T, loss, coverage, it, True
            g, H = grad()
        else:
            lam *= 8.0
            rejected += 1
            if small or rejected >= cfg.max_rejects:
                return T, loss, coverage, it, True
    return T, loss, coverage, it, False


def track(model, image: Tensor, depth: Tensor, K: Tensor, T_init: Tensor, cfg: Optional[TrackerConfig] = None, *,
          backend: str = "auto") -> TrackResult:
    """Optimise the world-to-camera pose of one frame (``image`` [H, W, 3] in [0, 1], ``depth``
    [H, W] metres, 0 invalid, ``K`` [3, 3]) against the map ``model`` from ``T_init`` [4, 4],
    by ``cfg.method``: :func:`track_warp` (default) or :func:`track_render`."""
    cfg = cfg or TrackerConfig()
    if cfg.method == "warp":
        return track_warp(model, image, depth, K, T_init, cfg, backend=backend)
    if cfg.method == "render":
        return track_render(model, image, depth, K, T_init, cfg, backend=backend)
    raise ValueError(f"tracker method must be 'warp' or 'render', got {cfg.method!r}")


def _frozen(model) -> FixedModel:
    """``model`` with its activated parameters computed once, without gradients (tracking
    renders the map many times and needs no gradient on it)."""
    if hasattr(model, "snapshot"):  # a map that mapping may change meanwhile: copies taken under its lock
        return FixedModel(model.snapshot())
    with torch.no_grad():
        return FixedModel(model.activated())


def _sample(maps: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Bilinear samples [N, C] of ``maps`` [C, h, w] at continuous pixel coordinates ``u``, ``v``
    [N] (pixel i spans [i, i + 1), its centre at i + 0.5; border values outside)."""
    C, h, w = maps.shape
    grid = torch.stack([2.0 * u / w - 1.0, 2.0 * v / h - 1.0], -1)[None, None]
    return F.grid_sample(maps[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T


def track_warp(model, image: Tensor, depth: Tensor, K: Tensor, T_init: Tensor, cfg: Optional[TrackerConfig] = None,
               *, backend: str = "auto") -> TrackResult:
    """Tracking through the renderer with one render per linearisation point (the default).

    At each pyramid level the map is rendered (colour, depth, alpha) at the current pose; the
    frame's valid-depth pixels, unprojected with its own depth, are warped into that rendered
    view by the pose being solved for, and the same truncated Huber costs as
    :func:`track_render` (colour, and rendered depth against the warped point's depth, on points
    landing where the rendered alpha is above ``alpha_thresh``) are minimised with
    Levenberg-Marquardt on the SE(3) twist, with the analytic warp Jacobian (rendered-image
    gradients). Every step costs a bilinear lookup instead of a render. When the pose has moved
    more than ``rerender_trans`` / ``rerender_rot`` since the level's render, the map is rendered
    again at the new pose and the level continues (at most ``max_renders`` renders), so the
    final pose is aligned against a render taken at (or within a hair of) it."""
    cfg = cfg or TrackerConfig()
    frozen = _frozen(model)
    T_cur = rigid(T_init.detach().float().clone())
    iters_all: List[int] = []
    total, renders = 0, 0
    last_loss = float("inf")
    converged = True
    coverage = 0.0
    H0, W0 = depth.shape
    full = None  # (pose, colour, depth, alpha) of the last render at the working size (pool_renders)
    for li, f in enumerate(cfg.levels):
        im_l, d_l = pyramid(image, depth, f)
        K_l = scale_K(K.float(), f)
        h, w = d_l.shape
        fx, fy, cx, cy = float(K_l[0, 0]), float(K_l[1, 1]), float(K_l[0, 2]), float(K_l[1, 2])
        vv, uu = torch.nonzero(d_l > 0, as_tuple=True)
        if vv.numel() > cfg.max_points:
            sel = torch.arange(0, vv.numel(), vv.numel() / cfg.max_points, device=vv.device).long()
            vv, uu = vv[sel], uu[sel]
        z = d_l[vv, uu]
        P = torch.stack([(uu.float() + 0.5 - cx) / fx * z, (vv.float() + 0.5 - cy) / fy * z, z], -1)  # [N, 3]
        col = im_l[vv, uu]  # [N, 3]
        zeros, ones = torch.zeros_like(z), torch.ones_like(z)
        A = torch.stack([torch.stack([ones, zeros, zeros, zeros, P[:, 2], -P[:, 1]], -1),
                         torch.stack([zeros, ones, zeros, -P[:, 2], zeros, P[:, 0]], -1),
                         torch.stack([zeros, zeros, ones, P[:, 1], -P[:, 0], zeros], -1)], 1)  # d(exp(xi) p)/dxi
        n_all = max(1, int(P.shape[0]))
        max_it = cfg.max_iters[min(li, len(cfg.max_iters) - 1)]
        final = li == len(cfg.levels) - 1
        ts = 1.0 if final else cfg.tol_scale[min(li, len(cfg.tol_scale) - 1)]
        tol_t, tol_r = cfg.tol_trans * ts, cfg.tol_rot * ts
        rel_tol = cfg.rel_tol * ts
        need_flat = 2 if final else 1
        it = 0
        level_conv = False
        level_renders = 0
        loss = last_loss
        while True:
            reuse = full is not None and level_renders == 0 and not _moved(T_cur, full[0], cfg, ts)
            if cfg.pool_renders and reuse:  # the last render (at most a level's re-render distance away) serves
                T_ref = full[0]
            else:
                T_ref = T_cur.clone()
                if cfg.pool_renders:  # one render at the working size, pooled to the coarser levels
                    with torch.no_grad():
                        out = render(frozen, Cameras(T_ref[None], K.float()[None], W0, H0), depth=True,
                                     backend=backend, validate=False)
                    full = (T_ref, out.rgb[0], out.depth[0], out.alpha[0])
                else:
                    with torch.no_grad():
                        out = render(frozen, Cameras(T_ref[None], K_l[None], w, h), depth=True, backend=backend,
                                     validate=False)
                renders += 1
                level_renders += 1
            if cfg.pool_renders:
                rgb, dr, al = _pool_render(full[1], full[2], full[3], f)
            else:
                rgb, dr, al = out.rgb[0], out.depth[0], out.alpha[0]
            rgb, dr, al = rgb[:h, :w], dr[:h, :w], al[:h, :w]
            gxi, gyi = _grad_xy(rgb)
            gxd, gyd = _grad_xy(dr)
            maps = torch.cat([rgb, dr[..., None], al[..., None], gxi, gyi, gxd[..., None], gyd[..., None]],
                             -1).permute(2, 0, 1).contiguous()  # [13, h, w]
            fill = [None]

            def evaluate(T: Tensor):
                M = (T_ref.double() @ inv_rigid(T.double())).float()
                R, t = M[:3, :3], M[:3, 3]
                q = P @ R.T + t
                qz = q[:, 2].clamp_min(1e-6)
                u = fx * q[:, 0] / qz + cx
                v = fy * q[:, 1] / qz + cy
                s = _sample(maps, u, v)
                inside = (q[:, 2] > 1e-3) & (u >= 0) & (u <= w) & (v >= 0) & (v <= h)
                cover = inside & (s[:, 4] > cfg.alpha_thresh)
                cov = float((inside & (s[:, 4] > cfg.coverage_alpha)).sum()) / n_all
                r_c = s[:, :3] - col
                r_d = s[:, 3] - q[:, 2]
                e_c = _huber(r_c, cfg.huber_rgb).mean(-1)
                e_d = _huber(r_d, cfg.huber_depth)
                fit = (e_c < cfg.cap_rgb) & (e_d < cfg.cap_depth)
                mask = cover & fit
                n = int(mask.sum())
                if n < cfg.min_pixels:
                    return None
                e = e_c + cfg.w_depth * e_d
                if fill[0] is None:  # at the render's pose: the mean cost of a pixel the map explains
                    fill[0] = float(e[mask].mean())
                # outliers cost the cap; points the render does not cover cost what an explained pixel costs on
                # average, so the pose gains nothing by moving points out of the mapped area or into it (a flat
                # cap there pulls every pose back towards the keyframes: a 1 % shortfall of the motion)
                cap = cfg.cap_rgb + cfg.w_depth * cfg.cap_depth
                cost = torch.where(mask, e, torch.where(cover, torch.full_like(e, cap), torch.full_like(e, fill[0])))
                loss = float(cost.sum()) / n_all

                def grad():  # gradient and Gauss-Newton matrix, only for the steps that are taken
                    return _warp_normal_equations(A, mask, q, s, r_c, r_d, R, fx, fy, n_all, cfg)

                return loss, cov, grad

            ev0 = evaluate(T_cur)
            if ev0 is None:
                break
            T_cur, loss, coverage, it, inner_conv = _levenberg_marquardt(evaluate, T_cur, ev0, it, max_it, tol_t, tol_r,
                                                                         rel_tol, need_flat, cfg)
            if not _moved(T_cur, T_ref, cfg, ts) or level_renders >= cfg.max_renders or it >= max_it:
                level_conv = inner_conv
                break
        iters_all.append(it)
        total += it
        converged = converged and level_conv
        last_loss = loss
    return TrackResult(viewmat=rigid(T_cur), loss=last_loss, iters=total, iters_per_level=iters_all,
                       converged=converged, coverage=coverage, renders=renders)


def _moved(T: Tensor, T_ref: Tensor, cfg: TrackerConfig, scale: float) -> bool:
    """Whether ``T`` is more than ``scale`` times the re-render distance (``rerender_trans`` metres
    or ``rerender_rot`` degrees) away from the pose ``T_ref`` of a render."""
    dist, ang = pose_error(T, T_ref)
    return dist > cfg.rerender_trans * scale or ang > cfg.rerender_rot * scale


def _pool_render(rgb: Tensor, depth: Tensor, alpha: Tensor, factor: int) -> Tuple[Tensor, Tensor, Tensor]:
    """A render at the working size pooled by an integer ``factor``: colour and alpha averaged,
    depth as the pooled accumulated depth over the pooled alpha (what a render at the coarse
    size gives, anti-aliased). Tile-based rasterizing costs about as much at a quarter of the
    size as at the full size (each pixel walks a tile list four times longer), so the tracker
    renders once and pools instead of rendering every level."""
    if factor == 1:
        return rgb, depth, alpha
    x = torch.cat([rgb, (depth * alpha)[..., None], alpha[..., None]], -1).permute(2, 0, 1)[None]
    x = F.avg_pool2d(x, factor)[0].permute(1, 2, 0)
    a = x[..., 4]
    d = torch.where(a > 1e-4, x[..., 3] / a.clamp_min(1e-4), torch.zeros_like(a))
    return x[..., :3].contiguous(), d.contiguous(), a.contiguous()


def track_render(model, image: Tensor, depth: Tensor, K: Tensor, T_init: Tensor, cfg: Optional[TrackerConfig] = None,
                 *, backend: str = "auto") -> TrackResult:
    """Optimise the world-to-camera pose of one frame (``image`` [H, W, 3] in [0, 1], ``depth``
    [H, W] metres, 0 invalid, ``K`` [3, 3]) against the map ``model`` from ``T_init`` [4, 4].

    Each iteration renders the map at the current pose, takes the exact gradient of the
    masked L1 loss on the twist (through the renderer) and steps ``-(H + lambda diag H)^-1 g``
    with H the Gauss-Newton matrix of the IRLS-weighted residuals (from the rendered images'
    warp Jacobian); a step that raises the loss is undone and lambda raised
    (Levenberg-Marquardt). A level ends when the step is below ``tol_trans`` / ``tol_rot`` or
    lambda saturates. Returns the best pose (:class:`TrackResult`)."""
    cfg = cfg or TrackerConfig()
    model = _frozen(model)
    T_cur = T_init.detach().float().clone()
    iters_all: List[int] = []
    total = 0
    last_loss = float("inf")
    converged = True
    coverage = 0.0
    for li, f in enumerate(cfg.levels):
        im_l, d_l = pyramid(image, depth, f)
        K_l = scale_K(K.float(), f)
        h, w = d_l.shape
        max_it = cfg.max_iters[min(li, len(cfg.max_iters) - 1)]
        ts = cfg.tol_scale[min(li, len(cfg.tol_scale) - 1)] if li < len(cfg.levels) - 1 else 1.0
        need_flat = 1 if li < len(cfg.levels) - 1 else 2

        def evaluate(T: Tensor):
            ev = _evaluate(model, T, K_l, w, h, im_l, d_l, cfg, backend, True)
            if ev is None:
                return None
            loss, g, H, cov = ev
            return loss, cov, (lambda: (g, H))

        ev = evaluate(T_cur)
        it = 1
        if ev is None:
            iters_all.append(it)
            total += it
            converged = False
            continue
        T_cur, loss, coverage, it, level_conv = _levenberg_marquardt(
            evaluate, T_cur, ev, it, max_it, cfg.tol_trans * ts, cfg.tol_rot * ts, cfg.rel_tol * ts, need_flat, cfg)
        iters_all.append(it)
        total += it
        converged = converged and level_conv
        last_loss = loss
    return TrackResult(viewmat=rigid(T_cur), loss=last_loss, iters=total, iters_per_level=iters_all, converged=converged,
                       coverage=coverage, renders=total)
