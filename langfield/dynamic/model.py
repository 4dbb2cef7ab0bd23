"""Deformable Gaussians: canonical Gaussians + a deformation field, a scene model over time.

:class:`DeformableGaussians` subclasses :class:`langfield.scene.Gaussians`: ``.splats`` holds the
*canonical* Gaussians (gsplat names, so ``DefaultStrategy``, the viewer, ``export`` and 3D
selection keep working), ``.deform`` the :class:`~langfield.dynamic.field.DeformationField`.
``activated(t)`` adds the field's deltas at ``t`` (means, raw quaternion, log-scales,
optionally opacity logit and DC colour); ``t=None`` or ``deform_enabled=False`` (the static
warm-up) gives the canonical Gaussians. A zero field renders the canonical scene exactly.

Time-sensitive language (:mod:`langfield.dynamic.language`): optional ``K`` state prototypes
per Gaussian (``states`` [N, K, L]) mixed by a small network (``mixer``) of the deformation
feature at ``t``: ``softmax(mixer(feature(x, t))) @ states``. When present, the latents the
renderer gets are ``[time-agnostic levels..., state]``: the run's levels plus a ``state``
level, so :class:`~langfield.field.LanguageField` queries it like any level. Optional
per-Gaussian temporal logits ``time_logits`` [N, R, K] (R bins over t, linearly
interpolated) are added to the mixer's logits. ``.lang`` (used
by 3D selection) gives the state channel at ``.time`` (set it with :meth:`set_time`).

Temporal opacity (4DGS / STG style, optional): ``splats["time_opacity"]`` [N, R] log-gates over
R bins evenly spread over t; the opacity at ``t`` is ``sigmoid(opacity) * g(t)``, ``g`` the gates
``exp(b_r - max_r b_r)`` linearly interpolated between bins (:func:`time_gate`): 1 at a Gaussian's brightest bin, so the canonical
opacity stays its peak (gsplat's pruning on it keeps its meaning) and a Gaussian can exist over a
time interval only (an object that drives further than its own size is then drawn by
Gaussians along its path, each at its moment, where a deformation learnt from the photometric
loss alone cannot carry it). Zeros (the start) give a gate of exactly 1: the static scene. It
lives in ``splats`` so that densification splits, clones and prunes it with the Gaussians; in
checkpoints it is the ``temporal`` group (``splats`` keeps gsplat's names only).

Checkpoints: tensors ``splats`` (canonical), ``deform`` (the field's state dict), optional
``temporal`` (``opacity`` [N, R]), and with
time-sensitive language ``states`` (``prototypes``, optional ``time_logits``) / ``mixer``;
config.json ``model``: ``{"kind": "deformable", "deform": DeformConfig, "states": {"k": K,
"hidden": H, "time_bins": R, ...} | None}``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from langfield.dynamic.field import DeformConfig, DeformationField
from langfield.scene import Activated, Gaussians

__all__ = ["DeformableGaussians", "StateMixer", "MODEL_KIND", "TIME_OPACITY"]

MODEL_KIND = "deformable"
TIME_OPACITY = "time_opacity"
"""The ``splats`` key of the per-Gaussian temporal opacity bins [N, R]."""


class StateMixer(nn.Module):
    """Weights [N, K] of the K state prototypes from the deformation feature [N, D] at ``t``
    and a sinusoidal encoding of ``t`` (``t_freqs`` frequencies), so that a state change
    without motion (a lamp switching colour) can be learnt as well as one with motion."""

    def __init__(self, feature_dim: int, k: int, hidden: int = 32, t_freqs: int = 4):
        super().__init__()
        self.k, self.hidden, self.feature_dim, self.t_freqs = int(k), int(hidden), int(feature_dim), int(t_freqs)
        self.net = nn.Sequential(nn.Linear(feature_dim + 1 + 2 * self.t_freqs, hidden), nn.ReLU(),
                                 nn.Linear(hidden, k))

    def encode_t(self, t: float, n: int, like: Tensor) -> Tensor:
        tt = like.new_full((1,), 2.0 * float(t) - 1.0)
        f = (2.0 ** torch.arange(self.t_freqs, device=like.device, dtype=like.dtype)) * math.pi * tt
        return torch.cat([tt, f.sin(), f.cos()]).expand(n, -1)

    def logits(self, feature: Tensor, t: float) -> Tensor:
        return self.net(torch.cat([feature, self.encode_t(t, feature.shape[0], feature)], -1))

    def forward(self, feature: Tensor, t: float) -> Tensor:
        return torch.softmax(self.logits(feature, t), -1)


def interp_time(grid: Tensor, t: float) -> Tensor:
    """``grid [N, R, K]`` (R bins evenly over t in [0, 1]) linearly interpolated at ``t`` -> [N, K]."""
    R = grid.shape[1]
    if R == 1:
        return grid[:, 0]
    x = min(max(float(t), 0.0), 1.0) * (R - 1)
    i0 = min(int(math.floor(x)), R - 2)
    w = x - i0
    return (1.0 - w) * grid[:, i0] + w * grid[:, i0 + 1]


def time_gate(bins: Tensor, t: float) -> Tensor:
    """The temporal opacity factor [N] in (0, 1] of log-gates ``bins`` [N, R] at ``t``: the
    gates ``exp(b_r - max_r b_r)`` (exactly 1 for equal bins) linearly interpolated between the
    two bins around ``t``. At a bin's time it is that bin's gate alone; between bins the gates
    (not their logs) mix, so a Gaussian gated to one frame time fades out linearly toward the
    next one while the Gaussian gated there fades in (interpolating the logs instead made both
    nearly vanish halfway: a moving object gated frame by frame disappeared between its frames)."""
    return interp_time(torch.exp(bins - bins.max(1, keepdim=True).values)[:, :, None], t)[:, 0]


class DeformableGaussians(Gaussians):
    """See the module docstring. ``DeformableGaussians(means, quats, scales, opacities, sh0,
    shN=None, lang=None, *, deform, ...)``; :meth:`from_gaussians` wraps static Gaussians."""

    def __init__(self, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, sh0: Tensor,
                 shN: Optional[Tensor] = None, lang: Optional[Tensor] = None, requires_grad: bool = True,
                 copy: bool = True, *, deform: Optional[DeformationField] = None,
                 time_opacity: Optional[Tensor] = None):
        super().__init__(means, quats, scales, opacities, sh0, shN, lang, requires_grad=requires_grad, copy=copy)
        if time_opacity is not None:
            self.set_time_opacity(time_opacity, requires_grad=requires_grad)
        if deform is None:
            deform = DeformationField.for_points(self.splats["means"].detach())
        self.deform = deform.to(self.splats["means"].device)
        self.deform_enabled = True
        self.states: Optional[nn.Parameter] = None
        self.mixer: Optional[StateMixer] = None
        self.time_logits: Optional[nn.Parameter] = None
        self.time = 0.0

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_gaussians(cls, g: Gaussians, cfg: Optional[DeformConfig] = None,
                       requires_grad: bool = True) -> "DeformableGaussians":
        d = g.to_dict()
        field = DeformationField.for_points(d["means"], cfg)
        return cls(d["means"], d["quats"], d["scales"], d["opacities"], d["sh0"], d["shN"], d.get("lang"),
                   requires_grad=requires_grad, copy=True, deform=field)

    def set_states(self, states: Optional[Tensor], mixer: Optional[StateMixer] = None,
                   requires_grad: bool = True, time_logits: Optional[Tensor] = None) -> "DeformableGaussians":
        """Time-sensitive language: prototypes [N, K, L] and their mixer (None removes them);
        optional per-Gaussian temporal logits [N, R, K] added to the mixer's (R bins over t,
        interpolated linearly): a state switch of an object that neither moves nor changes its
        deformation feature is then a per-Gaussian function of t, not only of the shared network."""
        if states is None:
            self.states, self.mixer, self.time_logits = None, None, None
            return self
        if states.ndim != 3 or states.shape[0] != self.num:
            raise ValueError(f"states must be [N, K, L] with N = {self.num}, got {tuple(states.shape)}")
        if mixer is None:
            mixer = StateMixer(self.deform.cfg.hidden, int(states.shape[1]))
        self.states = nn.Parameter(states.detach().to(self.device).clone(), requires_grad=requires_grad)
        self.mixer = mixer.to(self.device)
        if time_logits is not None:
            if time_logits.ndim != 3 or time_logits.shape[0] != self.num or time_logits.shape[2] != states.shape[1]:
                raise ValueError(f"time_logits must be [N, R, K] = [{self.num}, R, {states.shape[1]}], got "
                                 f"{tuple(time_logits.shape)}")
            self.time_logits = nn.Parameter(time_logits.detach().to(self.device).clone(), requires_grad=requires_grad)
        else:
            self.time_logits = None
        return self

    def set_time_opacity(self, bins: Optional[Tensor], requires_grad: bool = True) -> "DeformableGaussians":
        """Per-Gaussian temporal opacity log-gates [N, R] (R >= 2; None removes them)."""
        if bins is None:
            if TIME_OPACITY in self.splats:
                del self.splats[TIME_OPACITY]
            return self
        if bins.ndim != 2 or bins.shape[0] != self.num or bins.shape[1] < 2:
            raise ValueError(f"time_opacity must be [N, R] with N = {self.num} and R >= 2, got {tuple(bins.shape)}")
        self.splats[TIME_OPACITY] = nn.Parameter(bins.detach().to(self.device).float().clone(),
                                                 requires_grad=requires_grad)
        return self

    @property
    def time_opacity(self) -> Optional[Tensor]:
        return self.splats[TIME_OPACITY] if TIME_OPACITY in self.splats else None

    def to_dict(self, detach: bool = True) -> Dict[str, Tensor]:
        """The canonical Gaussians' raw tensors (gsplat names; not the temporal opacity)."""
        return {k: v for k, v in super().to_dict(detach).items() if k != TIME_OPACITY}

    def select(self, mask: Tensor) -> Gaussians:
        return Gaussians.from_dict({k: v[mask] for k, v in self.to_dict().items()},
                                   requires_grad=self.means.requires_grad, copy=False)

    def clone(self) -> Gaussians:
        return Gaussians.from_dict({k: v.clone() for k, v in self.to_dict().items()},
                                   requires_grad=self.means.requires_grad, copy=False)

    def set_time(self, t: float) -> "DeformableGaussians":
        self.time = float(t)
        return self

    # ---- the scene-model interface --------------------------------------------------------
    def deformation(self, t: float):
        return self.deform(self.splats["means"], float(t))

    def state_weights(self, t: float, feature: Optional[Tensor] = None) -> Tensor:
        if self.mixer is None:
            raise ValueError("the model has no time-sensitive states")
        if feature is None:
            feature = self.deformation(t).feature
        logits = self.mixer.logits(feature, t)
        if self.time_logits is not None:
            logits = logits + interp_time(self.time_logits, t)
        return torch.softmax(logits, -1)

    def state_latents(self, t: float, feature: Optional[Tensor] = None) -> Tensor:
        """The time-sensitive latents [N, L] at ``t``."""
        w = self.state_weights(t, feature)
        return torch.einsum("nk,nkl->nl", w, self.states)

    def activated(self, t: Optional[float] = None) -> Activated:
        sp = self.splats
        static_lang = sp["lang"] if "lang" in sp else None
        if t is None or not self.deform_enabled:
            a = super().activated(None)
            if self.states is not None and static_lang is not None:
                a.lang = torch.cat([static_lang, self.state_latents(0.0 if t is None else t)], -1)
            return a
        d = self.deform(sp["means"], float(t))
        opac = sp["opacities"] if d.opacities is None else sp["opacities"] + d.opacities
        opac = torch.sigmoid(opac)
        if TIME_OPACITY in sp:
            opac = opac * time_gate(sp[TIME_OPACITY], float(t))
        sh0 = sp["sh0"] if d.sh0 is None else sp["sh0"] + d.sh0[:, None, :]
        lang = static_lang
        if self.states is not None and static_lang is not None:
            lang = torch.cat([static_lang, self.state_latents(t, d.feature)], -1)
        return Activated(means=sp["means"] + d.means, quats=sp["quats"] + d.quats, scales=torch.exp(sp["scales"] + d.scales),
                         opacities=opac, sh=torch.cat([sh0, sp["shN"]], 1), sh_degree=self.sh_degree,
                         lang=lang)

    @property
    def lang(self) -> Optional[Tensor]:
        base = self.splats["lang"] if "lang" in self.splats else None
        if base is None or self.states is None:
            return base
        with torch.no_grad():
            return torch.cat([base, self.state_latents(self.time)], -1)

    @torch.no_grad()
    def deformed(self, t: float) -> Gaussians:
        """Plain Gaussians at time ``t`` (e.g. to export one moment as a PLY)."""
        a = self.activated(t)
        q = a.quats
        d = {"means": a.means, "quats": q, "scales": torch.log(a.scales), "opacities": torch.logit(a.opacities, 1e-6),
             "sh0": a.sh[:, :1], "shN": a.sh[:, 1:]}
        if "lang" in self.splats:
            d["lang"] = self.splats["lang"]
        return Gaussians.from_dict({k: v.detach().clone() for k, v in d.items()}, requires_grad=False, copy=False)

    # ---- checkpoints ------------------------------------------------------------------------
    def model_config(self) -> Dict[str, Any]:
        st = None
        if self.states is not None:
            st = {"k": int(self.states.shape[1]), "hidden": self.mixer.hidden, "t_freqs": self.mixer.t_freqs,
                  "latent_dim": int(self.states.shape[2]),
                  "time_bins": 0 if self.time_logits is None else int(self.time_logits.shape[1])}
        out = {"kind": MODEL_KIND, "deform": self.deform.cfg.to_dict(), "states": st}
        if self.time_opacity is not None:
            out["time_opacity_bins"] = int(self.time_opacity.shape[1])
        return out

    def model_tensors(self) -> Dict[str, Any]:
        """The tensors a checkpoint needs besides ``splats``: ``deform`` (+ ``temporal``, ``states``,
        ``mixer``)."""
        out: Dict[str, Any] = {"deform": {k: v.detach() for k, v in self.deform.state_dict().items()}}
        if self.time_opacity is not None:
            out["temporal"] = {"opacity": self.time_opacity.detach()}
        if self.states is not None:
            out["states"] = {"prototypes": self.states.detach()}
            if self.time_logits is not None:
                out["states"]["time_logits"] = self.time_logits.detach()
            out["mixer"] = {k: v.detach() for k, v in self.mixer.state_dict().items()}
        return out

    @classmethod
    def from_checkpoint(cls, doc: Mapping[str, Any], ckpt, device=None,
                        requires_grad: bool = False) -> "DeformableGaussians":
        """The deformable model of a run checkpoint (``langfield.run.model_from_checkpoint``);
        the field's options come from the checkpoint's config (else config.json ``model``)."""
        from langfield.run import RunError

        model = (ckpt.config.get("model") if isinstance(ckpt.config, Mapping) else None) or doc.get("model") or {}
        t = ckpt.tensors
        if "deform" not in t:
            raise RunError(f"{getattr(ckpt, 'path', 'checkpoint')}: a deformable run's checkpoint has no 'deform' "
                           f"tensors")
        try:
            cfg = DeformConfig.from_dict(model.get("deform") or {})
            field = DeformationField(cfg)
            field.load_state_dict(t["deform"])
        except (ValueError, TypeError, RuntimeError, KeyError) as e:
            raise RunError(f"config.json model.deform: {str(e).splitlines()[0]}") from None
        s = t["splats"]
        s = {k[len("splats."):] if k.startswith("splats.") else k: v for k, v in s.items()}
        g = cls(s["means"], s["quats"], s["scales"], s["opacities"], s["sh0"], s.get("shN"), s.get("lang"),
                requires_grad=requires_grad, copy=False, deform=field)
        tb = (t.get("temporal") or {}).get("opacity")
        if tb is not None:
            try:
                g.set_time_opacity(tb, requires_grad=requires_grad)
            except ValueError as e:
                raise RunError(f"checkpoint temporal opacity: {e}") from None
        st = model.get("states")
        if st and "states" in t and "mixer" in t:
            mixer = StateMixer(cfg.hidden, int(st["k"]), int(st.get("hidden", 32)), int(st.get("t_freqs", 4)))
            try:
                mixer.load_state_dict(t["mixer"])
            except RuntimeError as e:
                raise RunError(f"checkpoint mixer: {str(e).splitlines()[0]}") from None
            try:
                g.set_states(t["states"]["prototypes"], mixer, requires_grad=requires_grad,
                             time_logits=t["states"].get("time_logits"))
            except ValueError as e:
                raise RunError(f"checkpoint states: {e}") from None
        if not requires_grad:
            for p in g.parameters():
                p.requires_grad_(False)
        return g.to(device) if device is not None else g

    def extra_repr(self) -> str:
        k = 0 if self.states is None else int(self.states.shape[1])
        return super().extra_repr() + f", deform={self.deform.cfg.kind}, states={k}"
