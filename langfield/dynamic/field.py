"""Deformation fields: (canonical position, t) -> deltas of means, rotations, log-scales.

Two kinds behind one module, :class:`DeformationField`:

* ``hexplane`` (default, 4DGS / K-planes style): six feature planes per resolution (xy, xz,
  yz over space; xt, yt, zt over space-time), sampled bilinearly with
  :func:`torch.nn.functional.grid_sample`, multiplied across the planes (Hadamard product)
  and concatenated across the resolutions; a small MLP head maps that to a per-Gaussian
  *deformation feature* and the deltas. Spatial planes start uniform in [0.1, 0.5], time
  planes at 1 (K-planes' initialisation), so the product starts as a pure function of space.
* ``mlp`` (Deformable-3DGS style): positional encoding of (x, t) into an MLP.

The output layer starts at zero: a fresh field deforms nothing, bit for bit (the canonical
parameters plus an exact 0). Positions are normalised by the box ``aabb`` fixed at creation
(the canonical Gaussians' bounds, padded); points outside it read the border of the planes.

``field(x, t)`` -> :class:`Deformation` (``means`` [N, 3], ``quats`` [N, 4] added to the raw
quaternion, ``scales`` [N, 3] added to the log-scales, optional ``opacities`` [N] added to the
logit and ``sh0`` [N, 3] to the DC colour, and ``feature`` [N, hidden], which the
time-sensitive language field reads).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DeformConfig", "Deformation", "DeformationField"]


@dataclass
class DeformConfig:
    """Options of a deformation field (stored in config.json ``model.deform``)."""

    kind: str = "hexplane"
    """``hexplane`` (space-time plane grid + MLP head) or ``mlp`` (positional encoding + MLP)."""
    resolutions: Tuple[int, ...] = (32, 64)
    """hexplane: spatial resolutions of the planes (one set of six planes each)."""
    time_resolution: int = 24
    """hexplane: samples along t of the space-time planes."""
    features: int = 16
    """hexplane: channels per plane."""
    hidden: int = 64
    """Width of the head (and of the deformation feature)."""
    layers: int = 1
    """Hidden layers of the head (hexplane) or of the MLP (mlp: ``layers`` + 1)."""
    pe_space: int = 8
    """mlp: positional-encoding frequencies of x."""
    pe_time: int = 6
    """mlp: positional-encoding frequencies of t."""
    opacity: bool = False
    """Also deform the opacity (logit)."""
    color: bool = False
    """Also deform the DC colour."""
    aabb: Optional[List[List[float]]] = None
    """[[x0, y0, z0], [x1, y1, z1]]: the box positions are normalised by (set at creation)."""

    def validate(self) -> None:
        if self.kind not in ("hexplane", "mlp"):
            raise ValueError(f"deform kind must be 'hexplane' or 'mlp', got {self.kind!r}")
        if self.kind == "hexplane":
            if not self.resolutions or any(int(r) < 2 for r in self.resolutions):
                raise ValueError(f"deform resolutions must be >= 2, got {list(self.resolutions)}")
            if self.time_resolution < 2:
                raise ValueError(f"deform time_resolution must be >= 2, got {self.time_resolution}")
            if self.features < 1:
                raise ValueError(f"deform features must be >= 1, got {self.features}")
        if self.hidden < 1 or self.layers < 0:
            raise ValueError(f"deform hidden must be >= 1 and layers >= 0, got {self.hidden}, {self.layers}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resolutions"] = [int(r) for r in self.resolutions]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeformConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown deformation options {unknown}")
        kw = dict(d)
        if "resolutions" in kw:
            kw["resolutions"] = tuple(int(r) for r in kw["resolutions"])
        return cls(**kw)


@dataclass
class Deformation:
    means: Tensor
    quats: Tensor
    scales: Tensor
    feature: Tensor
    opacities: Optional[Tensor] = None
    sh0: Optional[Tensor] = None


# plane pairs over (x, y, z, t) = (0, 1, 2, 3)
_PAIRS = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))


class DeformationField(nn.Module):
    """See the module docstring. ``DeformationField(cfg)`` with ``cfg.aabb`` set (or
    :meth:`for_points`, which sets it from points)."""

    def __init__(self, cfg: DeformConfig):
        super().__init__()
        cfg.validate()
        if cfg.aabb is None:
            raise ValueError("DeformationField needs cfg.aabb (use DeformationField.for_points)")
        self.cfg = cfg
        box = torch.tensor(cfg.aabb, dtype=torch.float32).reshape(2, 3)
        self.register_buffer("lo", box[0].clone(), persistent=False)
        self.register_buffer("inv_ext", 2.0 / (box[1] - box[0]).clamp_min(1e-6), persistent=False)
        g = torch.Generator().manual_seed(0)  # the same field for the same options, on every machine
        if cfg.kind == "hexplane":
            planes = []
            for r in cfg.resolutions:
                for a, b in _PAIRS:
                    ra = int(r)
                    rb = int(cfg.time_resolution) if b == 3 else int(r)
                    if b == 3:
                        p = torch.ones(1, cfg.features, rb, ra)
                    else:
                        p = torch.rand(1, cfg.features, rb, ra, generator=g) * 0.4 + 0.1
                    planes.append(nn.Parameter(p))
            self.planes = nn.ParameterList(planes)
            d_in = cfg.features * len(cfg.resolutions)
        else:
            self.planes = nn.ParameterList()
            d_in = 3 + 6 * cfg.pe_space + 1 + 2 * cfg.pe_time
        layers: List[nn.Module] = []
        d = d_in
        for _ in range(max(cfg.layers, 1 if cfg.kind == "mlp" else 0) + 1):
            lin = nn.Linear(d, cfg.hidden)
            with torch.no_grad():
                bound = 1.0 / math.sqrt(d)
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * bound - bound)
                lin.bias.copy_(torch.rand(lin.bias.shape, generator=g) * 2 * bound - bound)
            layers += [lin, nn.ReLU()]
            d = cfg.hidden
        self.trunk = nn.Sequential(*layers)
        self.n_out = 10 + (1 if cfg.opacity else 0) + (3 if cfg.color else 0)
        self.out = nn.Linear(cfg.hidden, self.n_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def for_points(cls, points: Tensor, cfg: Optional[DeformConfig] = None, pad: float = 0.1) -> "DeformationField":
        """A field whose box is the bounds of ``points`` [N, 3] grown by ``pad`` of its size
        (robust: 0.5 / 99.5 % quantiles)."""
        cfg = dataclasses.replace(cfg or DeformConfig())
        x = points.detach().float().cpu()
        if x.shape[0] > 200_000:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:200_000]]
        lo = torch.quantile(x, 0.005, dim=0)
        hi = torch.quantile(x, 0.995, dim=0)
        ext = (hi - lo).clamp_min(1e-3)
        lo, hi = lo - pad * ext, hi + pad * ext
        cfg.aabb = [lo.tolist(), hi.tolist()]
        return cls(cfg)

    # ---- evaluation ----------------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.lo.to(x.device)) * self.inv_ext.to(x.device) - 1.0

    def encode(self, x: Tensor, t: float) -> Tensor:
        """The input features of the head for positions ``x`` [N, 3] at time ``t``."""
        cfg = self.cfg
        u = self.normalize(x)
        n = u.shape[0]
        tt = u.new_full((n, 1), 2.0 * float(t) - 1.0)
        if cfg.kind == "mlp":
            f_s = torch.arange(cfg.pe_space, device=u.device, dtype=u.dtype)
            f_t = torch.arange(cfg.pe_time, device=u.device, dtype=u.dtype)
            xs = (u[:, :, None] * (2.0 ** f_s) * math.pi).reshape(n, -1)
            ts = (tt * (2.0 ** f_t) * math.pi).reshape(n, -1)
            return torch.cat([u, xs.sin(), xs.cos(), tt, ts.sin(), ts.cos()], -1)
        q = torch.cat([u, tt], -1)  # [N, 4] in [-1, 1]
        spatial = self._spatial(x, q)
        outs = []
        k = 0
        for ri, _r in enumerate(cfg.resolutions):
            prod = spatial[ri]
            for a, b in _PAIRS:
                if b == 3:
                    grid = torch.stack([q[:, a], q[:, b]], -1)[None, None]  # [1, 1, N, 2] (x = a, y = b)
                    s = F.grid_sample(self.planes[k], grid, mode="bilinear", padding_mode="border",
                                      align_corners=True)[0, :, 0].T  # [N, F]
                    prod = prod * s
                k += 1
            outs.append(prod)
        return torch.cat(outs, -1)

    def _spatial(self, x: Tensor, q: Tensor) -> List[Tensor]:
        """Per resolution, the product of the three spatial planes' samples at ``q`` [N, F]:
        independent of t, so kept (outside autograd only) while ``x`` and the planes are the
        same tensors, unchanged in place: a query at a new time then samples only the three
        space-time planes."""
        key = None
        if not torch.is_grad_enabled():
            key = (x.data_ptr(), x._version, tuple(x.shape), str(x.device), x.dtype,
                   tuple(p._version for p in self.planes), tuple(p.data_ptr() for p in self.planes))
            c = getattr(self, "_spatial_cache", None)
            if c is not None and c[2] is x and c[0] == key:
                return c[1]
        out = []
        k = 0
        for _r in self.cfg.resolutions:
            prod = None
            for a, b in _PAIRS:
                if b != 3:
                    grid = torch.stack([q[:, a], q[:, b]], -1)[None, None]
                    s = F.grid_sample(self.planes[k], grid, mode="bilinear", padding_mode="border",
                                      align_corners=True)[0, :, 0].T
                    prod = s if prod is None else prod * s
                k += 1
            out.append(prod)
        if key is not None:
            self._spatial_cache = (key, out, x)  # holding x: its memory is not reused meanwhile
        else:
            self._spatial_cache = None
        return out

    def forward(self, x: Tensor, t: float) -> Deformation:
        h = self.trunk(self.encode(x, t))
        o = self.out(h)
        d = Deformation(means=o[:, 0:3], quats=o[:, 3:7], scales=o[:, 7:10], feature=h)
        j = 10
        if self.cfg.opacity:
            d.opacities = o[:, j]
            j += 1
        if self.cfg.color:
            d.sh0 = o[:, j:j + 3]
        return d

    def regularization(self, tv_weight: float = 1.0, smooth_weight: float = 1.0) -> Tensor:
        """4DGS' plane regularisers: total variation of the spatial planes and a second
        difference along t of the space-time planes (0 for the mlp kind)."""
        total = self.out.weight.new_zeros(())
        if self.cfg.kind != "hexplane":
            return total
        k = 0
        for _r in self.cfg.resolutions:
            for _a, b in _PAIRS:
                p = self.planes[k]
                k += 1
                if b == 3:
                    d2 = p[:, :, 2:] - 2 * p[:, :, 1:-1] + p[:, :, :-2]
                    total = total + smooth_weight * (d2 ** 2).mean()
                else:
                    tv = ((p[:, :, 1:] - p[:, :, :-1]) ** 2).mean() + ((p[:, :, :, 1:] - p[:, :, :, :-1]) ** 2).mean()
                    total = total + tv_weight * tv
        return total

    def is_zero(self) -> bool:
        return bool((self.out.weight == 0).all() and (self.out.bias == 0).all())

    def extra_repr(self) -> str:
        c = self.cfg
        if c.kind == "hexplane":
            return f"hexplane resolutions={list(c.resolutions)} x t{c.time_resolution}, features={c.features}, hidden={c.hidden}"
        return f"mlp pe=({c.pe_space}, {c.pe_time}), hidden={c.hidden}, layers={c.layers}"
