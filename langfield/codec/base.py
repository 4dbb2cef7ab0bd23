"""The language codec interface: how 512-D CLIP features become what each Gaussian carries.

A codec turns the 2D features of the training images into **targets** the rendered per-pixel
latents are fitted to, defines the **loss** between a render and its targets, and turns rendered
latents back into CLIP space for queries (**decode**, or directly **decode_scores** against a
few text embeddings). The language stage, :class:`~langfield.field.LanguageField`, the viewer
and ``eval`` only talk to this interface, so a new codec (LangSplatV2's sparse codebook) plugs
in without touching them.

=====================  ==========================================================================
``kind``               name recorded in the run's config (``language.codec.kind``)
``in_dim``             size of the CLIP features (512 for ViT-B-16)
``latent_dim``         channels per level that each Gaussian carries and the renderer blends
``encode(x)``          ``[..., in_dim] -> [..., latent_dim]`` (a feature's latent)
``decode(z)``          ``[..., latent_dim] -> [..., in_dim]``, L2-normalised CLIP-space features
``decode_scores(z,e)`` cosines ``[n, K]`` of decoded ``z [n, latent_dim]`` with ``e [K, in_dim]``
``targets(x)``         2D supervision: features ``[R, in_dim]`` -> targets ``[R, target_dim]``
``target_dim``         size of one target (``latent_dim`` for the autoencoder)
``loss(p, t, valid)``  one level's loss: render ``[H, W, latent_dim]`` vs targets ``[H, W, target_dim]``
``save(path)``, ``load(path, device)``  files next to the run (no pickle)
``report``             a dict the fit fills (recorded in the run's config)
=====================  ==========================================================================
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Optional, Protocol, Tuple, Union, runtime_checkable

import torch
from torch import Tensor

__all__ = ["LanguageCodec", "CODECS", "codec_class", "codec_file", "load_codec", "fit_codec", "masked_l1_level",
           "CodecError"]

PathLike = Union[str, os.PathLike]


class CodecError(ValueError):
    """An unknown codec kind or a codec file that does not fit the run."""


@runtime_checkable
class LanguageCodec(Protocol):
    kind: str
    report: Dict[str, Any]

    @property
    def in_dim(self) -> int: ...

    @property
    def latent_dim(self) -> int: ...

    @property
    def target_dim(self) -> int: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def decode_scores(self, z: Tensor, emb: Tensor) -> Tensor: ...

    def targets(self, x: Tensor) -> Tensor: ...

    def loss(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor: ...

    def save(self, path: PathLike) -> str: ...


# kind -> (module, class name, file stem in the run folder)
CODECS: Dict[str, Tuple[str, str, str]] = {
    "autoencoder": ("langfield.codec.autoencoder", "SceneAutoencoder", "autoencoder"),
    "codebook": ("langfield.codec.codebook", "CodebookCodec", "codebook"),
}


def codec_class(kind: str):
    if kind not in CODECS:
        raise CodecError(f"unknown language codec {kind!r}; known: {', '.join(CODECS)}")
    import importlib

    mod, cls, _ = CODECS[kind]
    return getattr(importlib.import_module(mod), cls)


def codec_file(kind: str) -> str:
    """The codec's weights file name in a run folder (``autoencoder.safetensors``)."""
    if kind not in CODECS:
        raise CodecError(f"unknown language codec {kind!r}; known: {', '.join(CODECS)}")
    return CODECS[kind][2] + ".safetensors"


def load_codec(path: PathLike, kind: str = "autoencoder", device: Union[str, torch.device] = "cpu"):
    """A saved codec of ``kind`` from ``path`` (its ``.safetensors`` file or stem)."""
    return codec_class(kind).load(path, device=device)


def fit_codec(kind: str, features: Iterable[Tensor], *, latent_dim: int, seed: int = 0,
              device: Union[str, torch.device] = "cpu", progress: bool = False, **options: Any):
    """Fit a codec of ``kind`` on an iterable of feature chunks ``[..., in_dim]`` (every level of
    every training image). Returns ``(codec, report)``."""
    cls = codec_class(kind)
    return cls.fit(features, latent_dim=latent_dim, seed=seed, device=device, progress=progress, **options)


def masked_l1_level(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean absolute error over the ``valid`` pixels of one level (``pred``/``target``
    ``[H, W, L]``, ``valid`` ``[H, W]``), 0 when none is valid."""
    L = pred.shape[-1]
    n = valid.sum()
    d = (pred - target).abs().sum(-1)
    return (d * valid).sum() / (n * L).clamp_min(1)


def first_param_device(module) -> Optional[torch.device]:
    p = next(iter(module.parameters()), None)
    return None if p is None else p.device
