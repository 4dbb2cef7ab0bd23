"""2D language features per image: extractors behind one interface and a resumable cache.

* ``sam-clip`` (:class:`SamClipExtractor`): LangSplat's recipe, SAM masks at three levels
  (subpart / part / whole) + CLIP per masked crop. Regions [R, D] + index maps [H, W].
* ``dense-clip`` (:class:`DenseClipExtractor`): MaskCLIP per-patch features from one forward
  pass per window; the fast path. Dense [h, w, D].
* ``labels`` (:class:`LabelsExtractor`): ground-truth label maps + text embeddings of the
  region names, optionally perturbed to imitate inconsistent 2D masks.

``extract_dataset(dataset, extractor, cache_dir)`` fills a :class:`FeatureCache` (skipping
finished images); ``make_extractor(name, ...)`` loads the models by name. Missing weights
raise :class:`WeightsUnavailableError` naming the model and how to supply it. The cache
manifest records the models used and the matching text encoder
(``cache.text_encoder()``), so queries use the same ones.

Importing this package does not import open_clip or segment_anything.
"""

from .base import (LEVELS, ExtractorBase, FeatureExtractor, FeatureMaps, FrameInfo, LevelMaps, WeightsError,
                   WeightsUnavailableError)
from .cache import CacheCorruptError, CacheMismatchError, FeatureCache, extract_dataset
from .nms import mask_iou, mask_nms
from .text import OFFLINE_NOTE, ClipTextEncoder, OfflineTextEncoder, TextEncoder, load_text_encoder

__all__ = ["LEVELS", "FeatureExtractor", "ExtractorBase", "FeatureMaps", "LevelMaps", "FrameInfo", "WeightsError",
           "WeightsUnavailableError", "FeatureCache", "CacheMismatchError", "CacheCorruptError", "extract_dataset", "mask_iou", "mask_nms",
           "TextEncoder", "ClipTextEncoder", "OfflineTextEncoder", "load_text_encoder", "OFFLINE_NOTE",
           "ClipModel", "load_clip", "load_sam", "SamClipExtractor", "SamClipParams", "DenseClipExtractor",
           "DenseClipParams", "LabelsExtractor", "LabelsParams", "make_extractor", "make_text_encoder"]

_LAZY = {
    "ClipModel": ".models", "load_clip": ".models", "load_sam": ".models",
    "SamClipExtractor": ".sam_clip", "SamClipParams": ".sam_clip",
    "DenseClipExtractor": ".dense_clip", "DenseClipParams": ".dense_clip",
    "LabelsExtractor": ".labels", "LabelsParams": ".labels",
    "make_extractor": ".factory", "make_text_encoder": ".factory",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
