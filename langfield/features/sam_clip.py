"""``sam-clip``: LangSplat's feature recipe, re-implemented.

Per image:

1. SAM image embedding once (``SamPredictor.set_image``).
2. A regular grid of ``points_per_side`` x ``points_per_side`` single-point prompts, decoded in
   batches of ``points_per_batch`` with ``multimask_output=True``: SAM's three outputs per
   prompt are the three levels (0 -> ``subpart``, 1 -> ``part``, 2 -> ``whole``).
   Mask logits are resampled from SAM's low-resolution output to the image in one bilinear
   step (SAM's own post-processing upsamples to 1024 x 1024 first: same masks up to
   interpolation, far less memory).
3. Per level: keep masks with predicted IoU > ``pred_iou_thresh``, stability score >
   ``stability_score_thresh`` (SAM's definition, offset 1.0) and at least ``min_mask_area``
   pixels; box NMS (``box_nms_thresh``) as SAM's automatic generator does; then mask NMS
   (:func:`~langfield.features.nms.mask_nms`, vectorised) on score = stability x predicted
   IoU, with LangSplat's thresholds (IoU 0.8, score 0.7, nested masks dropped).
4. Index map per level: every pixel gets the **smallest** kept mask covering it (smaller
   masks are painted over larger ones, as LangSplat does); masks left with no pixel are
   dropped; uncovered pixels are -1.
5. CLIP per region: the mask's bounding box crop with the background zeroed, zero-padded to
   a square (centred), resized to the CLIP input size (bicubic, antialiased), encoded in
   batches of ``clip_batch``, L2-normalised, stored as float16.

Not re-implemented from SAM's automatic generator: multi-crop layers (``crop_n_layers``) and
the hole/island clean-up of ``min_mask_region_area`` (here: a plain area threshold).

SAM's predictor resizes the longest image side to ``sam.image_encoder.img_size`` (1024 for
the released models), so any SAM built with another ``img_size`` works unchanged (the tests
use a tiny one with 64).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LEVELS, ExtractorBase, FeatureMaps, FrameInfo, LevelMaps, check_image
from .models import ClipModel
from .nms import mask_nms

__all__ = ["SamClipExtractor", "SamClipParams", "crop_regions", "index_map_smallest_first"]


@dataclass
class SamClipParams:
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.7
    stability_score_thresh: float = 0.85
    stability_score_offset: float = 1.0
    min_mask_area: int = 100
    box_nms_thresh: float = 0.7
    nms_iou_thresh: float = 0.8
    nms_score_thresh: float = 0.7
    nms_contain_thresh: Optional[float] = 0.85  # None: keep nested masks
    nms_contain_ratio: float = 0.5
    max_masks_per_level: int = 256  # after NMS, by score
    clip_batch: int = 64


def _boxes(masks: Tensor) -> Tensor:
    """[M, H, W] bool -> [M, 4] float xyxy (inclusive max + 1); empty masks give zeros."""
    M, H, W = masks.shape
    if M == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows = masks.any(2)
    cols = masks.any(1)
    ar_h = torch.arange(H, device=masks.device)
    ar_w = torch.arange(W, device=masks.device)
    y0 = torch.where(rows, ar_h, H).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, W).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    b = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where((x1 > 0)[:, None], b, torch.zeros_like(b))


def index_map_smallest_first(masks: Tensor) -> Tuple[Tensor, Tensor]:
    """masks [M, H, W] bool -> (index [H, W] int32 with the smallest covering mask per
    pixel, -1 where none; ``used`` [M] long: the masks that own at least one pixel, in
    input order, with the index map renumbered to positions in ``used``)."""
    M, H, W = masks.shape
    if M == 0:
        return torch.full((H, W), -1, dtype=torch.int32, device=masks.device), torch.zeros(0, dtype=torch.long)
    areas = masks.reshape(M, -1).sum(1)
    order = torch.argsort(areas, stable=True)  # smallest first
    flat = masks[order].reshape(M, -1)
    first = flat.to(torch.uint8).argmax(0)  # first True along the sorted masks
    covered = flat.any(0)
    idx = torch.where(covered, order[first], torch.full_like(first, -1))
    owners = torch.unique(idx[covered]) if covered.any() else torch.zeros(0, dtype=torch.long, device=masks.device)
    remap = torch.full((M + 1,), -1, dtype=torch.long, device=masks.device)
    remap[owners] = torch.arange(owners.numel(), device=masks.device)
    out = remap[torch.where(idx < 0, M, idx)].view(H, W).to(torch.int32)
    return out, owners


def crop_regions(image: Tensor, masks: Tensor, size: Tuple[int, int]) -> Tensor:
    """image [3, H, W] in [0, 1], masks [M, H, W] bool -> [M, 3, size] crops: bounding box,
    background zeroed, zero-padded to a centred square, resized (bicubic, antialiased)."""
    M = masks.shape[0]
    out = image.new_zeros(M, 3, *size)
    boxes = _boxes(masks).long().tolist()
    for m, (x0, y0, x1, y1) in enumerate(boxes):
        if x1 <= x0 or y1 <= y0:
            continue
        crop = image[:, y0:y1, x0:x1] * masks[m, y0:y1, x0:x1].to(image.dtype)
        h, w = crop.shape[1:]
        s = max(h, w)
        sq = image.new_zeros(3, s, s)
        oy, ox = (s - h) // 2, (s - w) // 2
        sq[:, oy:oy + h, ox:ox + w] = crop
        down = s > min(size)
        out[m] = F.interpolate(sq[None], size=size, mode="bicubic", align_corners=False, antialias=down)[0]
    return out.clamp_(0, 1)


class SamClipExtractor(ExtractorBase):
    """SAM masks at three levels + CLIP per mask (see the module docstring)."""

    name = "sam-clip"
    kind = "regions"
    levels = LEVELS

    def __init__(self, sam, clip: ClipModel, params: Optional[SamClipParams] = None, sam_source=None):
        from segment_anything import SamPredictor

        self.sam = sam
        self.clip = clip
        self.params = params or SamClipParams()
        self.dim = clip.dim
        self.device = clip.device
        self.predictor = SamPredictor(sam)
        self.sam_source = dict(sam_source or getattr(sam, "_langfield_source", None) or
                               {"kind": "custom", "checkpoint": None, "random_init": None})
        self.sam_source["img_size"] = int(sam.image_encoder.img_size)
        self.stats: Dict[str, Any] = {}

    def config(self) -> Dict[str, Any]:
        return {"extractor": self.name, "kind": self.kind, "levels": list(self.levels), "dim": self.dim,
                "clip": self.clip.source, "sam": self.sam_source, "params": asdict(self.params)}

    def text_config(self) -> Dict[str, Any]:
        return {"type": "clip", **self.clip.source}

    # -------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def masks(self, image: Tensor) -> Dict[str, Tuple[Tensor, Tensor]]:
        """image [H, W, 3] in [0, 1] -> {level: (masks [M, H, W] bool, scores [M])} after NMS,
        by descending score."""
        from torchvision.ops import nms as box_nms

        p = self.params
        H, W = image.shape[:2]
        img8 = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        pred = self.predictor
        pred.set_image(img8)
        sam = self.sam
        dev = pred.device
        n = p.points_per_side
        g = (np.arange(n) + 0.5) / n
        pts = np.stack(np.meshgrid(g * W, g * H), -1).reshape(-1, 2)  # (x, y) pixels, row-major
        pts_in = torch.as_tensor(pred.transform.apply_coords(pts, (H, W)), dtype=torch.float32, device=dev)
        grid = self.logits_grid(H, W)
        acc: List[Dict[str, Tensor]] = [dict(m=torch.zeros(0, H, W, dtype=torch.bool, device=dev),
                                             s=torch.zeros(0, device=dev)) for _ in range(3)]
        n_raw = [0, 0, 0]
        for b in range(0, len(pts_in), p.points_per_batch):
            for k, (m_k, s_k) in enumerate(self.decode_points(pts_in[b:b + p.points_per_batch], grid)):
                n_raw[k] += int(m_k.shape[0])
                if m_k.shape[0] == 0:
                    continue
                m = torch.cat([acc[k]["m"], m_k])
                s = torch.cat([acc[k]["s"], s_k])
                keep = box_nms(_boxes(m), s, p.box_nms_thresh)  # bounded memory between batches
                acc[k] = dict(m=m[keep], s=s[keep])
        out = {}
        for k, level in enumerate(LEVELS):
            m, s = acc[k]["m"], acc[k]["s"]
            keep = mask_nms(m, s, p.nms_iou_thresh, p.nms_score_thresh, p.nms_contain_thresh, p.nms_contain_ratio)
            keep = keep[:p.max_masks_per_level]
            out[level] = (m[keep], s[keep])
        self.stats = {"raw": dict(zip(LEVELS, n_raw)), "kept": {lv: int(v[0].shape[0]) for lv, v in out.items()}}
        pred.reset_image()
        return out

    def logits_grid(self, H: int, W: int) -> Tensor:
        """[1, H, W, 2] grid_sample grid: one bilinear step from SAM's low-res logits (of the
        padded square input frame) to the image set in the predictor."""
        S = self.sam.image_encoder.img_size
        ih, iw = self.predictor.input_size
        dev = self.predictor.device
        ys = ((torch.arange(H, device=dev) + 0.5) * (ih / H)) / S * 2 - 1
        xs = ((torch.arange(W, device=dev) + 0.5) * (iw / W)) / S * 2 - 1
        return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]  # (x, y)

    @torch.no_grad()
    def decode_points(self, points: Tensor, grid: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """One batch of point prompts (in SAM's input frame, [B, 2]) on the image set in the
        predictor -> per multimask output k: (masks [n, H, W] bool, scores [n]) of the masks
        passing the thresholds. ``grid``: [1, H, W, 2] resampling grid from the low-res
        logits to the image."""
        p = self.params
        sam = self.sam
        dev = points.device
        c = points[:, None, :]
        labels = torch.ones(c.shape[:2], dtype=torch.int64, device=dev)
        sparse, dense = sam.prompt_encoder(points=(c, labels), boxes=None, masks=None)
        low, iou = sam.mask_decoder(image_embeddings=self.predictor.features,
                                    image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                    dense_prompt_embeddings=dense, multimask_output=True)
        H, W = grid.shape[1:3]
        out = []
        thr = sam.mask_threshold
        for k in range(low.shape[1]):
            sel = torch.nonzero(iou[:, k] > p.pred_iou_thresh).flatten()  # cheap test first
            if sel.numel() == 0:
                out.append((torch.zeros(0, H, W, dtype=torch.bool, device=dev), torch.zeros(0, device=dev)))
                continue
            lg = F.grid_sample(low[sel, k:k + 1].float(), grid.expand(sel.numel(), -1, -1, -1), mode="bilinear",
                               padding_mode="border", align_corners=False)[:, 0]
            hi = (lg > thr + p.stability_score_offset).flatten(1).sum(-1).float()
            lo = (lg > thr - p.stability_score_offset).flatten(1).sum(-1).float()
            stab = torch.where(lo > 0, hi / lo.clamp_min(1), torch.zeros_like(hi))
            binm = lg > thr
            del lg
            area = binm.flatten(1).sum(-1)
            ok = (stab > p.stability_score_thresh) & (area >= max(1, p.min_mask_area))
            out.append((binm[ok], (iou[sel, k][ok] * stab[ok]).float()))
        return out

    # ------------------------------------------------------------------------------ extract
    @torch.no_grad()
    def extract(self, image: Tensor, info: Optional[FrameInfo] = None) -> FeatureMaps:
        image = check_image(image).to(self.device)
        H, W = image.shape[:2]
        per_level = self.masks(image)
        chw = image.permute(2, 0, 1)
        idx_maps, crops, counts = {}, [], []
        for level in LEVELS:
            m, _ = per_level[level]
            idx, used = index_map_smallest_first(m)
            idx_maps[level] = idx
            m = m[used]
            counts.append(m.shape[0])
            crops.append(crop_regions(chw, m, self.clip.image_size))
        crops_t = torch.cat(crops) if crops else chw.new_zeros(0, 3, *self.clip.image_size)
        feats = self.clip.encode_image(crops_t, batch_size=self.params.clip_batch).half().cpu()
        levels, o = {}, 0
        for level, c in zip(LEVELS, counts):
            levels[level] = LevelMaps(feats[o:o + c].contiguous(), idx_maps[level].cpu())
            o += c
        return FeatureMaps(levels, (H, W), "regions", meta={"regions": dict(zip(LEVELS, counts))})
