"""``dense-clip``: per-patch CLIP features from one forward pass (MaskCLIP-style).

CLIP's image embedding is its class token after attention pooling in the last block; the
patch tokens of the ordinary forward pass are not aligned with text. MaskCLIP's
observation: in the last block, the *value* path alone (``ln_1 -> v projection ->
out_proj``, no query-key softmax, no residual and no MLP) followed by ``ln_post`` and the
image projection gives per-patch embeddings in the joint image-text space. That is what
:func:`maskclip_tokens` computes for open_clip ``VisionTransformer`` models.

High resolution: the image is resized so its short side is ``short_side`` pixels (rounded to
whole patches), covered by windows of the model's input size moved by ``stride`` pixels
(the last window of a row / column is aligned to the border), every window is one forward
pass (batched), and overlapping patch features are averaged and re-normalised. Features
are stored at patch resolution ``[h, w, D]`` with the image size; consumers interpolate
(:meth:`FeatureMaps.dense`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ExtractorBase, FeatureMaps, FrameInfo, LevelMaps, check_image
from .models import ClipModel

__all__ = ["DenseClipExtractor", "DenseClipParams", "maskclip_tokens", "window_starts"]


@dataclass
class DenseClipParams:
    short_side: Optional[int] = 448  # resize so the short side has this many pixels (None: keep)
    stride: Optional[int] = None  # window step in pixels (default: 2/3 of the window, whole patches)
    batch_size: int = 16  # windows per forward pass


def _check_vit(clip: ClipModel):
    v = clip.model.visual
    blocks = getattr(getattr(v, "transformer", None), "resblocks", None)
    ok = (blocks is not None and hasattr(v, "conv1") and hasattr(v, "proj") and getattr(v, "attn_pool", None) is None
          and isinstance(getattr(blocks[-1], "attn", None), torch.nn.MultiheadAttention))
    if not ok:
        raise NotImplementedError(
            f"dense-clip needs an open_clip VisionTransformer with standard attention blocks (ViT-B-16, ViT-L-14, "
            f"...); {clip.model_name} has a {type(v).__name__} image tower")
    return v


@torch.no_grad()
def maskclip_tokens(clip: ClipModel, x: Tensor) -> Tensor:
    """x [B, 3, S, S] in [0, 1] at the model's input size -> [B, gh, gw, D] float32,
    L2-normalised per-patch embeddings (value path of the last block, see the module
    docstring)."""
    v = _check_vit(clip)
    x = clip.normalize(x)
    with clip._autocast():
        t = v.conv1(x.to(v.conv1.weight.dtype))  # [B, width, gh, gw]
        B, C, gh, gw = t.shape
        t = t.reshape(B, C, -1).permute(0, 2, 1)
        cls = v.class_embedding.view(1, 1, -1).expand(B, -1, -1).to(t.dtype)
        t = torch.cat([cls, t], 1) + v.positional_embedding.to(t.dtype)
        t = v.ln_pre(t)
        tr = v.transformer
        batch_first = getattr(tr, "batch_first", True)
        if not batch_first:
            t = t.transpose(0, 1)
        for blk in tr.resblocks[:-1]:
            t = blk(t)
        if not batch_first:
            t = t.transpose(0, 1)
        last = tr.resblocks[-1]
        attn = last.attn
        E = attn.embed_dim
        y = last.ln_1(t)
        y = F.linear(y, attn.in_proj_weight[2 * E:], None if attn.in_proj_bias is None else attn.in_proj_bias[2 * E:])
        y = attn.out_proj(y)
        y = last.ls_1(y) if hasattr(last, "ls_1") else y
        y = v.ln_post(y[:, 1:])
        y = y @ v.proj
    return F.normalize(y.float(), dim=-1).view(B, gh, gw, -1)


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Window offsets covering [0, length): 0, stride, ..., with the last one at
    ``length - window`` (a single 0 when the window covers everything)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


class DenseClipExtractor(ExtractorBase):
    """MaskCLIP dense features with sliding windows (see the module docstring)."""

    name = "dense-clip"
    kind = "dense"
    levels = ("dense",)

    def __init__(self, clip: ClipModel, params: Optional[DenseClipParams] = None):
        self.clip = clip
        self.params = params or DenseClipParams()
        v = _check_vit(clip)
        self.patch = int(v.conv1.kernel_size[0])
        self.window = tuple(clip.image_size)
        if self.window[0] % self.patch or self.window[1] % self.patch:
            raise ValueError(f"model input {self.window} is not a multiple of its patch size {self.patch}")
        self.dim = clip.dim
        self.device = clip.device

    def config(self) -> Dict[str, Any]:
        return {"extractor": self.name, "kind": self.kind, "levels": list(self.levels), "dim": self.dim,
                "clip": self.clip.source, "patch": self.patch, "window": list(self.window), "params": asdict(self.params)}

    def text_config(self) -> Dict[str, Any]:
        return {"type": "clip", **self.clip.source}

    def _stride(self) -> Tuple[int, int]:
        p = self.patch
        if self.params.stride is not None:
            s = max(p, int(self.params.stride) // p * p)
            return s, s
        return tuple(max(p, (w * 2 // 3) // p * p) for w in self.window)

    def work_size(self, H: int, W: int) -> Tuple[int, int]:
        """(h, w) in pixels the image is resized to: short side ``short_side``, whole patches,
        at least one window."""
        p = self.patch
        s = self.params.short_side
        scale = 1.0 if s is None else s / min(H, W)
        h = max(p, int(round(H * scale / p)) * p)
        w = max(p, int(round(W * scale / p)) * p)
        return h, w

    def _windows(self, img: Tensor) -> Tuple[Tensor, List[Tuple[int, int]], Tuple[int, int]]:
        """img [3, h, w] -> (windows [N, 3, wh, ww], offsets (y, x) in pixels, padded (h, w))."""
        wh, ww = self.window
        _, h, w = img.shape
        ph, pw = max(h, wh), max(w, ww)
        if (ph, pw) != (h, w):
            img = F.pad(img, (0, pw - w, 0, ph - h))
        sy, sx = self._stride()
        offs = [(y, x) for y in window_starts(ph, wh, sy) for x in window_starts(pw, ww, sx)]
        wins = torch.stack([img[:, y:y + wh, x:x + ww] for y, x in offs])
        return wins, offs, (ph, pw)

    @torch.no_grad()
    def extract_batch(self, images: Sequence[Tensor], infos: Sequence[FrameInfo]) -> List[FeatureMaps]:
        p = self.patch
        preps = []
        for im in images:
            im = check_image(im).to(self.device)
            H, W = im.shape[:2]
            h, w = self.work_size(H, W)
            x = im.permute(2, 0, 1)[None]
            if (h, w) != (H, W):
                x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False,
                                  antialias=h < H or w < W).clamp(0, 1)
            wins, offs, (ph, pw) = self._windows(x[0])
            preps.append(((H, W), (h, w), (ph, pw), wins, offs))
        all_wins = torch.cat([pr[3] for pr in preps])
        toks = torch.cat([maskclip_tokens(self.clip, all_wins[i:i + self.params.batch_size])
                          for i in range(0, all_wins.shape[0], self.params.batch_size)])
        out, o = [], 0
        gwh, gww = self.window[0] // p, self.window[1] // p
        for (H, W), (h, w), (ph, pw), wins, offs in preps:
            acc = toks.new_zeros(ph // p, pw // p, self.dim)
            cnt = toks.new_zeros(ph // p, pw // p, 1)
            for (y, x) in offs:
                acc[y // p:y // p + gwh, x // p:x // p + gww] += toks[o]
                cnt[y // p:y // p + gwh, x // p:x // p + gww] += 1
                o += 1
            feats = F.normalize(acc / cnt.clamp_min(1), dim=-1)[:h // p, :w // p]
            out.append(FeatureMaps({"dense": LevelMaps(feats.half().cpu().contiguous())}, (H, W), "dense",
                                   meta={"windows": len(offs), "work_size": [h, w]}))
        return out

    def extract(self, image: Tensor, info: Optional[FrameInfo] = None) -> FeatureMaps:
        return self.extract_batch([image], [info])[0]
