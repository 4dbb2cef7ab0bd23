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
back (``bench/distributed.py`` measures both).

Training (``langfield train --shard-gaussians`` under ``torchrun``,
:class:`langfield.train.rgb.RGBTrainer`): every local Gaussian carries its **global index**, its
row in the replicated run's parameter tensors. The camera's rank also computes gsplat's
densification statistics of the gathered rows (``grad2d``, ``count``, ``radii``, exactly as
``DefaultStrategy._update_state``) and sends them back with the gradients, so each owner
accumulates the statistics of its own Gaussians. :func:`sharded_refine` then takes
``DefaultStrategy``'s grow / prune decisions shard by shard and keeps the global indices equal
to the replicated run's (duplicates appended in global order, the split draws of
``torch.randn(2, n_split, 3)`` drawn once for all shards and handed to the owners, pruned rows
closing the gaps), so checkpoints gathered onto rank 0 (:func:`gather_to_main`, rows in global
order) are those of a data-parallel run, whatever the number of ranks.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .core import Dist

__all__ = ["morton_shards", "visible_mask", "ShardedRenderer", "pack_activated", "sharded_refine", "gather_to_main",
           "shard_state_bytes"]


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

    def __init__(self, job: Dist, strategy=None):
        self.job = job
        self.strategy = strategy  # gsplat DefaultStrategy: densification statistics go back with the gradients
        self.bytes_sent = 0
        self.bytes_received = 0
        self.gathered_rows = 0  # rows rendered by this rank in the last step
        self.stats: Optional[Dict[str, Tensor]] = None  # statistics of the local Gaussians (take_stats)
        self._pending = None

    def _gather_to(self, dst: int, rows: Tensor, counts: List[int]) -> Optional[Tensor]:
        import torch.distributed as dist

        job = self.job
        m = max(max(counts), 1)
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
        m = max(max(counts), 1)
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
               ids: Optional[Tensor] = None, absgrad: bool = False, n_cameras: Optional[int] = None):
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
        means, quats, scales, opac, sh = _unpack(remote, k)
        sh = sh[:, :(deg + 1) ** 2]
        bg = None
        if background is not None:
            bg = torch.as_tensor(background, dtype=torch.float32, device=dev).reshape(1, 3)
        out, alpha, meta = rasterization(means, quats, scales, opac, sh, camera.viewmats.to(dev),
                                         camera.Ks.to(dev), camera.width, camera.height, sh_degree=deg,
                                         backgrounds=bg, backend=backend, absgrad=absgrad)
        stats = self.strategy is not None and n_cameras is not None
        if stats:
            meta["means2d"].retain_grad()
        self._pending = (act, idx, counts, remote, width, order, meta if stats else None, n_cameras)
        return out[0, ..., :3], alpha[0, ..., 0]

    def _row_stats(self, meta, n_rows: int, n_cameras: int) -> Tensor:
        """``[n_rows, 3]``: grad2d, count and radii increments of the gathered rows, computed by
        gsplat's own ``DefaultStrategy._update_state`` from this camera's render."""
        from types import SimpleNamespace

        st = self.strategy
        m2 = meta["means2d"]
        dev = m2.device
        tmp = {"grad2d": torch.zeros(n_rows, device=dev), "count": torch.zeros(n_rows, device=dev),
               "radii": torch.zeros(n_rows, device=dev) if st.refine_scale2d_stop_iter > 0 else None,
               "scene_scale": 1.0}
        g = getattr(m2, "absgrad", None) if st.absgrad else m2.grad
        if g is None:  # the loss did not reach this render
            g = torch.zeros_like(m2)
        info = {**meta, "n_cameras": n_cameras, st.key_for_gradient: SimpleNamespace(grad=g, absgrad=g)}
        st._update_state({"means": torch.empty(n_rows, 0, device=dev)}, tmp, info, packed=False)
        return torch.stack([tmp["grad2d"], tmp["count"],
                            tmp["radii"] if tmp["radii"] is not None else torch.zeros(n_rows, device=dev)], 1)

    def take_stats(self) -> Optional[Dict[str, Tensor]]:
        """The densification statistics accumulated by :meth:`backward` since the last call
        (``grad2d`` and ``count`` summed, ``radii`` the maximum; ``None`` without a strategy)."""
        out, self.stats = self.stats, None
        if out is not None and self.strategy.refine_scale2d_stop_iter <= 0:
            out["radii"] = None  # as DefaultStrategy: no screen radii kept
        return out

    def backward(self) -> None:
        """Send the gathered rows' gradients to their owners and back-propagate them into this
        rank's parameters (accumulating into ``.grad``)."""
        act, idx, counts, remote, width, order, meta, n_cameras = self._pending
        self._pending = None
        job = self.job
        g_remote = remote.grad if remote.grad is not None else torch.zeros_like(remote)
        cols = width
        if meta is not None:  # the densification statistics ride along with the gradients
            g_remote = torch.cat([g_remote, self._row_stats(meta, g_remote.shape[0], n_cameras).to(g_remote)], 1)
            cols = width + 3
        if order is not None:  # back to the gathered (shard) order
            g = torch.empty_like(g_remote)
            g[order] = g_remote
            g_remote = g
        g_act = torch.zeros_like(act)
        n = act.shape[0]
        if meta is not None and self.stats is None:
            z = torch.zeros(n, device=act.device)
            self.stats = {"grad2d": z, "count": z.clone(), "radii": z.clone()}
        for c in range(job.world):
            per_shard = [counts[r][c] for r in range(job.world)]
            if job.active:
                g = self._scatter_from(c, g_remote if c == job.rank else None, per_shard, cols, act.detach())
            else:
                g = g_remote
            if meta is not None:
                self.stats["grad2d"].index_add_(0, idx[c], g[:, width])
                self.stats["count"].index_add_(0, idx[c], g[:, width + 1])
                self.stats["radii"].scatter_reduce_(0, idx[c], g[:, width + 2], "amax")
            if idx[c].numel() == 0:
                continue
            # one backward per camera: the parameters' gradients add up camera by camera, in the
            # order of the ranks, as the data-parallel all-reduce adds them (the same bits)
            g_act.zero_()
            g_act.index_add_(0, idx[c], g[:, :width])
            act.backward(g_act, retain_graph=True)


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


# ---- sharded densification and checkpoints ------------------------------------------------------

def _all_ids(job: Dist, local: Tensor, what: str) -> Tensor:
    """The sorted global indices of every rank's ``local`` selection."""
    return torch.cat(job.all_gather_var(local.to(torch.int64), what=what)).sort().values


def _split_rows(params, optimizers, state, mask: Tensor, samples: Tensor, revised_opacity: bool) -> None:
    """gsplat 1.5.3's ``split`` with the children's offsets given (``samples`` [2, n, 3]: this
    shard's columns of the offsets computed for all shards at once): the rows not split
    first, then the first and the second child of every split row (gsplat's layout)."""
    from gsplat.strategy.ops import _update_param_with_optimizer

    dev = mask.device
    sel = torch.where(mask)[0]
    rest = torch.where(~mask)[0]
    scales = torch.exp(params["scales"][sel])

    def param_fn(name: str, p: Tensor) -> Tensor:
        repeats = [2] + [1] * (p.dim() - 1)
        if name == "means":
            p_split = (p[sel] + samples).reshape(-1, 3)
        elif name == "scales":
            p_split = torch.log(scales / 1.6).repeat(2, 1)
        elif name == "opacities" and revised_opacity:
            p_split = torch.logit(1.0 - torch.sqrt(1.0 - torch.sigmoid(p[sel]))).repeat(repeats)
        else:
            p_split = p[sel].repeat(repeats)
        return torch.nn.Parameter(torch.cat([p[rest], p_split]), requires_grad=p.requires_grad)

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return torch.cat([v[rest], torch.zeros((2 * len(sel), *v.shape[1:]), device=dev)])

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)
    for k, v in state.items():
        if isinstance(v, Tensor):
            state[k] = torch.cat((v[rest], v[sel].repeat([2] + [1] * (v.dim() - 1))))


@torch.no_grad()
def sharded_refine(strategy, params, optimizers, state: Dict, step: int, ids: Tensor, n_global: int, job: Dist
                   ) -> Tuple[Tensor, int, Dict[str, int]]:
    """gsplat 1.5.3 ``DefaultStrategy._grow_gs`` + ``_prune_gs`` on Gaussian shards, with the
    same result as on the replicated Gaussians: every shard decides for its own rows from
    their statistics (which :class:`ShardedRenderer` accumulated on the owner), the selected
    global indices are exchanged (three small all-gathers), the split noise is drawn once from
    the global torch RNG (identical on every rank) and each owner takes its rows' columns, and
    every row's new global index follows the replicated layout (duplicates appended in global
    order, then the rows not split, then the first and second children of the split rows, then
    the pruned rows removed). Returns ``(new ids, new global count, counts)``."""
    from gsplat.strategy.ops import duplicate, remove

    dev = ids.device
    N = int(n_global)
    count = state["count"]
    grads = state["grad2d"] / count.clamp_min(1)
    is_grad_high = grads > strategy.grow_grad2d
    is_small = torch.exp(params["scales"]).max(dim=-1).values <= strategy.grow_scale3d * state["scene_scale"]
    is_dupli = is_grad_high & is_small
    is_split = is_grad_high & ~is_small
    if step < strategy.refine_scale2d_stop_iter:
        is_split |= state["radii"] > strategy.grow_scale2d
    D = _all_ids(job, ids[is_dupli], "all_gather of the duplicated Gaussians").to(dev)
    # the split rows' ids with their scales and quats: the samples are computed over all of
    # them in global order, exactly as the replicated run computes them
    sp = torch.cat([params["scales"][is_split], params["quats"][is_split]], 1).detach()
    sid = ids[is_split].to(torch.int64)
    sid_all = torch.cat(job.all_gather_var(sid, what="all_gather of the split Gaussians"))
    sp_all = torch.cat(job.all_gather_var(sp, what="all_gather of the split Gaussians' shapes"))
    S, order = sid_all.sort()
    S, sp_all = S.to(dev), sp_all[order.to(sp_all.device)].to(dev)
    nd, ns = int(D.numel()), int(S.numel())
    # duplicate: the copies take indices N.. in global order
    if int(is_dupli.sum()) > 0:
        new = N + torch.searchsorted(D, ids[is_dupli])
        duplicate(params=params, optimizers=optimizers, state=state, mask=is_dupli)
        ids = torch.cat([ids, new])
        is_split = torch.cat([is_split, torch.zeros(new.numel(), dtype=torch.bool, device=dev)])
    n1 = N + nd
    # split: one draw for all shards, as the replicated run's torch.randn(2, n_split, 3)
    if ns > 0:
        import torch.nn.functional as F
        from gsplat.utils import normalized_quat_to_rotmat

        scales = torch.exp(sp_all[:, :3])
        rotmats = normalized_quat_to_rotmat(F.normalize(sp_all[:, 3:], dim=-1))
        samples = torch.einsum("nij,nj,bnj->bni", rotmats, scales, torch.randn(2, ns, 3, device=dev))
        pos = torch.searchsorted(S, ids[is_split])
        rest = ids[~is_split]
        new_rest = rest - torch.searchsorted(S, rest)
        if pos.numel():
            _split_rows(params, optimizers, state, is_split, samples[:, pos], strategy.revised_opacity)
        ids = torch.cat([new_rest, n1 - ns + pos, n1 + pos])
    n2 = n1 + ns
    # prune (on the grown Gaussians, as _prune_gs after _grow_gs)
    is_prune = torch.sigmoid(params["opacities"].flatten()) < strategy.prune_opa
    if step > strategy.reset_every:
        is_too_big = torch.exp(params["scales"]).max(dim=-1).values > strategy.prune_scale3d * state["scene_scale"]
        if step < strategy.refine_scale2d_stop_iter:
            is_too_big |= state["radii"] > strategy.prune_scale2d
        is_prune = is_prune | is_too_big
    P = _all_ids(job, ids[is_prune], "all_gather of the pruned Gaussians").to(dev)
    if P.numel():
        if int(is_prune.sum()) > 0:
            remove(params=params, optimizers=optimizers, state=state, mask=is_prune)
        kept = ids[~is_prune]
        ids = kept - torch.searchsorted(P, kept)
    return ids, n2 - int(P.numel()), {"duplicated": nd, "split": ns, "pruned": int(P.numel())}


def gather_to_main(job: Dist, ids: Tensor, tensors: Dict[str, Tensor], n_global: int,
                   chunk_rows: int = 1 << 20) -> Optional[Dict[str, Tensor]]:
    """Rank 0: every tensor (rows = this rank's Gaussians, ``ids`` their global indices) put
    together in global order, on the CPU; other ranks: ``None``. Rows travel in chunks of
    ``chunk_rows`` per rank (the receive buffers of one chunk are the only extra device memory)."""
    if not job.active:
        order = torch.empty_like(ids)
        order[ids] = torch.arange(ids.numel(), device=ids.device)
        return {k: v.detach()[order].cpu() for k, v in tensors.items()}
    import torch.distributed as dist

    dev = job.device(ids.device)
    counts = [int(c) for c in job.all_gather(torch.tensor([ids.numel()], dtype=torch.int64, device=dev),
                                             what="all_gather of the shard sizes")]
    if sum(counts) != n_global:
        raise RuntimeError(f"the shards hold {sum(counts)} Gaussians, expected {n_global}")
    m = max(max(counts), 1)
    n_chunks = (m + chunk_rows - 1) // chunk_rows

    def gather(t: Tensor) -> Optional[List[Tensor]]:
        width = 1
        for d in t.shape[1:]:
            width *= int(d)
        flat = t.detach().reshape(t.shape[0], width).to(dev)
        parts_all: List[List[Tensor]] = [[] for _ in range(job.world)]
        for c in range(n_chunks):
            lo = c * chunk_rows
            buf = flat.new_zeros(min(chunk_rows, m - lo), flat.shape[1])
            piece = flat[lo:lo + buf.shape[0]]
            buf[:piece.shape[0]] = piece
            if job.is_main:
                parts = [torch.empty_like(buf) for _ in range(job.world)]
                job.collective("gather of the shards to rank 0", lambda: dist.gather(buf, parts, dst=0))
                for r in range(job.world):
                    parts_all[r].append(parts[r].cpu())
            else:
                job.collective("gather of the shards to rank 0", lambda: dist.gather(buf, dst=0))
        if not job.is_main:
            return None
        return [torch.cat(p)[:counts[r]] for r, p in enumerate(parts_all)]

    id_parts = gather(ids[:, None].to(torch.int64))
    out: Dict[str, Tensor] = {}
    for k, t in tensors.items():
        if t.dim() > 1 and 0 in t.shape[1:]:  # no columns (shN at SH degree 0, on every rank): nothing to send
            if job.is_main:
                out[k] = torch.empty((n_global, *t.shape[1:]), dtype=t.dtype)
            continue
        parts = gather(t)
        if job.is_main:
            full = torch.empty((n_global, *t.shape[1:]), dtype=t.dtype)
            for idr, pr in zip(id_parts, parts):
                full[idr[:, 0]] = pr.reshape(-1, *t.shape[1:]).to(t.dtype)
            out[k] = full
    return out if job.is_main else None


def broadcast_chunked(job: Dist, tensors: Dict[str, Tensor], chunk: int = 1 << 24) -> None:
    """Rank 0's values of ``tensors`` (anywhere, e.g. on the CPU) on every rank, in place, sent
    through the job's device ``chunk`` elements at a time (a whole scene never sits on a GPU)."""
    if not job.active:
        return
    dev = job.device()
    with torch.no_grad():
        for k, t in tensors.items():
            flat = t.data.view(-1)
            for lo in range(0, flat.numel(), chunk):
                part = flat[lo:lo + chunk].to(dev, copy=True)
                job.broadcast(part, src=0, what=f"broadcast of {k!r}")
                flat[lo:lo + chunk] = part.to(flat.device)
