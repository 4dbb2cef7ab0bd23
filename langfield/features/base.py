"""The extractor interface and the per-image result type.

An extractor turns one image ``[H, W, 3]`` float in [0, 1] into :class:`FeatureMaps`: per
level either

* **regions** (``sam-clip``, ``labels``; LangSplat's representation): ``features`` [R, D]
  float16, one L2-normalised CLIP vector per region, and ``index`` [H, W] int32 giving each
  pixel's region (-1: no region); or
* **dense** (``dense-clip``): ``features`` [h, w, D] float16 at reduced (patch) resolution;
  ``index`` is None and consumers interpolate to the image size
  (:meth:`FeatureMaps.dense`).

Levels: ``("subpart", "part", "whole")`` for sam-clip and labels (LangSplat's s / m / l),
``("dense",)`` for dense-clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LEVELS", "LevelMaps", "FeatureMaps", "FrameInfo", "FeatureExtractor", "ExtractorBase", "WeightsError",
           "WeightsUnavailableError", "resolve_device"]

LEVELS = ("subpart", "part", "whole")  # sam-clip multimask outputs 0, 1, 2; scenes' label levels


class WeightsError(RuntimeError):
    """Model weights exist but cannot be loaded (wrong file, wrong architecture)."""


class WeightsUnavailableError(WeightsError, FileNotFoundError):
    """Model weights are not available here (no file, no cache, no internet). The message
    names the model and how to supply its weights."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class LevelMaps:
    features: Tensor  # [R, D] (regions) or [h, w, D] (dense); float16, L2-normalised rows
    index: Optional[Tensor] = None  # [H, W] int32, -1 = no region (regions only)

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[0]) if self.index is not None else 0


@dataclass
class FeatureMaps:
    """Features of one image at every level (see the module docstring)."""

    levels: Dict[str, LevelMaps]
    image_size: Tuple[int, int]  # (H, W) of the image the features describe
    kind: str = "regions"  # "regions" | "dense"
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("regions", "dense"):
            raise ValueError(f"kind must be 'regions' or 'dense', got {self.kind!r}")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    @property
    def level_names(self) -> List[str]:
        return list(self.levels)

    @property
    def dim(self) -> int:
        return int(next(iter(self.levels.values())).features.shape[-1])

    def dense(self, level: str, size: Optional[Tuple[int, int]] = None) -> Tensor:
        """Per-pixel features [H, W, D] float32 at ``size`` (default: the image size); pixels
        without a region are zero. Dense maps are bilinearly interpolated (and
        re-normalised); region maps are gathered (nearest for another size)."""
        H, W = size or self.image_size
        lv = self.levels[level]
        if lv.index is not None:
            idx = lv.index
            if (H, W) != tuple(idx.shape):
                idx = F.interpolate(idx[None, None].float(), size=(H, W), mode="nearest-exact")[0, 0].long()
            idx = idx.long()
            feats = torch.cat([lv.features.float(), lv.features.new_zeros(1, lv.features.shape[1]).float()])
            return feats[torch.where(idx < 0, feats.shape[0] - 1, idx)]
        x = lv.features.float().permute(2, 0, 1)[None]
        y = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        return F.normalize(y, dim=-1)

    def valid(self, level: str, size: Optional[Tuple[int, int]] = None) -> Tensor:
        """[H, W] bool: pixels that have a feature at ``level`` (all of them for dense maps)."""
        H, W = size or self.image_size
        lv = self.levels[level]
        if lv.index is None:
            return torch.ones(H, W, dtype=torch.bool)
        idx = lv.index
        if (H, W) != tuple(idx.shape):
            idx = F.interpolate(idx[None, None].float(), size=(H, W), mode="nearest-exact")[0, 0]
        return idx >= 0

    def to(self, device) -> "FeatureMaps":
        return FeatureMaps({k: LevelMaps(v.features.to(device), None if v.index is None else v.index.to(device))
                            for k, v in self.levels.items()}, self.image_size, self.kind, dict(self.meta))


@dataclass
class FrameInfo:
    """What an extractor may know about an image besides its pixels."""

    name: str
    index: int = 0
    root: Optional[Path] = None  # the dataset folder (relative paths in ``extras`` resolve against it)
    extras: Dict[str, Any] = field(default_factory=dict)  # the frame's format-specific fields
    size: Optional[Tuple[int, int]] = None  # (H, W) of the image as loaded
    read_size: Optional[Tuple[int, int]] = None  # (W, H) files are resized to (Frame.read_size)

    @classmethod
    def from_dataset(cls, dataset, i: int) -> "FrameInfo":
        f = dataset.frames[i]
        return cls(name=f.name or Path(f.image_path).name, index=i, root=Path(dataset.root), extras=dict(f.extras),
                   size=(int(f.height), int(f.width)), read_size=tuple(f.read_size))


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str  # "sam-clip" | "dense-clip" | "labels"
    dim: int
    levels: Tuple[str, ...]
    kind: str  # "regions" | "dense"

    def extract(self, image: Tensor, info: FrameInfo) -> FeatureMaps: ...

    def extract_batch(self, images: Sequence[Tensor], infos: Sequence[FrameInfo]) -> List[FeatureMaps]: ...

    def config(self) -> Dict[str, Any]:
        """JSON-able description (models, pretrained tags, parameters) recorded in the cache."""
        ...

    def text_config(self) -> Dict[str, Any]:
        """The text encoder whose space the features live in (queries must use it)."""
        ...


class ExtractorBase:
    """Default ``extract_batch`` (one image at a time) and ``__repr__``."""

    name = "base"
    kind = "regions"
    levels: Tuple[str, ...] = LEVELS
    dim = 0

    def extract(self, image: Tensor, info: FrameInfo) -> FeatureMaps:  # pragma: no cover - abstract
        raise NotImplementedError

    def extract_batch(self, images: Sequence[Tensor], infos: Sequence[FrameInfo]) -> List[FeatureMaps]:
        return [self.extract(im, inf) for im, inf in zip(images, infos)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


def check_image(image: Tensor) -> Tensor:
    if not isinstance(image, Tensor):
        image = torch.as_tensor(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {list(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    return image.float().clamp(0, 1)
