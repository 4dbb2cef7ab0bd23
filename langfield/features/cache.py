"""The feature cache: one safetensors file per image plus a JSON manifest.

Layout of ``cache_dir``::

    manifest.json              {"format": 1, "extractor": "sam-clip", "kind": "regions",
                                "levels": [...], "dim": 512, "config": {models, tags, params},
                                "text": {the text encoder queries must use},
                                "images": {image name: {"file": ..., "size": [H, W], "regions": {...}}}}
    <slug>-<hash>.safetensors  per level: "<level>.features" float16 [R, D] or [h, w, D],
                               "<level>.index" int32 [H, W] (regions only); metadata: image
                               name, size, kind, levels

Files and the manifest are written atomically (temp file + rename), the manifest under a
file lock, after each image: an interrupted run loses at most the image in flight, and a
rerun skips every finished image. A cache made by a different extractor or configuration
is refused (pass ``overwrite=True`` to replace it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .base import FeatureMaps, FrameInfo, LevelMaps

__all__ = ["FeatureCache", "CacheMismatchError", "extract_dataset"]

FORMAT = 1
PathLike = Union[str, os.PathLike]


class CacheMismatchError(ValueError):
    """The cache folder holds features of another extractor or configuration."""


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[-80:] or "image"
    return f"{s}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:10]}"


def _canon(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureCache:
    """Per-image features of one extractor (see the module docstring)."""

    MANIFEST = "manifest.json"

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        self._manifest: Optional[Dict[str, Any]] = None

    # ----------------------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.folder / self.MANIFEST

    @property
    def manifest(self) -> Dict[str, Any]:
        if self._manifest is None:
            if not self.manifest_path.is_file():
                raise FileNotFoundError(f"{self.manifest_path}: no feature cache here (run `langfield extract`)")
            self._manifest = json.loads(self.manifest_path.read_text("utf-8"))
        return self._manifest

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    @property
    def extractor(self) -> str:
        return self.manifest["extractor"]

    @property
    def levels(self) -> List[str]:
        return list(self.manifest["levels"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def config(self) -> Dict[str, Any]:
        return self.manifest["config"]

    @property
    def text_config(self) -> Dict[str, Any]:
        """The text encoder queries on these features must use."""
        return self.manifest["text"]

    def text_encoder(self, device="auto", clip=None):
        from .text import load_text_encoder

        return load_text_encoder(self.text_config, device=device, clip=clip)

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.folder / ".manifest.lock"))

    def _write_manifest(self, m: Dict[str, Any]) -> None:
        _atomic_write_bytes(self.manifest_path, json.dumps(m, indent=1).encode("utf-8"))
        self._manifest = m

    def open(self, extractor, overwrite: bool = False) -> "FeatureCache":
        """Create the cache for ``extractor`` or check an existing one matches it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = _canon(extractor.config())
        text = _canon(extractor.text_config())
        with self._lock():
            if self.manifest_path.is_file():
                self._manifest = None
                m = self.manifest
                if _canon(m.get("config")) != cfg or m.get("format") != FORMAT:
                    if not overwrite:
                        raise CacheMismatchError(
                            f"{self.folder} holds {m.get('extractor')} features made with another configuration "
                            f"({_diff(m.get('config'), cfg)}); use another folder or overwrite=True (--overwrite)")
                    for e in m.get("images", {}).values():
                        (self.folder / e["file"]).unlink(missing_ok=True)
                else:
                    return self
            self._write_manifest({"format": FORMAT, "extractor": extractor.name, "kind": extractor.kind,
                                  "levels": list(extractor.levels), "dim": int(extractor.dim), "config": cfg,
                                  "text": text, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": {}})
        return self

    # ------------------------------------------------------------------------------- images
    def names(self) -> List[str]:
        return list(self.manifest.get("images", {})) if self.exists() else []

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: str) -> bool:
        return self.has(name)

    def has(self, name: str) -> bool:
        if not self.exists():
            return False
        e = self.manifest.get("images", {}).get(name)
        return e is not None and (self.folder / e["file"]).is_file()

    def save(self, name: str, fm: FeatureMaps) -> None:
        from safetensors.torch import save as st_save

        tensors: Dict[str, Tensor] = {}
        for level, lv in fm.levels.items():
            tensors[f"{level}.features"] = lv.features.detach().to("cpu", torch.float16).contiguous()
            if lv.index is not None:
                tensors[f"{level}.index"] = lv.index.detach().to("cpu", torch.int32).contiguous()
        meta = {"name": name, "size": f"{fm.image_size[0]},{fm.image_size[1]}", "kind": fm.kind,
                "levels": ",".join(fm.levels)}
        file = _slug(name) + ".safetensors"
        _atomic_write_bytes(self.folder / file, st_save(tensors, metadata=meta))
        entry = {"file": file, "size": list(fm.image_size)}
        if fm.kind == "regions":
            entry["regions"] = {k: int(v.features.shape[0]) for k, v in fm.levels.items()}
        with self._lock():
            self._manifest = None
            m = self.manifest
            m.setdefault("images", {})[name] = entry
            self._write_manifest(m)

    def load(self, name: str, device="cpu") -> FeatureMaps:
        from safetensors import safe_open

        e = self.manifest.get("images", {}).get(name)
        if e is None:
            raise KeyError(f"{name!r} is not in the feature cache {self.folder} ({len(self)} images)")
        path = self.folder / e["file"]
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            levels = {}
            keys = set(f.keys())
            for level in meta.get("levels", ",".join(self.levels)).split(","):
                idx = f.get_tensor(f"{level}.index") if f"{level}.index" in keys else None
                levels[level] = LevelMaps(f.get_tensor(f"{level}.features"), idx)
        H, W = (int(v) for v in meta.get("size", "{},{}".format(*e["size"])).split(","))
        return FeatureMaps(levels, (H, W), meta.get("kind", self.kind))


def _diff(a: Optional[Dict[str, Any]], b: Dict[str, Any], prefix: str = "") -> str:
    a = a or {}
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                out.append(_diff(a[k], b[k], f"{prefix}{k}."))
            else:
                out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return "; ".join(x for x in out if x)[:500]


def extract_dataset(dataset, extractor, cache_dir: PathLike, batch_size: int = 1, progress: bool = True,
                    indices: Optional[Sequence[int]] = None, overwrite: bool = False,
                    log=print) -> FeatureCache:
    """Extract features for the images of a :class:`langfield.data.Dataset` (or any object
    with ``len``, ``load_image(i)`` and ``frames[i].name``) into ``cache_dir``; images
    already in the cache are skipped. ``batch_size`` images go to the extractor at once.
    Returns the :class:`FeatureCache`."""
    cache = FeatureCache(cache_dir).open(extractor, overwrite=overwrite)
    text = extractor.text_config()
    if text.get("type") == "offline":
        log(f"[{extractor.name}] note: {text.get('note', 'offline text encoder (not CLIP)')}")
    if text.get("random_init"):
        log(f"[{extractor.name}] note: randomly initialised CLIP (tests / benchmarks): features are meaningless")
    idx = list(range(len(dataset))) if indices is None else list(indices)
    infos = {i: FrameInfo.from_dataset(dataset, i) if hasattr(dataset, "root") else
             FrameInfo(name=dataset.frames[i].name, index=i, extras=dict(getattr(dataset.frames[i], "extras", {})))
             for i in idx}
    todo = [i for i in idx if not cache.has(infos[i].name)]
    skipped = len(idx) - len(todo)
    if skipped:
        log(f"[{extractor.name}] {skipped} of {len(idx)} images already in {cache.folder}: skipped")
    needs_image = getattr(extractor, "needs_image", True)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"features {extractor.name}", unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    regions = 0
    try:
        for b in range(0, len(todo), max(1, batch_size)):
            chunk = todo[b:b + max(1, batch_size)]
            images = [dataset.load_image(i) if needs_image else None for i in chunk]
            results = extractor.extract_batch(images, [infos[i] for i in chunk])
            for i, fm in zip(chunk, results):
                cache.save(infos[i].name, fm)
                if fm.kind == "regions":
                    regions += sum(v.num_regions for v in fm.levels.values())
            if bar is not None:
                done = b + len(chunk)
                post = {"img/s": f"{done / max(time.perf_counter() - t0, 1e-9):.2f}"}
                if regions:
                    post["regions/img"] = f"{regions / done:.0f}"
                bar.set_postfix(post, refresh=False)
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return cache
