"""Text encoders: a list of strings -> [n, D] L2-normalised embeddings in the space of an
image feature extractor.

* :class:`ClipTextEncoder`: the text tower of an open_clip model (the one the image
  features came from).
* :class:`OfflineTextEncoder`: for machines without CLIP weights. Deterministic hashed
  embeddings: every lower-cased word gets a random unit vector seeded by a hash of the word,
  every exact phrase gets one too, and a text's embedding is the normalised sum of its
  phrase vector and its word vectors. It is **not semantic**: identical names match
  exactly, texts sharing words are correlated ("red mug" vs "blue mug"), synonyms and
  paraphrases are unrelated ("mug" vs "cup"). Like CLIP's, its embeddings share a common
  direction (any two texts have cosine ~0.7), so LERF's relevancy behaves as with CLIP. It is used only by ``labels`` scenes and the
  demo, and announced as such in their output and configs.

``text_config()`` of an extractor / ``encoder.config()`` records which encoder was used;
:func:`load_text_encoder` rebuilds it, so queries on a run use the same one.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Dict, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = ["TextEncoder", "ClipTextEncoder", "OfflineTextEncoder", "load_text_encoder", "OFFLINE_NOTE"]

OFFLINE_NOTE = ("offline text encoder (hashed words, not CLIP): exact label names match, phrases sharing words "
                "are correlated, nothing else is semantic")


@runtime_checkable
class TextEncoder(Protocol):
    name: str
    dim: int
    offline: bool

    def encode(self, texts: Sequence[str]) -> Tensor: ...

    def config(self) -> Dict[str, Any]: ...


class ClipTextEncoder:
    """The text tower of a :class:`~langfield.features.models.ClipModel` (or one loaded by
    name: ``ClipTextEncoder.load("ViT-B-16", "laion2b_s34b_b88k")``)."""

    offline = False

    def __init__(self, clip):
        self.clip = clip
        self.dim = clip.dim
        self.name = f"clip:{clip.label}"
        self._cache: Dict[str, Tensor] = {}

    @classmethod
    def load(cls, model: str, pretrained: Optional[str] = None, checkpoint=None, device="auto") -> "ClipTextEncoder":
        from .models import load_clip

        return cls(load_clip(model, pretrained, checkpoint, device=device))

    def encode(self, texts: Sequence[str]) -> Tensor:
        texts = list(texts)
        todo = sorted({t for t in texts if t not in self._cache})
        if todo:
            for t, e in zip(todo, self.clip.encode_text(todo).cpu()):
                self._cache[t] = e
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

    def config(self) -> Dict[str, Any]:
        return {"type": "clip", **self.clip.source}


_WORD = re.compile(r"[a-z0-9]+")


class OfflineTextEncoder:
    """Deterministic hashed text embeddings (see the module docstring): NOT semantic.

    ``e(text) = normalize(sqrt(shared) * c + sqrt(1 - shared) * normalize(phrase_weight * p(text)
    + sum_w v(w)))``: ``c`` is one vector common to all texts, ``p`` a vector per exact
    (normalised) phrase, ``v`` a vector per word (stop words such as "of", "the" left out).
    ``shared`` gives CLIP's geometry: any two texts have cosine about ``shared`` (CLIP text
    embeddings sit in a narrow cone; LERF's relevancy at temperature 10 is calibrated for
    that), identical texts 1, texts sharing words in between."""

    offline = True
    STOPWORDS = frozenset({"a", "an", "the", "of", "in", "on", "at", "to", "and", "with", "for", "by"})

    def __init__(self, dim: int = 512, seed: int = 0, phrase_weight: float = 2.0, shared: float = 0.7,
                 stopwords: bool = True):
        if dim < 2:
            raise ValueError("dim must be at least 2")
        if not 0.0 <= shared < 1.0:
            raise ValueError(f"shared must be in [0, 1), got {shared}")
        self.dim = int(dim)
        self.seed = int(seed)
        self.phrase_weight = float(phrase_weight)
        self.shared = float(shared)
        self.stopwords = bool(stopwords)
        self.name = f"offline-hash-{self.dim}"

    def _vec(self, key: str) -> np.ndarray:
        h = hashlib.blake2b(f"{self.seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
        v = np.random.default_rng(int.from_bytes(h, "little")).standard_normal(self.dim)
        return v / np.linalg.norm(v)

    def encode(self, texts: Sequence[str]) -> Tensor:
        out = np.zeros((len(texts), self.dim))
        common = self._vec("common") if self.shared > 0 else None
        for i, t in enumerate(texts):
            norm = " ".join(_WORD.findall(t.lower()))
            words = norm.split()
            if self.stopwords:
                words = [w for w in words if w not in self.STOPWORDS] or words
            v = self.phrase_weight * self._vec("phrase:" + norm)
            for w in words:
                v = v + self._vec("word:" + w)
            v = v / max(np.linalg.norm(v), 1e-12)
            if common is not None:
                v = np.sqrt(self.shared) * common + np.sqrt(1.0 - self.shared) * v
            out[i] = v / max(np.linalg.norm(v), 1e-12)
        return torch.from_numpy(out).float()

    def config(self) -> Dict[str, Any]:
        return {"type": "offline", "dim": self.dim, "seed": self.seed, "phrase_weight": self.phrase_weight,
                "shared": self.shared, "stopwords": self.stopwords, "note": OFFLINE_NOTE}


def load_text_encoder(cfg: Dict[str, Any], device="auto", clip=None) -> Union[ClipTextEncoder, OfflineTextEncoder]:
    """Rebuild the text encoder a feature cache / run config records (``cfg`` as written by
    ``encoder.config()``). ``clip``: an already loaded ClipModel to reuse when it matches."""
    kind = cfg.get("type")
    if kind == "offline":
        return OfflineTextEncoder(cfg.get("dim", 512), cfg.get("seed", 0), cfg.get("phrase_weight", 1.0),
                                  cfg.get("shared", 0.0), cfg.get("stopwords", False))
    if kind == "clip":
        if clip is not None and clip.source.get("model") == cfg.get("model") and \
                clip.random_init == bool(cfg.get("random_init")) and \
                (clip.checkpoint or clip.pretrained) == (cfg.get("checkpoint") or cfg.get("pretrained")):
            return ClipTextEncoder(clip)
        if cfg.get("random_init"):
            raise ValueError("these features were made with a randomly initialised CLIP (a test or benchmark run): "
                             "there is no text encoder to match them; re-extract with real weights")
        return ClipTextEncoder.load(cfg["model"], cfg.get("pretrained"), cfg.get("checkpoint"), device=device)
    raise ValueError(f"unknown text encoder config {cfg!r}")
