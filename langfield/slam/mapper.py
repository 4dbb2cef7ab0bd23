"""The map of online mapping: Gaussians that grow from unprojected depth, optimised on a window
of keyframes with colour + depth L1 (and language when the run has it), pruned when
transparent or oversized.

:class:`GaussianMap` holds raw tensors with gsplat's names (``means``, ``quats``, ``scales``
(log; [N, 1] when isotropic), ``opacities`` (logit), ``sh0`` [N, 1, 3], ``lang`` [N, L]) and
its own Adam state, so Gaussians can be added and removed between iterations and the whole
state (moments included) saved and restored exactly for ``--resume``. It implements the
scene-model interface (``activated(t)``) of :func:`langfield.render.render` and converts to
:class:`langfield.scene.Gaussians` (``to_gaussians``) for checkpoints, the viewer and export.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from langfield.maths import rgb_to_sh
from langfield.render.model import Cameras, render
from langfield.scene import Activated, Gaussians

__all__ = ["MapperConfig", "GaussianMap", "unproject", "seed_gaussians", "prune_mask"]


@dataclass
class MapperConfig:
    """Mapping settings (see the module docstring)."""

    iters: int = 12  # mapping iterations per keyframe
    first_iters: int = 60  # on the first keyframe
    window: int = 4  # most recent keyframes optimised
    random_older: int = 2  # plus this many random older ones
    w_depth: float = 1.0
    lang_pass: str = "shared"  # "shared": the latents ride in the colour pass and their loss (times w_lang) also
    # shapes the geometry; "detached": a second pass at 1 / lang_stride of the size with the geometry detached, so
    # a run with language keeps the geometry and trajectory of the run without it (room, 100 frames: name-query
    # mIoU 0.55 detached vs 0.575 shared at 12 iterations; ATE 0.63 vs 0.84 cm)
    w_lang: float = 0.1  # weight of the language loss ("shared": 1.0 raised the room's ATE 0.8 -> 1.4 cm)
    lang_stride: int = 2  # "detached": the language pass renders 1 / lang_stride of the width and height
    isotropic: bool = True
    add_stride: int = 2  # unproject every add_stride-th pixel (both axes)
    add_alpha: float = 0.5  # add where the rendered alpha is below this ...
    add_behind: float = 0.05  # ... or the rendered depth is this far (m, plus 2% of depth) behind the observation
    init_opacity: float = 0.95
    size_factor: float = 0.75  # Gaussian std = size_factor * stride * depth / f
    prune_opacity: float = 0.05
    prune_scale: float = 0.5  # metres; larger Gaussians are removed
    lr_means: float = 5e-4
    lr_sh0: float = 5e-3
    lr_opacities: float = 1e-2
    lr_scales: float = 2e-3
    lr_quats: float = 1e-3
    lr_lang: float = 3e-2  # (1e-2 left the latents behind: name-query mIoU 0.43 -> 0.48 on a short run)
    pose_opt: bool = True  # refine the window keyframes' poses with the map (the first keyframe stays fixed)
    lr_pose_trans: float = 1e-4  # Adam on each keyframe's twist: metres ...
    lr_pose_rot: float = 2e-4  # ... and radians per step

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "MapperConfig":
        return cls(**{k: v for k, v in dict(d).items() if k in cls.__dataclass_fields__})


PARAMS = ("means", "quats", "scales", "opacities", "sh0", "lang")


class GaussianMap:
    """Raw Gaussian parameters + Adam moments (see the module docstring)."""

    def __init__(self, isotropic: bool = True, lang_dim: int = 0, device="cpu"):
        self.isotropic = bool(isotropic)
        self.lang_dim = int(lang_dim)
        self.device = torch.device(device)
        s = 1 if self.isotropic else 3
        self.params: Dict[str, Tensor] = {
            "means": torch.zeros((0, 3)), "quats": torch.zeros((0, 4)), "scales": torch.zeros((0, s)),
            "opacities": torch.zeros((0,)), "sh0": torch.zeros((0, 1, 3)),
        }
        if self.lang_dim:
            self.params["lang"] = torch.zeros((0, self.lang_dim))
        self.params = {k: v.to(self.device).requires_grad_(True) for k, v in self.params.items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.step_count = 0
        # held while the parameters change (add, keep, an Adam step) and while a snapshot is taken, so a
        # tracking thread never sees half an update when mapping runs concurrently
        self.lock = threading.RLock()

    def snapshot(self) -> Activated:
        """The activated parameters now, detached copies (tracking renders them while mapping may
        go on changing the map)."""
        with self.lock, torch.no_grad():
            a = self.activated()
            return Activated(means=a.means.clone(), quats=a.quats.clone(), scales=a.scales.contiguous(),
                             opacities=a.opacities, sh=a.sh.clone(), sh_degree=a.sh_degree, lang=None)

    # ---- the scene-model interface ------------------------------------------------------
    @property
    def num(self) -> int:
        return int(self.params["means"].shape[0])

    def __len__(self) -> int:
        return self.num

    def activated(self, t: Optional[float] = None) -> Activated:
        p = self.params
        sc = torch.exp(p["scales"])
        if sc.shape[1] == 1:
            sc = sc.expand(-1, 3)
        return Activated(means=p["means"], quats=p["quats"], scales=sc, opacities=torch.sigmoid(p["opacities"]),
                         sh=p["sh0"], sh_degree=0, lang=p.get("lang"))

    def to_gaussians(self, with_lang: bool = True) -> Gaussians:
        p = {k: v.detach() for k, v in self.params.items()}
        sc = p["scales"].expand(-1, 3) if p["scales"].shape[1] == 1 else p["scales"]
        return Gaussians(p["means"], p["quats"], sc, p["opacities"], p["sh0"], None,
                         p.get("lang") if with_lang else None, requires_grad=False)

    # ---- growth and pruning -------------------------------------------------------------
    def set_lang_dim(self, lang_dim: int) -> None:
        """Give every Gaussian ``lang_dim`` language latents (zeros) with fresh moments."""
        with self.lock:
            self.lang_dim = int(lang_dim)
            z = torch.zeros((self.num, self.lang_dim), device=self.device)
            self.params["lang"] = z.clone().requires_grad_(True)
            self.exp_avg["lang"] = z.clone()
            self.exp_avg_sq["lang"] = z.clone()

    def add(self, new: Dict[str, Tensor]) -> None:
        """Append Gaussians (raw values; keys as :attr:`params`, ``lang`` zeros when absent)."""
        n = int(new["means"].shape[0])
        if n == 0:
            return
        if "lang" in self.params and "lang" not in new:
            new = dict(new, lang=torch.zeros((n, self.lang_dim), device=self.device))
        with self.lock:
            for k in list(self.params):
                v = new[k].to(self.device, torch.float32)
                self.params[k] = torch.cat([self.params[k].detach(), v], 0).requires_grad_(True)
                self.exp_avg[k] = torch.cat([self.exp_avg[k], torch.zeros_like(v)], 0)
                self.exp_avg_sq[k] = torch.cat([self.exp_avg_sq[k], torch.zeros_like(v)], 0)

    def keep(self, mask: Tensor) -> int:
        """Keep the Gaussians where ``mask`` is True; returns how many were removed."""
        removed = int((~mask).sum())
        if removed:
            with self.lock:
                self._keep(mask)
        return removed

    def _keep(self, mask: Tensor) -> None:
        for k in list(self.params):
            self.params[k] = self.params[k].detach()[mask].requires_grad_(True)
            self.exp_avg[k] = self.exp_avg[k][mask]
            self.exp_avg_sq[k] = self.exp_avg_sq[k][mask]

    # ---- optimisation -------------------------------------------------------------------
    def zero_grad(self) -> None:
        for v in self.params.values():
            v.grad = None

    @torch.no_grad()
    def adam_step(self, lrs: Dict[str, float], betas=(0.9, 0.999), eps: float = 1e-15,
                  frozen: Tuple[str, ...] = ()) -> None:
        """One Adam step on every parameter with a gradient (bias correction by a shared step
        count, as gsplat's strategy does after adding Gaussians)."""
        with self.lock:
            self._adam(lrs, betas, eps, frozen)

    def _adam(self, lrs, betas, eps, frozen) -> None:
        self.step_count += 1
        b1, b2 = betas
        bc1 = 1 - b1 ** self.step_count
        bc2 = 1 - b2 ** self.step_count
        for k, p in self.params.items():
            if p.grad is None or k in frozen:
                continue
            g = p.grad
            m, v = self.exp_avg[k], self.exp_avg_sq[k]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / bc2).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lrs[k] / bc1)

    # ---- state ----------------------------------------------------------------------------
    def state_tensors(self) -> Dict[str, Tensor]:
        out = {}
        for k in self.params:
            out[f"map.{k}"] = self.params[k].detach().contiguous()
            out[f"adam_m.{k}"] = self.exp_avg[k].contiguous()
            out[f"adam_v.{k}"] = self.exp_avg_sq[k].contiguous()
        return out

    def state_config(self) -> Dict:
        return {"isotropic": self.isotropic, "lang_dim": self.lang_dim, "adam_step": self.step_count}

    @classmethod
    def from_state(cls, tensors: Dict[str, Tensor], cfg: Dict, device="cpu") -> "GaussianMap":
        m = cls(isotropic=bool(cfg["isotropic"]), lang_dim=int(cfg["lang_dim"]), device=device)
        for k in list(m.params):
            m.params[k] = tensors[f"map.{k}"].to(device).clone().requires_grad_(True)
            m.exp_avg[k] = tensors[f"adam_m.{k}"].to(device).clone()
            m.exp_avg_sq[k] = tensors[f"adam_v.{k}"].to(device).clone()
        m.step_count = int(cfg["adam_step"])
        return m


def unproject(depth: Tensor, K: Tensor, c2w: Tensor, mask: Tensor) -> Tensor:
    """World points [M, 3] of the pixels in ``mask`` (pixel centres at +0.5; z-depth)."""
    vv, uu = torch.nonzero(mask, as_tuple=True)
    z = depth[vv, uu]
    x = (uu.float() + 0.5 - K[0, 2]) / K[0, 0] * z
    y = (vv.float() + 0.5 - K[1, 2]) / K[1, 1] * z
    pc = torch.stack([x, y, z], -1)
    return pc @ c2w[:3, :3].T + c2w[:3, 3]


def seed_gaussians(gmap: GaussianMap, image: Tensor, depth: Tensor, K: Tensor, viewmat: Tensor,
                   cfg: MapperConfig, backend: str = "auto") -> int:
    """Add Gaussians from the frame's depth where the map is empty (rendered alpha below
    ``add_alpha``) or behind the observed surface, on a grid of every ``add_stride``-th
    pixel, sized to the pixel footprint, coloured from the image. Returns how many."""
    H, W = depth.shape
    s = max(1, int(cfg.add_stride))
    grid = torch.zeros((H, W), dtype=torch.bool, device=depth.device)
    grid[s // 2::s, s // 2::s] = True
    want = grid & (depth > 0)
    if gmap.num > 0:
        with torch.no_grad():
            out = render(gmap, Cameras(viewmat[None], K[None], W, H), depth=True, backend=backend, validate=False)
        alpha, dr = out.alpha[0], out.depth[0]
        behind = (dr - depth) > (cfg.add_behind + 0.02 * depth)
        want = want & ((alpha < cfg.add_alpha) | behind)
    n = int(want.sum())
    if n == 0:
        return 0
    from langfield.maths import inv_rigid

    c2w = inv_rigid(viewmat)
    pts = unproject(depth, K, c2w, want)
    z = depth[want]
    f = 0.5 * float(K[0, 0] + K[1, 1])
    std = cfg.size_factor * s * z / f
    ns = 1 if gmap.isotropic else 3
    quats = torch.zeros((n, 4), device=depth.device)
    quats[:, 0] = 1.0
    p = math.log(cfg.init_opacity / (1 - cfg.init_opacity))
    gmap.add({"means": pts, "quats": quats, "scales": torch.log(std)[:, None].expand(-1, ns).contiguous(),
              "opacities": torch.full((n,), p, device=depth.device),
              "sh0": rgb_to_sh(image[want])[:, None, :]})
    return n


def prune_mask(gmap: GaussianMap, cfg: MapperConfig) -> Tensor:
    """True for the Gaussians to keep: opacity at least ``prune_opacity`` and largest scale at
    most ``prune_scale``."""
    with torch.no_grad():
        op = torch.sigmoid(gmap.params["opacities"])
        sc = torch.exp(gmap.params["scales"]).amax(-1)
        return (op >= cfg.prune_opacity) & (sc <= cfg.prune_scale)


def lrs_of(cfg: MapperConfig) -> Dict[str, float]:
    return {"means": cfg.lr_means, "quats": cfg.lr_quats, "scales": cfg.lr_scales, "opacities": cfg.lr_opacities,
            "sh0": cfg.lr_sh0, "lang": cfg.lr_lang}
