"""Exact ray casting of analytic scenes on the CPU (vectorised torch, float32).

:func:`render_view` returns, for one pinhole camera (OpenCV convention, world-to-camera
``viewmat`` 4x4 and intrinsics ``K`` 3x3, pixel centres at +0.5 like gsplat):

* ``rgb`` [H,W,3] float32 in [0,1]: Lambert + ambient per light, hard shadows (one shadow
  ray per light), procedural textures, adaptive supersampling (``aa x aa`` stratified
  samples in pixels where labels or colour change between neighbours);
* ``depth`` [H,W] float32: camera **z-depth** in metres of the pixel-centre ray (exact
  analytic intersection; 0 where the ray hits nothing);
* ``instance`` [H,W] int32: object instance id (0 = background) = whole-level label id;
* ``labels`` [3,H,W] int32: label ids for the levels ``("whole", "part", "subpart")``;
* ``normal`` [H,W,3] world normals, ``prim`` [H,W] primitive index (-1 = background).

Rays are traced in chunks of spatially coherent rays; each chunk is bounded by a cone
(origin ball + direction cone + length), primitives whose bounding spheres cannot touch it
are skipped, and exact intersections run only on the rest. Deterministic: no randomness.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from langfield.scenes.model import SHAPES, FlatScene

T_EPS = 1e-5  # smallest accepted ray parameter
SHADOW_OFFSET = 5e-4  # shadow rays start this far above the surface (metres)
FAR = 1e4
TILE = 16
CHUNK = 256

_INF = float("inf")


# ----------------------------------------------------------------------------- shapes
def _first(*cands, tmin=T_EPS):
    """Smallest valid candidate parameter (> tmin) per ray; inf if none."""
    best = None
    for t, ok in cands:
        t = torch.where(ok & (t > tmin), t, torch.full_like(t, _INF))
        best = t if best is None else torch.minimum(best, t)
    return best


def _roots(a, b, c):
    """Roots of a t^2 + 2 b t + c = 0 in a numerically stable form (t1, t2, real?)."""
    disc = b * b - a * c
    ok = disc >= 0
    sq = torch.sqrt(torch.clamp(disc, min=0.0))
    q = -(b + torch.copysign(sq, b))
    return q / a, c / q, ok


def _sphere(o, d, s, tmin=T_EPS):
    r = s[0]
    b = (o * d).sum(-1)
    perp = o - b[:, None] * d
    h = r * r - (perp * perp).sum(-1)
    ok = h >= 0
    sh = torch.sqrt(torch.clamp(h, min=0.0))
    return _first((-b - sh, ok), (-b + sh, ok), tmin=tmin)


def _box(o, d, s):
    h = torch.tensor(s[:3], dtype=o.dtype)
    inv = 1.0 / d
    t1 = (-h - o) * inv
    t2 = (h - o) * inv
    tn = torch.minimum(t1, t2).nan_to_num(-_INF).amax(-1)
    tf = torch.maximum(t1, t2).nan_to_num(_INF).amin(-1)
    ok = tf >= tn
    return _first((tn, ok), (tf, ok))


def _cylinder(o, d, s, tmin=T_EPS):
    r, hh = s[0], s[1]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - r * r
    t1, t2, ok = _roots(a, b, c)
    z1 = o[:, 2] + t1 * d[:, 2]
    z2 = o[:, 2] + t2 * d[:, 2]
    tc1 = (hh - o[:, 2]) / d[:, 2]
    tc2 = (-hh - o[:, 2]) / d[:, 2]

    def in_disc(t):
        x = o[:, 0] + t * d[:, 0]
        y = o[:, 1] + t * d[:, 1]
        return x * x + y * y <= r * r

    return _first((t1, ok & (z1.abs() <= hh)), (t2, ok & (z2.abs() <= hh)), (tc1, in_disc(tc1)), (tc2, in_disc(tc2)),
                  tmin=tmin)


def _cone(o, d, s, tmin=T_EPS):
    r, h = s[0], s[1]
    k2 = (r / h) ** 2
    oz = h - o[:, 2]
    dz = -d[:, 2]
    a = d[:, 0] ** 2 + d[:, 1] ** 2 - k2 * dz * dz
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1] - k2 * oz * dz
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - k2 * oz * oz
    t1, t2, ok = _roots(a, b, c)

    def on_side(t):
        z = o[:, 2] + t * d[:, 2]
        return ok & (z >= 0) & (z <= h)

    tb = -o[:, 2] / d[:, 2]
    xb = o[:, 0] + tb * d[:, 0]
    yb = o[:, 1] + tb * d[:, 1]
    return _first((t1, on_side(t1)), (t2, on_side(t2)), (tb, xb * xb + yb * yb <= r * r), tmin=tmin)


def _plane(o, d, s):
    t = -o[:, 2] / d[:, 2]
    x = o[:, 0] + t * d[:, 0]
    y = o[:, 1] + t * d[:, 1]
    return _first((t, (x.abs() <= s[0]) & (y.abs() <= s[1])))


def _capsule(o, d, s, tmin=T_EPS):
    r, hh = s[0], s[1]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - r * r
    t1, t2, ok = _roots(a, b, c)
    z1 = o[:, 2] + t1 * d[:, 2]
    z2 = o[:, 2] + t2 * d[:, 2]
    off = torch.tensor([0.0, 0.0, hh], dtype=o.dtype)
    return _first(
        (t1, ok & (z1.abs() <= hh)),
        (t2, ok & (z2.abs() <= hh)),
        (_sphere(o - off, d, (r,), tmin), torch.ones_like(ok)),
        (_sphere(o + off, d, (r,), tmin), torch.ones_like(ok)),
        tmin=tmin,
    )


def _torus(o, d, s, iters: int = 64):
    """Sphere tracing of the exact torus SDF from the bounding sphere, then Newton steps on
    the quartic implicit so that the depth is exact to float precision."""
    R, r = s[0], s[1]
    b = (o * d).sum(-1)
    perp = o - b[:, None] * d
    h = (R + r) ** 2 - (perp * perp).sum(-1)
    out = torch.full_like(b, _INF)
    sel = ((h >= 0) & (-b + torch.sqrt(torch.clamp(h, min=0.0)) > T_EPS)).nonzero().flatten()
    if sel.numel() == 0:
        return out
    o, d, b, h = o[sel], d[sel], b[sel], h[sel]
    sh = torch.sqrt(h)
    t = torch.clamp(-b - sh, min=0.0)
    t1 = -b + sh
    tol = 1e-6 * (R + r)
    live = torch.arange(t.numel())
    for i in range(iters // 4):
        ol, dl = o.index_select(0, live), d.index_select(0, live)
        tl = t.index_select(0, live)
        for _ in range(4):
            p = ol + tl[:, None] * dl
            q = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2) - R
            sdf = torch.sqrt(q * q + p[:, 2] ** 2) - r
            tl = tl + sdf
        t.index_copy_(0, live, tl)
        go = ((sdf.abs() >= tol) & (tl <= t1.index_select(0, live))).nonzero().flatten()
        if go.numel() == 0 or 4 * (i + 1) >= iters:
            break
        live = live.index_select(0, go)
    k = R * R - r * r
    for _ in range(3):
        p = o + t[:, None] * d
        pp = (p * p).sum(-1)
        g = pp + k
        f = g * g - 4 * R * R * (p[:, 0] ** 2 + p[:, 1] ** 2)
        df = 4 * g * (p * d).sum(-1) - 8 * R * R * (p[:, 0] * d[:, 0] + p[:, 1] * d[:, 1])
        step = f / df
        t = torch.where(df.abs() > 1e-12, t - step.clamp(-r, r), t)
    p = o + t[:, None] * d
    q = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2) - R
    sdf = torch.sqrt(q * q + p[:, 2] ** 2) - r
    out[sel] = _first((t, (sdf.abs() < 1e-4 * (1 + r)) & (t <= t1 + 1e-4)))
    return out


def _recentred(fn, centre_z=lambda s: 0.0):
    """Solve the quadratic from the ray's closest approach to the primitive's centre: the
    coefficients then stay small and float32 keeps depth exact to ~1e-7 relative (from a
    far-away origin, c = |o|^2 - r^2 cancels catastrophically for thin primitives)."""

    def wrapped(o, d, s):
        c = torch.tensor([0.0, 0.0, centre_z(s)], dtype=o.dtype)
        t0 = -((o - c) * d).sum(-1)
        return fn(o + t0[:, None] * d, d, s, tmin=T_EPS - t0) + t0

    return wrapped


_INTERSECT = {"sphere": _sphere, "box": _box, "cylinder": _recentred(_cylinder), "cone": _recentred(_cone, lambda s: s[1] / 2),
              "plane": _plane, "torus": _torus, "capsule": _recentred(_capsule)}


def _normal_local(shape: str, p, s):
    """Outward normal at a local surface point."""
    if shape == "sphere":
        n = p
    elif shape == "box":
        h = torch.tensor(s[:3], dtype=p.dtype)
        rel = p.abs() / h
        ax = rel.argmax(-1)
        n = torch.zeros_like(p)
        n.scatter_(1, ax[:, None], torch.sign(p.gather(1, ax[:, None])))
    elif shape in ("cylinder", "cone"):
        r, hh = s[0], s[1]
        rho = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2).clamp(min=1e-12)
        if shape == "cylinder":
            side = torch.stack([p[:, 0], p[:, 1], torch.zeros_like(rho)], -1)
            cap = torch.stack([torch.zeros_like(rho), torch.zeros_like(rho), torch.sign(p[:, 2])], -1)
            d_side = (rho - r).abs()
            d_cap = (p[:, 2].abs() - hh).abs()
        else:
            k = r / hh
            side = torch.stack([p[:, 0], p[:, 1], k * rho], -1)
            cap = torch.zeros_like(p)
            cap[:, 2] = -1.0
            d_side = (rho - k * (hh - p[:, 2])).abs() / math.sqrt(1 + k * k)
            d_cap = p[:, 2].abs()
        n = torch.where((d_cap < d_side)[:, None], cap, side)
    elif shape == "plane":
        n = torch.zeros_like(p)
        n[:, 2] = 1.0
    elif shape == "torus":
        R = s[0]
        rho = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2).clamp(min=1e-12)
        c = torch.stack([p[:, 0] / rho * R, p[:, 1] / rho * R, torch.zeros_like(rho)], -1)
        n = p - c
    elif shape == "capsule":
        c = torch.zeros_like(p)
        c[:, 2] = p[:, 2].clamp(-s[1], s[1])
        n = p - c
    else:
        raise ValueError(shape)
    return n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# ----------------------------------------------------------------------------- scene
class TorchScene:
    """A :class:`FlatScene` as float32 tensors plus per-primitive python scalars."""

    def __init__(self, fs: FlatScene):
        self.fs = fs
        self.n = len(fs)
        f32 = torch.float32
        self.rot = torch.as_tensor(fs.rot, dtype=f32)
        self.trans = torch.as_tensor(fs.trans, dtype=f32)
        self.bcenter = torch.as_tensor(fs.bcenter, dtype=f32)
        self.bradius = torch.as_tensor(fs.bradius, dtype=f32)
        self.tex = torch.as_tensor(fs.tex)
        self.color = torch.as_tensor(fs.color, dtype=f32)
        self.color2 = torch.as_tensor(fs.color2, dtype=f32)
        self.tscale = torch.as_tensor(fs.tscale, dtype=f32)
        self.taxis = torch.as_tensor(fs.taxis)
        self.emit = torch.as_tensor(fs.emit, dtype=f32)
        self.ids = torch.as_tensor(fs.ids, dtype=torch.int32)
        self.shapes = [SHAPES[int(c)] for c in fs.shape]
        self.sizes = [tuple(float(v) for v in row) for row in fs.size]
        self.background = torch.as_tensor(fs.background, dtype=f32)


def trace(sc: TorchScene, o, d, tmax=None, chunk: Optional[int] = None):
    """Nearest hit of rays ``o + t d`` (d unit, [N,3]) with ``t < tmax``.

    Returns ``t`` [N] (tmax or inf where nothing is hit) and the primitive index [N]
    (-1 = nothing). Rays should come in spatially coherent order (they are bounded in
    consecutive chunks of ``chunk``).
    """
    n = o.shape[0]
    chunk = chunk or CHUNK
    if tmax is None:
        tmax = torch.full((n,), _INF, dtype=o.dtype)
    if n == 0 or sc.n == 0:
        return tmax.clone(), torch.full((n,), -1, dtype=torch.int64)
    c = -(-n // chunk)
    pad = c * chunk - n
    if pad:
        o = torch.cat([o, o[-1:].expand(pad, 3)])
        d = torch.cat([d, d[-1:].expand(pad, 3)])
        tmax = torch.cat([tmax, tmax[-1:].expand(pad)])
    O = o.view(c, chunk, 3)
    D = d.view(c, chunk, 3)
    best = tmax.view(c, chunk).clone()
    pid = torch.full((c, chunk), -1, dtype=torch.int64)

    # chunk bounds: origins in ball(m, rho), directions within angle of axis a, t <= L
    m = O.mean(1)
    rho = (O - m[:, None]).norm(dim=-1).amax(1)
    a = D.sum(1)
    a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cosb = (D * a[:, None]).sum(-1).amin(1).clamp(-1.0, 1.0)
    k = torch.sqrt(torch.clamp(2.0 - 2.0 * cosb, min=0.0))[:, None]
    L = torch.nan_to_num(best.amax(1), posinf=FAR).clamp(max=FAR)[:, None]
    v = sc.bcenter[None] - m[:, None]  # [C,P,3]
    s = (v * a[:, None]).sum(-1)
    q = (v - s[..., None] * a[:, None]).norm(dim=-1)
    topt = (s + k * q / torch.sqrt(torch.clamp(1.0 - k * k, min=1e-6))).clamp(min=0.0)
    topt = torch.minimum(topt, L)
    f = (v - topt[..., None] * a[:, None]).norm(dim=-1) - k * topt
    slack = rho[:, None] + sc.bradius[None] * 1.001 + 1e-3
    cand = (f <= slack) | (k > 0.95)

    any_p = cand.any(0).nonzero().flatten().tolist()
    flat_best = best.view(-1)
    flat_pid = pid.view(-1)
    for p in any_p:
        idx = cand[:, p].nonzero().flatten()
        if idx.numel() == c:
            ridx = None
            oo, dd = o, d
        else:
            ridx = (idx[:, None] * chunk + torch.arange(chunk)[None]).flatten()
            oo = o.index_select(0, ridx)
            dd = d.index_select(0, ridx)
        # per-ray bounding-sphere test, then the exact intersection on the survivors
        cc = sc.bcenter[p] - oo
        bb = (cc * dd).sum(-1)
        r = float(sc.bradius[p]) * 1.001 + 1e-4
        perp2 = (cc * cc).sum(-1) - bb * bb
        cur = flat_best if ridx is None else flat_best.index_select(0, ridx)
        keep = ((perp2 <= r * r) & (bb + r > 0) & (bb - r < cur)).nonzero().flatten()
        if keep.numel() == 0:
            continue
        R = sc.rot[p]
        ol = (oo.index_select(0, keep) - sc.trans[p]) @ R
        dl = dd.index_select(0, keep) @ R
        t = _INTERSECT[sc.shapes[p]](ol, dl, sc.sizes[p])
        gidx = keep if ridx is None else ridx.index_select(0, keep)
        cur = flat_best.index_select(0, gidx)
        better = t < cur
        if bool(better.any()):
            sel = better.nonzero().flatten()
            gsel = gidx.index_select(0, sel)
            flat_best.index_copy_(0, gsel, t.index_select(0, sel))
            flat_pid.index_fill_(0, gsel, p)
    return best.view(-1)[:n], pid.view(-1)[:n]


def surface(sc: TorchScene, o, d, t, pid):
    """Local hit points and world normals (facing the ray) for hit rays (pid >= 0)."""
    n = o.shape[0]
    pl = torch.zeros((n, 3), dtype=o.dtype)
    nw = torch.zeros((n, 3), dtype=o.dtype)
    hit = pid >= 0
    if not bool(hit.any()):
        return pl, nw
    pw = o + torch.where(hit, t, torch.zeros_like(t))[:, None] * d
    order = torch.argsort(pid, stable=True)
    counts = torch.bincount(pid[hit], minlength=sc.n).tolist()
    start = int((~hit).sum())
    for p, cnt in enumerate(counts):
        if cnt == 0:
            continue
        sel = order[start : start + cnt]
        start += cnt
        R = sc.rot[p]
        loc = (pw[sel] - sc.trans[p]) @ R
        pl[sel] = loc
        nw[sel] = _normal_local(sc.shapes[p], loc, sc.sizes[p]) @ R.T
    facing = (nw * d).sum(-1) > 0
    nw = torch.where(facing[:, None], -nw, nw)
    return pl, nw


def _hash3(ix, iy, iz, seed: int):
    h = ix * 73856093 ^ iy * 19349663 ^ iz * 83492791 ^ (seed * 2654435761 & 0x7FFFFFFF)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 0xFFFF).to(torch.float32) / 65535.0


def value_noise(x, seed: int):
    """Trilinear value noise in [0,1] of points x [N,3] (deterministic lattice hash)."""
    fl = torch.floor(x)
    i = fl.to(torch.int64)
    f = x - fl
    u = f * f * (3 - 2 * f)
    out = torch.zeros(x.shape[0], dtype=x.dtype)
    for dx in (0, 1):
        wx = u[:, 0] if dx else 1 - u[:, 0]
        for dy in (0, 1):
            wy = u[:, 1] if dy else 1 - u[:, 1]
            for dz in (0, 1):
                wz = u[:, 2] if dz else 1 - u[:, 2]
                out = out + wx * wy * wz * _hash3(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, seed)
    return out


def albedo(sc: TorchScene, pl, pid):
    """Procedural texture colour at local points of primitives ``pid`` (all >= 0)."""
    x = pl * sc.tscale[pid][:, None] + 1e-3  # offset: faces at round coordinates (z=0 planes) stay on one side
    kind = sc.tex[pid]
    w = torch.zeros(pl.shape[0], dtype=pl.dtype)
    checker = torch.remainder(torch.floor(x).sum(-1), 2.0)
    stripes = torch.remainder(torch.floor(x.gather(1, sc.taxis[pid][:, None]).squeeze(1)), 2.0)
    w = torch.where(kind == 1, checker, w)
    w = torch.where(kind == 2, stripes, w)
    if bool((kind == 3).any()):
        sel = (kind == 3).nonzero().flatten()
        xs = x[sel]
        nz = 0.65 * value_noise(xs, sc.fs.seed) + 0.35 * value_noise(2.03 * xs + 17.0, sc.fs.seed + 1)
        w[sel] = nz
    return sc.color[pid] * (1 - w)[:, None] + sc.color2[pid] * w[:, None]


def shade(sc: TorchScene, o, d, t, pid, normals_out=None):
    """Colour of rays given their hits: Lambert + ambient, hard shadows, emission.
    ``normals_out`` ([N,3], optional) receives the world normals of the hits."""
    n = o.shape[0]
    hit = pid >= 0
    col = sc.background.expand(n, 3).clone()
    hidx = hit.nonzero().flatten()
    if hidx.numel() == 0:
        return col
    o, d, t, p = o[hidx], d[hidx], t[hidx], pid[hidx]
    pl, nw = surface(sc, o, d, t, p)
    if normals_out is not None:
        normals_out[hidx] = nw
    pw = o + t[:, None] * d
    alb = albedo(sc, pl, p)
    light = torch.full((hidx.numel(), 3), float(sc.fs.ambient), dtype=o.dtype)
    for lt in sc.fs.lights:
        if lt.kind == "directional":
            ldir = torch.tensor(lt.vec, dtype=o.dtype)
            ldir = (ldir / ldir.norm()).expand_as(pw)
            dist = torch.full((pw.shape[0],), FAR, dtype=o.dtype)
        elif lt.kind == "point":
            delta = torch.tensor(lt.vec, dtype=o.dtype) - pw
            dist = delta.norm(dim=-1)
            ldir = delta / dist[:, None].clamp(min=1e-9)
        else:
            raise ValueError(f"unknown light kind {lt.kind!r}")
        ndl = (nw * ldir).sum(-1).clamp(min=0.0)
        lit = (ndl > 0).nonzero().flatten()
        if lit.numel():
            so = pw[lit] + nw[lit] * SHADOW_OFFSET
            ts, ps = trace(sc, so, ldir[lit], (dist[lit] - 2 * SHADOW_OFFSET).clamp(min=0.0))
            ndl[lit] = torch.where(ps >= 0, torch.zeros_like(ts), ndl[lit])
        light = light + ndl[:, None] * (lt.intensity * torch.tensor(lt.color, dtype=o.dtype))
    c = alb * light + alb * sc.emit[p][:, None]
    col[hidx] = c.clamp(0.0, 1.0)
    return col


# ----------------------------------------------------------------------------- cameras
def _tile_order(W: int, H: int, tile: Optional[int] = None):
    """Pixel linear indices (y*W+x) ordered tile by tile (row-major inside tiles)."""
    tile = tile or TILE
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    key = ((ys // tile) * ((W + tile - 1) // tile) + xs // tile) * (tile * tile) + (ys % tile) * tile + xs % tile
    return torch.argsort(key.flatten())


def camera_rays(K, viewmat, u, v):
    """World rays through pixel coordinates (u, v) (pixel centres at i + 0.5).

    Returns origins [N,3], unit directions [N,3] and ``zfac`` [N] with z-depth = t * zfac.
    """
    K = np.asarray(K, dtype=np.float64)
    c2w = np.linalg.inv(np.asarray(viewmat, dtype=np.float64))
    f32 = torch.float32
    x = (u.to(torch.float64) - K[0, 2]) / K[0, 0]
    y = (v.to(torch.float64) - K[1, 2]) / K[1, 1]
    dc = torch.stack([x, y, torch.ones_like(x)], -1)
    nrm = dc.norm(dim=-1)
    dc = dc / nrm[:, None]
    dw = (dc @ torch.as_tensor(c2w[:3, :3]).T).to(f32)
    dw = dw / dw.norm(dim=-1, keepdim=True)
    o = torch.as_tensor(c2w[:3, 3], dtype=f32).expand(dw.shape[0], 3).contiguous()
    return o, dw, (1.0 / nrm).to(f32)


def cast_pixels(sc: TorchScene, K, viewmat, uv) -> Dict[str, torch.Tensor]:
    """Exact z-depth, primitive and label ids at arbitrary pixel coordinates uv [N,2]."""
    uv = torch.as_tensor(uv)
    o, d, zf = camera_rays(K, viewmat, uv[:, 0], uv[:, 1])
    with single_thread():
        t, pid = trace(sc, o, d)
    hit = pid >= 0
    depth = torch.where(hit, t * zf, torch.zeros_like(t))
    ids = torch.where(hit[:, None], sc.ids[pid.clamp(min=0)], torch.zeros(1, 3, dtype=torch.int32))
    return {"depth": depth, "prim": pid, "labels": ids.T.contiguous()}


class single_thread:
    """Run torch on one intra-op thread: these ops are small (a few 100k elements), where
    thread start-up and contention cost far more than they save (100x on a busy 2-core
    machine); parallelism, if any, belongs across views."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def render_view(sc, K, viewmat, width: int, height: int, aa: int = 2,
                contrast: float = 0.15) -> Dict[str, torch.Tensor]:
    """Render one view; see the module docstring for the outputs."""
    with single_thread():
        return _render_view(sc, K, viewmat, width, height, aa, contrast)


def _render_view(sc, K, viewmat, width, height, aa, contrast):
    if isinstance(sc, FlatScene):
        sc = TorchScene(sc)
    W, H = int(width), int(height)
    order = _tile_order(W, H)
    ys = (order // W).to(torch.float64) + 0.5
    xs = (order % W).to(torch.float64) + 0.5
    o, d, zf = camera_rays(K, viewmat, xs, ys)
    t, pid = trace(sc, o, d)
    nrm = torch.zeros((o.shape[0], 3), dtype=torch.float32)
    col = shade(sc, o, d, t, pid, normals_out=nrm)
    hit = pid >= 0
    npx = W * H
    img = torch.empty((npx, 3), dtype=torch.float32)
    img[order] = col
    depth = torch.zeros(npx, dtype=torch.float32)
    depth[order] = torch.where(hit, t * zf, torch.zeros_like(t))
    prim = torch.empty(npx, dtype=torch.int64)
    prim[order] = pid
    normal = torch.zeros((npx, 3), dtype=torch.float32)
    normal[order] = nrm
    ids = torch.where(hit[:, None], sc.ids[pid.clamp(min=0)], torch.zeros(1, 3, dtype=torch.int32))
    labels = torch.zeros((npx, 3), dtype=torch.int32)
    labels[order] = ids

    if aa > 1:
        img2 = img.view(H, W, 3)
        pr = prim.view(H, W)
        edge = torch.zeros((H, W), dtype=torch.bool)
        dh = (pr[:, 1:] != pr[:, :-1]) | ((img2[:, 1:] - img2[:, :-1]).abs().amax(-1) > contrast)
        dv = (pr[1:] != pr[:-1]) | ((img2[1:] - img2[:-1]).abs().amax(-1) > contrast)
        edge[:, 1:] |= dh
        edge[:, :-1] |= dh
        edge[1:] |= dv
        edge[:-1] |= dv
        rank = torch.empty(npx, dtype=torch.int64)
        rank[order] = torch.arange(npx)
        epix = edge.flatten().nonzero().flatten()
        if epix.numel():
            epix = epix[torch.argsort(rank[epix])]
            offs = [((i + 0.5) / aa, (j + 0.5) / aa) for j in range(aa) for i in range(aa)]
            centre = aa % 2 == 1
            if centre:
                offs = [ofs for ofs in offs if not (abs(ofs[0] - 0.5) < 1e-9 and abs(ofs[1] - 0.5) < 1e-9)]
            offs_t = torch.tensor(offs, dtype=torch.float64)  # [S,2]
            ex = (epix % W).to(torch.float64)[:, None] + offs_t[None, :, 0]
            ey = (epix // W).to(torch.float64)[:, None] + offs_t[None, :, 1]
            o2, d2, _ = camera_rays(K, viewmat, ex.flatten(), ey.flatten())
            t2, p2 = trace(sc, o2, d2)
            c2 = shade(sc, o2, d2, t2, p2).view(epix.numel(), len(offs), 3)
            acc = c2.sum(1)
            cnt = len(offs)
            if centre:
                acc = acc + img[epix]
                cnt += 1
            img[epix] = acc / cnt

    return {
        "rgb": img.view(H, W, 3),
        "depth": depth.view(H, W),
        "instance": labels[:, 0].view(H, W).clone(),
        "labels": labels.T.reshape(3, H, W).contiguous(),
        "normal": normal.view(H, W, 3),
        "prim": prim.view(H, W),
    }
