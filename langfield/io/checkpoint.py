"""Checkpoints: safetensors for tensors, JSON for configuration, written atomically.

A checkpoint is two files with one stem: ``<stem>.safetensors`` (tensors; nested dicts are
flattened with ``/`` in the key, e.g. ``splats/means``, ``optim/means/exp_avg``) and
``<stem>.json`` (``{"format": "langfield-checkpoint", "version": 1, "step": ..., "config":
{...}, "tensors": "<stem>.safetensors"}``). Each is written to a temporary file in the same
folder, fsynced, then renamed over the target; the JSON goes last, so a reader that finds a
JSON finds its tensors. Given a folder, :func:`save_checkpoint` writes
``<folder>/ckpt_<step:07d>.*`` and :func:`load_checkpoint` loads the latest one.

Nothing here unpickles: safetensors and JSON only, and gsplat ``.pt`` checkpoints are read
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "load_gsplat_ckpt", "atomic_write_bytes", "atomic_write_json", "flatten_tensors", "unflatten_tensors"]

PathLike = Union[str, os.PathLike]
FORMAT = "langfield-checkpoint"
VERSION = 1
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (names the file)."""


@dataclass
class Checkpoint:
    tensors: Dict[str, Any]  # nested dicts of tensors
    config: Dict[str, Any] = field(default_factory=dict)
    step: int = 0
    path: Optional[Path] = None  # the .safetensors file


# ------------------------------------------------------------------------------------------
# atomic writes

def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
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
    _atomic(Path(path), lambda f: f.write(data))


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
    doc = {"format": FORMAT, "version": VERSION, "step": int(step), "tensors": st_path.name, "config": cfg}
    json_bytes = (json.dumps(doc, indent=2, default=_json_default) + "\n").encode("utf-8")  # fail before writing
    atomic_write_bytes(st_path, data)
    atomic_write_bytes(js_path, json_bytes)
    return str(st_path)


def latest_checkpoint(folder: PathLike) -> Optional[Path]:
    """The ``ckpt_<step>.json`` with the highest step in ``folder`` (None if there is none)."""
    folder = Path(folder)
    best = None
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), p)
    return None if best is None else best[1]


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`: a ``.safetensors`` or ``.json``
    file, or a folder (its latest ``ckpt_*``; a run folder's ``checkpoints/`` is looked in
    too). A ``.safetensors`` without JSON loads with an empty config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        found = latest_checkpoint(p) or latest_checkpoint(p / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"no checkpoint (ckpt_<step>.json) in {p} or {p / 'checkpoints'}")
        p = found
    if p.suffix not in (".safetensors", ".json"):
        raise CheckpointError(f"{p}: not a langfield checkpoint (expected .safetensors or .json; "
                              f"gsplat .pt files load with load_gsplat_ckpt)")
    st_path, js_path = _paths(p, 0)
    config: Dict[str, Any] = {}
    step = 0
    if js_path.exists():
        try:
            doc = json.loads(js_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{js_path}: corrupt checkpoint JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"{js_path}: not a langfield checkpoint JSON (no \"format\": \"{FORMAT}\")")
        config = doc.get("config") or {}
        step = int(doc.get("step", 0))
        if doc.get("tensors"):
            st_path = js_path.parent / doc["tensors"]
    elif p.suffix == ".json":
        raise FileNotFoundError(f"checkpoint JSON not found: {js_path}")
    if not st_path.exists():
        raise FileNotFoundError(f"checkpoint tensors not found: {st_path}")
    try:
        flat = load_file(str(st_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
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
    from ..scene import Gaussians

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
