"""The feature cache: one safetensors file per image plus a JSON manifest.

Layout of ``cache_dir``::

    manifest.json              {"format": 1, "extractor": "sam-clip", "kind": "regions",
                                "levels": [...], "dim": 512, "config": {models, tags, params},
                                "text": {the text encoder queries must use},
                                "images": {image name: {"file": ..., "size": [H, W], "regions": {...},
                                                        "bytes": file size, "blake2b": digest}}}
    <slug>-<hash>.safetensors  per level: "<level>.features" float16 [R, D] or [h, w, D],
                               "<level>.index" int32 [H, W] (regions only); metadata: image
                               name, size, kind, levels

Files and the manifest are written atomically (a temporary file unique to the writer, then
a rename), the manifest under a file lock, after each image: an interrupted run loses at
most the image in flight, a rerun skips every finished image, and several processes may
fill one cache (``torchrun ... -m langfield extract`` shards the images over the ranks; on
several hosts the folder must be on a shared filesystem with POSIX locks, e.g. NFSv4). A cache made by a different extractor or configuration is refused (pass
``overwrite=True`` to replace it).

Integrity: the manifest records each file's size and BLAKE2b digest. :meth:`FeatureCache.has`
checks the size (cheap, always); :meth:`FeatureCache.load` checks size and digest and raises
:class:`CacheCorruptError` naming the file; :meth:`FeatureCache.verify` checks every entry,
and :func:`extract_dataset` (``langfield extract``, the language stage) runs it and
recomputes damaged entries with a warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .base import FeatureMaps, FrameInfo, LevelMaps

__all__ = ["FeatureCache", "CacheMismatchError", "CacheCorruptError", "extract_dataset"]

FORMAT = 1
PathLike = Union[str, os.PathLike]


class CacheMismatchError(ValueError):
    """The cache folder holds features of another extractor or configuration."""


class CacheCorruptError(ValueError):
    """A damaged cache file (manifest or entry); the message names the file."""

    def __init__(self, message: str, path: Optional[PathLike] = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[-80:] or "image"
    return f"{s}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:10]}"


def _canon(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from langfield.io.checkpoint import atomic_write_bytes  # unique temp name per writer, umask modes

    atomic_write_bytes(path, data)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def _canonical_safetensors(data: bytes) -> bytes:
    """``data`` with its header in one fixed order (metadata keys sorted, tensors by offset):
    safetensors writes its metadata from a hash map whose order changes from process to
    process, and a cache filled by several processes (ranks, reruns) should hold the same
    bytes for the same features."""
    (n,) = struct.unpack("<Q", data[:8])
    try:
        head = json.loads(data[8:8 + n].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):  # pragma: no cover - safetensors wrote it
        return data
    meta = head.pop("__metadata__", None)
    out = {}
    if meta is not None:
        out["__metadata__"] = {k: meta[k] for k in sorted(meta)}
    for k in sorted(head, key=lambda k: (tuple(head[k]["data_offsets"]), k)):
        out[k] = head[k]
    text = json.dumps(out, separators=(",", ":")).encode("utf-8")
    if len(text) > n:  # pragma: no cover - same content, same length
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]


def _st_metadata(data: bytes) -> Dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return (json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {})


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
            try:
                m = json.loads(self.manifest_path.read_text("utf-8"))
                if not isinstance(m, dict) or not isinstance(m.get("images", {}), dict):
                    raise ValueError("not a feature cache manifest")
            except (ValueError, UnicodeDecodeError) as e:
                raise CacheCorruptError(f"{self.manifest_path}: corrupt feature cache manifest ({str(e)[:200]}); "
                                        f"rerun `langfield extract` (it rebuilds it)", self.manifest_path) from None
            self._manifest = m
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

    def open(self, extractor, overwrite: bool = False, log=None) -> "FeatureCache":
        """Create the cache for ``extractor`` or check an existing one matches it. A corrupt
        manifest is replaced by an empty one (its entries are recomputed), announced through
        ``log`` (default: a warning)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = _canon(extractor.config())
        text = _canon(extractor.text_config())
        with self._lock():
            if self.manifest_path.is_file():
                self._manifest = None
                try:
                    m = self.manifest
                except CacheCorruptError as e:
                    _warn(log, f"warning: {str(e).split('; rerun')[0]}; starting a new manifest (features recomputed)")
                    m = None
                if m is None:
                    pass
                elif _canon(m.get("config")) != cfg or m.get("format") != FORMAT:
                    if not overwrite:
                        raise CacheMismatchError(
                            f"{self.folder} holds {m.get('extractor')} features made with another configuration "
                            f"({_diff(m.get('config'), cfg)}); use another folder or overwrite=True (--overwrite)")
                    for e in m.get("images", {}).values():
                        f = e.get("file") if isinstance(e, dict) else None
                        if isinstance(f, str) and f and Path(f).name == f and f not in (".", ".."):
                            (self.folder / f).unlink(missing_ok=True)
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
        """``name`` is in the manifest and its file is there with the recorded size (no
        digest: see :meth:`verify`)."""
        if not self.exists():
            return False
        e = self.manifest.get("images", {}).get(name)
        return e is not None and self._problem(e, checksum=False) is None

    def path(self, name: str) -> Path:
        """The file of an entry (KeyError when ``name`` is not in the manifest)."""
        e = self.manifest.get("images", {}).get(name)
        if e is None:
            raise KeyError(f"{name!r} is not in the feature cache {self.folder} ({len(self)} images)")
        return self.folder / e["file"]

    def _problem(self, e: Dict[str, Any], checksum: bool) -> Optional[str]:
        """What is wrong with an entry's file (None when nothing)."""
        file = e.get("file") if isinstance(e, dict) else None
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            return "bad manifest entry (file)"
        path = self.folder / file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "missing"
        except OSError as err:
            return f"unreadable ({err.strerror or err})"
        if e.get("bytes") is None:  # an older manifest: check the safetensors structure instead
            from langfield.io.checkpoint import safetensors_problem

            return safetensors_problem(path)
        if size != int(e["bytes"]):
            return f"{size} bytes, the manifest recorded {int(e['bytes'])} (truncated or replaced)"
        if checksum and e.get("blake2b"):
            from langfield.io.checkpoint import file_digest

            try:
                if file_digest(path) != e["blake2b"]:
                    return "contents differ from the checksum in the manifest"
            except OSError as err:
                return f"unreadable ({err.strerror or err})"
        return None

    def verify(self, names: Optional[Sequence[str]] = None, checksum: bool = True) -> Dict[str, str]:
        """Check the entries (``names``, default all): ``{name: problem}`` for each one whose
        file is missing, of another size than recorded, or (``checksum``) with other contents."""
        if not self.exists():
            return {}
        images = self.manifest.get("images", {})
        out = {}
        for n in (list(images) if names is None else names):
            if n in images:
                p = self._problem(images[n], checksum)
                if p is not None:
                    out[n] = p
        return out

    def discard(self, name: str) -> None:
        """Remove an entry (manifest and file)."""
        with self._lock():
            self._manifest = None
            m = self.manifest
            e = m.get("images", {}).pop(name, None)
            if e is None:
                return
            self._write_manifest(m)
        f = e.get("file") if isinstance(e, dict) else None
        if isinstance(f, str) and f and Path(f).name == f:
            (self.folder / f).unlink(missing_ok=True)

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
        data = _canonical_safetensors(st_save(tensors, metadata=meta))
        _atomic_write_bytes(self.folder / file, data)
        entry = {"file": file, "size": list(fm.image_size), "bytes": len(data), "blake2b": _digest(data)}
        if fm.kind == "regions":
            entry["regions"] = {k: int(v.features.shape[0]) for k, v in fm.levels.items()}
        with self._lock():
            self._manifest = None
            m = self.manifest
            m.setdefault("images", {})[name] = entry
            self._write_manifest(m)

    def load(self, name: str, device="cpu") -> FeatureMaps:
        """The features of one image. The file's size and digest are checked against the
        manifest; any damage raises :class:`CacheCorruptError` naming the file."""
        from safetensors.torch import load as st_load

        e = self.manifest.get("images", {}).get(name)
        if e is None:
            raise KeyError(f"{name!r} is not in the feature cache {self.folder} ({len(self)} images)")
        path = self.folder / str(e.get("file"))

        def bad(problem: str) -> CacheCorruptError:
            return CacheCorruptError(f"{path}: damaged feature cache entry of {name!r}: {problem}; rerun "
                                     f"`langfield extract` (or the training command) to recompute it", path)

        problem = self._problem(e, checksum=False)
        if problem is not None:
            raise bad(problem)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise bad(f"unreadable ({err.strerror or err})") from None
        if e.get("blake2b") and _digest(data) != e["blake2b"]:
            raise bad("contents differ from the checksum in the manifest")
        try:
            meta = _st_metadata(data)
            tensors = st_load(data)
            levels = {}
            for level in meta.get("levels", ",".join(self.levels)).split(","):
                idx = tensors.get(f"{level}.index")
                levels[level] = LevelMaps(tensors[f"{level}.features"].to(device),
                                          None if idx is None else idx.to(device))
            H, W = (int(v) for v in meta.get("size", "{},{}".format(*e["size"])).split(","))
        except Exception as err:  # safetensors' own errors name no file
            raise bad(f"{type(err).__name__}: {str(err)[:200]}") from None
        return FeatureMaps(levels, (H, W), meta.get("kind", self.kind))


def _warn(log, msg: str) -> None:
    if log is None:
        import warnings

        warnings.warn(msg, stacklevel=3)
    else:
        log(msg)


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


def extract_dataset(dataset, extractor, cache_dir: PathLike, batch_size: int = 1, progress: Optional[bool] = None,
                    indices: Optional[Sequence[int]] = None, overwrite: bool = False,
                    log=print, verify: bool = True) -> FeatureCache:
    """Extract features for the images of a :class:`langfield.data.Dataset` (or any object
    with ``len``, ``load_image(i)`` and ``frames[i].name``) into ``cache_dir``; images
    already in the cache are skipped once verified (size always; digest with ``verify``):
    damaged entries are recomputed with a warning naming the file. ``batch_size`` images go
    to the extractor at once. Returns the :class:`FeatureCache`.

    In a distributed job (``torchrun``, see :mod:`langfield.distributed`) every rank extracts
    every ``world``-th image into the same cache and returns once all ranks are done: rank 0
    creates or replaces the cache, each rank verifies, discards and writes only its own
    entries (unique temporary names, atomic renames, the manifest under its file lock), so a
    killed job resumes without recomputing finished images, with any number of ranks."""
    from langfield.distributed import get as _job

    job = _job()
    if job.active:  # same extractor and images on every rank, else refused; rank 0 creates (or
        # replaces) the cache alone, the others open it after
        names = [dataset.frames[i].name for i in (range(len(dataset)) if indices is None else indices)]
        job.check_same("feature extraction (extractor, images)", {"extractor": _canon(extractor.config()),
                                                                  "images": names})
        job.on_main(lambda: [FeatureCache(cache_dir).open(extractor, overwrite=overwrite, log=log), None][1],
                    errors=(CacheMismatchError, CacheCorruptError, ValueError, OSError), what="opening the feature cache")
        cache = FeatureCache(cache_dir).open(extractor, overwrite=False, log=log)
        user_log = log
        log = (lambda m: user_log(f"[rank {job.rank}/{job.world}] {m}")) if not job.is_main else user_log
        if not job.is_main:
            progress = False
    else:
        cache = FeatureCache(cache_dir).open(extractor, overwrite=overwrite, log=log)
    text = extractor.text_config()
    if text.get("type") == "offline" and job.is_main:
        log(f"[{extractor.name}] note: {text.get('note', 'offline text encoder (not CLIP)')}")
    if text.get("random_init") and job.is_main:
        log(f"[{extractor.name}] note: randomly initialised CLIP (tests / benchmarks): features are meaningless")
    idx = list(range(len(dataset))) if indices is None else list(indices)
    all_idx = idx
    if job.active:  # every rank its share (interleaved: a similar mix of images on each); each
        idx = idx[job.rank::job.world]  # verifies, discards and writes only its own entries
    infos = {i: FrameInfo.from_dataset(dataset, i) if hasattr(dataset, "root") else
             FrameInfo(name=dataset.frames[i].name, index=i, extras=dict(getattr(dataset.frames[i], "extras", {})))
             for i in all_idx}
    for name, problem in cache.verify([infos[i].name for i in idx], checksum=verify).items():
        if problem != "missing":
            log(f"[{extractor.name}] warning: {cache.folder / cache.manifest['images'][name]['file']}: damaged "
                f"feature cache entry of {name!r} ({problem}): recomputing it")
        cache.discard(name)
    todo = [i for i in idx if not cache.has(infos[i].name)]
    skipped = len(idx) - len(todo)
    if skipped:
        log(f"[{extractor.name}] {skipped} of {len(idx)} images already in {cache.folder}: skipped")
    needs_image = getattr(extractor, "needs_image", True)
    bar = None
    if todo:
        from langfield.train.progress import Progress, progress_mode

        bar = Progress(len(todo), desc=f"features {extractor.name}", unit="img", mode=progress_mode(progress))
        bar = bar if bar.active else None
    regions = 0
    try:
        for b in range(0, len(todo), max(1, batch_size)):
            chunk = todo[b:b + max(1, batch_size)]
            images = [dataset.load_image(i) if needs_image else None for i in chunk]
            results = extractor.extract_batch(images, [infos[i] for i in chunk])
            for i, fm in zip(chunk, results):
                cache.save(infos[i].name, fm)
                job.heartbeat(f"extracted {infos[i].name!r}")
                if fm.kind == "regions":
                    regions += sum(v.num_regions for v in fm.levels.values())
            if bar is not None:
                done = b + len(chunk)
                if regions:
                    bar.set(regions_per_img=f"{regions / done:.0f}")
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if job.active:  # the whole cache is there when every rank has done its share
        job.wait_all("feature extraction")
        cache._manifest = None  # the other ranks' entries
        idx = all_idx
    still = cache.verify([infos[i].name for i in idx], checksum=False)
    if still:  # another writer damaged or removed files meanwhile: never report a cache complete that is not
        name, problem = next(iter(still.items()))
        raise CacheCorruptError(f"{cache.folder}: {len(still)} feature cache entries are damaged after extraction "
                                f"(e.g. {name!r}: {problem}); rerun to recompute them", cache.folder)
    return cache
