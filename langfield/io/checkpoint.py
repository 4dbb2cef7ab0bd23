"""Checkpoints: safetensors for tensors, JSON for configuration, written atomically.

A checkpoint is two files with one stem: ``<stem>.safetensors`` (tensors; nested dicts are
flattened with ``/`` in the key, e.g. ``splats/means``, ``optim/means/exp_avg``) and
``<stem>.json`` (``{"format": "langfield-checkpoint", "version": 1, "step": ..., "config":
{...}, "tensors": "<stem>.safetensors"}``). Each is written to a temporary file in the same
folder, fsynced, then renamed over the target; the JSON goes last, so a reader that finds a
JSON finds its tensors. Given a folder, :func:`save_checkpoint` writes
``<folder>/ckpt_<step:07d>.*`` and :func:`load_checkpoint` loads the latest one.

The JSON also records the tensors file's size and BLAKE2b digest (``tensors_bytes``,
``tensors_blake2b``): :func:`load_checkpoint` and :func:`verify_checkpoint` check them (and
the safetensors header) and raise :class:`CheckpointError` naming the file on any damage;
:func:`latest_valid_checkpoint` skips damaged newest checkpoints and
:func:`quarantine_checkpoint` moves one aside into ``<folder>/corrupt/``. The tensors file a
JSON names must be a plain file name in the JSON's own folder.

Files are written with the permissions ``open()`` would give them (``0666`` less the
process umask), not ``mkstemp``'s ``0600``.

Nothing here unpickles: safetensors and JSON only, and gsplat ``.pt`` checkpoints are read
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Checkpoint", "CheckpointError", "CheckpointNotFoundError", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "latest_valid_checkpoint", "verify_checkpoint", "quarantine_checkpoint",
           "load_gsplat_ckpt", "atomic_write_bytes", "atomic_write_json", "flatten_tensors", "unflatten_tensors",
           "safetensors_problem", "file_digest", "process_umask", "save_gaussians", "load_gaussians"]

PathLike = Union[str, os.PathLike]
FORMAT = "langfield-checkpoint"
VERSION = 1
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (names the file)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file (JSON or tensors) that is not there."""


@dataclass
class Checkpoint:
    tensors: Dict[str, Any]  # nested dicts of tensors
    config: Dict[str, Any] = field(default_factory=dict)
    step: int = 0
    path: Optional[Path] = None  # the .safetensors file


# ------------------------------------------------------------------------------------------
# atomic writes

def process_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux
    ``/proc/self/status``), else by setting and restoring it."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def atomic_write(path: Path, write) -> None:
    """Write through ``write(f)`` to a unique temporary file in the target's folder, fsync,
    give it the mode ``open()`` would (0666 & ~umask), rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            try:
                os.fchmod(f.fileno(), 0o666 & ~process_umask())
            except (AttributeError, OSError):  # pragma: no cover (no fchmod: Windows)
                pass
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder + ``os.replace``."""
    atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, default=_json_default) + "\n").encode("utf-8"))


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"config value of type {type(o).__name__} is not JSON serialisable: {o!r}")


# ------------------------------------------------------------------------------------------
# nesting

def flatten_tensors(tensors: Mapping[str, Any], prefix: str = "") -> Dict[str, Tensor]:
    """``{"a": {"b": t}}`` -> ``{"a/b": t}``; leaves must be tensors."""
    out: Dict[str, Tensor] = {}
    for k, v in tensors.items():
        k = str(k)
        if "/" in k or not k:
            raise ValueError(f"checkpoint key {prefix + k!r}: keys must be non-empty and contain no '/'")
        if isinstance(v, Mapping):
            out.update(flatten_tensors(v, prefix + k + "/"))
        elif isinstance(v, Tensor):
            out[prefix + k] = v
        else:
            raise TypeError(f"checkpoint tensors: {prefix + k!r} is a {type(v).__name__}, not a tensor "
                            f"(put non-tensor values in the config)")
    return out


def unflatten_tensors(flat: Mapping[str, Tensor]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in flat.items():
        parts = k.split("/")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


# ------------------------------------------------------------------------------------------

def _paths(path: Path, step: int) -> Tuple[Path, Path]:
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path / f"ckpt_{step:07d}.safetensors", path / f"ckpt_{step:07d}.json"


def save_checkpoint(path: PathLike, tensors: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None,
                    step: int = 0) -> str:
    """Write ``tensors`` (a dict, possibly nested, of tensors) and ``config`` (JSON-able) at
    ``step``. ``path`` is a ``.safetensors`` (or ``.json``) file name, or a folder (then
    ``ckpt_<step:07d>.*`` inside it). Returns the path of the ``.safetensors`` file."""
    from safetensors.torch import save

    st_path, js_path = _paths(Path(path), int(step))
    flat = flatten_tensors(tensors)
    seen = set()
    clean = {}
    for k, v in flat.items():
        t = v.detach().to("cpu").contiguous()
        st = t.untyped_storage()
        if t.numel() and (st.data_ptr() in seen or st.nbytes() != t.numel() * t.element_size()):
            t = t.clone()  # safetensors refuses tensors that share (or only view) a storage
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        clean[k] = t
    meta = {"format": FORMAT, "step": str(int(step))}
    data = save(clean, metadata=meta)
    cfg = dict(config or {})
    doc = {"format": FORMAT, "version": VERSION, "step": int(step), "tensors": st_path.name,
           "tensors_bytes": len(data), "tensors_blake2b": hashlib.blake2b(data, digest_size=32).hexdigest(),
           "config": cfg}
    json_bytes = (json.dumps(doc, indent=2, default=_json_default) + "\n").encode("utf-8")  # fail before writing
    atomic_write_bytes(st_path, data)
    atomic_write_bytes(js_path, json_bytes)
    return str(st_path)


def _ckpt_jsons(folder: Path) -> List[Tuple[int, Path]]:
    """``(step, path)`` of the ``ckpt_<step>.json`` files in ``folder``, newest first."""
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
    out.sort(key=lambda x: (-x[0], x[1].name))
    return out


def latest_checkpoint(folder: PathLike) -> Optional[Path]:
    """The ``ckpt_<step>.json`` with the highest step in ``folder`` (None if there is none).
    Not verified: see :func:`latest_valid_checkpoint`."""
    found = _ckpt_jsons(Path(folder))
    return found[0][1] if found else None


def latest_valid_checkpoint(folder: PathLike, checksum: bool = True) -> Tuple[Optional[Path], List[Path]]:
    """The newest ``ckpt_<step>.json`` in ``folder`` that passes :func:`verify_checkpoint`,
    and the newer ones that did not (newest first): ``(path or None, [bad paths])``. The
    caller warns about (and may :func:`quarantine_checkpoint`) the bad ones."""
    bad: List[Path] = []
    for _, p in _ckpt_jsons(Path(folder)):
        try:
            verify_checkpoint(p, checksum=checksum)
        except CheckpointError:
            bad.append(p)
            continue
        return p, bad
    return None, bad


def file_digest(path: PathLike, chunk: int = 1 << 22) -> str:
    """BLAKE2b-256 hex digest of a file, read in chunks."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def safetensors_problem(path: PathLike, expect_bytes: Optional[int] = None) -> Optional[str]:
    """What is structurally wrong with a safetensors file (None when nothing): missing,
    shorter than its 8-byte header length, a header that is not JSON or points past the end
    of the file (truncation), trailing bytes, or a size other than ``expect_bytes``. Reads
    only the header."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            return "not a file"
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes, shorter than the 8-byte header length)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"truncated or not safetensors (header of {n} bytes in a file of {size} bytes)"
            raw = f.read(n)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
        end = 0
        for k, v in header.items():
            if k == "__metadata__":
                continue
            a, b = (int(x) for x in v["data_offsets"])
            if not 0 <= a <= b:
                raise ValueError(f"bad offsets of {k!r}")
            end = max(end, b)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return f"corrupt safetensors header ({str(e)[:120]})"
    if 8 + n + end > size:
        return f"truncated ({size} bytes, the header needs {8 + n + end})"
    if 8 + n + end < size:
        return f"{size - 8 - n - end} unexpected trailing bytes"
    if expect_bytes is not None and size != int(expect_bytes):
        return f"{size} bytes, the checkpoint recorded {int(expect_bytes)}"
    return None


def _read_json_doc(js_path: Path) -> Dict[str, Any]:
    try:
        doc = json.loads(js_path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{js_path}: checkpoint JSON not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{js_path}: corrupt checkpoint JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{js_path}: cannot read ({e.strerror or e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{js_path}: not a langfield checkpoint JSON (no \"format\": \"{FORMAT}\")")
    try:
        int(doc.get("step", 0))
        if doc.get("tensors_bytes") is not None:
            int(doc["tensors_bytes"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{js_path}: corrupt checkpoint JSON (step or tensors_bytes is not an integer)") from None
    if not isinstance(doc.get("config", {}) or {}, dict):
        raise CheckpointError(f"{js_path}: corrupt checkpoint JSON (config is not an object)")
    return doc


def _tensors_path(js_path: Path, doc: Mapping[str, Any]) -> Path:
    """The tensors file a checkpoint JSON names: a plain file name in the JSON's folder."""
    name = doc.get("tensors")
    if name is None or name == "":
        return js_path.with_suffix(".safetensors")
    if (not isinstance(name, str) or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or Path(name).name != name or os.path.isabs(name) or (len(name) > 1 and name[1] == ":")):
        raise CheckpointError(f"{js_path}: field 'tensors' must be a file name in the checkpoint's own folder, "
                              f"got {str(name)[:200]!r}")
    return js_path.parent / name


def verify_checkpoint(path: PathLike, checksum: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the file when a checkpoint cannot be loaded:
    JSON missing or corrupt, tensors path outside its folder, tensors file missing,
    truncated, with a damaged header, of another size than recorded, or (``checksum``, when
    recorded) with other contents. ``path``: the ``.json`` or ``.safetensors`` file."""
    p = Path(path)
    if p.suffix not in (".safetensors", ".json"):
        raise CheckpointError(f"{p}: not a langfield checkpoint (expected .safetensors or .json)")
    st_path, js_path = _paths(p, 0)
    doc: Dict[str, Any] = {}
    if js_path.exists() or p.suffix == ".json":
        doc = _read_json_doc(js_path)
        st_path = _tensors_path(js_path, doc)
    if not st_path.exists():
        raise CheckpointNotFoundError(f"{st_path}: checkpoint tensors not found")
    problem = safetensors_problem(st_path, doc.get("tensors_bytes"))
    if problem:
        raise CheckpointError(f"{st_path}: damaged checkpoint tensors: {problem}")
    if checksum and doc.get("tensors_blake2b"):
        try:
            digest = file_digest(st_path)
        except OSError as e:
            raise CheckpointError(f"{st_path}: cannot read ({e.strerror or e})") from None
        if digest != doc["tensors_blake2b"]:
            raise CheckpointError(f"{st_path}: damaged checkpoint tensors: contents differ from the checksum "
                                  f"recorded in {js_path.name}")


def quarantine_checkpoint(path: PathLike) -> List[Path]:
    """Move a (damaged) checkpoint's JSON and tensors file into ``<its folder>/corrupt/``
    (names made unique there). Returns the new paths."""
    p = Path(path)
    st_path, js_path = _paths(p, 0)
    if js_path.is_file():
        try:
            st_path = _tensors_path(js_path, json.loads(js_path.read_text("utf-8")))
        except (ValueError, UnicodeDecodeError, OSError, CheckpointError, AttributeError):
            st_path = js_path.with_suffix(".safetensors")
    dest_dir = js_path.parent / "corrupt"
    moved = []
    for src in (js_path, st_path):
        if not src.is_file():
            continue
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / src.name
        k = 1
        while dest.exists():
            dest = dest_dir / f"{src.stem}.{k}{src.suffix}"
            k += 1
        shutil.move(str(src), str(dest))
        moved.append(dest)
    return moved


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu", checksum: bool = True) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`: a ``.safetensors`` or ``.json``
    file, or a folder (its latest ``ckpt_*``; a run folder's ``checkpoints/`` is looked in
    too). A ``.safetensors`` without JSON loads with an empty config. Damage of any kind
    raises :class:`CheckpointError` naming the file (:class:`CheckpointNotFoundError`, also a
    ``FileNotFoundError``, for missing files); ``checksum``: compare the recorded digest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        found = latest_checkpoint(p) or latest_checkpoint(p / "checkpoints")
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint (ckpt_<step>.json) in {p} or {p / 'checkpoints'}")
        p = found
    if p.suffix not in (".safetensors", ".json"):
        raise CheckpointError(f"{p}: not a langfield checkpoint (expected .safetensors or .json; "
                              f"gsplat .pt files load with load_gsplat_ckpt)")
    verify_checkpoint(p, checksum=checksum)
    st_path, js_path = _paths(p, 0)
    config: Dict[str, Any] = {}
    step = 0
    if js_path.exists():
        doc = _read_json_doc(js_path)
        config = doc.get("config") or {}
        step = int(doc.get("step", 0))
        st_path = _tensors_path(js_path, doc)
    try:
        flat = load_file(str(st_path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{st_path}: corrupt or unreadable safetensors file ({e})") from None
    if not js_path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(st_path), framework="pt") as f:
                step = int((f.metadata() or {}).get("step", 0))
        except Exception:  # metadata is optional
            pass
    return Checkpoint(tensors=unflatten_tensors(flat), config=config, step=step, path=st_path)


def load_gsplat_ckpt(path: PathLike, device: Union[str, torch.device] = "cpu", requires_grad: bool = True):
    """Gaussians from a gsplat ``simple_trainer`` checkpoint (``{"step": ..., "splats":
    state_dict}`` saved with ``torch.save``), read with ``weights_only=True`` only.
    Returns ``(gaussians, step)``."""
    from langfield.scene import Gaussians  # io reads scenes: scene never imports io

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"gsplat checkpoint not found: {p}")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p}: cannot load as a gsplat checkpoint with weights_only=True "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"langfield never unpickles arbitrary objects") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a dict with 'splats', got {type(obj).__name__}")
    splats = obj.get("splats", obj)
    if not isinstance(splats, Mapping):
        raise CheckpointError(f"{p}: 'splats' is a {type(splats).__name__}, expected a state dict")
    try:
        g = Gaussians.from_dict({k: v for k, v in splats.items()}, requires_grad=requires_grad, copy=False)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{p}: 'splats' are not Gaussian parameters: {e}") from None
    step = obj.get("step", 0)
    try:
        step = int(step)
    except (TypeError, ValueError):
        step = 0
    return g.to(device), step


def save_gaussians(path: PathLike, gaussians, config: Optional[Mapping[str, Any]] = None, step: int = 0) -> str:
    """A safetensors checkpoint of ``gaussians`` (+ JSON config with ``sh_degree``, ``lang_dim``,
    ``num`` and ``config``); returns the tensors path."""
    cfg = {"sh_degree": gaussians.sh_degree, "lang_dim": gaussians.lang_dim, "num": gaussians.num}
    cfg.update(config or {})
    return save_checkpoint(path, {"splats": gaussians.to_dict()}, cfg, step)


def load_gaussians(path: PathLike, requires_grad: bool = True):
    """Gaussians from a langfield checkpoint (file or folder: its newest) or a gsplat ``.pt``."""
    from langfield.scene import Gaussians

    if str(path).endswith((".pt", ".pth")):
        return load_gsplat_ckpt(path, requires_grad=requires_grad)[0]
    ckpt = load_checkpoint(path)
    tensors = ckpt.tensors.get("splats", ckpt.tensors)
    return Gaussians.from_dict(tensors, requires_grad=requires_grad, copy=False)
