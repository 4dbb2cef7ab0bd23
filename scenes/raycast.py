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

Tracing works on (ray, primitive) *pairs*, never looping over primitives in Python:

1. rays come in spatially coherent order (16x16 pixel tiles) and are bounded in chunks
   (axis-aligned boxes of origins and directions + the longest ray); a hierarchy of chunk
   sizes (e.g. 128 then 32 rays) keeps, per chunk, only the primitives whose tight local
   bounding box it can reach (an interval slab test in the primitive's frame);
2. the surviving pairs are expanded to single rays and tested against the bounding sphere
   and then the local bounding box, so elongated or flat parts (table legs, lamp arm,
   shelves) cost only where they are;
3. exact intersections run once per shape *type* on all remaining pairs at once (per-pair
   sizes), and the nearest hit per ray is a scatter-min (ties: the lowest primitive index);
   shadow rays only ask whether anything is hit.

The culling tests are conservative (padded), and every quantity that reaches the output is
computed from the rays with elementwise ops only (no matmul), so a ray's result does not depend on which
rays it is traced with: output is deterministic and identical for any chunking or worker
count.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from langfield.scenes.model import SHAPES, FlatScene

T_EPS = 1e-5  # smallest accepted ray parameter
SHADOW_OFFSET = 5e-4  # shadow rays start this far above the surface (metres)
FAR = 1e4
TILE = 16
# chunk sizes (rays bounded together), coarse to fine; the first level is tested densely
# against every primitive, each next one only against its parent's survivors
LEVELS_FEW = (128, 32)
LEVELS_MANY = (1024, 128, 32)
MANY_PRIMS = 48  # from this many primitives on, use LEVELS_MANY
MAX_PAIRS = 1 << 21

_INF = float("inf")


# ----------------------------------------------------------------------------- shapes
# Every intersector takes local rays o, d [N,3] (d unit) and per-ray sizes s [N,3].
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


def _dot(a, b):
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _sphere(o, d, s, tmin=T_EPS, r=None):
    r = s[:, 0] if r is None else r
    b = _dot(o, d)
    perp = o - b[:, None] * d
    h = r * r - _dot(perp, perp)
    ok = h >= 0
    sh = torch.sqrt(torch.clamp(h, min=0.0))
    return _first((-b - sh, ok), (-b + sh, ok), tmin=tmin)


def _box(o, d, s):
    h = s
    inv = 1.0 / d
    t1 = (-h - o) * inv
    t2 = (h - o) * inv
    tn = torch.minimum(t1, t2).nan_to_num(-_INF).amax(-1)
    tf = torch.maximum(t1, t2).nan_to_num(_INF).amin(-1)
    ok = tf >= tn
    return _first((tn, ok), (tf, ok))


def _cylinder(o, d, s, tmin=T_EPS):
    r, hh = s[:, 0], s[:, 1]
    ox, oy, oz = o[:, 0], o[:, 1], o[:, 2]
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    c = ox * ox + oy * oy - r * r
    t1, t2, ok = _roots(a, b, c)
    z1 = oz + t1 * dz
    z2 = oz + t2 * dz
    tc1 = (hh - oz) / dz
    tc2 = (-hh - oz) / dz

    def in_disc(t):
        x = ox + t * dx
        y = oy + t * dy
        return x * x + y * y <= r * r

    return _first((t1, ok & (z1.abs() <= hh)), (t2, ok & (z2.abs() <= hh)), (tc1, in_disc(tc1)), (tc2, in_disc(tc2)),
                  tmin=tmin)


def _cone(o, d, s, tmin=T_EPS):
    r, h = s[:, 0], s[:, 1]
    ox, oy, oz = o[:, 0], o[:, 1], o[:, 2]
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    k2 = (r / h) ** 2
    hz = h - oz
    ndz = -dz
    a = dx * dx + dy * dy - k2 * ndz * ndz
    b = ox * dx + oy * dy - k2 * hz * ndz
    c = ox * ox + oy * oy - k2 * hz * hz
    t1, t2, ok = _roots(a, b, c)

    def on_side(t):
        z = oz + t * dz
        return ok & (z >= 0) & (z <= h)

    tb = -oz / dz
    xb = ox + tb * dx
    yb = oy + tb * dy
    return _first((t1, on_side(t1)), (t2, on_side(t2)), (tb, xb * xb + yb * yb <= r * r), tmin=tmin)


def _plane(o, d, s):
    t = -o[:, 2] / d[:, 2]
    x = o[:, 0] + t * d[:, 0]
    y = o[:, 1] + t * d[:, 1]
    return _first((t, (x.abs() <= s[:, 0]) & (y.abs() <= s[:, 1])))


def _capsule(o, d, s, tmin=T_EPS):
    r, hh = s[:, 0], s[:, 1]
    ox, oy, oz = o[:, 0], o[:, 1], o[:, 2]
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    c = ox * ox + oy * oy - r * r
    t1, t2, ok = _roots(a, b, c)
    z1 = oz + t1 * dz
    z2 = oz + t2 * dz
    off = torch.zeros_like(o)
    off[:, 2] = hh
    return torch.minimum(
        _first((t1, ok & (z1.abs() <= hh)), (t2, ok & (z2.abs() <= hh)), tmin=tmin),
        torch.minimum(_sphere(o - off, d, s, tmin, r=r), _sphere(o + off, d, s, tmin, r=r)),
    )


def _cubic_max_root(b, c, e):
    """Largest real root of m^3 + b m^2 + c m + e (float64, vectorised), Newton-polished."""
    p = c - b * b / 3
    q = 2 * b ** 3 / 27 - b * c / 3 + e
    disc = (q / 2) ** 2 + (p / 3) ** 3
    sq = torch.sqrt(torch.clamp(disc, min=0.0))
    one = torch.sign(-q / 2 + sq) * torch.abs(-q / 2 + sq) ** (1 / 3) + torch.sign(-q / 2 - sq) * torch.abs(-q / 2 - sq) ** (1 / 3)
    rr = torch.sqrt(torch.clamp(-p / 3, min=0.0))
    cos = torch.clamp(-q / 2 / torch.clamp(rr ** 3, min=1e-300), -1.0, 1.0)
    three = 2 * rr * torch.cos(torch.acos(cos) / 3)
    m = torch.where(disc > 0, one, three) - b / 3
    for _ in range(2):
        f = ((m + b) * m + c) * m + e
        df = (3 * m + 2 * b) * m + c
        m = torch.where(df.abs() > 1e-30, m - f / torch.where(df.abs() > 1e-30, df, torch.ones_like(df)), m)
    return m


def _torus(o, d, s):
    """Exact ray-torus hit: the quartic in the ray parameter, taken from the ray's closest
    approach to the centre (so it has no cubic term) and scaled by R + r, is solved in
    float64 by Ferrari's method (resolvent cubic, two quadratics) and Newton-polished."""
    f64 = torch.float64
    R, r = s[:, 0].to(f64), s[:, 1].to(f64)
    o, d = o.to(f64), d.to(f64)
    dn = torch.sqrt(_dot(d, d))
    d = d / dn[:, None]
    t0 = -_dot(o, d)
    oc = o + t0[:, None] * d
    c0 = _dot(oc, oc)
    L = R + r
    # in units of L: u = t / L
    R2 = (R / L) ** 2
    k = c0 / (L * L) + R2 - (r / L) ** 2
    ox, oy = oc[:, 0] / L, oc[:, 1] / L
    a2 = d[:, 0] ** 2 + d[:, 1] ** 2
    a1 = ox * d[:, 0] + oy * d[:, 1]
    a0 = ox * ox + oy * oy
    P = 2 * k - 4 * R2 * a2
    Q = -8 * R2 * a1
    S = k * k - 4 * R2 * a0
    m = torch.clamp(_cubic_max_root(P, P * P / 4 - S, -Q * Q / 8), min=0.0)
    sm = torch.sqrt(2 * m)
    w_div = Q / (2 * torch.where(sm > 1e-4, sm, torch.ones_like(sm)))
    w_sq = torch.sign(Q) * torch.sqrt(torch.clamp((P / 2 + m) ** 2 - S, min=0.0))
    w = torch.where(sm > 1e-4, w_div, w_sq)
    cands = []
    for B, C in ((-sm, P / 2 + m + w), (sm, P / 2 + m - w)):
        disc = B * B / 4 - C
        ok = disc >= 0
        sq = torch.sqrt(torch.clamp(disc, min=0.0))
        for u in (-B / 2 - sq, -B / 2 + sq):
            for _ in range(2):
                g = ((u * u + P) * u + Q) * u + S
                dg = (4 * u * u + 2 * P) * u + Q
                safe = dg.abs() > 1e-12
                u = torch.where(safe, u - g / torch.where(safe, dg, torch.ones_like(dg)), u)
            cands.append(((u * L + t0) / dn, ok & (c0 <= L * L * 1.0001)))
    t = _first(*((tt.to(torch.float32), ok) for tt, ok in cands))
    return t


def _recentred(fn, centre_z=None):
    """Solve the quadratic from the ray's closest approach to the primitive's centre: the
    coefficients then stay small and float32 keeps depth exact to ~1e-7 relative (from a
    far-away origin, c = |o|^2 - r^2 cancels catastrophically for thin primitives)."""

    def wrapped(o, d, s):
        if centre_z is None:
            t0 = -_dot(o, d)
        else:
            c = torch.zeros_like(o)
            c[:, 2] = centre_z(s)
            t0 = -_dot(o - c, d)
        return fn(o + t0[:, None] * d, d, s, tmin=T_EPS - t0) + t0

    return wrapped


_INTERSECT = {"sphere": _sphere, "box": _box, "cylinder": _recentred(_cylinder),
              "cone": _recentred(_cone, lambda s: s[:, 1] / 2), "plane": _plane, "torus": _torus,
              "capsule": _recentred(_capsule)}


def _local_box(shape: str, s) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """Tight local-frame bounding box (lo, hi) of a primitive."""
    if shape == "sphere":
        e = (s[0], s[0], s[0])
        return tuple(-v for v in e), e
    if shape == "box":
        return (-s[0], -s[1], -s[2]), (s[0], s[1], s[2])
    if shape == "cylinder":
        return (-s[0], -s[0], -s[1]), (s[0], s[0], s[1])
    if shape == "cone":
        return (-s[0], -s[0], 0.0), (s[0], s[0], s[1])
    if shape == "plane":
        return (-s[0], -s[1], 0.0), (s[0], s[1], 0.0)
    if shape == "torus":
        e = s[0] + s[1]
        return (-e, -e, -s[1]), (e, e, s[1])
    if shape == "capsule":
        return (-s[0], -s[0], -s[1] - s[0]), (s[0], s[0], s[1] + s[0])
    raise ValueError(shape)


def _normal_local(shape: str, p, s):
    """Outward normal at local surface points p [N,3] (per-point sizes s [N,3])."""
    if shape == "sphere":
        n = p
    elif shape == "box":
        rel = p.abs() / s
        ax = rel.argmax(-1)
        n = torch.zeros_like(p)
        n.scatter_(1, ax[:, None], torch.sign(p.gather(1, ax[:, None])))
    elif shape in ("cylinder", "cone"):
        r, hh = s[:, 0], s[:, 1]
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
            d_side = (rho - k * (hh - p[:, 2])).abs() / torch.sqrt(1 + k * k)
            d_cap = p[:, 2].abs()
        n = torch.where((d_cap < d_side)[:, None], cap, side)
    elif shape == "plane":
        n = torch.zeros_like(p)
        n[:, 2] = 1.0
    elif shape == "torus":
        R = s[:, 0]
        rho = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2).clamp(min=1e-12)
        c = torch.stack([p[:, 0] / rho * R, p[:, 1] / rho * R, torch.zeros_like(rho)], -1)
        n = p - c
    elif shape == "capsule":
        c = torch.zeros_like(p)
        c[:, 2] = torch.minimum(torch.maximum(p[:, 2], -s[:, 1]), s[:, 1])
        n = p - c
    else:
        raise ValueError(shape)
    return n / torch.sqrt(_dot(n, n)).clamp(min=1e-12)[:, None]


def _to_local(x, R):
    """x [...,3] (world offsets) times per-row rotations R [...,3,3]: x @ R, elementwise."""
    return x[..., 0:1] * R[..., 0, :] + x[..., 1:2] * R[..., 1, :] + x[..., 2:3] * R[..., 2, :]


def _to_world(n, R):
    """Per-row R @ n (local directions to world), elementwise."""
    return n[:, 0:1] * R[:, :, 0] + n[:, 1:2] * R[:, :, 1] + n[:, 2:3] * R[:, :, 2]


# ----------------------------------------------------------------------------- scene
class TorchScene:
    """A :class:`FlatScene` as float32 tensors (plus per-primitive local bounding boxes)."""

    def __init__(self, fs: FlatScene):
        self.fs = fs
        self.n = len(fs)
        f32 = torch.float32
        self.rot = torch.as_tensor(fs.rot, dtype=f32).reshape(-1, 3, 3)
        self.trans = torch.as_tensor(fs.trans, dtype=f32).reshape(-1, 3)
        self.bcenter = torch.as_tensor(fs.bcenter, dtype=f32).reshape(-1, 3)
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
        self.code = torch.as_tensor(np.asarray(fs.shape), dtype=torch.int64).reshape(-1)
        self.size = torch.as_tensor(fs.size, dtype=f32).reshape(-1, 3)
        # local bounding boxes (centre, half extents), padded against float error
        lo = np.zeros((self.n, 3))
        hi = np.zeros((self.n, 3))
        for i, (sh, s) in enumerate(zip(self.shapes, self.sizes)):
            lo[i], hi[i] = _local_box(sh, s)
        half = (hi - lo) / 2
        # float32 rounding of local coordinates is ~1e-7 of their magnitude: pad by far more
        pad = 2e-5 + 1e-6 * (np.abs(np.asarray(fs.trans).reshape(-1, 3)).max(1, keepdims=True) + half.max(1, keepdims=True))
        self.bmid = torch.as_tensor((hi + lo) / 2, dtype=f32).reshape(-1, 3)
        self.bhalf = torch.as_tensor(half + pad, dtype=f32).reshape(-1, 3)
        self.absrot = self.rot.abs()
        self.rsphere = self.bradius * 1.001 + 1e-4  # per-ray sphere test radius
        # the same per-primitive data as contiguous 1-D columns (fast gathers and elementwise ops)
        self.bcx, self.bcy, self.bcz = (x.contiguous() for x in self.bcenter.unbind(1))
        self.rcols = [self.rot[:, i, j].contiguous() for i in range(3) for j in range(3)]
        self.tcols = [x.contiguous() for x in self.trans.unbind(1)]
        self.mcols = [x.contiguous() for x in self.bmid.unbind(1)]
        self.hcols = [x.contiguous() for x in self.bhalf.unbind(1)]
        self.scols = [x.contiguous() for x in self.size.unbind(1)]
        self.present = sorted({int(c) for c in np.asarray(fs.shape).reshape(-1)})


def _chunk_bounds(cols, tmax, cs):
    """Axis-aligned bounds of consecutive chunks of ``cs`` rays: origin box (centre, half
    extents), direction box (centre, half extents) and the largest ray parameter L.
    ``cols``: the six ray components (ox, oy, oz, dx, dy, dz) as contiguous 1-D tensors."""
    lo = torch.stack([c.view(-1, cs).amin(1) for c in cols], -1)
    hi = torch.stack([c.view(-1, cs).amax(1) for c in cols], -1)
    mid, half = (lo + hi) * 0.5, (hi - lo) * 0.5
    L = torch.nan_to_num(tmax.view(-1, cs).amax(1), posinf=FAR).clamp(max=FAR)
    return mid[:, :3], half[:, :3], mid[:, 3:], half[:, 3:], L


def _slab_test(mo, eo, md, ed, L, R, absR, trans, bmid, bhalf):
    """Can a ray of a chunk hit a primitive's local bounding box?

    Interval slab test: in the primitive's frame every ray of the chunk has, per axis j,
    ``o_j in [m_j - e_j, m_j + e_j]`` and ``d_j in [a_j - w_j, a_j + w_j]`` (the chunk's
    world boxes, rotated: half extents grow to ``|R|^T e``), so its point at ``t >= 0``
    lies in ``[m_j - e_j + t (a_j - w_j), m_j + e_j + t (a_j + w_j)]``; a hit needs a ``t``
    in [0, L] where all three intervals meet the box. Arguments broadcast (pairs or [C,P]
    grids); returns a bool mask.
    """
    ml = _to_local(mo - trans, R) - bmid
    el = _to_local(eo, absR)
    al = _to_local(md, R)
    wl = _to_local(ed, absR)
    # constraints alpha + beta t <= 0: the lower end below the box top, the upper end above its bottom
    alpha = torch.cat([ml - el - bhalf, -bhalf - ml - el], -1)
    beta = torch.cat([al - wl, -al - wl], -1)
    tb = -alpha / beta
    lo = torch.where(beta < 0, tb, torch.zeros_like(tb)).amax(-1).clamp(min=0.0)
    hi = torch.where(beta > 0, tb, torch.full_like(tb, _INF)).amin(-1)
    hi = torch.minimum(hi, L)
    bad = ((beta == 0) & (alpha > 0)).any(-1)
    return (lo <= hi) & ~bad


def _levels(sc: TorchScene, n: int):
    sizes = LEVELS_MANY if sc.n >= MANY_PRIMS else LEVELS_FEW
    while len(sizes) > 1 and n < 2 * sizes[0]:
        sizes = sizes[1:]
    return sizes


def _candidates(sc: TorchScene, cols, tmax, n):
    """(chunk index, primitive index) pairs at the finest chunk level whose
    bounds can touch the primitive's local bounding box. o, d, tmax are padded."""
    sizes = _levels(sc, n)
    ci = pi = None
    prev = None
    for cs in sizes:
        mo, eo, md, ed, L = _chunk_bounds(cols, tmax, cs)
        if ci is None:  # dense first level: [C, P]
            ok = _nz(_slab_test(mo[:, None], eo[:, None], md[:, None], ed[:, None], L[:, None], sc.rot[None],
                                sc.absrot[None], sc.trans[None], sc.bmid[None], sc.bhalf[None]).flatten())
            ci, pi = ok // sc.n, ok % sc.n
        else:
            f = prev // cs
            ci = (ci[:, None] * f + torch.arange(f)[None]).flatten()
            pi = pi.repeat_interleave(f)
            ok = _nz(_slab_test(mo[ci], eo[ci], md[ci], ed[ci], L[ci], sc.rot[pi], sc.absrot[pi], sc.trans[pi],
                                sc.bmid[pi], sc.bhalf[pi]))
            ci, pi = ci.index_select(0, ok), pi.index_select(0, ok)
        prev = cs
    return ci, pi


def _nz(mask):
    """Indices of the true entries of a 1-D bool tensor (numpy's is several times faster)."""
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _intersect_pairs(sc: TorchScene, rays, tmax, ri, pi):
    """Exact hits of the (ray, primitive) pairs: returns (ri, pi, t) of pairs hit at
    T_EPS < t < tmax, after a per-ray bounding-sphere and local bounding-box test.
    ``rays``: (o, d, ox, oy, oz, dx, dy, dz) with the components as contiguous 1-D tensors."""
    o, d, ox, oy, oz, dx, dy, dz = rays
    # bounding sphere (world frame; a conservative filter, so its rounding does not matter)
    cx = sc.bcx.index_select(0, pi) - ox.index_select(0, ri)
    cy = sc.bcy.index_select(0, pi) - oy.index_select(0, ri)
    cz = sc.bcz.index_select(0, pi) - oz.index_select(0, ri)
    bb = cx * dx.index_select(0, ri) + cy * dy.index_select(0, ri) + cz * dz.index_select(0, ri)
    r = sc.rsphere.index_select(0, pi)
    tm = tmax.index_select(0, ri)
    perp2 = cx * cx + cy * cy + cz * cz - bb * bb
    keep = _nz((perp2 <= r * r) & (bb > -r) & (bb - r < tm))
    ri, pi, tm = ri.index_select(0, keep), pi.index_select(0, keep), tm.index_select(0, keep)
    # local frame (component-wise: o @ R) + tight local bounding box (slab test)
    def g(col):
        return col.index_select(0, pi)

    R = [g(c) for c in sc.rcols]  # R00 R01 R02 R10 ... R22
    x = ox.index_select(0, ri) - g(sc.tcols[0])
    y = oy.index_select(0, ri) - g(sc.tcols[1])
    z = oz.index_select(0, ri) - g(sc.tcols[2])
    ol = [x * R[j] + y * R[3 + j] + z * R[6 + j] for j in range(3)]
    x, y, z = dx.index_select(0, ri), dy.index_select(0, ri), dz.index_select(0, ri)
    dl = [x * R[j] + y * R[3 + j] + z * R[6 + j] for j in range(3)]
    tn = tf = None
    for j in range(3):
        oc = ol[j] - g(sc.mcols[j])
        h = g(sc.hcols[j])
        inv = 1.0 / dl[j]
        t1 = (-h - oc) * inv
        t2 = (h - oc) * inv
        lo = torch.minimum(t1, t2).nan_to_num_(-_INF)
        hi = torch.maximum(t1, t2).nan_to_num_(_INF)
        tn = lo if tn is None else torch.maximum(tn, lo)
        tf = hi if tf is None else torch.minimum(tf, hi)
    keep = _nz((tf >= tn) & (tf > 0) & (tn < tm))
    ri, pi, tm = ri.index_select(0, keep), pi.index_select(0, keep), tm.index_select(0, keep)
    # [3,N] storage, used as [N,3] views whose columns are contiguous
    olT = torch.stack([c.index_select(0, keep) for c in ol])
    dlT = torch.stack([c.index_select(0, keep) for c in dl])
    sT = torch.stack([c.index_select(0, pi) for c in sc.scols])
    t = torch.full((ri.numel(),), _INF, dtype=o.dtype)
    code = sc.code.index_select(0, pi)
    for c in sc.present:
        if len(sc.present) == 1:
            t = _INTERSECT[SHAPES[c]](olT.T, dlT.T, sT.T)
            break
        sel = _nz(code == c)
        if sel.numel():
            t[sel] = _INTERSECT[SHAPES[c]](olT.index_select(1, sel).T, dlT.index_select(1, sel).T,
                                           sT.index_select(1, sel).T)
    hit = _nz(t < tm)
    return ri.index_select(0, hit), pi.index_select(0, hit), t.index_select(0, hit)


def trace(sc: TorchScene, o, d, tmax=None, chunk: Optional[int] = None, any_hit: bool = False):
    """Nearest hit of rays ``o + t d`` (d unit, [N,3]) with ``t < tmax``.

    Returns ``t`` [N] (tmax or inf where nothing is hit) and the primitive index [N]
    (-1 = nothing; on exact ties the lowest index). Rays should come in spatially coherent
    order (they are bounded in consecutive chunks). ``any_hit``: only whether something is
    hit (shadow rays): returns a bool [N] instead.
    """
    n = o.shape[0]
    if tmax is None:
        tmax = torch.full((n,), _INF, dtype=o.dtype)
    if n == 0 or sc.n == 0:
        if any_hit:
            return torch.zeros(n, dtype=torch.bool)
        return tmax.clone(), torch.full((n,), -1, dtype=torch.int64)
    sizes = _levels(sc, n)
    cs = sizes[-1]
    pad = -n % sizes[0]
    if pad:
        o = torch.cat([o, o[-1:].expand(pad, 3)])
        d = torch.cat([d, d[-1:].expand(pad, 3)])
        tmax = torch.cat([tmax, tmax[-1:].expand(pad)])
    cols = tuple(x.contiguous() for x in o.unbind(1)) + tuple(x.contiguous() for x in d.unbind(1))
    ci, pi = _candidates(sc, cols, tmax, n)
    rays = (o, d) + cols
    # expand chunk pairs to ray pairs, a block at a time
    step = max(1, MAX_PAIRS // cs)
    ar = torch.arange(cs)
    hits = []
    for s in range(0, ci.numel(), step):
        c, p = ci[s:s + step], pi[s:s + step]
        ri = (c[:, None] * cs + ar[None]).flatten()
        pr = p.repeat_interleave(cs)
        if pad:
            ok = _nz(ri < n)
            ri, pr = ri.index_select(0, ok), pr.index_select(0, ok)
        hits.append(_intersect_pairs(sc, rays, tmax, ri, pr))
    if not hits:  # no ray has a candidate primitive (tiny images can miss everything)
        if any_hit:
            return torch.zeros(n, dtype=torch.bool)
        return tmax[:n].clone(), torch.full((n,), -1, dtype=torch.int64)
    ri = torch.cat([h[0] for h in hits])
    pr = torch.cat([h[1] for h in hits])
    t = torch.cat([h[2] for h in hits])
    if any_hit:
        out = torch.zeros(n, dtype=torch.bool)
        out[ri] = True
        return out
    best = tmax[:n].clone()
    best.scatter_reduce_(0, ri, t, "amin")
    win = (t == best.index_select(0, ri)).nonzero().flatten()
    big = sc.n
    pid = torch.full((n,), big, dtype=torch.int64)
    pid.scatter_reduce_(0, ri[win], pr[win], "amin")
    pid[pid == big] = -1
    return best, pid


def surface(sc: TorchScene, o, d, t, pid):
    """Local hit points and world normals (facing the ray) for hit rays (pid >= 0)."""
    n = o.shape[0]
    pl = torch.zeros((n, 3), dtype=o.dtype)
    nw = torch.zeros((n, 3), dtype=o.dtype)
    hidx = (pid >= 0).nonzero().flatten()
    if hidx.numel() == 0:
        return pl, nw
    all_hit = hidx.numel() == n
    if not all_hit:
        o, d, t, pid = o[hidx], d[hidx], t[hidx], pid[hidx]
    pw = o + t[:, None] * d
    R = sc.rot.index_select(0, pid)
    loc = _to_local(pw - sc.trans.index_select(0, pid), R)
    nl = torch.zeros_like(loc)
    code = sc.code.index_select(0, pid)
    for c in sc.present:
        sel = (code == c).nonzero().flatten()
        if sel.numel():
            nl[sel] = _normal_local(SHAPES[c], loc[sel], sc.size.index_select(0, pid[sel]))
    nrm = _to_world(nl, R)
    facing = _dot(nrm, d) > 0
    nrm = torch.where(facing[:, None], -nrm, nrm)
    if all_hit:
        return loc, nrm
    pl[hidx] = loc
    nw[hidx] = nrm
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
            shadowed = trace(sc, so, ldir[lit], (dist[lit] - 2 * SHADOW_OFFSET).clamp(min=0.0), any_hit=True)
            ndl[lit] = torch.where(shadowed, torch.zeros_like(so[:, 0]), ndl[lit])
        light = light + ndl[:, None] * (lt.intensity * torch.tensor(lt.color, dtype=o.dtype))
    c = alb * light + alb * sc.emit[p][:, None]
    col[hidx] = c.clamp(0.0, 1.0)
    return col


# ----------------------------------------------------------------------------- cameras
@functools.lru_cache(maxsize=8)
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
