"""Feature extractors and text encoders by name: ``make_extractor(kind, **opts)`` and
``make_text_encoder(kind, ...)``, used by ``langfield extract``, the language stage and anyone
else who needs an extractor (import them from :mod:`langfield.features`)."""

from __future__ import annotations

from typing import Optional

from .base import WeightsUnavailableError, resolve_device
from .models import (DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, check_sam_checkpoint, clip_weights_cached, load_clip,
                     load_sam)
from .text import OFFLINE_NOTE, ClipTextEncoder, OfflineTextEncoder

__all__ = ["make_extractor", "make_text_encoder", "EXTRACTORS"]

EXTRACTORS = ("sam-clip", "dense-clip", "labels")


def make_text_encoder(kind: str = "auto", clip_model: str = DEFAULT_CLIP_MODEL,
                      clip_pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED, clip_checkpoint=None,
                      device="auto", offline_dim: int = 512, log=print):
    """``clip`` (raise when the weights are missing), ``offline`` (hashed, not semantic) or
    ``auto``: CLIP when its weights are here (a checkpoint file, or the tag in the local
    Hugging Face cache), else the offline encoder, announced through ``log``."""
    if kind not in ("auto", "clip", "offline"):
        raise ValueError(f"text encoder must be auto, clip or offline, got {kind!r}")
    if kind == "offline":
        return OfflineTextEncoder(offline_dim)
    if kind == "auto" and clip_checkpoint is None:
        cached = clip_weights_cached(clip_model, clip_pretrained) if clip_pretrained else False
        if cached is False:
            log(f"CLIP weights {clip_model}/{clip_pretrained} are not available here: using the {OFFLINE_NOTE}")
            return OfflineTextEncoder(offline_dim)
    try:
        return ClipTextEncoder(load_clip(clip_model, clip_pretrained, clip_checkpoint, device=device))
    except WeightsUnavailableError:
        if kind == "clip":
            raise
        log(f"CLIP weights {clip_model}/{clip_pretrained} are not available here: using the {OFFLINE_NOTE}")
        return OfflineTextEncoder(offline_dim)


def make_extractor(name: str, *, clip_model: str = DEFAULT_CLIP_MODEL,
                   clip_pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED, clip_checkpoint=None,
                   sam_model: str = "vit_h", sam_checkpoint=None, text_encoder: str = "auto", device="auto",
                   sam_params=None, dense_params=None, labels_params=None, random_init: bool = False, log=print):
    """An extractor by name with its models loaded (see the package docstring)."""
    from .dense_clip import DenseClipExtractor
    from .labels import LabelsExtractor
    from .sam_clip import SamClipExtractor

    dev = resolve_device(device)
    if name == "labels":
        if random_init:
            raise ValueError("the labels extractor has no random-init mode; use text_encoder='offline'")
        return LabelsExtractor(make_text_encoder(text_encoder, clip_model, clip_pretrained, clip_checkpoint, dev,
                                                 log=log), labels_params)
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; use one of {EXTRACTORS}")
    if name == "sam-clip" and not random_init:
        check_sam_checkpoint(sam_model, sam_checkpoint)  # fail before loading CLIP
    clip = load_clip(clip_model, clip_pretrained, clip_checkpoint, device=dev, random_init=random_init)
    if name == "dense-clip":
        return DenseClipExtractor(clip, dense_params)
    sam = load_sam(sam_model, sam_checkpoint, device=dev, random_init=random_init)
    return SamClipExtractor(sam, clip, sam_params)
