"""Frames as a stream: which training view each step uses.

:class:`EpochSampler` draws one view per step from a fresh seeded permutation of the training
views per epoch, as the per-scene trainers always have. The list of views may **grow while
training** (:meth:`EpochSampler.add_views`: online mapping appends keyframes, a viewer-driven
capture appends frames); new views join at the next epoch, so a fixed list gives exactly the
order it gave before. The generator, the current permutation and the position are the whole
state (checkpointed for an exact resume).

Schedules that do not need the run length up front live here too: :func:`exp_decay` gives
gsplat's exponential learning-rate decay either over a known number of steps or, for an open
stream, with a fixed half-life.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["EpochSampler", "exp_decay"]


class EpochSampler:
    """One training view per step from ``train_idx`` (a list that may grow), in seeded
    random order per epoch. Subclasses (the trainers) set ``train_idx``, ``gen``, ``perm``
    and ``pos``; or construct it directly."""

    train_idx: List[int]
    gen: torch.Generator
    perm: Tensor
    pos: int

    def __init__(self, train_idx: Sequence[int] = (), seed: int = 0):
        self.train_idx = list(train_idx)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.zeros(0, dtype=torch.long)
        self.pos = 0

    def add_views(self, indices: Sequence[int]) -> None:
        """Append views to the stream; they are drawn from the next epoch on."""
        self.train_idx.extend(int(i) for i in indices)

    def _next_index(self) -> int:
        if self.pos >= self.perm.numel():
            if not self.train_idx:
                raise RuntimeError("no training views to sample from")
            self.perm = torch.randperm(len(self.train_idx), generator=self.gen)
            self.pos = 0
        i = self.train_idx[int(self.perm[self.pos])]
        self.pos += 1
        return i

    next_index = _next_index


def exp_decay(start: float, final_ratio: float, step: int, total: Optional[int] = None,
              half_life: Optional[int] = None) -> float:
    """``start`` decayed exponentially: to ``start * final_ratio`` at ``total`` steps (gsplat's
    ``ExponentialLR(gamma = final_ratio ** (1 / total))`` in closed form), or, for a stream of
    unknown length, halved every ``half_life`` steps and floored at ``start * final_ratio``."""
    if total is not None:
        return start * final_ratio ** (step / max(int(total), 1))
    if half_life is None or half_life <= 0:
        return start
    return max(start * 0.5 ** (step / half_life), start * final_ratio)
