"""Mask non-maximum suppression, vectorised on the device.

The pairwise intersections of M binary masks are one matrix product of the flattened masks
(chunked over pixels so memory stays bounded; exact integer counts in float32 per chunk,
accumulated in float64), instead of an O(M^2) Python loop over mask pairs. What remains is a
greedy pass over M rows of an M x M boolean matrix.

Rule (:func:`mask_nms`), over masks with ``score > score_thresh``:

1. *containment* (optional, ``contain_thresh``): a mask is dropped when at least
   ``contain_thresh`` of its pixels lie inside another candidate that it covers less than
   ``contain_ratio`` of (a small mask nested in a much larger one at the same level);
   independent of scores;
2. *greedy IoU*: the rest, by descending score (ties: lower index first), are kept unless
   their IoU with an already kept mask exceeds ``iou_thresh``.

Returns the kept indices in descending-score order.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["mask_intersections", "mask_iou", "mask_nms"]


def mask_intersections(masks: Tensor, max_chunk_bytes: int = 1 << 28) -> Tuple[Tensor, Tensor]:
    """masks [M, ...] bool -> (intersections [M, M] float64, areas [M] float64)."""
    M = masks.shape[0]
    flat = masks.reshape(M, -1)
    P = flat.shape[1]
    dtype = torch.float16 if flat.device.type == "cuda" else torch.float32
    # fp16 on the GPU is exact only while a chunk's counts stay below 2048
    limit = 2048 if dtype == torch.float16 else 1 << 24
    chunk = max(1, min(P, limit, max_chunk_bytes // max(1, M * 4)))
    inter = torch.zeros(M, M, dtype=torch.float64, device=flat.device)
    for s in range(0, P, chunk):
        x = flat[:, s:s + chunk].to(dtype)
        inter += (x @ x.T).double()
    areas = torch.diagonal(inter).clone()
    return inter, areas


def mask_iou(masks: Tensor) -> Tensor:
    """[M, ...] bool -> IoU [M, M] float64 (0 where both masks are empty)."""
    inter, areas = mask_intersections(masks)
    union = areas[:, None] + areas[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def mask_nms(masks: Tensor, scores: Tensor, iou_thresh: float = 0.8, score_thresh: float = 0.0,
             contain_thresh: Optional[float] = None, contain_ratio: float = 0.5) -> Tensor:
    """Indices (long, on ``masks``' device) of the masks kept by the rule in the module
    docstring, by descending score."""
    M = masks.shape[0]
    device = masks.device
    if M == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    scores = scores.to(device).float()
    cand = torch.nonzero(scores > score_thresh).flatten()
    if cand.numel() == 0:
        return cand
    # stable descending sort (ties keep the lower index first)
    order = cand[torch.from_numpy(np.argsort(-scores[cand].cpu().numpy(), kind="stable")).to(device)]
    inter, areas = mask_intersections(masks[order])
    keep_mask = torch.ones(order.numel(), dtype=torch.bool, device=device)
    if contain_thresh is not None:
        a_i = areas[:, None]  # the container
        a_j = areas[None, :]  # the contained
        inside = (inter >= contain_thresh * a_j) & (inter < contain_ratio * a_i) & (a_j > 0)
        inside.fill_diagonal_(False)
        keep_mask &= ~inside.any(0)
    union = areas[:, None] + areas[None, :] - inter
    over = (inter > iou_thresh * union) & (union > 0)  # IoU > thr without a division
    over = torch.triu(over, diagonal=1).cpu().numpy()
    alive = keep_mask.cpu().numpy().copy()
    suppressed = ~alive
    for i in range(len(order)):
        if suppressed[i]:
            continue
        suppressed |= over[i]
    kept = np.nonzero(~suppressed)[0]
    return order[torch.from_numpy(kept).to(device)]
