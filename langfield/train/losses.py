"""Photometric losses of the RGB stage."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from langfield.eval.metrics import ssim

__all__ = ["rgb_loss"]


def rgb_loss(pred: Tensor, target: Tensor, ssim_lambda: float = 0.2) -> Tuple[Tensor, Tensor, Tensor]:
    """``(1 - ssim_lambda) * L1 + ssim_lambda * (1 - SSIM)`` on [H, W, 3] (or [B, H, W, 3]) images.

    With ``ssim_lambda = 0.2`` this is 3DGS' "L1 + 0.2 D-SSIM" (its code weights L1 by 0.8;
    D-SSIM is taken as ``1 - SSIM``, not ``(1 - SSIM) / 2``, as in 3DGS and gsplat). SSIM is
    :func:`langfield.eval.ssim` (11x11 Gaussian window over the valid region).
    Returns ``(loss, l1, ssim)``.
    """
    l1 = (pred - target).abs().mean()
    if ssim_lambda > 0:
        s = ssim(pred, target)
        loss = (1.0 - ssim_lambda) * l1 + ssim_lambda * (1.0 - s)
    else:
        s = l1.new_zeros(())
        loss = l1
    return loss, l1, s
