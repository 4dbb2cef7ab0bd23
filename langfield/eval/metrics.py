"""Image metrics on [H,W,C] or [B,H,W,C] tensors with values in [0, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim", "gaussian_window"]


def _bchw(x: Tensor) -> Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected an image [H,W,C] or a batch [B,H,W,C], got shape {list(x.shape)}")
    return x.permute(0, 3, 1, 2)


def psnr(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (mean over the batch)."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ: {list(pred.shape)} vs {list(target.shape)}")
    err = (pred - target) ** 2
    if mask is not None:
        m = mask.expand_as(err).to(err.dtype)
        mse = (err * m).flatten(-3).sum(-1) / m.flatten(-3).sum(-1).clamp(min=1)
    else:
        mse = err.flatten(-3).mean(-1)
    return (-10.0 * torch.log10(mse.clamp(min=1e-12))).mean()


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(pred: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004; Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03).

    Computed over the valid region (no padding) like skimage's ``gaussian_weights=True`` default,
    and differentiable, so ``1 - ssim`` serves as the D-SSIM loss.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ: {list(pred.shape)} vs {list(target.shape)}")
    x, y = _bchw(pred), _bchw(target)
    B, C, H, W = x.shape
    win = min(window, H, W)
    if win % 2 == 0:
        win -= 1
    g = gaussian_window(win, sigma, x.dtype, x.device)
    kx = g.view(1, 1, 1, win).repeat(C, 1, 1, 1)
    ky = g.view(1, 1, win, 1).repeat(C, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kx, groups=C), ky, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean()
