"""Fast repeated queries over time: the relevancy of a text as a function of the 3-D latent.

A query at a new time needs the deformation at ``t``, the render and the relevancy of every
pixel. The last part dominates on a CPU when done as :meth:`LanguageField.query` does it:
each pixel's latent goes through the scene autoencoder's decoder (3 -> 512 channels, about
0.24 MMAC per pixel and level, ~16 GMAC for one 256x256 level). But for a fixed text, level
and decoder the relevancy is a function of the latent alone (``R^L -> [0, 1]``), independent
of t and of the view. :class:`LatticeQuery` evaluates it once on a lattice spanning the
latents the level can render (rendered latents are alpha-weighted sums of the Gaussians'
latents with total weight <= 1: inside the box of 0 and the Gaussians' values, state level:
of the prototypes), exactly as :func:`langfield.query.relevancy_maps` does, and each query then
interpolates it (trilinear for ``L = 3``) at the rendered latents: cost independent of the
decoder. :meth:`LatticeQuery.max_error` measures the interpolation against the exact decode
on a render. The smoothing, level score, point and mask follow
:func:`langfield.query.result_from_maps`, as the exact path.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LatticeQuery"]


class LatticeQuery:
    """``LatticeQuery(field, texts, level, resolution=64)``: relevancy of ``texts`` on one
    level of a :class:`langfield.field.LanguageField`, tabulated on a ``resolution^L`` lattice
    (L = the latent size, 3 for LangSplat's autoencoder). :meth:`query` takes a
    :meth:`LanguageField.render` and returns :class:`langfield.query.QueryResult` s."""

    def __init__(self, field, texts: Union[str, Sequence[str]], level: str, resolution: int = 64,
                 chunk: int = 65536):
        from langfield.query import relevancy_maps

        self.single = isinstance(texts, str)
        self.texts: List[str] = [texts] if self.single else list(texts)
        if level not in field.levels:
            raise ValueError(f"level {level!r} is not one of the run's levels {list(field.levels)}")
        self.field, self.level = field, level
        L = int(field.latent_dim)
        if L > 4:
            raise ValueError(f"a relevancy lattice needs a small latent (<= 4 channels), the run has {L}")
        li = list(field.levels).index(level)
        g = field.gaussians
        with torch.no_grad():
            lat = g.lang if not (hasattr(g, "states") and g.states is not None and level == field.levels[-1]) \
                else g.states.reshape(-1, g.states.shape[-1])
            if lat.shape[-1] != L:  # [N, levels * L]
                lat = lat.reshape(lat.shape[0], -1, L)[:, li]
            lo = torch.minimum(lat.min(0).values, torch.zeros(L, device=lat.device)).float()
            hi = torch.maximum(lat.max(0).values, torch.zeros(L, device=lat.device)).float()
        pad = 1e-3 * (hi - lo).clamp_min(1e-6)
        self.lo, self.hi = (lo - pad).cpu(), (hi + pad).cpu()
        self.resolution = int(resolution)
        axes = [torch.linspace(float(a), float(b), self.resolution) for a, b in zip(self.lo, self.hi)]
        pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, L)  # x fastest last
        tq = field.text_query
        emb, canon = tq.embed(self.texts), tq.canon
        with torch.no_grad():
            rel, _ = relevancy_maps({level: pts[None].to(field.device)}, field.decoder, emb, canon, chunk=chunk)
        # rel [Q, 1, 1, R^L] -> [1, Q, R, ..., R] with the first latent axis slowest
        self.table = rel[:, 0, 0].reshape(1, len(self.texts), *([self.resolution] * L)).float().cpu()
        self.L = L

    def relevancy(self, latents: Tensor) -> Tensor:
        """Interpolated relevancy ``[Q, H, W]`` of rendered latents ``[H, W, L]``."""
        H, W, L = latents.shape
        u = (latents.float().cpu() - self.lo) / (self.hi - self.lo) * 2.0 - 1.0  # [-1, 1]
        if L == 3:
            # grid_sample's last grid axis indexes the input's last dimension (x = axis 2)
            grid = u.flip(-1).reshape(1, 1, 1, H * W, 3)
            out = F.grid_sample(self.table, grid, mode="bilinear", padding_mode="border", align_corners=True)
            return out.reshape(len(self.texts), H, W)
        if L == 2:
            grid = u.flip(-1).reshape(1, 1, H * W, 2)
            out = F.grid_sample(self.table, grid, mode="bilinear", padding_mode="border", align_corners=True)
            return out.reshape(len(self.texts), H, W)
        raise ValueError(f"lattice interpolation for latent size {L} is not implemented (2 or 3)")

    def query(self, render, *, threshold: float = 0.4, smooth: Optional[int] = None, min_alpha: float = 0.5):
        from langfield.query import result_from_maps

        if render.latents is None or self.level not in render.latents:
            raise ValueError("the render has no latents of the level (render with language=True)")
        rel = self.relevancy(render.latents[self.level])
        if min_alpha > 0:
            rel = rel * (render.alpha.float().cpu() > min_alpha)
        res = [result_from_maps(rel[q][None], [self.level], smooth=smooth, threshold=threshold, text=t)
               for q, t in enumerate(self.texts)]
        return res[0] if self.single else res

    @torch.no_grad()
    def max_error(self, render) -> float:
        """The largest |interpolated - exact| relevancy over the render's pixels (alpha > 0.5)."""
        exact = self.field.query(render, self.texts, level=self.level)
        approx = self.relevancy(render.latents[self.level])
        valid = render.alpha.float().cpu() > 0.5
        err = 0.0
        for q, e in enumerate(exact):
            d = (e.relevancy[e.level_index].float().cpu() - approx[q]).abs()[valid]
            err = max(err, float(d.max()) if d.numel() else 0.0)
        return err
