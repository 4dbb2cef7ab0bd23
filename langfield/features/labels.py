"""``labels``: features from ground-truth label maps (the procedural scenes, or any
nerfstudio dataset with the same fields).

Per frame the dataset gives ``label_paths`` ``{whole, part, subpart}`` (16-bit PNG label ids,
0 = background; in ``transforms.json``, kept in ``frame.extras``) and the dataset folder holds
``labels.json`` (``names[level][id]`` -> text). Each level's regions are the ids present in the
view (ascending), the index map is each pixel's position in that list (-1 = background), and
each region's feature is the text embedding of its name. With the default settings the
result is exact: what a perfect, view-consistent 2D segmenter + an ideal CLIP would give.

To imitate real 2D masks (inconsistent across views), per view and deterministically from
``seed`` and the frame name:

* ``noise``: Gaussian noise of about that norm added to each region's embedding (then
  re-normalised);
* ``drop``: each region is dropped (its pixels become -1) with this probability;
* ``merge``: each region is merged with a random neighbouring region with this probability;
  the merged region's feature is the area-weighted mean of the two embeddings
  (re-normalised).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LEVELS, ExtractorBase, FeatureMaps, FrameInfo, LevelMaps, check_image

__all__ = ["LabelsExtractor", "LabelsParams", "read_label_names"]


@dataclass
class LabelsParams:
    noise: float = 0.0
    drop: float = 0.0
    merge: float = 0.0
    seed: int = 0


def read_label_names(root: Path) -> Dict[str, Dict[int, str]]:
    """``labels.json`` -> {level: {id: name}}."""
    path = Path(root) / "labels.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the labels extractor needs labels.json (id -> name per level) "
                                f"next to transforms.json, as `langfield scenes make` writes it")
    meta = json.loads(path.read_text("utf-8"))
    names = meta.get("names")
    if not isinstance(names, dict):
        raise ValueError(f"{path}: missing 'names' ({{level: {{id: name}}}})")
    return {lv: {int(k): str(v) for k, v in names.get(lv, {}).items()} for lv in LEVELS}


def _read_labels(path: Path, size: Optional[Tuple[int, int]]) -> Tensor:
    from ..data.base import read_image

    arr = read_image(path, "label map")
    if arr.ndim == 3:
        arr = arr[..., 0]
    t = torch.from_numpy(arr.astype(np.int64))
    if size is not None and tuple(t.shape) != tuple(size):
        t = F.interpolate(t[None, None].double(), size=size, mode="nearest-exact")[0, 0].round().long()
    return t


class LabelsExtractor(ExtractorBase):
    """Ground-truth regions + text embeddings of their names (see the module docstring)."""

    name = "labels"
    kind = "regions"
    levels = LEVELS
    needs_image = False  # reads only label maps: extract_dataset passes image=None

    def __init__(self, text_encoder, params: Optional[LabelsParams] = None):
        self.text = text_encoder
        self.params = params or LabelsParams()
        self.dim = int(text_encoder.dim)
        self._names: Dict[str, Dict[str, Dict[int, str]]] = {}
        self._emb: Dict[str, Tensor] = {}

    def config(self) -> Dict[str, Any]:
        return {"extractor": self.name, "kind": self.kind, "levels": list(self.levels), "dim": self.dim,
                "text": self.text.config(), "params": asdict(self.params)}

    def text_config(self) -> Dict[str, Any]:
        return self.text.config()

    def names(self, root: Path) -> Dict[str, Dict[int, str]]:
        key = str(Path(root).resolve())
        if key not in self._names:
            self._names[key] = read_label_names(root)
            todo = sorted({n for lv in self._names[key].values() for n in lv.values() if n not in self._emb})
            if todo:
                for n, e in zip(todo, self.text.encode(todo).float().cpu()):
                    self._emb[n] = e
        return self._names[key]

    def embed(self, names: List[str]) -> Tensor:
        missing = [n for n in names if n not in self._emb]
        if missing:
            for n, e in zip(missing, self.text.encode(missing).float().cpu()):
                self._emb[n] = e
        if not names:
            return torch.zeros(0, self.dim)
        return torch.stack([self._emb[n] for n in names])

    def _rng(self, info: FrameInfo, level: str) -> np.random.Generator:
        h = hashlib.blake2b(f"{self.params.seed}\x00{info.name}\x00{level}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(h, "little"))

    def extract(self, image: Optional[Tensor], info: FrameInfo) -> FeatureMaps:
        paths = info.extras.get("label_paths")
        if not isinstance(paths, dict) or info.root is None:
            raise ValueError(f"frame {info.name!r} has no label_paths: the labels extractor needs ground-truth label "
                             f"maps (transforms.json frames with label_paths {{whole, part, subpart}}, as "
                             f"`langfield scenes make` writes)")
        if image is not None:
            size = tuple(check_image(image).shape[:2])
        else:
            size = info.size
        names = self.names(info.root)
        levels = {}
        for level in LEVELS:
            if level not in paths:
                raise ValueError(f"frame {info.name!r}: label_paths has no {level!r} map")
            lab = _read_labels(Path(info.root) / paths[level], size)
            ids = torch.unique(lab)
            ids = ids[ids != 0]
            lut = torch.full((int(lab.max()) + 2,), -1, dtype=torch.long)
            lut[ids] = torch.arange(ids.numel())
            idx = lut[lab]
            try:
                region_names = [names[level][int(i)] for i in ids]
            except KeyError as e:
                raise ValueError(f"frame {info.name!r}: {level} label id {e.args[0]} is not in labels.json") from None
            feats = self.embed(region_names)
            idx, feats = self._perturb(idx, feats, self._rng(info, level))
            levels[level] = LevelMaps(feats.half().contiguous(), idx.to(torch.int32).contiguous())
        H, W = levels[LEVELS[0]].index.shape
        return FeatureMaps(levels, (H, W), "regions")

    def _perturb(self, idx: Tensor, feats: Tensor, rng: np.random.Generator) -> Tuple[Tensor, Tensor]:
        p = self.params
        R = feats.shape[0]
        if R == 0 or (p.noise <= 0 and p.drop <= 0 and p.merge <= 0):
            return idx, feats
        feats = feats.clone()
        areas = torch.bincount(idx[idx >= 0], minlength=R).double()
        target = np.arange(R)  # region -> region it is merged into (union-find roots)

        def root(a):
            while target[a] != a:
                a = target[a]
            return a

        if p.merge > 0 and R > 1:
            # neighbouring pairs from horizontally / vertically adjacent pixels
            pairs = set()
            for a, b in ((idx[:, 1:], idx[:, :-1]), (idx[1:, :], idx[:-1, :])):
                m = (a != b) & (a >= 0) & (b >= 0)
                if m.any():
                    ab = torch.stack([a[m], b[m]], 1)
                    ab = torch.unique(torch.sort(ab, 1).values, dim=0)
                    pairs.update(map(tuple, ab.tolist()))
            nbrs: Dict[int, List[int]] = {}
            for a, b in sorted(pairs):
                nbrs.setdefault(a, []).append(b)
                nbrs.setdefault(b, []).append(a)
            for r in rng.permutation(R):
                if rng.random() < p.merge and nbrs.get(int(r)):
                    other = root(int(rng.choice(nbrs[int(r)])))
                    a = root(int(r))
                    if other != a:
                        wa, wb = areas[a], areas[other]
                        feats[other] = F.normalize((feats[a] * wa + feats[other] * wb).float(), dim=0)
                        areas[other] = wa + wb
                        target[a] = other
        roots = np.array([root(r) for r in range(R)])
        keep = roots == np.arange(R)
        if p.drop > 0:
            keep &= rng.random(R) >= p.drop
        if p.noise > 0:
            n = torch.from_numpy(rng.standard_normal((R, feats.shape[1]))).float() * (p.noise / feats.shape[1] ** 0.5)
            feats = F.normalize(feats + n, dim=-1)
        new = np.full(R + 1, -1, dtype=np.int64)
        kept_ids = np.nonzero(keep)[0]
        new[kept_ids] = np.arange(len(kept_ids))
        remap = torch.from_numpy(new[np.append(roots, R)])  # region -> root -> new index (or -1)
        idx = remap[torch.where(idx < 0, R, idx)]
        return idx, feats[torch.from_numpy(kept_ids)]
