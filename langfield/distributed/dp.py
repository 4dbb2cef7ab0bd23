"""Data-parallel training: a batch of cameras split over the ranks, Gaussians replicated.

Every rank holds all Gaussians and the same optimiser and strategy state. Each step:

1. every rank draws the same ``B`` training views (one seeded sampler, identical on every
   rank) and renders its share ``B / N`` of them (rank ``r`` takes views
   ``r B/N .. (r+1) B/N - 1``);
2. each view's loss is divided by ``B`` and back-propagated on its own (the camera loop keeps
   one render's memory at a time); the gradients are **summed** over the ranks in one flat
   all-reduce (:func:`langfield.distributed.all_reduce_grads`), which gives every rank the
   gradient of the batch mean;
3. gsplat's ``DefaultStrategy`` statistics (the screen-space gradient norm per Gaussian
   ``grad2d``, the visibility ``count``, the screen ``radii``) are accumulated per view
   into a zero buffer, **reduced over the ranks** (sum, sum, max) and only then added to the
   running state, so every rank takes the same densify / prune / reset decisions (its
   ``_grow_gs`` / ``_prune_gs`` draw from the global torch RNG, seeded identically);
4. the optimisers step on every rank with identical gradients: the Gaussians stay
   bit-identical, checked every ``sync_check_every`` steps (:meth:`Dist.check_params`).

With ``N = 1`` and ``B > 1`` the same code is a single-process multi-camera batch, and
``2 ranks x 1 camera`` equals ``1 rank x 2 cameras`` (up to the order of float additions in
the reduction; on the CPU backend the two agree to the last bit in practice).

Learning rates with a batch (``lr_batch_scaling``, as gsplat's ``simple_trainer`` does for
``batch_size x world_size``, after Malladi et al.'s square-root rule for Adam): every
learning rate times ``sqrt(B)``, Adam's ``eps`` divided by ``sqrt(B)``, ``betas`` =
``1 - B (1 - beta)``; the number of steps (and the densification schedule) is the user's to
divide by ``B`` (gsplat's ``steps_scaler``), since a step now sees ``B`` images.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .core import Dist

__all__ = ["batch_adam_kwargs", "strategy_post_backward", "reduce_strategy_stats", "accumulate_stats", "refine_due",
           "reset_stats"]


def batch_adam_kwargs(batch: int, scaling: bool = True) -> Tuple[float, Dict[str, Any]]:
    """``(lr factor, Adam kwargs)`` for a global batch of ``batch`` cameras (gsplat's rule)."""
    if batch <= 1 or not scaling:
        return 1.0, {"eps": 1e-15, "betas": (0.9, 0.999)}
    s = math.sqrt(batch)
    b1, b2 = max(1 - batch * (1 - 0.9), 0.0), max(1 - batch * (1 - 0.999), 0.0)
    return s, {"eps": 1e-15 / s, "betas": (b1, b2)}


def reduce_strategy_stats(strategy, params, infos: Sequence[Dict[str, Any]], batch: int, job: Dist
                          ) -> Dict[str, Optional[torch.Tensor]]:
    """This step's ``grad2d`` / ``count`` / ``radii`` increments of all ``batch`` views, over
    every rank: each rank's views (``infos``, rendered one camera per call with the loss
    divided by ``batch``) accumulated by gsplat's own ``_update_state`` into a zero state, then
    summed (max for radii) over the ranks."""
    n = len(next(iter(params.values())))
    dev = next(iter(params.values())).device
    tmp: Dict[str, Any] = {"grad2d": torch.zeros(n, device=dev), "count": torch.zeros(n, device=dev),
                           "radii": torch.zeros(n, device=dev) if strategy.refine_scale2d_stop_iter > 0 else None,
                           "scene_scale": 1.0}
    for info in infos:
        # the loss of one view was divided by the batch: n_cameras = batch restores gsplat's
        # per-view normalisation of the screen gradient (it multiplies by n_cameras)
        strategy._update_state(params, tmp, {**info, "n_cameras": batch}, packed=False)
    if job.active:
        flat = torch.cat([tmp["grad2d"], tmp["count"]])
        job.all_reduce(flat, "sum", what="all_reduce of the densification statistics")
        tmp["grad2d"], tmp["count"] = flat[:n], flat[n:]
        if tmp["radii"] is not None:
            job.all_reduce(tmp["radii"], "max", what="all_reduce of the screen radii")
    return tmp


def strategy_post_backward(strategy, params, optimizers, state: Dict[str, Any], step: int,
                           infos: Sequence[Dict[str, Any]], batch: int, job: Dist) -> None:
    """gsplat 1.5.3 ``DefaultStrategy.step_post_backward`` for a batch split over ranks: the
    statistics of every rank's views are reduced before the refinement decision (see the
    module docstring), which is then taken by gsplat's own ``_grow_gs`` / ``_prune_gs``."""
    if step >= strategy.refine_stop_iter:
        return
    accumulate_stats(state, reduce_strategy_stats(strategy, params, infos, batch, job))
    if refine_due(strategy, step):
        strategy._grow_gs(params, optimizers, state, step)
        strategy._prune_gs(params, optimizers, state, step)
        reset_stats(strategy, state)
    # gsplat 1.5.3's own opacity reset never fires (``step % reset_every == 0 & step > 0``
    # parses as a chained comparison with ``0 > 0``); the trainers' --opacity-reset does it


def accumulate_stats(state: Dict[str, Any], inc: Dict[str, Optional[torch.Tensor]]) -> None:
    """Add one step's statistics increments to the strategy's running state (radii: maximum)."""
    for k in ("grad2d", "count", "radii"):
        if inc.get(k) is None:
            continue
        if state.get(k) is None:
            state[k] = inc[k]
        elif k == "radii":
            state[k] = torch.maximum(state[k], inc[k])
        else:
            state[k] += inc[k]


def refine_due(strategy, step: int) -> bool:
    """gsplat 1.5.3 ``DefaultStrategy.step_post_backward``'s condition for growing and pruning."""
    return (strategy.refine_start_iter < step < strategy.refine_stop_iter and step % strategy.refine_every == 0
            and step % strategy.reset_every >= strategy.pause_refine_after_reset)


def reset_stats(strategy, state: Dict[str, Any]) -> None:
    state["grad2d"].zero_()
    state["count"].zero_()
    if strategy.refine_scale2d_stop_iter > 0 and state.get("radii") is not None:
        state["radii"].zero_()


def local_views(batch: int, job: Dist) -> List[int]:
    """Positions in the global batch that this rank renders."""
    return list(job.share(batch))
