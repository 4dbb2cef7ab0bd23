"""Gaussian-sharded rendering: scenes larger than one device's memory.

Each rank **owns** a spatially coherent shard of the Gaussians (:func:`morton_shards`: the
Gaussians sorted by the Morton code of their means and cut into ``N`` runs of equal size), with
its parameters, gradients and optimiser state: ``1/N`` of the scene per rank. Every step each
rank renders its own camera(s) from the visible Gaussians of **all** shards:

1. the ranks' cameras are exchanged (one small all-gather);
2. every owner tests its shard against every camera (a conservative frustum test: the mean
   in front of the near plane and within the image grown by the 3-sigma screen radius) and
   sends the visible rows of its *activated* parameters (means, quats, scales, opacities, SH)
   to the camera's rank (one gather per camera);
3. the camera's rank renders the gathered set with the ordinary rasterizer;
4. after its backward pass, the gradients of the gathered rows go back to their owners (one
   scatter per camera) and flow on through the owners' activations into their parameters
   (:meth:`ShardedRenderer.backward`): the result equals a replicated render of the whole
   scene, up to float summation order.

Memory per rank: ``N/W x (parameters + gradients + 2 Adam moments)`` for the shard plus
``V x (parameters + gradients)`` for the gathered visible set ``V`` of its camera; bytes sent
per rank and step: its shard's rows visible in each camera, plus their gradients on the way
back (``bench/distributed.py`` measures both). Densification in this mode is not wired yet:
the shard's Gaussians keep their number (see the report of issue #16).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .core import Dist

__all__ = ["morton_shards", "visible_mask", "ShardedRenderer", "pack_activated"]


def _spread_bits(x: Tensor) -> Tensor:
    """10-bit integers -> every third bit (for 30-bit 3D Morton codes)."""
    x = x & 0x3FF
    x = (x | (x << 16)) & 0x030000FF
    x = (x | (x << 8)) & 0x0300F00F
    x = (x | (x << 4)) & 0x030C30C3
    x = (x | (x << 2)) & 0x09249249
    return x


def morton_shards(means: Tensor, world: int) -> List[Tensor]:
    """Indices (int64) of each rank's shard: the Gaussians in Morton order of their means
    (10 bits per axis over the bounding box; ties by index) cut into ``world`` contiguous
    runs whose sizes differ by at most one. Deterministic: every rank computes the same split."""
    m = means.detach().double().cpu()
    n = m.shape[0]
    if n == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in range(world)]
    lo, hi = m.min(0).values, m.max(0).values
    q = ((m - lo) / (hi - lo).clamp_min(1e-12) * 1023).round().long().clamp(0, 1023)
    code = _spread_bits(q[:, 0]) | (_spread_bits(q[:, 1]) << 1) | (_spread_bits(q[:, 2]) << 2)
    order = torch.from_numpy(__import__("numpy").lexsort((torch.arange(n).numpy(), code.numpy()))).long()
    return [order[r * n // world:(r + 1) * n // world].sort().values for r in range(world)]


def visible_mask(means: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
                 near: float = 0.01, margin_px: float = 2.0) -> Tensor:
    """Conservative visibility of Gaussians (activated ``scales``) in one camera: a superset of
    what the rasterizer draws (its radius is at most 3 sigma of the projected covariance,
    plus the 0.3 px low-pass; the projected sigma is bounded by the largest scale times the
    Frobenius norm of the projection's Jacobian)."""
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    pc = means @ R.T + t
    z = pc[:, 2]
    zs = z.clamp_min(near)
    tx, ty = pc[:, 0] / zs, pc[:, 1] / zs
    u = K[0, 0] * tx + K[0, 2]
    v = K[1, 1] * ty + K[1, 2]
    # 3 sigma of J Sigma J^T <= 3 s_max ||J||_F, J the EWA Jacobian (unclamped: clamping shrinks it)
    jf = torch.sqrt((K[0, 0] / zs) ** 2 * (1 + tx ** 2) + (K[1, 1] / zs) ** 2 * (1 + ty ** 2))
    r = 3.0 * scales.max(dim=1).values * jf + margin_px
    return (z > near) & (u > -r) & (u < width + r) & (v > -r) & (v < height + r)


def pack_activated(a) -> Tuple[Tensor, int]:
    """``[n, P]`` rows of activated parameters (means 3, quats 4, scales 3, opacity 1, SH K x 3)
    and K."""
    n = a.means.shape[0]
    k = a.sh.shape[1]
    return torch.cat([a.means, a.quats, a.scales, a.opacities[:, None], a.sh.reshape(n, k * 3)], 1), k


def _unpack(rows: Tensor, k: int):
    means, quats, scales = rows[:, 0:3], rows[:, 3:7], rows[:, 7:10]
    opac = rows[:, 10]
    sh = rows[:, 11:11 + 3 * k].reshape(-1, k, 3)
    return means, quats, scales, opac, sh


class ShardedRenderer:
    """Renders each rank's camera from every shard's visible Gaussians (see the module
    docstring). Per step: ``out = r.render(local_gaussians, camera, ...)``; the caller's
    ``loss.backward()`` fills the gathered rows' gradients; then ``r.backward()`` sends them to
    their owners and back-propagates into the local parameters. Every rank must call both once
    per step (they are collectives)."""

    def __init__(self, job: Dist):
        self.job = job
        self.bytes_sent = 0
        self.bytes_received = 0
        self.gathered_rows = 0  # rows rendered by this rank in the last step
        self._pending = None

    def _gather_to(self, dst: int, rows: Tensor, counts: List[int]) -> Optional[Tensor]:
        import torch.distributed as dist

        job = self.job
        m = max(counts)
        buf = rows.new_zeros(m, rows.shape[1])
        buf[:rows.shape[0]] = rows
        self.bytes_sent += rows.numel() * rows.element_size() if job.rank != dst else 0
        if job.rank == dst:
            parts = [torch.empty_like(buf) for _ in range(job.world)]
            job.collective(f"gather of visible Gaussians to rank {dst}", lambda: dist.gather(buf, parts, dst=dst))
            self.bytes_received += sum(c for r, c in enumerate(counts) if r != dst) * rows.shape[1] * rows.element_size()
            return torch.cat([p[:c] for p, c in zip(parts, counts)])
        job.collective(f"gather of visible Gaussians to rank {dst}", lambda: dist.gather(buf, dst=dst))
        return None

    def _scatter_from(self, src: int, grads: Optional[Tensor], counts: List[int], width: int, like: Tensor
                      ) -> Tensor:
        import torch.distributed as dist

        job = self.job
        m = max(counts)
        out = like.new_zeros(m, width)
        if job.rank == src:
            parts, o = [], 0
            for r, c in enumerate(counts):
                p = like.new_zeros(m, width)
                p[:c] = grads[o:o + c]
                o += c
                parts.append(p)
                if r != src:
                    self.bytes_sent += c * width * like.element_size()
            job.collective(f"scatter of gradients from rank {src}", lambda: dist.scatter(out, parts, src=src))
        else:
            job.collective(f"scatter of gradients from rank {src}", lambda: dist.scatter(out, src=src))
        return out[:counts[job.rank]]

    def render(self, local, camera, *, sh_degree: Optional[int] = None, background=None, backend: str = "auto",
               ids: Optional[Tensor] = None):
        """Render ``camera`` (one :class:`~langfield.render.model.Cameras` view, this rank's)
        from all shards; ``local``: this rank's shard (a scene model with ``activated()``).
        ``ids``: the global index of each local Gaussian; the gathered rows are then rendered
        in global order (Gaussians at equal depth blend in index order, as in a replicated
        render). Returns ``(rgb [H, W, 3], alpha [H, W])`` whose graph ends at the gathered rows."""
        from langfield.render.api import rasterization

        job = self.job
        a = local.activated()
        act, k = pack_activated(a)
        dev = act.device
        deg = a.sh_degree if sh_degree is None else min(int(sh_degree), a.sh_degree)
        cam = torch.cat([camera.viewmats[0].reshape(-1), camera.Ks[0].reshape(-1),
                         torch.tensor([camera.width, camera.height], dtype=torch.float32, device=camera.device)]
                        ).to(dev, torch.float32)
        cams = job.all_gather(cam, what="all_gather of the cameras") if job.active else [cam]
        with torch.no_grad():
            masks = [visible_mask(a.means.detach(), a.scales.detach(), c[:16].view(4, 4), c[16:25].view(3, 3),
                                  int(c[25]), int(c[26])) for c in cams]
        idx = [m.nonzero().flatten() for m in masks]
        mine = torch.tensor([len(i) for i in idx], dtype=torch.int64, device=dev)
        counts = [[int(x) for x in t] for t in (job.all_gather(mine, what="all_gather of the visible counts")
                                               if job.active else [mine])]  # counts[shard][camera]
        gathered = None
        width = act.shape[1]
        gid = (torch.arange(act.shape[0], device=dev) if ids is None else ids.to(dev)).to(torch.int32)
        gid = gid.view(torch.float32) if act.dtype == torch.float32 else gid.to(act.dtype)  # bits, not values
        for c in range(job.world):
            per_shard = [counts[r][c] for r in range(job.world)]
            rows = torch.cat([act.detach()[idx[c]], gid[idx[c], None]], 1)  # + the global id column
            g = self._gather_to(c, rows, per_shard) if job.active else rows
            if c == job.rank:
                gathered = g
        order = None
        if ids is not None:
            key = gathered[:, -1].contiguous()
            key = key.view(torch.int32) if key.dtype == torch.float32 else key.long()
            order = torch.argsort(key, stable=True)
            gathered = gathered[order]
        remote = gathered[:, :width].detach().requires_grad_(True)
        self.gathered_rows = int(remote.shape[0])
        self._pending = (act, idx, counts, remote, width, order)
        means, quats, scales, opac, sh = _unpack(remote, k)
        sh = sh[:, :(deg + 1) ** 2]
        bg = None
        if background is not None:
            bg = torch.as_tensor(background, dtype=torch.float32, device=dev).reshape(1, 3)
        out, alpha, _meta = rasterization(means, quats, scales, opac, sh, camera.viewmats.to(dev),
                                          camera.Ks.to(dev), camera.width, camera.height, sh_degree=deg,
                                          backgrounds=bg, backend=backend)
        return out[0, ..., :3], alpha[0, ..., 0]

    def backward(self) -> None:
        """Send the gathered rows' gradients to their owners and back-propagate them into this
        rank's parameters (accumulating into ``.grad``)."""
        act, idx, counts, remote, width, order = self._pending
        self._pending = None
        job = self.job
        g_remote = remote.grad if remote.grad is not None else torch.zeros_like(remote)
        if order is not None:  # back to the gathered (shard) order
            g = torch.empty_like(g_remote)
            g[order] = g_remote
            g_remote = g
        g_act = torch.zeros_like(act)
        for c in range(job.world):
            per_shard = [counts[r][c] for r in range(job.world)]
            if job.active:
                g = self._scatter_from(c, g_remote if c == job.rank else None, per_shard, width, act.detach())
            else:
                g = g_remote
            g_act.index_add_(0, idx[c], g)
        act.backward(g_act)


def shard_state_bytes(local, optimizers: Dict[str, torch.optim.Optimizer]) -> int:
    """Bytes this rank holds for its shard: parameters, their gradients and optimiser state."""
    n = 0
    for p in local.parameters():
        n += p.numel() * p.element_size() * (2 if p.grad is not None else 1)
    for opt in optimizers.values():
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, Tensor) and v.dim() > 0:
                    n += v.numel() * v.element_size()
    return n
