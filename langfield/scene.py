"""Gaussians: the one in-memory scene type.

Parameters use gsplat's names and storage conventions, so a gsplat checkpoint's ``splats``
loads directly and gsplat's ``DefaultStrategy`` works on ``gaussians.splats`` as is:

=============  ============  ===========================================
name           shape         stored as
=============  ============  ===========================================
``means``      [N, 3]        world positions
``quats``      [N, 4]        rotation quaternion, wxyz, not normalised
``scales``     [N, 3]        log of the standard deviations
``opacities``  [N]           logit of the opacity
``sh0``        [N, 1, 3]     degree-0 SH coefficients (DC)
``shN``        [N, K-1, 3]   higher SH bands, K = (degree + 1) ** 2
``lang``       [N, L]        language latents (optional)
=============  ============  ===========================================

Activations: :attr:`Gaussians.scales_act` (exp), :attr:`Gaussians.opacities_act`
(sigmoid), :attr:`Gaussians.quats_act` (unit quaternions), :attr:`Gaussians.colors`
(``cat([sh0, shN], 1)``, what ``rasterization(colors=..., sh_degree=...)`` takes).

Initialisation: :meth:`Gaussians.from_points` (SfM points, as the original 3DGS does),
:meth:`Gaussians.random_in_frustums` (random points seen by the cameras) and
:meth:`Gaussians.from_dataset` (points when the dataset has them, else random, with a
warning).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Protocol, Tuple, Union, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "Gaussians",
    "Activated",
    "SceneModel",
    "SH_C0",
    "rgb_to_sh",
    "sh_to_rgb",
    "num_sh_bases",
    "sh_degree_from_bases",
    "knn_distances",
    "sample_points_in_frustums",
    "eval_sh_bases",
    "sh_rotation_matrices",
    "quat_multiply",
    "rotmat_to_quat",
]

from langfield.maths import (SH_C0, eval_sh_bases, num_sh_bases, quat_multiply,  # noqa: F401
                             rgb_to_sh, rotmat_to_quat, sh_degree_from_bases, sh_rotation_matrices, sh_to_rgb)

PARAM_NAMES = ("means", "quats", "scales", "opacities", "sh0", "shN", "lang")
REQUIRED = ("means", "quats", "scales", "opacities", "sh0")


# --------------------------------------------------------------------------------------
# Nearest neighbours and random initialisation

def _knn_brute(x: Tensor, q: Tensor, kk: int, chunk_elems: int = 1 << 22) -> Tensor:
    """The ``kk`` smallest distances [Q, kk] from each row of ``q`` to the rows of ``x``
    (ascending; ``inf`` where x has fewer rows). Candidates from the matrix-product form,
    kept ones recomputed from differences (no cancellation error)."""
    n = x.shape[0]
    kk_ = min(n, kk)
    cand = min(n, kk + 8)
    sq = (x * x).sum(-1)
    out = torch.full((q.shape[0], kk), float("inf"), dtype=x.dtype, device=x.device)
    chunk = max(1, int(chunk_elems // max(n, 1)))
    for s in range(0, q.shape[0], chunk):
        qq = q[s:s + chunk]
        d2 = (qq * qq).sum(-1)[:, None] + sq[None, :] - 2.0 * (qq @ x.T)
        idx = torch.topk(d2, cand, dim=1, largest=False).indices
        exact = ((qq[:, None, :] - x[idx]) ** 2).sum(-1)
        out[s:s + chunk, :kk_] = torch.topk(exact, kk_, dim=1, largest=False).values
    return out.clamp_min(0).sqrt()


_OFFSETS = torch.stack(torch.meshgrid(*([torch.arange(-1, 2)] * 3), indexing="ij"), -1).reshape(-1, 3)


def _knn_grid(x: Tensor, queries: Tensor, h: float, kk: int, budget: int = 1 << 22) -> Tensor:
    """``kk`` smallest distances for the points ``x[queries]`` among the points in the 27
    grid cells (size ``h``) around each; every point closer than ``h`` is among them."""
    dev = x.device
    lo = x.min(0).values
    cell = torch.floor((x - lo) / h).long()
    dims = cell.max(0).values + 1
    key = (cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    order = torch.argsort(key)
    skey = key[order]
    ukey, counts = torch.unique_consecutive(skey, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    qc = cell[queries][:, None, :] + _OFFSETS.to(dev)[None]  # [Q, 27, 3]
    inside = ((qc >= 0) & (qc < dims)).all(-1)
    nkey = (qc[..., 0] * dims[1] + qc[..., 1]) * dims[2] + qc[..., 2]
    pos = torch.searchsorted(ukey, nkey).clamp_max(ukey.numel() - 1)
    found = inside & (ukey[pos] == nkey)
    cnt = torch.where(found, counts[pos], torch.zeros_like(pos))  # [Q, 27]
    st = starts[pos]
    per_q = cnt.sum(1)
    out = torch.full((queries.numel(), kk), float("inf"), dtype=x.dtype, device=dev)
    cum = torch.cumsum(per_q, 0)
    s = 0
    Q = queries.numel()
    while s < Q:
        base = int(cum[s - 1]) if s > 0 else 0
        e = int(torch.searchsorted(cum, torch.tensor(base + budget, device=dev), right=True))
        e = max(e, s + 1)
        e = min(e, Q)
        c = cnt[s:e].reshape(-1)
        t0 = st[s:e].reshape(-1)
        total = int(c.sum())
        if total:
            ent = torch.repeat_interleave(torch.arange(c.numel(), device=dev), c)
            ent_start = torch.cumsum(c, 0) - c
            within = torch.arange(total, device=dev) - ent_start[ent]
            data = order[t0[ent] + within]
            qi = ent // 27  # local query index
            d2 = ((x[queries[s:e]][qi] - x[data]) ** 2).sum(-1)
            # one sort by (query, distance)
            d2d = d2.double()
            o = torch.argsort(qi.double() * (float(d2d.max()) * 2.0 + 1.0) + d2d)
            qi_s, d2_s = qi[o], d2[o]
            qcount = torch.bincount(qi_s, minlength=e - s)
            qstart = torch.cumsum(qcount, 0) - qcount
            rank = torch.arange(total, device=dev) - qstart[qi_s]
            keep = rank < kk
            blk = torch.full((e - s, kk), float("inf"), dtype=x.dtype, device=dev)
            blk[qi_s[keep], rank[keep]] = d2_s[keep]
            out[s:e] = blk.clamp_min(0).sqrt()
        s = e
    return out


def knn_distances(points: Tensor, k: int = 3) -> Tensor:
    """Exact distances [N, k] from each point to its ``k`` nearest other points, ascending
    (no sklearn). Uniform-grid search over the 27 cells around each point, with the cell
    size doubled for the points whose k-th neighbour lies beyond it; small clouds and the
    last few points go brute force. Duplicates give 0; fewer than ``k + 1`` points -> ``inf``."""
    x = points.detach()
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    n = x.shape[0]
    if n == 0:
        return x.new_zeros((0, k)).to(out_dtype)
    x = x - x.mean(0, keepdim=True)
    kk = k + 1  # the point itself (or a duplicate) comes first
    if n <= 4096:
        return _knn_brute(x, x, kk)[:, 1:].to(out_dtype)
    g = torch.Generator().manual_seed(0)
    sample = torch.randperm(n, generator=g)[:256].to(x.device)
    dk = _knn_brute(x, x[sample], kk)[:, k]
    dk = dk[torch.isfinite(dk) & (dk > 0)]
    extent = float((x.max(0).values - x.min(0).values).max())
    if extent == 0:
        return x.new_zeros((n, k)).to(out_dtype)
    h = float(dk.median()) * 1.5 if dk.numel() else extent / 1000
    h = max(h, extent / 2.0 ** 20)  # keeps cell keys in int64
    out = torch.full((n, kk), float("inf"), dtype=x.dtype, device=x.device)
    todo = torch.arange(n, device=x.device)
    while todo.numel():
        if todo.numel() <= 256 or h > extent:
            out[todo] = _knn_brute(x, x[todo], kk)
            break
        d = _knn_grid(x, todo, h, kk)
        ok = d[:, k] <= h
        out[todo[ok]] = d[ok]
        todo = todo[~ok]
        h *= 2.0
    return out[:, 1:].to(out_dtype)


def _as_tensor(x, dtype=torch.float32, device=None) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(dtype=dtype, device=device)
    return torch.as_tensor(np.array(x), dtype=dtype, device=device)


def visible_counts(points: Tensor, viewmats: Tensor, Ks: Tensor, widths: Tensor, heights: Tensor, *,
                   cam_chunk: int = 64) -> Tensor:
    """For points [n, 3], how many of the cameras (viewmats [C, 4, 4] world-to-camera, Ks [C, 3, 3],
    widths/heights [C]) see each in front of them and inside the image. Long [n]."""
    cnt = torch.zeros(points.shape[0], dtype=torch.long)
    V, K = viewmats.to(points.dtype), Ks.to(points.dtype)
    for s in range(0, V.shape[0], cam_chunk):
        Vs, Ks_ = V[s:s + cam_chunk], K[s:s + cam_chunk]
        pc = torch.einsum("cij,nj->cni", Vs[:, :3, :3], points) + Vs[:, None, :3, 3]
        zc = pc[..., 2]
        zs = zc.clamp_min(1e-12)
        pu = (Ks_[:, None, 0, 0] * pc[..., 0] + Ks_[:, None, 0, 1] * pc[..., 1]) / zs + Ks_[:, None, 0, 2]
        pv = Ks_[:, None, 1, 1] * pc[..., 1] / zs + Ks_[:, None, 1, 2]
        vis = (zc > 0) & (pu >= 0) & (pu < widths[s:s + cam_chunk, None]) & (pv >= 0) & \
            (pv < heights[s:s + cam_chunk, None])
        cnt += vis.sum(0)
    return cnt


def sample_points_in_frustums(viewmats, Ks, widths, heights, n: int, *, near: Optional[float] = None,
                              far: Optional[float] = None, min_visible: float = 0.5,
                              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Random points in the cameras' common view.

    Candidates are drawn in random cameras' frusta (uniform pixel, uniform depth in
    ``[near, far]``) and kept when they project inside at least ``min_visible`` of all the
    cameras (in front of them). ``near``/``far`` default to 0.1x / 2.5x the median depth of the
    point closest to all optical axes (the cameras' focus), or of the cameras' spread when the
    axes are (nearly) parallel. Returns ``(xyz [n, 3], visible_count [n])``; if too few
    candidates pass, the most-seen candidates fill up and a warning says so.
    """
    V = _as_tensor(viewmats, torch.float64).reshape(-1, 4, 4)
    K = _as_tensor(Ks, torch.float64).reshape(-1, 3, 3)
    C = V.shape[0]
    if C == 0:
        raise ValueError("random initialisation needs at least one camera")
    W = _as_tensor(widths, torch.float64).reshape(-1).expand(C)
    H = _as_tensor(heights, torch.float64).reshape(-1).expand(C)
    c2w = torch.linalg.inv(V)
    centres = c2w[:, :3, 3]
    fwd = c2w[:, :3, 2]
    fwd = fwd / fwd.norm(dim=-1, keepdim=True)
    # point closest to all optical axes
    P = torch.eye(3, dtype=torch.float64)[None] - fwd[:, :, None] * fwd[:, None, :]
    A = P.sum(0)
    b = (P @ centres[:, :, None]).sum(0)[:, 0]
    depth = None
    if C >= 2 and torch.linalg.cond(A) < 1e4:
        focus = torch.linalg.solve(A, b)
        dz = ((focus[None] - centres) * fwd).sum(-1)
        if (dz > 0).any():
            depth = float(dz[dz > 0].median())
    if depth is None:
        spread = float((centres - centres.mean(0)).norm(dim=-1).max()) if C > 1 else 0.0
        depth = max(spread, 1.0)
    near = 0.1 * depth if near is None else float(near)
    far = 2.5 * depth if far is None else float(far)
    if not (0 < near < far):
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    need = max(1, int(math.ceil(min_visible * C)))
    V32, K32 = V.float(), K.float()
    kept, counts = [], []
    best_pts, best_cnt = [], []
    have = 0
    batch = min(max(4096, 2 * n), 1 << 16)
    cam_chunk = max(1, (1 << 22) // batch)
    max_rounds = max(64, int(math.ceil(40 * n / batch)))
    for _ in range(max_rounds):
        cam = torch.randint(0, C, (batch,), generator=generator)
        u = torch.rand(batch, generator=generator, dtype=torch.float64) * W[cam]
        v = torch.rand(batch, generator=generator, dtype=torch.float64) * H[cam]
        z = near + torch.rand(batch, generator=generator, dtype=torch.float64) * (far - near)
        Kc = K[cam]
        xc = torch.stack([(u - Kc[:, 0, 2]) / Kc[:, 0, 0] * z, (v - Kc[:, 1, 2]) / Kc[:, 1, 1] * z, z], -1)
        pw = (c2w[cam, :3, :3] @ xc[:, :, None])[:, :, 0] + c2w[cam, :3, 3]
        cnt = visible_counts(pw.float(), V32, K32, W, H, cam_chunk=cam_chunk)
        ok = cnt >= need
        kept.append(pw[ok])
        counts.append(cnt[ok])
        if have < n and len(best_pts) < 8:
            best_pts.append(pw[~ok])
            best_cnt.append(cnt[~ok])
        have += int(ok.sum())
        if have >= n:
            break
    pts = torch.cat(kept)[:n]
    cnt = torch.cat(counts)[:n]
    if pts.shape[0] < n:
        warnings.warn(f"only {pts.shape[0]} of {n} random points are seen by {need} of {C} cameras; "
                      f"filling up with the most-seen candidates", stacklevel=2)
        rest_p, rest_c = torch.cat(best_pts), torch.cat(best_cnt)
        order = torch.argsort(rest_c, descending=True)[: n - pts.shape[0]]
        pts = torch.cat([pts, rest_p[order]])
        cnt = torch.cat([cnt, rest_c[order]])
    return pts.float(), cnt


# --------------------------------------------------------------------------------------
# the scene-model interface of the one render path (langfield.render.render)

@dataclass
class Activated:
    """Activated parameters a scene model hands to the renderer: ``means`` [N, 3], ``quats``
    [N, 4] (wxyz, any norm: the renderer normalises), ``scales`` [N, 3] (standard deviations),
    ``opacities`` [N] in [0, 1], ``sh`` [N, K, 3] SH coefficients of degree ``sh_degree``,
    ``lang`` [N, L] language latents or None. Tensors keep their autograd history."""

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    sh: Tensor
    sh_degree: int
    lang: Optional[Tensor] = None


@runtime_checkable
class SceneModel(Protocol):
    """What the render path needs of a scene: activated Gaussians, optionally at a time ``t``
    in [0, 1] (static models ignore it). Implemented by :class:`Gaussians`; deformable
    Gaussians and a SLAM map implement it too."""

    def activated(self, t: Optional[float] = None) -> Activated: ...


class FixedModel:
    """A scene model that hands the renderer parameters activated once (``t`` is ignored): a
    map rendered many times with the same parameters, or a detached snapshot of one."""

    def __init__(self, a: Activated):
        self.a = a

    def activated(self, t: Optional[float] = None) -> Activated:
        return self.a


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class Gaussians(nn.Module):
    """3D Gaussians with gsplat's parameter names in ``self.splats`` (an ``nn.ParameterDict``).

    ``Gaussians(means, quats, scales, opacities, sh0, shN=None, lang=None)`` takes *raw*
    (stored) values: log scales, logit opacities. ``shN=None`` means degree 0 (an [N, 0, 3]
    tensor); ``lang=None`` means no language latents (the key is absent from ``splats``).
    The tensors are copied unless ``copy=False`` (then they are used as they are, and an
    optimizer step changes them in place).
    """

    def __init__(self, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, sh0: Tensor,
                 shN: Optional[Tensor] = None, lang: Optional[Tensor] = None, requires_grad: bool = True,
                 copy: bool = True):
        super().__init__()
        n = int(means.shape[0])
        if shN is None:
            shN = sh0.new_zeros((n, 0, 3))
        params = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "sh0": sh0, "shN": shN}
        if lang is not None:
            params["lang"] = lang
        _check_shapes(params)
        self.splats = nn.ParameterDict({k: nn.Parameter(v.detach().clone() if copy or v.requires_grad else v,
                                                        requires_grad=requires_grad and v.is_floating_point())
                                        for k, v in params.items()})

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, tensors: Mapping[str, Tensor], requires_grad: bool = True, strict: bool = True,
                  copy: bool = True) -> "Gaussians":
        """From a dict of raw tensors (gsplat's ``splats`` state dict; keys may carry a
        ``splats.`` prefix). Unknown keys raise unless ``strict=False``."""
        d = {}
        for k, v in tensors.items():
            key = k[len("splats."):] if k.startswith("splats.") else k
            d[key] = v if isinstance(v, Tensor) else torch.as_tensor(v)
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            extra = ""
            if "features" in d or "colors" in d:
                extra = (" (this looks like a gsplat checkpoint trained with appearance optimisation: "
                         "'features'/'colors' instead of 'sh0'/'shN', which langfield does not load)")
            raise KeyError(f"Gaussian parameters missing: {', '.join(missing)}{extra}; got {sorted(d)}")
        unknown = [k for k in d if k not in PARAM_NAMES]
        if unknown and strict:
            raise KeyError(f"unknown Gaussian parameters {unknown}; expected {PARAM_NAMES}")
        return cls(d["means"], d["quats"], d["scales"], d["opacities"], d["sh0"], d.get("shN"), d.get("lang"),
                   requires_grad=requires_grad, copy=copy)

    @classmethod
    def from_points(cls, xyz, rgb=None, *, sh_degree: int = 3, init_opacity: float = 0.1, init_scale: float = 1.0,
                    lang_dim: int = 0, device: Union[str, torch.device, None] = None,
                    requires_grad: bool = True) -> "Gaussians":
        """3DGS initialisation from points ``xyz`` [N, 3] with colours ``rgb`` [N, 3] in [0, 1]
        (uint8 is divided by 255; None = grey): scale = log(init_scale * RMS distance to the 3
        nearest neighbours) on all axes, identity rotation, opacity ``init_opacity``, sh0 =
        RGB2SH(rgb), higher bands zero, ``lang`` zeros [N, lang_dim] when lang_dim > 0."""
        if isinstance(xyz, Tensor) and device is None:
            device = xyz.device
        xyz_t = _as_tensor(xyz, torch.float32, device)
        if xyz_t.ndim != 2 or xyz_t.shape[1] != 3:
            raise ValueError(f"points must be [N, 3], got shape {tuple(xyz_t.shape)}")
        n = xyz_t.shape[0]
        if n == 0:
            raise ValueError("empty point cloud: cannot initialise Gaussians from 0 points "
                             "(use Gaussians.random_in_frustums for random initialisation)")
        if not torch.isfinite(xyz_t).all():
            raise ValueError("point cloud has non-finite coordinates")
        if rgb is None:
            rgb_t = torch.full((n, 3), 0.5, device=xyz_t.device)
        else:
            is_u8 = (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8) or (
                isinstance(rgb, Tensor) and rgb.dtype == torch.uint8)
            rgb_t = _as_tensor(rgb, torch.float32, xyz_t.device)
            if is_u8:
                rgb_t = rgb_t / 255.0
            if rgb_t.shape != (n, 3):
                raise ValueError(f"colours must be [N, 3] = [{n}, 3], got {tuple(rgb_t.shape)}")
        if n >= 2:
            d = knn_distances(xyz_t, 3)
            finite = torch.isfinite(d)
            d2 = torch.where(finite, d * d, torch.zeros_like(d)).sum(1) / finite.sum(1).clamp_min(1)
            dist = d2.clamp_min(1e-7).sqrt()
        else:
            dist = torch.full((n,), 0.01, device=xyz_t.device)
        scales = torch.log(dist * init_scale)[:, None].repeat(1, 3)
        quats = torch.zeros((n, 4), device=xyz_t.device)
        quats[:, 0] = 1.0
        opacities = torch.full((n,), _logit(init_opacity), device=xyz_t.device)
        sh0 = rgb_to_sh(rgb_t)[:, None, :]
        shN = torch.zeros((n, num_sh_bases(sh_degree) - 1, 3), device=xyz_t.device)
        lang = torch.zeros((n, lang_dim), device=xyz_t.device) if lang_dim > 0 else None
        return cls(xyz_t.clone(), quats, scales, opacities, sh0, shN, lang, requires_grad=requires_grad, copy=False)

    @classmethod
    def random_in_frustums(cls, viewmats, Ks, widths, heights, n: int = 100_000, *, sh_degree: int = 3,
                           near: Optional[float] = None, far: Optional[float] = None, min_visible: float = 0.5,
                           seed: int = 0, init_opacity: float = 0.1, init_scale: float = 1.0, lang_dim: int = 0,
                           device=None) -> "Gaussians":
        """``n`` Gaussians at random points seen by at least ``min_visible`` of the cameras
        (see :func:`sample_points_in_frustums`), random colours, 3DGS scales."""
        g = torch.Generator().manual_seed(seed)
        xyz, _ = sample_points_in_frustums(viewmats, Ks, widths, heights, n, near=near, far=far,
                                           min_visible=min_visible, generator=g)
        rgb = torch.rand((xyz.shape[0], 3), generator=g)
        return cls.from_points(xyz, rgb, sh_degree=sh_degree, init_opacity=init_opacity, init_scale=init_scale,
                               lang_dim=lang_dim, device=device)

    @classmethod
    def from_dataset(cls, dataset, *, sh_degree: int = 3, n_random: int = 100_000, init_opacity: float = 0.1,
                     init_scale: float = 1.0, lang_dim: int = 0, seed: int = 0, device=None) -> "Gaussians":
        """From ``dataset.points`` (SfM / ply_file_path points) when the dataset has them,
        else ``n_random`` random points in its cameras' common view (with a warning)."""
        pts = getattr(dataset, "points", None)
        if pts is not None and len(pts) > 0:
            return cls.from_points(pts.xyz, pts.rgb, sh_degree=sh_degree, init_opacity=init_opacity,
                                   init_scale=init_scale, lang_dim=lang_dim, device=device)
        warnings.warn(f"dataset {getattr(dataset, 'root', '')} has no points: initialising {n_random} Gaussians "
                      f"at random in the cameras' common view", stacklevel=2)
        return cls.random_in_frustums(dataset.viewmats(), dataset.Ks(), dataset.widths(), dataset.heights(),
                                      n_random, sh_degree=sh_degree, seed=seed, init_opacity=init_opacity,
                                      init_scale=init_scale, lang_dim=lang_dim, device=device)

    # ---- raw parameters -----------------------------------------------------------
    @property
    def means(self) -> Tensor:
        return self.splats["means"]

    @property
    def quats(self) -> Tensor:
        return self.splats["quats"]

    @property
    def scales(self) -> Tensor:
        return self.splats["scales"]

    @property
    def opacities(self) -> Tensor:
        return self.splats["opacities"]

    @property
    def sh0(self) -> Tensor:
        return self.splats["sh0"]

    @property
    def shN(self) -> Tensor:
        return self.splats["shN"]

    @property
    def lang(self) -> Optional[Tensor]:
        return self.splats["lang"] if "lang" in self.splats else None

    # ---- activated values -----------------------------------------------------------
    @property
    def scales_act(self) -> Tensor:
        return torch.exp(self.scales)

    @property
    def opacities_act(self) -> Tensor:
        return torch.sigmoid(self.opacities)

    @property
    def quats_act(self) -> Tensor:
        return torch.nn.functional.normalize(self.quats, dim=-1)

    @property
    def colors(self) -> Tensor:
        """SH coefficients [N, K, 3] for ``rasterization(colors=..., sh_degree=self.sh_degree)``."""
        return torch.cat([self.sh0, self.shN], 1)

    @property
    def rgb(self) -> Tensor:
        """View-independent colour (DC term only) in [0, 1]-ish, [N, 3]."""
        return sh_to_rgb(self.sh0[:, 0, :])

    # ---- the scene-model interface ------------------------------------------------------
    def activated(self, t: Optional[float] = None) -> Activated:
        """The activated parameters for :func:`langfield.render.render` (``t`` is ignored:
        static Gaussians look the same at every time)."""
        sp = self.splats
        return Activated(means=sp["means"], quats=sp["quats"], scales=torch.exp(sp["scales"]),
                         opacities=torch.sigmoid(sp["opacities"]), sh=torch.cat([sp["sh0"], sp["shN"]], 1),
                         sh_degree=self.sh_degree, lang=sp["lang"] if "lang" in sp else None)

    # ---- sizes --------------------------------------------------------------------
    @property
    def num(self) -> int:
        return int(self.splats["means"].shape[0])

    def __len__(self) -> int:
        return self.num

    @property
    def sh_degree(self) -> int:
        return sh_degree_from_bases(1 + int(self.shN.shape[1]))

    @property
    def lang_dim(self) -> int:
        return 0 if self.lang is None else int(self.lang.shape[1])

    @property
    def device(self) -> torch.device:
        return self.splats["means"].device

    # ---- editing --------------------------------------------------------------------
    def set_lang(self, lang: Optional[Tensor], requires_grad: bool = True) -> "Gaussians":
        """Set (or remove, with None) the language latents [N, L]."""
        if lang is None:
            if "lang" in self.splats:
                del self.splats["lang"]
            return self
        if lang.ndim != 2 or lang.shape[0] != self.num:
            raise ValueError(f"lang must be [N, L] with N = {self.num}, got {tuple(lang.shape)}")
        self.splats["lang"] = nn.Parameter(lang.detach().to(self.device).clone(), requires_grad=requires_grad)
        return self

    def to_dict(self, detach: bool = True) -> Dict[str, Tensor]:
        """Raw tensors by name (``means`` ... ``shN``, ``lang`` when present)."""
        return {k: (v.detach() if detach else v) for k, v in self.splats.items()}

    def select(self, mask: Tensor) -> "Gaussians":
        """A new Gaussians with the rows ``mask`` (bool [N] or indices)."""
        return Gaussians.from_dict({k: v.detach()[mask] for k, v in self.splats.items()},
                                   requires_grad=self.means.requires_grad, copy=False)

    def clone(self) -> "Gaussians":
        return Gaussians.from_dict({k: v.detach().clone() for k, v in self.splats.items()},
                                   requires_grad=self.means.requires_grad, copy=False)

    @torch.no_grad()
    def transformed(self, T) -> "Gaussians":
        """A copy under the similarity ``T`` [4, 4] (``x' = s R x + t``): means moved, quats and
        view-dependent SH bands rotated, log scales shifted by log s. Use it to map a scene
        trained in a dataset's normalised frame back: ``g.transformed(inv(dataset.transform))``."""
        T = _as_tensor(T, torch.float64).reshape(4, 4)
        A = T[:3, :3]
        s = float(torch.linalg.det(A).abs() ** (1.0 / 3.0))
        if s <= 0:
            raise ValueError("transform is singular")
        R = A / s
        if not torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-5) or torch.linalg.det(R) < 0:
            raise ValueError("transform is not a similarity (scaled rotation + translation)")
        d = {k: v.detach().clone() for k, v in self.splats.items()}
        dev, dt = self.device, self.means.dtype
        d["means"] = (self.means.detach().double() @ (s * R).T.to(self.device) + T[:3, 3].to(self.device)).to(dt)
        qR = rotmat_to_quat(R).to(dev)
        d["quats"] = quat_multiply(qR[None], self.quats.detach().double()).to(dt)
        d["scales"] = self.scales.detach() + math.log(s)
        deg = self.sh_degree
        if deg > 0:
            shN = self.shN.detach().double()
            out = shN.clone()
            for l, D in enumerate(sh_rotation_matrices(R, deg), start=1):
                sl = slice(l * l - 1, (l + 1) * (l + 1) - 1)
                out[:, sl] = torch.einsum("ij,njc->nic", D.to(dev), shN[:, sl])
            d["shN"] = out.to(dt)
        return Gaussians.from_dict(d, requires_grad=self.means.requires_grad, copy=False)

    # ---- IO: langfield.io reads and writes Gaussians (write_ply / read_ply, save_gaussians /
    # load_gaussians); the scene model imports nothing of io, so the layers read downward.
    @classmethod
    def from_checkpoint(cls, doc, ckpt, device=None, requires_grad: bool = False) -> "Gaussians":
        """The Gaussians of a run checkpoint (``langfield.run.model_from_checkpoint``)."""
        g = cls.from_dict(ckpt.tensors["splats"], requires_grad=requires_grad, copy=False)
        return g.to(device) if device is not None else g

    def extra_repr(self) -> str:
        return f"num={self.num}, sh_degree={self.sh_degree}, lang_dim={self.lang_dim}, device={self.device}"


def _check_shapes(p: Dict[str, Tensor]) -> None:
    n = p["means"].shape[0]
    want = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,), "sh0": (n, 1, 3)}
    for k, shape in want.items():
        if tuple(p[k].shape) != shape:
            raise ValueError(f"'{k}' must have shape {list(shape)}, got {list(p[k].shape)}")
    shN = p["shN"]
    if shN.ndim != 3 or shN.shape[0] != n or shN.shape[2] != 3:
        raise ValueError(f"'shN' must have shape [N, K-1, 3], got {list(shN.shape)}")
    sh_degree_from_bases(1 + shN.shape[1])
    if "lang" in p and (p["lang"].ndim != 2 or p["lang"].shape[0] != n):
        raise ValueError(f"'lang' must have shape [N, L], got {list(p['lang'].shape)}")
