"""Pure-torch reference backend of the langfield renderer.

Every function here mirrors one native op of ``cuda/include/langfield_abi.h`` and computes
exactly what the shared math header ``cuda/include/lf_math.h`` computes, written with plain
torch ops so that autograd provides the backward pass. It is used by the tests (as the ground
truth for the CPU and CUDA libraries) and as the fallback ``torch`` backend when no compiler
is available.

Conventions (gsplat 1.5.3):

* OpenCV pinhole cameras (+z forward), ``viewmats`` world-to-camera ``[C,4,4]``,
  ``Ks`` ``[C,3,3]``; quaternions wxyz, normalised inside (``q / max(|q|, 1e-12)``, a zero
  quaternion gives the identity); scales activated; opacities in ``[0, 1]``.
* Pixel centres at ``+0.5``; outputs are HWC.
* Projection: EWA with gsplat's frustum clamp (x/z, y/z limited to 1.3x the half field of
  view, inside the Jacobian only), ``eps2d`` added to the 2D covariance diagonal,
  ``compensation = sqrt(max(0, det_orig / det_blur))``, opacity-aware radius
  ``ceil(min(3.33, sqrt(2 ln(op * 255))) * sqrt(cov2d_ii))`` (3.33 without opacities),
  clamped to 1e7. Culled (camera, Gaussian) pairs get ``radii == 0`` and zeros in every other
  output (and zero gradient).
* Intersections: key ``(c << (32 + tile_bits)) | (tile_id << 32) | bits(float32 depth)`` with
  ``tile_bits = (tile_w * tile_h).bit_length()``, stably sorted, so ties keep the generation
  order (camera, Gaussian, tile row-major). ``flatten_ids = c * N + g``.
* Blending: ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` with ``d = mean2d - pixel centre``,
  ``alpha = min(0.999, opacity * exp(-sigma))``; a Gaussian with ``sigma < 0`` or
  ``alpha < 1/255`` is skipped; blending stops *before* the Gaussian that would bring the
  transmittance to ``<= 1e-4``. ``render = sum_i alpha_i T_i c_i + T_final * background``,
  ``render_alpha = 1 - T_final``, ``last_ids`` = index into the sorted intersections of the
  last blended Gaussian, or -1.

All functions work in float32 and float64 (the tests use float64 for finite differences).
Radii, culling, the intersection lists and ``last_ids`` are not differentiable.

``absgrad``: ``rasterize(..., absgrad=True)`` attaches a fresh zero tensor ``means2d.absgrad``
``[C,N,2]`` to the ``means2d`` argument. Tensor hooks on the per-(pixel, Gaussian) offsets
``dx``/``dy`` (whose gradient is exactly that pixel's contribution to ``d loss / d means2d``)
add ``sum over pixels |contribution|`` into it during backward, i.e. after ``loss.backward()``
``means2d.absgrad`` holds what the native ``v_means2d_abs`` holds. Every call to
``rasterize`` replaces the tensor; backpropagating through the same graph twice accumulates.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["project", "sh", "isect", "rasterize", "rasterize_sparse"]

ALPHA_THRESHOLD = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
EXTEND_MAX = 3.33
RADIUS_MAX = 1e7

# rasterize: elements of one [tiles, pixels, gaussians] matrix per batch of tiles
_BATCH_ELEMS = 1 << 21
# rasterize: above this many (pixel, intersection) pairs in total, batches are
# recomputed in backward (activation checkpointing) to keep memory bounded
_CKPT_ELEMS = 1 << 23

from langfield.maths import SH_C0, SH_C1, SH_C2, SH_C3  # noqa: E402  (one copy of the constants)
from langfield.maths import quat_to_rotmat as _quat_to_rotmat  # noqa: E402


# ---------------------------------------------------------------- projection
def _clamp_inclusive(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """min(hi, max(lo, x)) whose gradient w.r.t. x is 1 on the closed interval [lo, hi]
    (torch.clamp with tensor bounds splits it at the boundaries) and 0 outside."""
    lo = lo.expand_as(x)
    hi = hi.expand_as(x)
    return torch.where(x > hi, hi, torch.where(x < lo, lo, x))


def project(
    means: Tensor,  # [N,3]
    quats: Tensor,  # [N,4]
    scales: Tensor,  # [N,3]
    opacities: Optional[Tensor],  # [N] or None
    viewmats: Tensor,  # [C,4,4]
    Ks: Tensor,  # [C,3,3]
    width: int,
    height: int,
    eps2d: float,
    near_plane: float,
    far_plane: float,
    radius_clip: float,
    calc_compensations: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """EWA projection, ``lf::project_one`` over every (camera, Gaussian) pair.

    Returns ``radii [C,N,2] int32, means2d [C,N,2], depths [C,N], conics [C,N,3],
    compensations [C,N] or None``.
    """
    N = means.shape[0]
    C = viewmats.shape[0]
    dtype = means.dtype

    # world covariance Sigma = (R S)(R S)^T
    R = _quat_to_rotmat(quats)  # [N,3,3]
    M = R * scales[:, None, :]
    covar = M @ M.transpose(-1, -2)  # [N,3,3]

    # camera frame
    Rw = viewmats[:, :3, :3]  # [C,3,3]
    tw = viewmats[:, :3, 3]  # [C,3]
    p = torch.einsum("cij,nj->cni", Rw, means) + tw[:, None, :]  # [C,N,3]
    cov_c = Rw[:, None] @ covar[None] @ Rw[:, None].transpose(-1, -2)  # [C,N,3,3]

    px, py, pz = p.unbind(-1)
    depth_ok = (pz >= near_plane) & (pz <= far_plane)
    z = torch.where(depth_ok, pz, torch.ones_like(pz))  # NaN/inf-safe for culled pairs

    fx = Ks[:, 0, 0][:, None]
    fy = Ks[:, 1, 1][:, None]
    cx = Ks[:, 0, 2][:, None]
    cy = Ks[:, 1, 2][:, None]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    rz = 1.0 / z
    rz2 = rz * rz
    tx = z * _clamp_inclusive(px * rz, -lim_x_neg, lim_x_pos)
    ty = z * _clamp_inclusive(py * rz, -lim_y_neg, lim_y_pos)
    zero = torch.zeros_like(z)
    J = torch.stack(
        [fx * rz, zero, -fx * tx * rz2, zero, fy * rz, -fy * ty * rz2], dim=-1
    ).reshape(C, N, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2)  # [C,N,2,2]
    mean2d = torch.stack([fx * px * rz + cx, fy * py * rz + cy], dim=-1)  # [C,N,2]

    a0, a1, a2, a3 = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 0], cov2d[..., 1, 1]
    det_orig = a0 * a3 - a1 * a2
    b0 = a0 + eps2d
    b3 = a3 + eps2d
    det = b0 * b3 - a1 * a2
    det_ok = det > 0
    det_s = torch.where(det_ok, det, torch.ones_like(det))
    ratio = torch.clamp(det_orig / det_s, min=0.0)
    pos = ratio > 0
    comp = torch.where(pos, torch.sqrt(torch.where(pos, ratio, torch.ones_like(ratio))), zero)
    inv_det = 1.0 / det_s
    conic = torch.stack([b3 * inv_det, -a1 * inv_det, b0 * inv_det], dim=-1)

    with torch.no_grad():
        valid = depth_ok & det_ok
        extend = torch.full_like(z, EXTEND_MAX)
        if opacities is not None:
            op = opacities.detach().to(dtype)[None, :].expand(C, N)
            if calc_compensations:
                op = op * comp
            op_ok = op >= ALPHA_THRESHOLD
            valid &= op_ok
            op_s = torch.where(op_ok, op, torch.ones_like(op))
            ext = torch.sqrt(2.0 * torch.log(op_s / ALPHA_THRESHOLD))
            extend = torch.where(op_ok, torch.minimum(extend, ext), extend)
        b0s = torch.where(valid, b0, torch.ones_like(b0)).clamp(min=0)
        b3s = torch.where(valid, b3, torch.ones_like(b3)).clamp(min=0)
        radius_x = torch.ceil(extend * torch.sqrt(b0s))
        radius_y = torch.ceil(extend * torch.sqrt(b3s))
        valid &= ~((radius_x <= radius_clip) & (radius_y <= radius_clip))
        mx, my = mean2d.detach().unbind(-1)
        valid &= (mx + radius_x > 0) & (mx - radius_x < width) & (my + radius_y > 0) & (
            my - radius_y < height
        )
        radii = torch.stack(
            [torch.clamp(radius_x, max=RADIUS_MAX), torch.clamp(radius_y, max=RADIUS_MAX)], dim=-1
        )
        radii = torch.where(valid[..., None], radii, torch.zeros_like(radii)).to(torch.int32)

    v2 = valid[..., None]
    means2d_out = torch.where(v2, mean2d, torch.zeros_like(mean2d))
    depths_out = torch.where(valid, pz, zero)
    conics_out = torch.where(v2, conic, torch.zeros_like(conic))
    comp_out = torch.where(valid, comp, zero) if calc_compensations else None
    return radii, means2d_out, depths_out, conics_out, comp_out


# ------------------------------------------------------- spherical harmonics
def _sh_basis(degree: int, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """[...] unit components -> [..., (degree+1)^2], order and constants of lf::sh_basis."""
    from langfield.maths import eval_sh_bases

    return eval_sh_bases(degree, torch.stack([x, y, z], -1))


def sh(degree: int, dirs: Tensor, coeffs: Tensor, masks: Optional[Tensor] = None) -> Tensor:
    """Real spherical harmonics, ``lf::sh_eval``: ``colors[...,3] = sum_k Y_k(dir/|dir|) coeffs[...,k,:]``.

    dirs ``[...,3]``, coeffs ``[...,K,3]`` with ``K >= (degree+1)^2`` (extra ones ignored),
    masks ``[...]`` bool or None. No +0.5 offset, no clamp; masked-out elements give 0.
    Directions shorter than 1e-12 get no gradient (as in ``lf::sh_eval_vjp``).
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in 0..3, got {degree}")
    nb = (degree + 1) ** 2
    if coeffs.shape[-2] < nb:
        raise ValueError(f"SH degree {degree} needs {nb} coefficients, got {coeffs.shape[-2]}")
    n = torch.linalg.vector_norm(dirs, dim=-1, keepdim=True)
    u = dirs / torch.clamp(n, min=1e-12)
    u = torch.where(n > 1e-12, u, u.detach())
    basis = _sh_basis(degree, *u.unbind(-1))  # [..., nb]
    colors = (basis[..., :, None] * coeffs[..., :nb, :]).sum(dim=-2)
    if masks is not None:
        colors = torch.where(masks.bool()[..., None], colors, torch.zeros_like(colors))
    return colors


# ---------------------------------------------------------- tile intersection
def _tile_bounds(radii: Tensor, means2d: Tensor, tile_size: int, tile_w: int, tile_h: int):
    """lf::tile_bounds in float32: (x0, x1, y0, y1) int64 tensors, [x0,x1) x [y0,y1)."""
    m = means2d.detach().to(torch.float32)
    r = radii.to(torch.float32)
    t = m / tile_size
    tr = r / tile_size
    lo = torch.floor(t - tr)
    hi = torch.ceil(t + tr)
    x0 = lo[..., 0].clamp(0, tile_w).to(torch.int64)
    x1 = hi[..., 0].clamp(0, tile_w).to(torch.int64)
    y0 = lo[..., 1].clamp(0, tile_h).to(torch.int64)
    y1 = hi[..., 1].clamp(0, tile_h).to(torch.int64)
    return x0, x1, y0, y1


@torch.no_grad()
def isect(
    radii: Tensor,  # [C,N,2] int
    means2d: Tensor,  # [C,N,2]
    depths: Tensor,  # [C,N]
    width: int,
    height: int,
    tile_size: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Tile intersections sorted by (camera, tile, depth).

    Returns ``tile_offsets [C,tile_h,tile_w] int32, flatten_ids [n_isects] int32,
    isect_ids [n_isects] int64``.
    """
    C, N = radii.shape[:2]
    device = means2d.device
    tile_w = (width + tile_size - 1) // tile_size
    tile_h = (height + tile_size - 1) // tile_size
    n_tiles = tile_w * tile_h
    tile_bits = n_tiles.bit_length()
    cam_bits = C.bit_length()
    if cam_bits + tile_bits + 32 > 63:
        raise ValueError("too many cameras/tiles to encode intersection keys in int64")

    x0, x1, y0, y1 = _tile_bounds(radii, means2d, tile_size, tile_w, tile_h)
    visible = (radii[..., 0] > 0) & (radii[..., 1] > 0)
    wx = (x1 - x0).clamp(min=0)
    counts = (wx * (y1 - y0).clamp(min=0)) * visible  # [C,N]
    counts = counts.reshape(-1)
    n_isects = int(counts.sum().item()) if counts.numel() else 0

    pair = torch.repeat_interleave(torch.arange(C * N, device=device), counts)  # [n_isects]
    starts = torch.cumsum(counts, 0) - counts
    k = torch.arange(n_isects, device=device) - starts[pair]
    wxf = wx.reshape(-1)[pair]
    tx = x0.reshape(-1)[pair] + k % wxf.clamp(min=1)
    ty = y0.reshape(-1)[pair] + torch.div(k, wxf.clamp(min=1), rounding_mode="floor")
    tile_id = ty * tile_w + tx
    cam = torch.div(pair, max(N, 1), rounding_mode="floor")
    dbits = depths.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1)
    dbits = dbits.to(torch.int64)[pair] & 0xFFFFFFFF
    keys = (cam << (32 + tile_bits)) | (tile_id << 32) | dbits
    isect_ids, order = torch.sort(keys, stable=True)
    flatten_ids = pair[order].to(torch.int32)

    # offsets: first sorted intersection of every (camera, tile)
    flat_tile = (isect_ids >> (32 + tile_bits)) * n_tiles + ((isect_ids >> 32) & ((1 << tile_bits) - 1))
    all_tiles = torch.arange(C * n_tiles, device=device, dtype=torch.int64)
    offsets = torch.searchsorted(flat_tile, all_tiles, right=False)
    tile_offsets = offsets.to(torch.int32).reshape(C, tile_h, tile_w)
    return tile_offsets, flatten_ids, isect_ids


# ------------------------------------------------------------ rasterization
def _raster_batch(
    means2d_f: Tensor,  # [C*N,2]
    conics_f: Tensor,  # [C*N,3]
    colors_f: Tensor,  # [C*N,D]
    opac_f: Tensor,  # [C*N]
    ids: Tensor,  # [B,G] flatten ids (padded with 0)
    pad: Tensor,  # [B,G] bool, True for real entries
    pix_x: Tensor,  # [B,P] pixel centres
    pix_y: Tensor,  # [B,P]
    absgrad_buf: Optional[Tensor],  # [C*N,2] or None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Blends one batch of tiles; returns (color [B,P,D], T [B,P], last position [B,P] or -1)."""
    m = means2d_f[ids]  # [B,G,2]
    con = conics_f[ids]  # [B,G,3]
    op = opac_f[ids]  # [B,G]
    col = colors_f[ids]  # [B,G,D]
    dx = m[:, None, :, 0] - pix_x[:, :, None]  # [B,P,G]
    dy = m[:, None, :, 1] - pix_y[:, :, None]
    if absgrad_buf is not None and dx.requires_grad:
        flat_ids = ids.reshape(-1)

        def _hook(axis):
            def hook(g):
                contrib = (g.abs().sum(dim=1) * pad).reshape(-1)
                absgrad_buf[:, axis].index_add_(0, flat_ids, contrib.to(absgrad_buf.dtype))

            return hook

        dx.register_hook(_hook(0))
        dy.register_hook(_hook(1))
    a = con[:, None, :, 0]
    b = con[:, None, :, 1]
    c = con[:, None, :, 2]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    ok = (sigma >= 0) & pad[:, None, :]
    sigma = torch.where(ok, sigma, torch.zeros_like(sigma))
    raw = op[:, None, :] * torch.exp(-sigma)
    # min(0.999, raw); the gradient passes at raw == 0.999 exactly, as in lf::alpha_vjp
    alpha = torch.where(raw > ALPHA_MAX, torch.full_like(raw, ALPHA_MAX), raw)
    with torch.no_grad():
        valid = ok & (alpha >= ALPHA_THRESHOLD)
        t_incl = torch.cumprod(1.0 - torch.where(valid, alpha, torch.zeros_like(alpha)), dim=-1)
        incl = valid & (t_incl > T_MIN)
        G = ids.shape[1]
        pos = torch.arange(G, device=ids.device).expand_as(incl)
        last = torch.where(incl, pos, torch.full_like(pos, -1)).amax(dim=-1)  # [B,P]
    a_i = torch.where(incl, alpha, torch.zeros_like(alpha))
    cp = torch.cumprod(1.0 - a_i, dim=-1)  # [B,P,G]
    T_excl = torch.cat([torch.ones_like(cp[..., :1]), cp[..., :-1]], dim=-1)
    w = a_i * T_excl
    color = torch.bmm(w, col)  # [B,P,D]
    return color, cp[..., -1], last


def rasterize(
    means2d: Tensor,  # [C,N,2]
    conics: Tensor,  # [C,N,3]
    colors: Tensor,  # [C,N,D]
    opacities: Tensor,  # [C,N]
    backgrounds: Optional[Tensor],  # [C,D] or None
    width: int,
    height: int,
    tile_size: int,
    tile_offsets: Tensor,  # [C,tile_h,tile_w] int32
    flatten_ids: Tensor,  # [n_isects] int32
    absgrad: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Front-to-back alpha blending of the tiles' sorted Gaussians.

    Returns ``render_colors [C,H,W,D], render_alphas [C,H,W,1], last_ids [C,H,W] int32``.
    Tiles are processed in batches (padded to the longest list of the batch); inside a batch
    everything is ``[tiles, pixels, gaussians]`` tensor algebra.
    """
    C, N = means2d.shape[:2]
    D = colors.shape[-1]
    device = means2d.device
    dtype = means2d.dtype
    tile_w = (width + tile_size - 1) // tile_size
    tile_h = (height + tile_size - 1) // tile_size
    n_tiles = C * tile_h * tile_w
    assert tile_offsets.shape == (C, tile_h, tile_w), (tile_offsets.shape, (C, tile_h, tile_w))
    P = tile_size * tile_size
    n_isects = flatten_ids.numel()

    means2d_f = means2d.reshape(C * N, 2)
    conics_f = conics.reshape(C * N, 3)
    colors_f = colors.reshape(C * N, D)
    opac_f = opacities.reshape(C * N)
    flat_ids_l = flatten_ids.to(torch.int64)

    absgrad_buf = None
    if absgrad:
        absgrad_buf = torch.zeros(C, N, 2, dtype=dtype, device=device)
        means2d.absgrad = absgrad_buf
        absgrad_buf = absgrad_buf.view(C * N, 2)

    offs = tile_offsets.reshape(-1).to(torch.int64)
    ends = torch.cat([offs[1:], torch.tensor([n_isects], device=device, dtype=torch.int64)])
    cnt = (ends - offs).clamp(min=0)
    nonempty = torch.nonzero(cnt > 0).reshape(-1)
    # longest lists first, so that a batch's padding stays small
    order = torch.argsort(cnt[nonempty], descending=True, stable=True)
    tiles = nonempty[order]
    tcnt = cnt[tiles].tolist()

    local = torch.arange(P, device=device)
    lx = (local % tile_size).to(dtype)
    ly = torch.div(local, tile_size, rounding_mode="floor").to(dtype)

    grad_on = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (means2d, conics, colors, opacities)
    )
    use_ckpt = grad_on and sum(tcnt) * P > _CKPT_ELEMS

    out_tiles, out_color, out_T, out_last = [], [], [], []
    i = 0
    while i < len(tiles):
        gmax = tcnt[i]
        B = max(1, min(len(tiles) - i, _BATCH_ELEMS // max(1, P * gmax)))
        bt = tiles[i : i + B]
        bcnt = cnt[bt]
        j = torch.arange(gmax, device=device)
        pad = j[None, :] < bcnt[:, None]  # [B,G]
        idx = torch.where(pad, offs[bt][:, None] + j[None, :], torch.zeros_like(pad, dtype=torch.int64))
        ids = torch.where(pad, flat_ids_l[idx], torch.zeros_like(idx))
        txy = bt % (tile_h * tile_w)
        tyi = torch.div(txy, tile_w, rounding_mode="floor")
        txi = txy % tile_w
        pix_x = (txi * tile_size).to(dtype)[:, None] + lx[None, :] + 0.5
        pix_y = (tyi * tile_size).to(dtype)[:, None] + ly[None, :] + 0.5
        args = (means2d_f, conics_f, colors_f, opac_f, ids, pad, pix_x, pix_y)
        if use_ckpt:
            # absgrad_buf goes through a closure: the hooks write into it in place,
            # which a saved checkpoint input must not see
            fn = functools.partial(_raster_batch, absgrad_buf=absgrad_buf)
            color, T, last = checkpoint(fn, *args, use_reentrant=False)
        else:
            color, T, last = _raster_batch(*args, absgrad_buf=absgrad_buf)
        last = torch.where(last >= 0, last + offs[bt][:, None], last)
        out_tiles.append(bt)
        out_color.append(color)
        out_T.append(T)
        out_last.append(last)
        i += B

    color_full = torch.zeros(n_tiles, P, D, dtype=dtype, device=device)
    T_full = torch.ones(n_tiles, P, dtype=dtype, device=device)
    last_full = torch.full((n_tiles, P), -1, dtype=torch.int64, device=device)
    if out_tiles:
        t_all = torch.cat(out_tiles)
        color_full = color_full.index_put((t_all,), torch.cat(out_color).to(dtype))
        T_full = T_full.index_put((t_all,), torch.cat(out_T).to(dtype))
        last_full = last_full.index_put((t_all,), torch.cat(out_last))

    def to_image(x: Tensor) -> Tensor:
        rest = x.shape[2:]
        x = x.reshape((C, tile_h, tile_w, tile_size, tile_size) + rest)
        x = x.transpose(2, 3).reshape((C, tile_h * tile_size, tile_w * tile_size) + rest)
        return x[:, :height, :width]

    render_colors = to_image(color_full)
    T_img = to_image(T_full)
    if backgrounds is not None:
        render_colors = render_colors + T_img[..., None] * backgrounds[:, None, None, :]
    render_alphas = (1.0 - T_img)[..., None]
    last_ids = to_image(last_full).to(torch.int32)
    return render_colors, render_alphas, last_ids


# ------------------------------------------------------- sparse channels
def rasterize_sparse(
    means2d: Tensor,  # [C,N,2]
    conics: Tensor,  # [C,N,3]
    sp_idx: Tensor,  # [C,N,K] int: channel of each pair, -1 = unused
    sp_w: Tensor,  # [C,N,K] weights
    opacities: Tensor,  # [C,N]
    width: int,
    height: int,
    tile_size: int,
    tile_offsets: Tensor,
    flatten_ids: Tensor,
    n_channels: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sparse channels: every Gaussian carries K (channel, weight) pairs of ``n_channels``
    output channels; a pixel's channel d is ``sum_i alpha_i T_i sum_{j: idx_ij = d} w_ij``.
    Defined as the dense blend of the scattered weights (:func:`rasterize` with
    ``colors[c, g, idx] += w``; the native sparse op must equal it). Background 0.
    Returns ``render [C,H,W,n_channels], render_alphas [C,H,W,1], last_ids [C,H,W]``."""
    C, N, K = sp_w.shape
    idx = sp_idx.to(torch.int64)
    ok = idx >= 0
    dense = torch.zeros(C, N, int(n_channels), dtype=sp_w.dtype, device=sp_w.device)
    dense = dense.scatter_add(-1, idx.clamp_min(0), torch.where(ok, sp_w, torch.zeros_like(sp_w)))
    return rasterize(means2d, conics, dense, opacities, None, width, height, tile_size, tile_offsets, flatten_ids)
