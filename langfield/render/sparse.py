"""Sparse channels: per-Gaussian (channel, weight) pairs rendered into per-pixel coefficients.

A sparse-codebook language field (:class:`langfield.codec.codebook.CodebookCodec`) gives each
Gaussian, per level, ``k`` non-zero coefficients out of ``L``; a dense render would blend all
``levels * L`` channels of every Gaussian at every pixel. The sparse op blends only the
``levels * k`` (index, weight) pairs: the native CPU and CUDA drivers
(``lf_rasterize_sparse_fwd`` / ``_bwd`` in ``cuda/include/langfield_abi.h``) and a torch
reference (:func:`langfield.render.reference.rasterize_sparse`, the dense blend of the scattered
weights). The result equals a dense render of the same coefficients (same alpha, skip and stop
rules); gradients flow to the weights (geometry is a constant of this op).

* :func:`sparse_topk` -- dense per-level coefficients ``[N, levels*L]`` -> ``(idx, w)`` pairs.
* :func:`dense_from_sparse` -- the inverse (scatter).
* :func:`rasterize_sparse` -- the op on projected Gaussians (``means2d``, ``conics``, tile lists).
* :func:`render_sparse` -- ``render(model, cameras, ...)``'s sparse twin: projects the model (or
  reuses the projection and tile lists of an earlier :func:`~langfield.render.model.render` of
  the same model and cameras through its ``meta``) and returns a
  :class:`~langfield.render.model.RenderOutput` with ``lang`` and ``alpha``.
* :func:`rasterize_sparse_relevancy` / :func:`render_sparse_relevancy` -- a codebook field's text
  query fused into the sparse pass: the per-pixel coefficients stay in the tile and only the
  relevancy ``[C, Q, levels, H, W]`` comes out (``lf_rasterize_sparse_relevancy_fwd``; the torch
  reference renders the coefficient maps and scores them), optionally with colour + depth blended
  in the same pass (one walk over the tiles for a whole relevancy frame).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from langfield.render.model import Cameras, RenderOutput

__all__ = ["sparse_topk", "dense_from_sparse", "rasterize_sparse", "render_sparse", "rasterize_sparse_relevancy",
           "render_sparse_relevancy", "scores_to_relevancy", "select_levels"]


def sparse_topk(lang: Tensor, latent_dim: int, k: int) -> Tuple[Tensor, Tensor]:
    """``lang [N, levels*L]`` -> ``(idx int32 [N, levels*k], w [N, levels*k])``: the ``k``
    largest entries of every level (by value; ties: the lower index), with channel indices into
    the ``levels*L`` channels (level offset included). Exact for coefficients with at most ``k``
    non-zeros per level; ``w`` keeps ``lang``'s autograd graph."""
    if lang.ndim != 2:
        raise ValueError(f"sparse_topk: lang must be [N, levels*L], got {tuple(lang.shape)}")
    L = int(latent_dim)
    if L < 1 or lang.shape[1] % L:
        raise ValueError(f"sparse_topk: {lang.shape[1]} channels are not a multiple of the latent size {L}")
    k = int(k)
    if not 1 <= k <= L:
        raise ValueError(f"sparse_topk: k must be in 1..{L}, got {k}")
    N, nl = lang.shape[0], lang.shape[1] // L
    x = lang.reshape(N, nl, L)
    with torch.no_grad():
        idx = torch.topk(x.detach(), k, dim=-1, sorted=False).indices  # [N, nl, k]
        idx = idx.sort(-1).values  # deterministic order inside a level
    w = x.gather(-1, idx)
    off = (torch.arange(nl, device=lang.device) * L).reshape(1, nl, 1)
    return (idx + off).reshape(N, nl * k).to(torch.int32), w.reshape(N, nl * k)


def dense_from_sparse(idx: Tensor, w: Tensor, n_channels: int) -> Tensor:
    """``(idx [..., K], w [..., K]) -> [..., n_channels]`` (duplicates add; ``idx < 0`` ignored)."""
    ix = idx.to(torch.int64)
    ok = ix >= 0
    out = torch.zeros(*w.shape[:-1], int(n_channels), dtype=w.dtype, device=w.device)
    return out.scatter_add(-1, ix.clamp_min(0), torch.where(ok, w, torch.zeros_like(w)))


def _check_pairs(idx: Tensor, w: Tensor, n_channels: int, C: int, N: int) -> Tuple[Tensor, Tensor]:
    if idx.shape != w.shape or idx.dim() not in (2, 3):
        raise ValueError(f"sparse pairs: idx {tuple(idx.shape)} and w {tuple(w.shape)} must both be [N, K] or "
                         f"[C, N, K]")
    if idx.dim() == 2:
        idx, w = idx.unsqueeze(0).expand(C, *idx.shape), w.unsqueeze(0).expand(C, *w.shape)
    if idx.shape[:2] != (C, N) or idx.shape[2] < 1:
        raise ValueError(f"sparse pairs: expected [{C}, {N}, K>=1], got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point:
        raise ValueError("sparse pairs: idx must be an integer tensor")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= n_channels:
            raise ValueError(f"sparse pairs: channel indices must be in [-1, {n_channels}), got [{lo}, {hi}]")
    return idx, w


def rasterize_sparse(means2d: Tensor, conics: Tensor, sp_idx: Tensor, sp_w: Tensor, opacities: Tensor, width: int,
                     height: int, tile_size: int, tile_offsets: Tensor, flatten_ids: Tensor, n_channels: int, *,
                     backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """The sparse op on projected Gaussians (``[C,N,...]`` as :func:`langfield.render.native.rasterize`
    takes them): returns ``render [C,H,W,n_channels], alphas [C,H,W,1], last_ids [C,H,W]``.
    ``backend``: "cpu"/"cuda" (native), "torch" (reference), "auto" (native when it builds)."""
    from langfield.render.api import resolve_backend

    C, N = means2d.shape[:2]
    sp_idx, sp_w = _check_pairs(sp_idx, sp_w, int(n_channels), C, N)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, opacities)):
        raise ValueError("rasterize_sparse: gradients flow to the weights only; detach the geometry (or render "
                         "the dense channels with render(..., extra=) for geometry gradients)")
    be = resolve_backend(backend, means2d.device, torch.float32)
    if be == "gsplat":
        be = "torch"
    if be in ("cpu", "cuda"):
        from langfield.render import native as ops

        sp_w = sp_w.to(torch.float32)
    else:
        from langfield.render import reference as ops
    return ops.rasterize_sparse(means2d, conics, sp_idx, sp_w, opacities, int(width), int(height), int(tile_size),
                                tile_offsets, flatten_ids, int(n_channels))


def render_sparse(model, cameras: Cameras, idx: Tensor, w: Tensor, n_channels: int, *, t: Optional[float] = None,
                  meta: Optional[Dict[str, Any]] = None, backend: str = "auto", eps2d: float = 0.3,
                  near_plane: float = 0.01, far_plane: float = 1e10, tile_size: int = 16) -> RenderOutput:
    """Render the sparse pairs ``idx``/``w`` (``[N, K]`` or ``[C, N, K]``, channels in
    ``[0, n_channels)``, -1 = unused) of ``model`` from ``cameras`` into ``lang [C, H, W,
    n_channels]`` (and ``alpha``). ``meta``: the ``meta`` of a :func:`~langfield.render.model.render`
    of the same model and cameras (classic mode): its projection and tile lists are reused, so
    colour + depth (dense pass) and coefficients (this pass) cost one sort. Geometry gets no
    gradient here; ``w`` does."""
    from langfield.render.api import backend_ops, resolve_backend

    C = len(cameras)
    dev = w.device
    if meta is not None and meta.get("n_cameras") == C and "isect_offsets" in meta and meta.get("width") == cameras.width \
            and meta.get("height") == cameras.height:
        means2d, conics, opac = meta["means2d"].detach(), meta["conics"].detach(), meta["opacities"].detach()
        tile_offsets, flatten_ids, ts = meta["isect_offsets"], meta["flatten_ids"], int(meta["tile_size"])
        be = backend if backend != "auto" else (meta.get("backend") or "auto")
    else:
        with torch.no_grad():
            if t is None and cameras.times is not None and len(cameras) > 0:
                t = float(cameras.times[0])
            a = model.activated(t)
            be = resolve_backend(backend, a.means.device, torch.float32)
            ops = backend_ops(be if be != "gsplat" else "torch")
            f32 = (lambda x: x.to(torch.float32)) if be in ("cpu", "cuda") else (lambda x: x)
            vm, Ks = cameras.viewmats.to(a.means.device), cameras.Ks.to(a.means.device)
            radii, means2d, depths, conics, _ = ops.project(
                f32(a.means), f32(a.quats), f32(a.scales), f32(a.opacities), f32(vm), f32(Ks), cameras.width,
                cameras.height, eps2d, near_plane, far_plane, 0.0, False)
            ts = int(tile_size)
            tile_offsets, flatten_ids, _ = ops.isect(radii, means2d, depths, cameras.width, cameras.height, ts)
            opac = f32(a.opacities).unsqueeze(0).expand(C, -1).contiguous()
    if be == "gsplat":
        be = "torch"
    render_, alphas, _last = rasterize_sparse(means2d, conics, idx.to(dev), w, opac, cameras.width, cameras.height,
                                              ts, tile_offsets, flatten_ids, int(n_channels), backend=be)
    return RenderOutput(rgb=None, alpha=alphas[..., 0], lang=render_, meta={"backend": be, "sparse_k": w.shape[-1]})


def select_levels(idx: Tensor, w: Tensor, latent_dim: int, k: int, levels) -> Tuple[Tensor, Tensor]:
    """The pairs of some levels only: ``idx``/``w`` ``[..., n*k]`` as :func:`sparse_topk` makes
    them (k pairs per level, level ``l``'s channels in ``[l L, (l+1) L)``) -> the pairs of
    ``levels`` (a list of level indices), channels renumbered to ``[0, len(levels) L)``."""
    L, k = int(latent_dim), int(k)
    parts_i, parts_w = [], []
    for j, lv in enumerate(levels):
        parts_i.append(idx[..., lv * k:(lv + 1) * k] + (j - lv) * L)
        parts_w.append(w[..., lv * k:(lv + 1) * k])
    return torch.cat(parts_i, -1), torch.cat(parts_w, -1)


def scores_to_relevancy(z: Tensor, A: Tensor, G: Tensor, n_levels: int, n_queries: int, temperature: float,
                        alpha: Optional[Tensor] = None, min_alpha: float = -1.0) -> Tensor:
    """The reference of the fused op's epilogue: coefficient maps ``z [C, H, W, n_levels * L]`` ->
    relevancy ``[C, Q, n_levels, H, W]`` (cosines ``z A / sqrt(z G z)``, LERF relevancy of the
    first ``n_queries`` columns of ``A`` against the others; 0 where ``alpha <= min_alpha``)."""
    C, H, W, n = z.shape
    L = n // int(n_levels)
    Q = int(n_queries)
    A = A.to(z.device, torch.float32)
    G = G.to(z.device, torch.float32)
    out = torch.empty(C, Q, int(n_levels), H, W, dtype=torch.float32, device=z.device)
    for lv in range(int(n_levels)):
        zl = z[..., lv * L:(lv + 1) * L].reshape(-1, L).float()
        dots = zl @ A
        nrm = ((zl @ G) * zl).sum(-1).clamp_min(0).sqrt().clamp_min(1e-12)
        s = dots / nrm[:, None]
        r = torch.sigmoid(temperature * (s[:, :Q] - s[:, Q:].amax(-1, keepdim=True)))
        out[:, :, lv] = r.reshape(C, H, W, Q).permute(0, 3, 1, 2)
    if alpha is not None:
        out = out * (alpha.reshape(C, 1, 1, H, W) > min_alpha)
    return out


@torch.no_grad()
def rasterize_sparse_relevancy(means2d: Tensor, conics: Tensor, sp_idx: Tensor, sp_w: Tensor, opacities: Tensor,
                               width: int, height: int, tile_size: int, tile_offsets: Tensor, flatten_ids: Tensor,
                               n_levels: int, A: Tensor, G: Tensor, n_queries: int, *, temperature: float = 10.0,
                               min_alpha: float = -1.0, colors: Optional[Tensor] = None,
                               backgrounds: Optional[Tensor] = None, backend: str = "auto"):
    """A codebook field's text query on projected Gaussians in one pass (no gradients): the
    (index, weight) pairs ``[N, K]`` / ``[C, N, K]`` (channels ``[0, n_levels * L)``) are blended
    per pixel and scored against ``A [L, M]`` (codebook-to-embedding cosines, the ``n_queries``
    queries first, then the canonical phrases) with the codebook Gram ``G [L, L]``. Optional
    dense ``colors [C, N, D]`` (and ``backgrounds [C, D]``) are blended in the same pass.
    Returns ``(relevancy [C, Q, n_levels, H, W], render [C, H, W, D] or None, alphas [C, H, W])``.
    The native op never materialises the ``[H, W, n_levels * L]`` coefficient maps; the torch
    reference does (and is what the op is tested against)."""
    from langfield.render.api import resolve_backend

    C, N = means2d.shape[:2]
    L = int(A.shape[0])
    n_ch = int(n_levels) * L
    sp_idx, sp_w = _check_pairs(sp_idx, sp_w, n_ch, C, N)
    if tuple(G.shape) != (L, L) or int(A.shape[1]) <= int(n_queries) or int(n_queries) < 1:
        raise ValueError(f"rasterize_sparse_relevancy: A {tuple(A.shape)} must be [L, Q + canonical] with "
                         f"Q={n_queries} >= 1 and G {tuple(G.shape)} [L, L]")
    if colors is not None and colors.dim() == 2:
        colors = colors.unsqueeze(0).expand(C, *colors.shape)
    be = resolve_backend(backend, means2d.device, torch.float32)
    if be in ("cpu", "cuda"):
        from langfield.render import native

        rel, render_, alphas, _ = native.rasterize_sparse_relevancy(
            means2d, conics, sp_idx, sp_w.to(torch.float32), opacities, int(width), int(height), int(tile_size),
            tile_offsets, flatten_ids, int(n_levels), A, G, int(n_queries), float(temperature), float(min_alpha),
            colors=colors, backgrounds=backgrounds)
        return rel, render_, alphas
    from langfield.render import reference

    D = 0 if colors is None else int(colors.shape[-1])
    dense = dense_from_sparse(sp_idx, sp_w.float(), n_ch)
    feats = dense if colors is None else torch.cat([colors.float(), dense], -1)
    bg = None
    if colors is not None and backgrounds is not None:
        bg = torch.cat([backgrounds.float(), backgrounds.new_zeros(C, n_ch).float()], -1)
    out, alphas, _ = reference.rasterize(means2d, conics, feats, opacities, bg, int(width), int(height),
                                         int(tile_size), tile_offsets, flatten_ids)
    alphas = alphas[..., 0]
    rel = scores_to_relevancy(out[..., D:], A, G, int(n_levels), int(n_queries), float(temperature), alphas,
                              float(min_alpha))
    return rel, (out[..., :D] if D else None), alphas


@torch.no_grad()
def render_sparse_relevancy(model, cameras: Cameras, idx: Tensor, w: Tensor, n_levels: int, A: Tensor, G: Tensor,
                            n_queries: int, *, temperature: float = 10.0, min_alpha: float = -1.0,
                            meta: Optional[Dict[str, Any]] = None, colors: bool = False,
                            sh_degree: Optional[int] = None, depth: bool = False, background=None,
                            t: Optional[float] = None, backend: str = "auto", eps2d: float = 0.3,
                            near_plane: float = 0.01, far_plane: float = 1e10, tile_size: int = 16):
    """:func:`rasterize_sparse_relevancy` on a scene model: reuses the projection and tile lists of
    ``meta`` (an earlier :func:`~langfield.render.model.render` of the same model and cameras)
    or projects the model itself; with ``colors`` (and ``depth``, ``background``, ``sh_degree``
    as :func:`~langfield.render.model.render` takes them; not with ``meta``) the SH colour and
    the expected depth are blended in the same pass. Returns ``(relevancy [C, Q, n_levels, H, W],
    RenderOutput(rgb, alpha, depth))``: the colour, alpha and depth equal
    :func:`~langfield.render.model.render`'s."""
    from langfield.render.api import backend_ops, resolve_backend

    C = len(cameras)
    dev = w.device
    W_, H_ = cameras.width, cameras.height
    if meta is not None:
        if colors or depth:
            raise ValueError("render_sparse_relevancy: colours and depth come with their own pass (meta=None)")
        if not (meta.get("n_cameras") == C and "isect_offsets" in meta and meta.get("width") == W_
                and meta.get("height") == H_):
            raise ValueError("render_sparse_relevancy: meta is not a render of these cameras")
        means2d, conics, opac = meta["means2d"].detach(), meta["conics"].detach(), meta["opacities"].detach()
        tile_offsets, flatten_ids, ts = meta["isect_offsets"], meta["flatten_ids"], int(meta["tile_size"])
        be = backend if backend != "auto" else (meta.get("backend") or "auto")
        feats = bg = None
        depths = None
    else:
        if t is None and cameras.times is not None and len(cameras) > 0:
            t = float(cameras.times[0])
        a = model.activated(t)
        be = resolve_backend(backend, a.means.device, torch.float32)
        ops = backend_ops(be if be != "gsplat" else "torch")
        f32 = (lambda x: x.to(torch.float32)) if be in ("cpu", "cuda") else (lambda x: x)
        vm, Ks = cameras.viewmats.to(a.means.device), cameras.Ks.to(a.means.device)
        radii, means2d, depths, conics, _ = ops.project(
            f32(a.means), f32(a.quats), f32(a.scales), f32(a.opacities), f32(vm), f32(Ks), W_, H_, eps2d,
            near_plane, far_plane, 0.0, False)
        ts = int(tile_size)
        tile_offsets, flatten_ids, _ = ops.isect(radii, means2d, depths, W_, H_, ts)
        opac = f32(a.opacities).unsqueeze(0).expand(C, -1).contiguous()
        feats = bg = None
        parts = []
        if colors:
            deg = a.sh_degree if sh_degree is None else min(int(sh_degree), a.sh_degree)
            k = (deg + 1) ** 2
            sh = a.sh if a.sh.shape[1] == k else a.sh[:, :k]
            coeffs = f32(sh).unsqueeze(0).expand(C, *sh.shape)
            visible = (radii > 0).all(dim=-1)
            campos = torch.linalg.inv(f32(vm))[:, :3, 3]
            dirs = f32(a.means).unsqueeze(0) - campos.unsqueeze(1)
            parts.append(torch.clamp_min(ops.sh(int(deg), dirs, coeffs, visible) + 0.5, 0.0))
            if background is not None:
                b = torch.as_tensor(background, dtype=torch.float32, device=a.means.device)
                bg = b.reshape(1, 3).expand(C, 3) if b.numel() == 3 else b.reshape(C, 3)
        if depth:
            parts.append(depths.unsqueeze(-1))
            if bg is not None:
                bg = torch.cat([bg, bg.new_zeros(C, 1)], -1)
        if parts:
            feats = torch.cat(parts, -1).contiguous()
    if be == "gsplat":
        be = "torch"
    rel, dense, alphas = rasterize_sparse_relevancy(
        means2d, conics, idx.to(dev), w, opac, W_, H_, ts, tile_offsets, flatten_ids, int(n_levels), A.to(dev),
        G.to(dev), int(n_queries), temperature=temperature, min_alpha=min_alpha, colors=feats, backgrounds=bg,
        backend=be)
    out = RenderOutput(rgb=None, alpha=alphas, meta={"backend": be})
    if dense is not None:
        if colors:
            out.rgb = dense[..., :3]
        if depth:
            d = dense[..., -1] / alphas.clamp(min=1e-10)
            out.depth = torch.where(alphas > 1e-4, d, torch.zeros_like(d))
    return rel, out
