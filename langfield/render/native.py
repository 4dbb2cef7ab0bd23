"""The native backends (CPU and CUDA) as torch autograd ops.

Each op has the same signature as its pure-torch twin in
:mod:`langfield.render.reference`; :mod:`langfield.render.api` picks one set.
Tensors are passed to the C ABI (cuda/include/langfield_abi.h) as raw
pointers: host memory for the CPU library, device memory plus torch's current
stream for the CUDA library.
"""

from __future__ import annotations

import ctypes
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from langfield.render._build import load_library

__all__ = ["project", "sh", "isect", "rasterize", "rasterize_sparse", "rasterize_sparse_relevancy", "box_filter",
           "NativeError"]


class NativeError(RuntimeError):
    """An error reported by the native library."""


def _lib(t: Tensor):
    return load_library("cuda" if t.is_cuda else "cpu")


def _stream(t: Tensor):
    if t.is_cuda:
        return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)
    return None


def _p(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr()) if t.numel() > 0 else None


def _check(lib, rc: int, what: str) -> None:
    if rc != 0:
        msg = lib.lf_last_error().decode(errors="replace")
        raise NativeError(f"{what}: {msg}")


def _c(t: Optional[Tensor], dtype=torch.float32) -> Optional[Tensor]:
    if t is None:
        return None
    return t.detach().to(dtype).contiguous()


# ------------------------------------------------------------------ project
class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane,
                far_plane, radius_clip, calc_compensations):
        C, N = viewmats.shape[0], means.shape[0]
        dev = means.device
        means_, quats_, scales_, viewmats_, Ks_ = (_c(x) for x in (means, quats, scales, viewmats, Ks))
        opac_ = _c(opacities)
        # every entry is written by the library (zeros for culled pairs)
        radii = torch.empty((C, N, 2), dtype=torch.int32, device=dev)
        means2d = torch.empty((C, N, 2), dtype=torch.float32, device=dev)
        depths = torch.empty((C, N), dtype=torch.float32, device=dev)
        conics = torch.empty((C, N, 3), dtype=torch.float32, device=dev)
        comps = torch.empty((C, N), dtype=torch.float32, device=dev) if calc_compensations else None
        lib = _lib(means)
        _check(lib, lib.lf_project_fwd(C, N, _p(means_), _p(quats_), _p(scales_), _p(opac_), _p(viewmats_),
                                       _p(Ks_), width, height, eps2d, near_plane, far_plane, radius_clip,
                                       _p(radii), _p(means2d), _p(depths), _p(conics), _p(comps), _stream(means)),
               "project forward")
        ctx.meta = (width, height, eps2d)
        ctx.save_for_backward(means_, quats_, scales_, viewmats_, Ks_, radii, conics,
                              comps if comps is not None else torch.empty(0, device=dev))
        ctx.has_comp = comps is not None
        ctx.mark_non_differentiable(radii)
        return radii, means2d, depths, conics, comps if comps is not None else torch.empty(0, device=dev)

    @staticmethod
    def backward(ctx, v_radii, v_means2d, v_depths, v_conics, v_comps):
        means, quats, scales, viewmats, Ks, radii, conics, comps = ctx.saved_tensors
        width, height, eps2d = ctx.meta
        C, N = viewmats.shape[0], means.shape[0]
        dev = means.device

        def g(v, shape):
            return torch.zeros(shape, dtype=torch.float32, device=dev) if v is None else _c(v)

        v_means2d = g(v_means2d, (C, N, 2))
        v_depths = g(v_depths, (C, N))
        v_conics = g(v_conics, (C, N, 3))
        v_comps = _c(v_comps) if (ctx.has_comp and v_comps is not None) else None
        v_means = torch.zeros_like(means)
        v_quats = torch.zeros_like(quats)
        v_scales = torch.zeros_like(scales)
        v_viewmats = torch.zeros_like(viewmats) if ctx.needs_input_grad[4] else None
        lib = _lib(means)
        _check(lib, lib.lf_project_bwd(C, N, _p(means), _p(quats), _p(scales), _p(viewmats), _p(Ks), width,
                                       height, eps2d, _p(radii), _p(conics), _p(comps) if ctx.has_comp else None,
                                       _p(v_means2d), _p(v_depths), _p(v_conics), _p(v_comps), _p(v_means),
                                       _p(v_quats), _p(v_scales), _p(v_viewmats), _stream(means)),
               "project backward")
        return (v_means, v_quats, v_scales, None, v_viewmats, None, None, None, None, None, None, None, None)


def project(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
            radius_clip, calc_compensations):
    radii, means2d, depths, conics, comps = _Project.apply(
        means, quats, scales, opacities, viewmats, Ks, int(width), int(height), float(eps2d),
        float(near_plane), float(far_plane), float(radius_clip), bool(calc_compensations))
    return radii, means2d, depths, conics, (comps if calc_compensations else None)


# -------------------------------------------------------------------- SH
class _SH(torch.autograd.Function):
    @staticmethod
    def forward(ctx, degree, dirs, coeffs, masks):
        M, K = dirs.shape[0], coeffs.shape[1]
        dirs_, coeffs_ = _c(dirs), _c(coeffs)
        masks_ = masks.to(torch.uint8).contiguous() if masks is not None else None
        colors = torch.zeros((M, 3), dtype=torch.float32, device=dirs.device)
        lib = _lib(dirs)
        _check(lib, lib.lf_sh_fwd(degree, M, K, _p(dirs_), _p(coeffs_), _p(masks_), _p(colors), _stream(dirs)),
               "sh forward")
        ctx.degree = degree
        ctx.save_for_backward(dirs_, coeffs_, masks_ if masks_ is not None else torch.empty(0))
        ctx.has_mask = masks_ is not None
        return colors

    @staticmethod
    def backward(ctx, v_colors):
        dirs, coeffs, masks = ctx.saved_tensors
        M, K = dirs.shape[0], coeffs.shape[1]
        v_coeffs = torch.zeros_like(coeffs)
        v_dirs = torch.zeros_like(dirs) if ctx.needs_input_grad[1] else None
        lib = _lib(dirs)
        _check(lib, lib.lf_sh_bwd(ctx.degree, M, K, _p(dirs), _p(coeffs), _p(masks) if ctx.has_mask else None,
                                  _p(_c(v_colors)), _p(v_coeffs), _p(v_dirs), _stream(dirs)), "sh backward")
        return None, v_dirs, v_coeffs, None


def sh(degree: int, dirs: Tensor, coeffs: Tensor, masks: Optional[Tensor] = None) -> Tensor:
    """SH colours (no +0.5 offset, no clamp) for dirs [...,3], coeffs [...,K,3]."""
    batch = dirs.shape[:-1]
    K = coeffs.shape[-2]
    out = _SH.apply(int(degree), dirs.reshape(-1, 3), coeffs.reshape(-1, K, 3),
                    None if masks is None else masks.reshape(-1))
    return out.reshape(*batch, 3)


# ------------------------------------------------------------------ isect
@torch.no_grad()
def isect(radii: Tensor, means2d: Tensor, depths: Tensor, width: int, height: int,
          tile_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    C, N = radii.shape[:2]
    dev = radii.device
    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    radii_, means2d_, depths_ = radii.to(torch.int32).contiguous(), _c(means2d), _c(depths)
    cum = torch.empty(C * N, dtype=torch.int64, device=dev)
    n = ctypes.c_int64(0)
    lib = _lib(radii)
    _check(lib, lib.lf_isect_count(C, N, _p(radii_), _p(means2d_), tile_size, tw, th, _p(cum),
                                   ctypes.byref(n), _stream(radii)), "isect count")
    n_isects = int(n.value)
    isect_ids = torch.empty(n_isects, dtype=torch.int64, device=dev)
    flatten_ids = torch.empty(n_isects, dtype=torch.int32, device=dev)
    tile_offsets = torch.empty((C, th, tw), dtype=torch.int32, device=dev)
    _check(lib, lib.lf_isect_fill(C, N, _p(radii_), _p(means2d_), _p(depths_), tile_size, tw, th, _p(cum),
                                  n_isects, _p(isect_ids), _p(flatten_ids), _p(tile_offsets), _stream(radii)),
           "isect fill")
    return tile_offsets, flatten_ids, isect_ids


# -------------------------------------------------------------- rasterize
class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, width, height, tile_size, tile_offsets,
                flatten_ids, absgrad):
        C, N, D = colors.shape
        dev = colors.device
        th, tw = tile_offsets.shape[1], tile_offsets.shape[2]
        ins = [_c(means2d), _c(conics), _c(colors), _c(opacities), _c(backgrounds)]
        tile_offsets = tile_offsets.contiguous()
        flatten_ids = flatten_ids.contiguous()
        n_isects = flatten_ids.numel()
        render = torch.empty((C, height, width, D), dtype=torch.float32, device=dev)
        alphas = torch.empty((C, height, width), dtype=torch.float32, device=dev)
        last_ids = torch.empty((C, height, width), dtype=torch.int32, device=dev)
        lib = _lib(colors)
        _check(lib, lib.lf_rasterize_fwd(C, N, D, width, height, tile_size, tw, th, *[_p(x) for x in ins],
                                         _p(tile_offsets), _p(flatten_ids), n_isects, _p(render), _p(alphas),
                                         _p(last_ids), _stream(colors)), "rasterize forward")
        ctx.meta = (width, height, tile_size, absgrad, backgrounds is not None)
        ctx.save_for_backward(*[x if x is not None else torch.empty(0, device=dev) for x in ins],
                              tile_offsets, flatten_ids, alphas, last_ids)
        ctx.means2d_input = means2d if absgrad else None
        ctx.mark_non_differentiable(last_ids)
        return render, alphas.unsqueeze(-1), last_ids

    @staticmethod
    def backward(ctx, v_render, v_alphas, v_last):
        means2d, conics, colors, opacities, backgrounds, tile_offsets, flatten_ids, alphas, last_ids = \
            ctx.saved_tensors
        width, height, tile_size, absgrad, has_bg = ctx.meta
        C, N, D = colors.shape
        th, tw = tile_offsets.shape[1], tile_offsets.shape[2]
        dev = colors.device
        v_render = torch.zeros((C, height, width, D), device=dev) if v_render is None else _c(v_render)
        v_alphas = torch.zeros((C, height, width), device=dev) if v_alphas is None else _c(v_alphas[..., 0])
        # the CPU library can skip the geometry gradients (frozen geometry: most of the work)
        geo = colors.is_cuda or absgrad or any(ctx.needs_input_grad[i] for i in (0, 1, 3))
        v_means2d = torch.zeros_like(means2d) if geo else None
        v_abs = torch.zeros_like(means2d) if absgrad else None
        v_conics = torch.zeros_like(conics) if geo else None
        v_colors = torch.zeros_like(colors)
        v_opac = torch.zeros_like(opacities) if geo else None
        v_bg = torch.zeros_like(backgrounds) if (has_bg and ctx.needs_input_grad[4]) else None
        lib = _lib(colors)
        _check(lib, lib.lf_rasterize_bwd(C, N, D, width, height, tile_size, tw, th, _p(means2d), _p(conics),
                                         _p(colors), _p(opacities), _p(backgrounds) if has_bg else None,
                                         _p(tile_offsets), _p(flatten_ids), flatten_ids.numel(), _p(alphas),
                                         _p(last_ids), _p(v_render), _p(v_alphas), _p(v_means2d), _p(v_abs),
                                         _p(v_conics), _p(v_colors), _p(v_opac), _p(v_bg), _stream(colors)),
               "rasterize backward")
        if absgrad and ctx.means2d_input is not None:
            m = ctx.means2d_input
            m.absgrad = v_abs if getattr(m, "absgrad", None) is None else m.absgrad + v_abs
        return v_means2d, v_conics, v_colors, v_opac, v_bg, None, None, None, None, None, None


def rasterize(means2d, conics, colors, opacities, backgrounds, width, height, tile_size, tile_offsets,
              flatten_ids, absgrad=False):
    return _Rasterize.apply(means2d, conics, colors, opacities, backgrounds, int(width), int(height),
                            int(tile_size), tile_offsets, flatten_ids, bool(absgrad))


# ------------------------------------------------------- sparse channels
_SPARSE_SIGNATURES = {
    "lf_rasterize_sparse_fwd": [ctypes.c_int] * 9 + [ctypes.c_void_p] * 7 + [ctypes.c_int64] + [ctypes.c_void_p] * 4,
    "lf_rasterize_sparse_bwd": [ctypes.c_int] * 9 + [ctypes.c_void_p] * 6 + [ctypes.c_int64] + [ctypes.c_void_p] * 4,
    "lf_rasterize_sparse_relevancy_fwd": [ctypes.c_int] * 13 + [ctypes.c_void_p] * 9 + [ctypes.c_int64]
    + [ctypes.c_void_p] * 2 + [ctypes.c_float] * 2 + [ctypes.c_void_p] * 5,
}


def _sparse_lib(t: Tensor):
    """The library with the sparse entry points' ctypes signatures set (once per library)."""
    lib = _lib(t)
    if not getattr(lib, "_lf_sparse_ready", False):
        for name, args in _SPARSE_SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int
        lib._lf_sparse_ready = True
    return lib


class _RasterizeSparse(torch.autograd.Function):
    """lf_rasterize_sparse_fwd / _bwd: K (channel, weight) pairs per Gaussian blended into
    ``n_channels`` outputs; the backward gives the weights' gradient (geometry is constant)."""

    @staticmethod
    def forward(ctx, means2d, conics, sp_idx, sp_w, opacities, width, height, tile_size, tile_offsets,
                flatten_ids, n_channels):
        C, N, K = sp_w.shape
        dev = sp_w.device
        th, tw = tile_offsets.shape[1], tile_offsets.shape[2]
        ins = [_c(means2d), _c(conics), _c(opacities)]
        idx_ = sp_idx.detach().to(torch.int32).contiguous()
        w_ = _c(sp_w)
        tile_offsets = tile_offsets.contiguous()
        flatten_ids = flatten_ids.contiguous()
        render = torch.empty((C, height, width, n_channels), dtype=torch.float32, device=dev)
        alphas = torch.empty((C, height, width), dtype=torch.float32, device=dev)
        last_ids = torch.empty((C, height, width), dtype=torch.int32, device=dev)
        lib = _sparse_lib(sp_w)
        _check(lib, lib.lf_rasterize_sparse_fwd(C, N, K, n_channels, width, height, tile_size, tw, th, _p(ins[0]),
                                                _p(ins[1]), _p(idx_), _p(w_), _p(ins[2]), _p(tile_offsets),
                                                _p(flatten_ids), flatten_ids.numel(), _p(render), _p(alphas),
                                                _p(last_ids), _stream(sp_w)), "rasterize_sparse forward")
        ctx.meta = (width, height, tile_size, n_channels)
        ctx.save_for_backward(*ins, idx_, w_, tile_offsets, flatten_ids, last_ids)
        ctx.mark_non_differentiable(alphas, last_ids)
        return render, alphas.unsqueeze(-1), last_ids

    @staticmethod
    def backward(ctx, v_render, v_alphas, v_last):
        means2d, conics, opacities, idx, w, tile_offsets, flatten_ids, last_ids = ctx.saved_tensors
        width, height, tile_size, n_channels = ctx.meta
        C, N, K = w.shape
        th, tw = tile_offsets.shape[1], tile_offsets.shape[2]
        v_w = torch.zeros_like(w)
        if v_render is not None:
            lib = _sparse_lib(w)
            _check(lib, lib.lf_rasterize_sparse_bwd(C, N, K, n_channels, width, height, tile_size, tw, th,
                                                    _p(means2d), _p(conics), _p(idx), _p(opacities),
                                                    _p(tile_offsets), _p(flatten_ids), flatten_ids.numel(),
                                                    _p(last_ids), _p(_c(v_render)), _p(v_w), _stream(w)),
                   "rasterize_sparse backward")
        return None, None, None, v_w, None, None, None, None, None, None, None


def rasterize_sparse(means2d, conics, sp_idx, sp_w, opacities, width, height, tile_size, tile_offsets, flatten_ids,
                     n_channels):
    """Native twin of :func:`langfield.render.reference.rasterize_sparse` (gradients: ``sp_w`` only)."""
    return _RasterizeSparse.apply(means2d, conics, sp_idx, sp_w, opacities, int(width), int(height),
                                  int(tile_size), tile_offsets, flatten_ids, int(n_channels))


@torch.no_grad()
def rasterize_sparse_relevancy(means2d, conics, sp_idx, sp_w, opacities, width, height, tile_size, tile_offsets,
                               flatten_ids, n_levels, A, G, n_queries, temperature, min_alpha, colors=None,
                               backgrounds=None, want_last_ids=False):
    """lf_rasterize_sparse_relevancy_fwd (no gradients): ``sp_idx``/``sp_w`` ``[C, N, K]`` with
    channels in ``[0, n_levels * L)``, ``A [L, M]`` (queries first), ``G [L, L]``; optional dense
    ``colors [C, N, D]`` (+ ``backgrounds [C, D]``) blended in the same pass. Returns
    ``(relevancy [C, Q, n_levels, H, W], render [C, H, W, D] or None, alphas [C, H, W],
    last_ids [C, H, W] or None)``: the last-blended ids only with ``want_last_ids`` (tracking
    them costs a load and a store per 8 pixels and Gaussian)."""
    C, N, K = sp_w.shape
    L, M = A.shape
    dev = sp_w.device
    th, tw = tile_offsets.shape[1], tile_offsets.shape[2]
    m2, co, op = _c(means2d), _c(conics), _c(opacities)
    idx_ = sp_idx.detach().to(torch.int32).contiguous()
    w_ = _c(sp_w)
    A_, G_ = _c(A), _c(G)
    D = 0 if colors is None else int(colors.shape[-1])
    col_ = _c(colors) if D else None
    bg_ = _c(backgrounds) if (D and backgrounds is not None) else None
    tile_offsets = tile_offsets.contiguous()
    flatten_ids = flatten_ids.contiguous()
    rel = torch.empty((C, int(n_queries), int(n_levels), height, width), dtype=torch.float32, device=dev)
    render = torch.empty((C, height, width, D), dtype=torch.float32, device=dev) if D else None
    alphas = torch.empty((C, height, width), dtype=torch.float32, device=dev)
    last_ids = torch.empty((C, height, width), dtype=torch.int32, device=dev) if want_last_ids else None
    lib = _sparse_lib(sp_w)
    _check(lib, lib.lf_rasterize_sparse_relevancy_fwd(
        C, N, K, int(n_levels), L, M, int(n_queries), D, int(width), int(height), int(tile_size), tw, th, _p(m2),
        _p(co), _p(idx_), _p(w_), _p(op), _p(col_), _p(bg_), _p(tile_offsets), _p(flatten_ids), flatten_ids.numel(),
        _p(A_), _p(G_), float(temperature), float(min_alpha), _p(render), _p(rel), _p(alphas), _p(last_ids),
        _stream(sp_w)), "rasterize_sparse_relevancy forward")
    return rel, render, alphas, last_ids


@torch.no_grad()
def box_filter(x: Tensor, size: int) -> Tensor:
    """lf_box_filter: the mean over ``size`` x ``size`` windows of ``[..., H, W]`` (float32 out),
    as :func:`langfield.query.box_filter` defines it; window sums in double."""
    shape = x.shape
    H, W = int(shape[-2]), int(shape[-1])
    src = _c(x).reshape(-1, H, W)
    out = torch.empty_like(src)
    # the CUDA driver's row sums go through a work buffer; the CPU driver keeps its own
    work = torch.empty(src.shape, dtype=torch.float64, device=src.device) if src.is_cuda else None
    lib = _lib(src)
    _check(lib, lib.lf_box_filter(src.shape[0], H, W, int(size), _p(src), _p(work), _p(out), _stream(src)),
           "box_filter")
    return out.reshape(shape)
