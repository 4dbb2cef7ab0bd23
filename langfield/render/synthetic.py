"""Random Gaussian scenes and orbit cameras for tests, benchmarks and GPU checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["RandomScene", "random_scene", "look_at_viewmats", "intrinsics"]


@dataclass
class RandomScene:
    means: Tensor
    quats: Tensor
    scales: Tensor  # activated
    opacities: Tensor  # in [0, 1]
    colors: Tensor  # [N, D] or SH [N, K, 3]
    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int

    def to(self, device) -> "RandomScene":
        return RandomScene(*(getattr(self, f).to(device) for f in
                             ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")),
                           self.width, self.height)

    def params(self):
        return dict(means=self.means, quats=self.quats, scales=self.scales, opacities=self.opacities,
                    colors=self.colors, viewmats=self.viewmats, Ks=self.Ks, width=self.width,
                    height=self.height)


def look_at_viewmats(eyes: Tensor, target: Tensor, up=(0.0, -1.0, 0.0)) -> Tensor:
    """World-to-camera [C,4,4] (OpenCV: x right, y down, z forward) looking at ``target``."""
    eyes = torch.as_tensor(eyes, dtype=torch.float32)
    target = torch.as_tensor(target, dtype=torch.float32).expand_as(eyes)
    up_v = torch.tensor(up, dtype=torch.float32).expand_as(eyes)
    z = torch.nn.functional.normalize(target - eyes, dim=-1)
    x = torch.nn.functional.normalize(torch.cross(up_v, z, dim=-1), dim=-1)
    y = torch.cross(z, x, dim=-1)
    R = torch.stack([x, y, z], dim=-2)  # rows: camera axes in world
    t = -(R @ eyes.unsqueeze(-1)).squeeze(-1)
    V = torch.eye(4).repeat(eyes.shape[0], 1, 1)
    V[:, :3, :3] = R
    V[:, :3, 3] = t
    return V


def intrinsics(C: int, width: int, height: int, fov_x_deg: float = 60.0) -> Tensor:
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    K = torch.tensor([[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]])
    return K.repeat(C, 1, 1)


def random_scene(
    N: int,
    C: int = 1,
    width: int = 64,
    height: int = 48,
    D: int = 3,
    sh_degree: Optional[int] = None,
    seed: int = 0,
    scale_range=(0.02, 0.15),
    radius: float = 4.0,
    extent: float = 1.0,
    opacity_range=(0.05, 0.95),
) -> RandomScene:
    """N Gaussians in a cube of half-size ``extent`` seen by C cameras on an orbit of ``radius``."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(N, 3, generator=g) * 2 - 1) * extent
    quats = torch.randn(N, 4, generator=g)
    lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
    scales = torch.exp(torch.rand(N, 3, generator=g) * (hi - lo) + lo)
    opacities = torch.rand(N, generator=g) * (opacity_range[1] - opacity_range[0]) + opacity_range[0]
    if sh_degree is None:
        colors = torch.rand(N, D, generator=g)
    else:
        colors = torch.randn(N, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    angles = torch.arange(C, dtype=torch.float32) * (2 * math.pi / max(C, 1)) + 0.3
    eyes = torch.stack([radius * torch.sin(angles), -0.3 * radius * torch.ones(C), -radius * torch.cos(angles)], -1)
    viewmats = look_at_viewmats(eyes, torch.zeros(3))
    Ks = intrinsics(C, width, height)
    return RandomScene(means, quats, scales, opacities, colors, viewmats, Ks, width, height)
