"""Loading CLIP (open_clip) and SAM (segment-anything) exactly as a user would, with clear
errors when weights are missing.

* CLIP: ``open_clip.create_model_and_transforms(name, pretrained=TAG_OR_FILE)``. A pretrained
  tag is fetched from the Hugging Face hub (or its local cache,
  ``~/.cache/huggingface/hub``); a file path loads a local checkpoint. Offline without a
  cached copy, the error names the model and tag and says how to supply the weights.
* SAM: ``segment_anything.sam_model_registry[kind](checkpoint=path)`` for ``vit_h``,
  ``vit_l`` or ``vit_b``; the checkpoint must be a local file (the error gives the official
  download address).

``random_init=True`` builds the same architecture with random weights: for tests and
benchmarks only (features are meaningless); it is recorded as such wherever the model is.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import WeightsError, WeightsUnavailableError, resolve_device

__all__ = ["ClipModel", "load_clip", "load_sam", "clip_weights_cached", "hub_reachable", "SAM_CHECKPOINT_URLS",
           "DEFAULT_CLIP_MODEL", "DEFAULT_CLIP_PRETRAINED", "OPENAI_MEAN", "OPENAI_STD"]

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"  # LangSplat's choice
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}

PathLike = Union[str, os.PathLike]


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ImportError("open_clip is needed for CLIP features: pip install open_clip_torch") from None
    return open_clip


@contextmanager
def _quiet(logger_names=("root", "open_clip")):
    """open_clip logs a warning for random init and an error before raising: we raise our own."""
    loggers = [logging.getLogger() if n == "root" else logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _to2(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (int(x), int(x))


def clip_weights_cached(model_name: str, pretrained: str) -> Optional[bool]:
    """Whether open_clip's weights for (model, tag) are in the local Hugging Face cache:
    True / False, or None when it cannot tell (tags downloaded from a plain URL)."""
    open_clip = _import_open_clip()
    cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    if not cfg:
        return False
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, filename = os.path.split(hub)  # "org/repo/" -> default file name, as open_clip does
    try:
        from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives
        filename = filename or HF_WEIGHTS_NAME
        names = [*_get_safe_alternatives(filename), filename]
    except ImportError:
        filename = filename or "open_clip_pytorch_model.bin"
        names = ["open_clip_model.safetensors", filename]
    for n in names:
        try:
            p = try_to_load_from_cache(repo_id=repo, filename=n)
        except Exception:
            p = None
        if isinstance(p, str) and os.path.isfile(p):
            return True
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection (False when offline mode is
    set): lets a missing download fail at once instead of after huggingface_hub's retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _clip_missing_message(model_name: str, pretrained: str, reason: str = "") -> str:
    hub = ""
    try:
        cfg = _import_open_clip().get_pretrained_cfg(model_name, pretrained) or {}
        if cfg.get("hf_hub"):
            hub = f" (Hugging Face repo {cfg['hf_hub'].rstrip('/')})"
        elif cfg.get("url"):
            hub = f" ({cfg['url']})"
    except Exception:
        pass
    why = f" ({reason})" if reason else ""
    return (f"CLIP weights for {model_name}/{pretrained}{hub} are not available offline{why}. Supply them with "
            f"--clip-checkpoint PATH (an open_clip checkpoint file for {model_name}), or download them once on a "
            f"machine with internet (python -c \"import open_clip; open_clip.create_model_and_transforms("
            f"'{model_name}', pretrained='{pretrained}')\") and copy its Hugging Face cache "
            f"(~/.cache/huggingface/hub, or HF_HOME) here; set HF_HUB_OFFLINE=1 to use that cache without network "
            f"retries.")


class ClipModel:
    """An open_clip model with the preprocessing langfield needs: image batches in [0, 1]
    (already at the model's input size) and text lists to L2-normalised embeddings, plus
    the dense MaskCLIP path (:func:`langfield.features.dense_clip.maskclip_tokens`).

    ``source`` records what was loaded: ``{"model", "pretrained", "checkpoint",
    "random_init"}``.
    """

    def __init__(self, model: torch.nn.Module, model_name: str, pretrained: Optional[str] = None,
                 checkpoint: Optional[PathLike] = None, random_init: bool = False, device: Union[str, torch.device] = "cpu"):
        open_clip = _import_open_clip()
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.random_init = bool(random_init)
        v = self.model.visual
        pc = dict(getattr(v, "preprocess_cfg", None) or {})
        self.image_size = _to2(pc.get("size", getattr(v, "image_size", 224)))
        self.mean = tuple(pc.get("mean", OPENAI_MEAN))
        self.std = tuple(pc.get("std", OPENAI_STD))
        self.dim = int(getattr(v, "output_dim", 0) or self._probe_dim())
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    def _probe_dim(self) -> int:
        with torch.no_grad():
            x = torch.zeros(1, 3, *self.image_size, device=self.device)
            return int(self.model.encode_image(x).shape[-1])

    @property
    def source(self) -> Dict[str, Any]:
        return {"model": self.model_name, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
                "random_init": self.random_init, "dim": self.dim}

    @property
    def label(self) -> str:
        if self.random_init:
            return f"{self.model_name}/random-init"
        return f"{self.model_name}/{self.checkpoint or self.pretrained}"

    def normalize(self, x: Tensor) -> Tensor:
        """[B, 3, h, w] in [0, 1] -> the model's normalised input."""
        return (x.to(self.device) - self._mean_t) / self._std_t

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def encode_image(self, x: Tensor, batch_size: int = 64) -> Tensor:
        """[B, 3, S, S] in [0, 1] at the model's input size -> [B, D] float32, L2-normalised."""
        out = []
        for i in range(0, x.shape[0], batch_size):
            with self._autocast():
                f = self.model.encode_image(self.normalize(x[i:i + batch_size]))
            out.append(F.normalize(f.float(), dim=-1))
        if not out:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """list of n strings -> [n, D] float32, L2-normalised."""
        texts = list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            with self._autocast():
                f = self.model.encode_text(tok)
            out.append(F.normalize(f.float(), dim=-1))
        if not out:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat(out)


def load_clip(model_name: str = DEFAULT_CLIP_MODEL, pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,
              checkpoint: Optional[PathLike] = None, device: Union[str, torch.device] = "auto",
              random_init: bool = False) -> ClipModel:
    """Load an open_clip model: ``checkpoint`` (a local file) if given, else the pretrained
    ``tag``. Raises :class:`WeightsUnavailableError` naming the model when the weights cannot
    be had, ``ValueError`` for unknown model names or tags. ``random_init``: random weights
    (tests and benchmarks only)."""
    open_clip = _import_open_clip()
    dev = resolve_device(device) if isinstance(device, str) else device
    schema = model_name.split(":", 1)[0] if ":" in model_name else None
    if schema is None and model_name.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models() (e.g. ViT-B-16, "
                         f"ViT-L-14, ViT-H-14), or use 'hf-hub:ORG/REPO' / 'local-dir:PATH'")
    if random_init:
        with _quiet():
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None, device=dev)
        return ClipModel(model, model_name, None, None, random_init=True, device=dev)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"CLIP checkpoint for {model_name} not found: {path} (pass --clip-checkpoint PATH to an existing "
                f"open_clip checkpoint file for {model_name}, or drop it to use a pretrained tag such as "
                f"{DEFAULT_CLIP_PRETRAINED!r})")
        try:
            with _quiet():
                model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=dev)
        except Exception as e:
            raise WeightsError(f"cannot load {path} as open_clip {model_name} weights: {type(e).__name__}: "
                               f"{str(e)[:400]}") from None
        return ClipModel(model, model_name, pretrained, path, device=dev)
    if not pretrained and schema is None:
        raise WeightsUnavailableError(
            f"no CLIP weights given for {model_name}: pass a pretrained tag (e.g. --clip-pretrained "
            f"{DEFAULT_CLIP_PRETRAINED}) or --clip-checkpoint PATH")
    if schema is None:
        known = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
        if pretrained not in known and not Path(str(pretrained)).expanduser().is_file():
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {model_name}; known tags: {known} "
                             f"(or pass --clip-checkpoint PATH)")
    if schema is None and clip_weights_cached(model_name, pretrained) is False and not hub_reachable():
        raise WeightsUnavailableError(_clip_missing_message(
            model_name, str(pretrained), "not in the local Hugging Face cache, and huggingface.co is unreachable"))
    try:
        with _quiet():
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=dev)
    except Exception as e:
        reason = str(e).split("Last error:")[-1].strip()[:200] or type(e).__name__
        raise WeightsUnavailableError(_clip_missing_message(model_name, str(pretrained), reason)) from None
    return ClipModel(model, model_name, pretrained, None, device=dev)


def check_sam_checkpoint(kind: str, checkpoint: Optional[PathLike]) -> Path:
    """The checkpoint path, or :class:`WeightsUnavailableError` naming the model and where to get it."""
    if kind not in SAM_CHECKPOINT_URLS:
        raise ValueError(f"unknown SAM model {kind!r}; use one of {list(SAM_CHECKPOINT_URLS)}")
    url = SAM_CHECKPOINT_URLS[kind]
    if checkpoint is None:
        raise WeightsUnavailableError(
            f"SAM weights ({kind}) are needed for sam-clip features: download {url} and pass "
            f"--sam-checkpoint PATH (and --sam-model {kind})")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"SAM checkpoint ({kind}) not found: {path}; download {url} and pass --sam-checkpoint PATH")
    return path


def load_sam_weights(sam, path: PathLike, kind: str = "vit_h") -> None:
    """Load a SAM checkpoint (a plain state dict, as Meta's ``sam_vit_*.pth`` are) into
    ``sam`` with ``torch.load(weights_only=True)``: no unpickling of arbitrary objects.
    Raises :class:`WeightsError` naming the file when it is not there, not loadable that way,
    not a state dict, or a state dict of another architecture."""
    path = Path(path).expanduser()
    url = SAM_CHECKPOINT_URLS.get(kind, "")
    hint = f"is it the {kind} checkpoint ({url.rsplit('/', 1)[-1]})?" if url else "is it a SAM checkpoint?"
    if not path.is_file():
        raise WeightsUnavailableError(f"SAM checkpoint ({kind}) not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise WeightsError(f"cannot load {path} as SAM {kind} weights with weights_only=True ({type(e).__name__}: "
                           f"{first}); langfield never unpickles arbitrary objects; {hint}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict) and \
            not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = state["model"]  # {"model": state_dict} wrappers
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a SAM state dict (a mapping of parameter names to tensors, got "
                           f"{type(state).__name__}); {hint}")
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"cannot load {path} as SAM {kind} weights ({str(e).splitlines()[0][:200]}...); "
                           f"{hint}") from None


def load_sam(kind: str = "vit_h", checkpoint: Optional[PathLike] = None, device: Union[str, torch.device] = "auto",
             random_init: bool = False):
    """``segment_anything.sam_model_registry[kind](checkpoint=path)``, eval mode, on ``device``."""
    try:
        from segment_anything import sam_model_registry
    except ImportError:
        raise ImportError("segment-anything is needed for sam-clip features: pip install segment-anything") from None
    if kind not in SAM_CHECKPOINT_URLS:
        raise ValueError(f"unknown SAM model {kind!r}; use one of {list(SAM_CHECKPOINT_URLS)}")
    dev = resolve_device(device) if isinstance(device, str) else device
    path = None if random_init else check_sam_checkpoint(kind, checkpoint)
    # never pass the file to segment-anything: it unpickles it with torch.load(weights_only=False) on torch < 2.6
    sam = sam_model_registry[kind](checkpoint=None)
    if path is not None:
        load_sam_weights(sam, path, kind)
    sam.eval().to(dev)
    for p in sam.parameters():
        p.requires_grad_(False)
    sam._langfield_source = {"kind": kind, "checkpoint": None if checkpoint is None else str(checkpoint),
                             "random_init": bool(random_init)}
    return sam
