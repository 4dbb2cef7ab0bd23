"""The one render path: ``render(model, cameras, ...)``.

Every caller that draws a scene (the RGB and language stages, :class:`~langfield.field.LanguageField`,
the viewer, ``eval``, ``query``, online mapping, dynamic scenes) goes through :func:`render`.
It asks the scene model for its activated parameters (at a time ``t`` for models that deform
over time) and makes **one** rasterizer pass that yields, as asked, the SH colour, the language
latents of all levels, any extra per-Gaussian channels, the expected depth and the alpha.

A *scene model* is anything with ``activated(t=None) -> Activated`` (see
:class:`langfield.scene.SceneModel`): static :class:`~langfield.scene.Gaussians` today,
deformable Gaussians and a SLAM map too. Gradients flow to whatever produced the activated
tensors (parameters, a deformation field) and, when ``cameras.viewmats`` requires grad, to the
camera poses (online tracking).

``validate=False`` is the trainers' fast path: it skips the scan for non-finite inputs that
forces a device synchronisation on CUDA (the trainers check their loss instead); user-facing
calls keep the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["Cameras", "CameraCache", "RenderOutput", "render"]


@dataclass
class Cameras:
    """C pinhole cameras of one size: ``viewmats`` [C, 4, 4] world-to-camera (OpenCV), ``Ks``
    [C, 3, 3], ``width``, ``height``, optional ``times`` [C] in [0, 1] (dynamic scenes)."""

    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int
    times: Optional[Tensor] = None

    def __post_init__(self):
        if self.viewmats.dim() == 2:
            self.viewmats = self.viewmats[None]
        if self.Ks.dim() == 2:
            self.Ks = self.Ks[None]
        self.width, self.height = int(self.width), int(self.height)
        if self.times is not None:
            self.times = torch.as_tensor(self.times, dtype=torch.float32).reshape(-1)

    def __len__(self) -> int:
        return int(self.viewmats.shape[0])

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    @classmethod
    def of(cls, viewmat, K, width: int, height: int, *, time: Optional[float] = None,
           device: Union[str, torch.device, None] = None) -> "Cameras":
        """From one (or a stack of) numpy/torch viewmat(s) and K(s)."""
        vm = torch.as_tensor(np.asarray(viewmat) if not isinstance(viewmat, Tensor) else viewmat)
        kk = torch.as_tensor(np.asarray(K) if not isinstance(K, Tensor) else K)
        vm = vm.to(device=device, dtype=torch.float32).reshape(-1, 4, 4)
        kk = kk.to(device=device, dtype=torch.float32).reshape(-1, 3, 3)
        times = None if time is None else torch.full((vm.shape[0],), float(time))
        return cls(vm, kk, width, height, times)

    @classmethod
    def from_frame(cls, frame, device: Union[str, torch.device, None] = None) -> "Cameras":
        """From a :class:`langfield.data.Frame` (its ``time`` too)."""
        return cls.of(frame.viewmat, frame.K, frame.width, frame.height, time=getattr(frame, "time", None),
                      device=device)

    @classmethod
    def from_frames(cls, frames: Sequence[Any], device: Union[str, torch.device, None] = None) -> "Cameras":
        sizes = {(int(f.width), int(f.height)) for f in frames}
        if len(sizes) != 1:
            raise ValueError(f"cameras of one batch must share a size, got {sorted(sizes)}")
        (w, h), = sizes
        vm = torch.from_numpy(np.stack([np.asarray(f.viewmat, dtype=np.float32) for f in frames]))
        kk = torch.from_numpy(np.stack([np.asarray(f.K, dtype=np.float32) for f in frames]))
        ts = [getattr(f, "time", None) for f in frames]
        times = None if any(t is None for t in ts) else torch.tensor(ts, dtype=torch.float32)
        return cls(vm.to(device), kk.to(device), w, h, times)

    def to(self, device) -> "Cameras":
        return Cameras(self.viewmats.to(device), self.Ks.to(device), self.width, self.height, self.times)

    def __getitem__(self, i) -> "Cameras":
        sl = slice(i, i + 1) if isinstance(i, int) else i
        return Cameras(self.viewmats[sl], self.Ks[sl], self.width, self.height,
                       None if self.times is None else self.times[sl])


class CameraCache(dict):
    """``frame index -> Cameras`` of a dataset, made on first use, so a trainer's list of views
    may grow (new frames get their cameras when first drawn)."""

    def __init__(self, frames, device):
        super().__init__()
        self.frames, self.device = frames, device

    def __missing__(self, i: int) -> "Cameras":
        cam = Cameras.from_frame(self.frames[i], self.device)
        self[i] = cam
        return cam


@dataclass
class RenderOutput:
    """What :func:`render` drew, batched over cameras (C first). Channels not asked for are None."""

    rgb: Optional[Tensor]  # [C, H, W, 3] (not clamped: the SH colour as blended, plus background)
    alpha: Tensor  # [C, H, W]
    depth: Optional[Tensor] = None  # [C, H, W] expected depth (0 where alpha <= 1e-4)
    lang: Optional[Tensor] = None  # [C, H, W, lang_dim] language latents of all levels
    extra: Optional[Tensor] = None  # [C, H, W, E]
    meta: Dict[str, Any] = field(default_factory=dict)


def _sh_for_degree(sh: Tensor, deg: int) -> Tensor:
    k = (deg + 1) ** 2
    return sh if sh.shape[1] == k else sh[:, :k]


def render(model, cameras: Cameras, *, t: Optional[float] = None, sh_degree: Optional[int] = None,
           colors: bool = True, language: bool = False, extra: Optional[Tensor] = None, depth: bool = False,
           background: Union[Tensor, Sequence[float], None] = None, backend: str = "auto", absgrad: bool = False,
           rasterize_mode: str = "classic", validate: bool = True) -> RenderOutput:
    """Render ``model`` from ``cameras`` in one rasterizer pass.

    Args:
        model: a scene model (``activated(t)``), e.g. :class:`~langfield.scene.Gaussians`.
        cameras: :class:`Cameras` (one size; for dynamic models all at one time, or ``t``).
        t: the time for dynamic models (default: the cameras' time; ignored by static ones).
        sh_degree: SH degree of the colour (default: the model's; capped by it).
        colors: render the SH colour (``rgb``); False renders only ``lang`` / ``extra``.
        language: render the model's language latents (``lang``) as extra channels.
        extra: more per-Gaussian channels ``[N, E]`` in the same pass (e.g. a selection mask).
        depth: also the expected depth.
        background: [3] or [C, 3] colour behind the scene (colour channels only; features get 0).
        backend, absgrad, rasterize_mode: as :func:`langfield.render.rasterization`.
        validate: False skips the non-finite scan that synchronises a CUDA device.
    """
    from langfield.render.api import rasterization

    if t is None and cameras.times is not None and len(cameras) > 0:
        ts = cameras.times
        if len(cameras) > 1 and bool((ts != ts[0]).any()):  # cameras at several times: one pass per time
            outs = [render(model, cameras[i], sh_degree=sh_degree, colors=colors, language=language, extra=extra,
                           depth=depth, background=None if background is None else _bg_row(background, i),
                           backend=backend, absgrad=absgrad, rasterize_mode=rasterize_mode, validate=validate)
                    for i in range(len(cameras))]
            return _cat(outs)
        t = float(ts[0])
    a = model.activated(t)
    C = len(cameras)
    feats = []
    if language:
        if a.lang is None:
            raise ValueError("render(language=True): the scene has no language latents")
        feats.append(a.lang)
    if extra is not None:
        feats.append(extra.to(a.means.dtype))
    features = torch.cat(feats, -1) if len(feats) > 1 else (feats[0] if feats else None)
    n_lang = int(a.lang.shape[-1]) if language else 0
    mode = "RGB+ED" if depth else "RGB"
    dev = a.means.device
    vm, Ks = cameras.viewmats.to(dev), cameras.Ks.to(dev)
    if colors:
        deg = a.sh_degree if sh_degree is None else min(int(sh_degree), a.sh_degree)
        bg = None
        if background is not None:
            bg = torch.as_tensor(background, dtype=torch.float32, device=dev)
            bg = bg.reshape(1, 3).expand(C, 3) if bg.numel() == 3 else bg.reshape(C, 3)
        out, alpha, meta = rasterization(a.means, a.quats, a.scales, a.opacities, _sh_for_degree(a.sh, deg), vm, Ks,
                                         cameras.width, cameras.height, sh_degree=deg, backgrounds=bg,
                                         features=features, render_mode=mode, backend=backend, absgrad=absgrad,
                                         rasterize_mode=rasterize_mode, validate=validate)
        c0 = 3
    else:
        if features is None:
            raise ValueError("render(colors=False) needs language=True or extra channels")
        out, alpha, meta = rasterization(a.means, a.quats, a.scales, a.opacities, features, vm, Ks, cameras.width,
                                         cameras.height, render_mode=mode, backend=backend, absgrad=absgrad,
                                         rasterize_mode=rasterize_mode, validate=validate)
        c0 = 0
    alpha = alpha[..., 0]
    res = RenderOutput(rgb=out[..., :3] if colors else None, alpha=alpha, meta=meta)
    if language:
        res.lang = out[..., c0:c0 + n_lang]
    if extra is not None:
        e = extra.shape[-1]
        res.extra = out[..., c0 + n_lang:c0 + n_lang + e]
    if depth:
        d = out[..., -1]
        res.depth = torch.where(alpha > 1e-4, d, torch.zeros_like(d))
    return res


def _bg_row(background, i: int):
    bg = torch.as_tensor(background, dtype=torch.float32)
    return bg if bg.numel() == 3 else bg.reshape(-1, 3)[i]


def _cat(outs) -> RenderOutput:
    def cat(name):
        vals = [getattr(o, name) for o in outs]
        return None if vals[0] is None else torch.cat(vals, 0)

    return RenderOutput(rgb=cat("rgb"), alpha=cat("alpha"), depth=cat("depth"), lang=cat("lang"), extra=cat("extra"),
                        meta={"per_camera": [o.meta for o in outs]})
