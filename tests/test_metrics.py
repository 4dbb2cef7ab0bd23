import math

import torch

from langfield.eval import psnr, ssim


def naive_ssim(x, y, win=11, sigma=1.5):
    """Per-window float64 loop (slow, obvious) over the valid region."""
    x, y = x.double(), y.double()
    H, W, C = x.shape
    r = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    w2 = torch.outer(g, g)
    w2 = w2 / w2.sum()
    vals = []
    for c in range(C):
        for i in range(H - win + 1):
            for j in range(W - win + 1):
                a, b = x[i:i + win, j:j + win, c], y[i:i + win, j:j + win, c]
                ma, mb = (w2 * a).sum(), (w2 * b).sum()
                va = (w2 * a * a).sum() - ma**2
                vb = (w2 * b * b).sum() - mb**2
                cov = (w2 * a * b).sum() - ma * mb
                c1, c2 = 0.01**2, 0.03**2
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return torch.stack(vals).mean()


def test_ssim_matches_naive_windows():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 17, 3, generator=g)
    y = (x + 0.1 * torch.randn(20, 17, 3, generator=g)).clamp(0, 1)
    assert abs(ssim(x, y).item() - naive_ssim(x, y).item()) < 1e-5
    assert abs(ssim(x, x).item() - 1.0) < 1e-6


def test_psnr_known_value():
    x = torch.zeros(8, 8, 3)
    y = torch.full((8, 8, 3), 0.1)
    assert abs(psnr(x, y).item() - 20.0) < 1e-4
    mask = torch.zeros(8, 8, 1)
    mask[:4] = 1
    y2 = y.clone()
    y2[4:] = 1.0
    assert abs(psnr(x, y2, mask).item() - 20.0) < 1e-4
