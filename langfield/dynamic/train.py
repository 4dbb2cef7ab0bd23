"""The dynamic RGB stage: time-stamped frames -> deformable Gaussians, in a resumable run folder.

:class:`DynamicTrainer` is :class:`langfield.train.rgb.RGBTrainer` with a deformable scene model:
the same losses, learning rates, gsplat ``DefaultStrategy`` densification of the *canonical*
Gaussians (fed with the render's ``meta``), checkpoints in ``RUN/checkpoints`` through
``RunFolder.store("rgb")``, the run lock and progress lines. What it adds:

* each step renders its camera at the frame's time (``Cameras.from_frame`` carries it);
* a static warm-up (``warmup`` steps with the deformation off, default ``steps // 12``: the
  canonical Gaussians learn the scene as a static one first, as 4DGS' coarse stage);
* the field's own Adam (plane grid and head: ``grid_lr`` / ``mlp_lr``, decaying
  exponentially to ``lr_final`` times over the run) and 4DGS' plane regularisers
  (``tv_weight`` total variation of the spatial planes, ``time_smooth_weight`` smoothness
  along t);
* checkpoints carry the field (``deform``), its Adam state (``deform_optim``) and config.json
  the model (``"model": {"kind": "deformable", "deform": ...}``) and these options
  (``"dynamic"``). Resuming on the CPU backend gives the same parameters bit for bit.
"""

from __future__ import annotations

import os

import dataclasses
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from langfield.dynamic.field import DeformConfig, DeformationField
from langfield.dynamic.model import TIME_OPACITY, DeformableGaussians
from langfield.io.checkpoint import atomic_write_json
from langfield.run import NonFiniteError, RunError, RunFolder
from langfield.train.config import TrainConfig
from langfield.train.rgb import RGBTrainer, lr_means, run_training
from langfield.train.sampler import exp_decay

__all__ = ["DynamicConfig", "DynamicTrainer", "train_dynamic", "DYNAMIC_RESUME_MAY_CHANGE"]

PathLike = Union[str, os.PathLike]


@dataclass
class DynamicConfig:
    """Options of the deformation (stored in config.json ``dynamic``)."""

    deform: str = "hexplane"
    """``hexplane`` (space-time plane grid + MLP head) or ``mlp`` (positional encoding + MLP)."""
    resolutions: tuple = (32, 64)
    time_resolution: int = 24
    features: int = 16
    hidden: int = 64
    layers: int = 1
    deform_opacity: bool = False
    deform_color: bool = False
    time_opacity_bins: int = 0
    """Per-Gaussian temporal opacity over this many bins of t (0: off; see
    :mod:`langfield.dynamic.model`): Gaussians that exist over a time interval only, for objects
    that move further than their own size."""
    time_opacity_lr: float = 0.05
    warmup: Optional[int] = None
    """Static steps before the deformation is switched on; default min(3000, steps // 12) (500 of
    a 6,000-step run: on D-NeRF 200x200 jumpingjacks 30.8 dB at 4k steps against 27.6 with
    steps // 5; the field starts at zero, so its first steps are static ones anyway)."""
    grid_lr: float = 1.6e-3
    mlp_lr: float = 1.6e-4
    lr_final: float = 0.1
    """The field's learning rates decay exponentially to this fraction of their start."""
    tv_weight: float = 1e-4
    time_smooth_weight: float = 1e-3

    def resolved(self, steps: int) -> "DynamicConfig":
        c = replace(self)
        if c.warmup is None:
            c.warmup = min(3000, steps // 12)
        return c

    def validate(self) -> None:
        self.deform_config().validate()
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.time_opacity_bins < 0 or self.time_opacity_bins == 1:
            raise ValueError(f"--time-opacity-bins must be 0 (off) or >= 2, got {self.time_opacity_bins}")
        for k in ("grid_lr", "mlp_lr", "lr_final", "time_opacity_lr"):
            if not getattr(self, k) > 0:
                raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {getattr(self, k)}")
        for k in ("tv_weight", "time_smooth_weight"):
            if not getattr(self, k) >= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(self, k)}")

    def deform_config(self) -> DeformConfig:
        return DeformConfig(kind=self.deform, resolutions=tuple(int(r) for r in self.resolutions),
                            time_resolution=self.time_resolution, features=self.features, hidden=self.hidden,
                            layers=self.layers, opacity=self.deform_opacity, color=self.deform_color)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resolutions"] = [int(r) for r in self.resolutions]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DynamicConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown dynamic options {unknown}")
        kw = dict(d)
        if "resolutions" in kw:
            kw["resolutions"] = tuple(int(r) for r in kw["resolutions"])
        return cls(**kw)


DYNAMIC_RESUME_MAY_CHANGE = ()


class DynamicTrainer(RGBTrainer):
    """See the module docstring. Build with :meth:`create_dynamic` or :meth:`resume_dynamic`."""

    _pending: Optional[DynamicConfig] = None

    def __init__(self, run: RunFolder, data: Path, cfg: TrainConfig, dataset, device: torch.device):
        super().__init__(run, data, cfg, dataset, device)
        dcfg = type(self)._pending
        if dcfg is None:
            dcfg = DynamicConfig.from_dict(run.read_config().get("dynamic") or {}) if run.config.is_file() \
                else DynamicConfig()
        self.dcfg = dcfg.resolved(cfg.steps)
        self.deform_opt: Optional[torch.optim.Optimizer] = None
        self._pending_deform: Optional[Dict[str, Tensor]] = None
        self._pending_temporal: Optional[Tensor] = None
        if not getattr(dataset, "has_time", False):
            raise RunError(f"{data}: the dataset has no frame times; train it as a static scene (without --dynamic)")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def create_dynamic(cls, data: PathLike, out: PathLike, cfg: TrainConfig, dcfg: DynamicConfig, *,
                       overwrite: bool = False, dataset=None) -> "DynamicTrainer":
        try:
            dcfg.validate()
        except ValueError as e:
            raise RunError(str(e)) from None
        cls._pending = dcfg
        try:
            return cls.create(data, out, cfg, overwrite=overwrite, dataset=dataset)
        finally:
            cls._pending = None

    @classmethod
    def resume_dynamic(cls, out: PathLike, data: Optional[PathLike] = None,
                       overrides: Optional[Mapping[str, Any]] = None,
                       dynamic_overrides: Optional[Mapping[str, Any]] = None, *, dataset=None) -> "DynamicTrainer":
        rf = RunFolder(out)
        if rf.config.is_file():
            doc = rf.read_config()
            if (doc.get("model") or {}).get("kind") != "deformable":
                raise RunError(f"{rf.config}: not a dynamic run (model kind "
                               f"{(doc.get('model') or {}).get('kind', 'gaussians')!r}); resume it without --dynamic")
            stored = DynamicConfig.from_dict(doc.get("dynamic") or {})
            want = replace(stored, **dict(dynamic_overrides or {}))
            diff = [k for k in stored.to_dict() if stored.to_dict()[k] != want.to_dict()[k]
                    and k not in DYNAMIC_RESUME_MAY_CHANGE]
            if diff:
                raise RunError(f"--resume: dynamic options differ from the stored run: {', '.join(diff)}")
            cls._pending = stored
        try:
            return cls.resume(out, data, overrides, dataset=dataset)
        finally:
            cls._pending = None

    def _init_optim(self) -> None:
        g = self.gaussians
        if not isinstance(g, DeformableGaussians):
            raw = {k: v.detach() for k, v in g.splats.items()}
            if self._pending_deform is not None:
                field = DeformationField(DeformConfig.from_dict(self._pending_deform_cfg))
                field.load_state_dict(self._pending_deform)
            else:
                field = DeformationField.for_points(raw["means"], self.dcfg.deform_config())
            bins = self._pending_temporal
            if bins is None and self.dcfg.time_opacity_bins >= 2:
                bins = torch.zeros(raw["means"].shape[0], self.dcfg.time_opacity_bins)
            g = DeformableGaussians(raw["means"], raw["quats"], raw["scales"], raw["opacities"], raw["sh0"],
                                    raw["shN"], raw.get("lang"), requires_grad=True, copy=False, deform=field,
                                    time_opacity=bins)
            self.gaussians = g.to(self.device)
        super()._init_optim()
        d = self.gaussians.deform
        groups = []
        planes = list(d.planes)
        if planes:
            groups.append({"params": planes, "lr": self._deform_lrs()[0], "name": "grid"})
        groups.append({"params": list(d.trunk.parameters()) + list(d.out.parameters()), "lr": self._deform_lrs()[1],
                       "name": "mlp"})
        # the batch rule of the Gaussians' Adams (eps 1e-15, betas (0.9, 0.999) for one camera)
        self.deform_opt = torch.optim.Adam(groups, **self._batch_scaling()[1])

    def _lrs(self) -> Dict[str, float]:
        out = super()._lrs()
        out[TIME_OPACITY] = self._batch_scaling()[0] * self.dcfg.time_opacity_lr
        return out

    def _deform_lrs(self):
        c = self.dcfg
        s = max(self.step - c.warmup, 0)
        total = max(self.cfg.steps - c.warmup, 1)
        f = self._batch_scaling()[0]  # sqrt(B) with a batch of B cameras, as the Gaussians' rates
        return (f * exp_decay(c.grid_lr, c.lr_final, s, total), f * exp_decay(c.mlp_lr, c.lr_final, s, total))

    # ---- data-parallel jobs -------------------------------------------------------------------
    def fingerprint(self) -> Dict[str, Any]:
        out = super().fingerprint()
        out["dynamic"] = self.dcfg.to_dict()
        return out

    def _all_params(self) -> Dict[str, Tensor]:
        """The canonical Gaussians and the deformation field's parameters (``deform.*``): what
        every rank must hold bit for bit."""
        g = self.gaussians
        out = dict(g.splats.items())
        if isinstance(g, DeformableGaussians):
            out.update({f"deform.{k}": v for k, v in g.deform.named_parameters()})
        return out

    def _sync_start(self) -> None:
        super()._sync_start()
        g = self.gaussians
        if self.job.active and isinstance(g, DeformableGaussians):  # resumed: the stored field
            from langfield import distributed

            field = {f"deform.{k}": v for k, v in g.deform.named_parameters()}
            distributed.broadcast_params(field)
            self.job.check_params(field, self.step)

    def _write_config(self, resumed_from: Optional[int] = None) -> None:
        super()._write_config(resumed_from)
        doc = self.run.read_config()
        doc["model"] = self.gaussians.model_config()
        doc["dynamic"] = self.dcfg.to_dict()
        doc["dataset"]["time_range"] = [0.0, 1.0]
        atomic_write_json(self.run.config, doc)

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_tensors(self) -> Dict[str, Any]:
        out = super().state_tensors()
        out["splats"].pop(TIME_OPACITY, None)  # stored as ``temporal`` (model_tensors): splats keep gsplat's names
        out.update(self.gaussians.model_tensors())
        st = self.deform_opt.state_dict()["state"]
        if st:
            out["deform_optim"] = {str(k): {n: v for n, v in s.items() if isinstance(v, Tensor)} for k, s in st.items()}
        return out

    def _params_finite(self) -> bool:
        return super()._params_finite() and all(bool(torch.isfinite(p).all()) for p in self.gaussians.deform.parameters())

    def save_checkpoint(self) -> Path:
        if not self._params_finite():
            raise NonFiniteError(self._nonfinite_message("the parameters are not finite"), self.step,
                                 self.last_ckpt_step)
        if self.job.active:  # identical on every rank (checked), written by rank 0 alone
            self.job.check_params(self._all_params(), self.step)
            if not self.job.is_main:
                self.last_ckpt_step = self.step
                return self.run.store("rgb").path(self.step)
        g = self.gaussians
        cfg = {"stage": "rgb", "train": self.cfg.to_dict(), "dynamic": self.dcfg.to_dict(), "model": g.model_config(),
               "sampler_pos": self.pos, "train_time_s": self.train_time, "num_gaussians": g.num,
               "sh_degree": g.sh_degree, "lang_dim": 0, "num": g.num, "background": self.background}
        p = self.run.store("rgb", self.cfg.keep_checkpoints).save(self.state_tensors(), cfg, self.step)
        self.last_ckpt_step = self.step
        return p

    def _load_state(self, ckpt) -> None:
        t = ckpt.tensors
        if "deform" not in t:
            raise RunError(f"{self.run.checkpoints}: checkpoint {ckpt.step} has no deformation field")
        self._pending_deform = t["deform"]
        self._pending_temporal = (t.get("temporal") or {}).get("opacity")
        self._pending_deform_cfg = ((ckpt.config.get("model") or {}).get("deform")
                                    or self.dcfg.deform_config().to_dict())
        try:
            super()._load_state(ckpt)  # -> _init_optim wraps the Gaussians with the stored field
        finally:
            self._pending_deform = None
            self._pending_temporal = None
        st = t.get("deform_optim", {})
        if st:
            sd = self.deform_opt.state_dict()
            sd["state"] = {int(k): {n: v.to(self.device) for n, v in s.items()} for k, s in st.items()}
            self.deform_opt.load_state_dict(sd)

    # ---- training ---------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        from langfield.train.losses import rgb_loss

        if self.batch > 1 or self.job.active:
            return self._train_step_batch()
        cfg, dc = self.cfg, self.dcfg
        step = self.step
        g = self.gaussians
        params = g.splats
        g.deform_enabled = step >= dc.warmup
        i = self._next_index()
        cams = self._cams[i]
        bg = self._bg()
        target = self._target(i, bg)
        for grp in self.optimizers["means"].param_groups:
            grp["lr"] = lr_means(cfg, self.scene_scale, step)
        lr_grid, lr_mlp = self._deform_lrs()
        for grp in self.deform_opt.param_groups:
            grp["lr"] = lr_grid if grp["name"] == "grid" else lr_mlp
        out = self._render_step(g, cams, bg, step)
        pred, info = out.rgb[0], out.meta
        if self.strategy is not None:
            self.strategy.step_pre_backward(params, self.optimizers, self.strategy_state, step, info)
        loss, _l1, _s = rgb_loss(pred, target, cfg.ssim_lambda)
        if g.deform_enabled and (dc.tv_weight > 0 or dc.time_smooth_weight > 0):
            loss = loss + g.deform.regularization(dc.tv_weight, dc.time_smooth_weight)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise NonFiniteError(self._nonfinite_message(f"the loss is not finite ({lv})"), step, self.last_ckpt_step)
        loss.backward()
        self._optimizer_step()
        if self.strategy is not None:
            self.strategy.step_post_backward(params, self.optimizers, self.strategy_state, step, info)
            if cfg.opacity_reset and step > 0 and step % cfg.reset_every == 0 and step < cfg.refine_stop_iter:
                from gsplat.strategy.ops import reset_opa

                reset_opa(params, self.optimizers, self.strategy_state, value=cfg.prune_opa * 2.0)
        with torch.no_grad():
            mse = float(((pred.detach() - target) ** 2).mean())
        self.step = step + 1
        return {"loss": lv, "psnr": -10.0 * math.log10(max(mse, 1e-12))}

    def _optimizer_step(self) -> None:
        """Adam on the Gaussians, and on the deformation field once it is switched on."""
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.gaussians.deform_enabled:
            self.deform_opt.step()
        self.deform_opt.zero_grad(set_to_none=True)

    def _train_step_batch(self) -> Dict[str, float]:
        """A step on ``batch`` cameras (each at its frame's time), this rank's share of them
        rendered here: :meth:`RGBTrainer._train_step_batch` with the deformation field. The
        field's gradients ride in the same flat all-reduce as the Gaussians'; the plane
        regularisers are added once per step after the reduction (identical on every rank), so
        ``N ranks x B/N cameras`` takes the step of ``1 process x B cameras``."""
        from langfield import distributed
        from langfield.distributed.dp import strategy_post_backward

        cfg, dc, job, B = self.cfg, self.dcfg, self.job, self.batch
        step = self.step
        job.set_step(step)
        g = self.gaussians
        params = g.splats
        g.deform_enabled = step >= dc.warmup
        views = self._draw_batch(B)
        lr_grid, lr_mlp = self._deform_lrs()
        for grp in self.deform_opt.param_groups:
            grp["lr"] = lr_grid if grp["name"] == "grid" else lr_mlp
        infos, stats = self._render_share(views, step)
        field = list(g.deform.parameters()) if g.deform_enabled else []
        stats = distributed.all_reduce_grads(list(params.values()) + field, extra=stats, dist_=job)
        lv, mse = float(stats[0]) / B, float(stats[1]) / B
        if g.deform_enabled and (dc.tv_weight > 0 or dc.time_smooth_weight > 0):
            reg = g.deform.regularization(dc.tv_weight, dc.time_smooth_weight)
            reg.backward()  # after the reduction: once per step, the same on every rank
            lv += float(reg.detach())
        if not math.isfinite(lv):  # the same on every rank (the reduced loss): all stop together
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            self.deform_opt.zero_grad(set_to_none=True)
            raise NonFiniteError(self._nonfinite_message(f"the loss is not finite ({lv})"), step, self.last_ckpt_step)
        self._optimizer_step()
        if self.strategy is not None:
            strategy_post_backward(self.strategy, params, self.optimizers, self.strategy_state, step, infos, B, job)
            if cfg.opacity_reset and step > 0 and step % cfg.reset_every == 0 and step < cfg.refine_stop_iter:
                from gsplat.strategy.ops import reset_opa

                reset_opa(params, self.optimizers, self.strategy_state, value=cfg.prune_opa * 2.0)
        self.step = step + 1
        if job.active and self.step % cfg.sync_check_every == 0:
            job.check_params(self._all_params(), self.step)
        return {"loss": lv, "psnr": -10.0 * math.log10(max(mse, 1e-12))}

    def evaluate(self, write_renders: Optional[bool] = None, progress: bool = False) -> Dict[str, Any]:
        self.gaussians.deform_enabled = True
        return super().evaluate(write_renders, progress)


def train_dynamic(data: PathLike, out: PathLike, config: Optional[TrainConfig] = None,
                  dynamic: Optional[DynamicConfig] = None, *, resume: bool = False, overwrite: bool = False,
                  hooks: Sequence[Callable[[DynamicTrainer], None]] = (), evaluate: bool = True,
                  **options) -> Dict[str, Any]:
    """Train (or resume) a dynamic run: :func:`langfield.train.rgb.train_rgb` with a deformable
    model. ``options`` are TrainConfig fields; ``dynamic`` the deformation's options (on resume:
    must equal the stored ones when given). Returns the metrics (held-out (view, time) pairs)."""
    def make() -> DynamicTrainer:
        opts = options
        if resume:
            if config is not None:
                opts = {**{k: v for k, v in config.to_dict().items() if v != getattr(TrainConfig(), k)}, **opts}
            return DynamicTrainer.resume_dynamic(out, data, opts, None if dynamic is None else dynamic.to_dict())
        return DynamicTrainer.create_dynamic(data, out, replace(config or TrainConfig(), **opts),
                                             dynamic or DynamicConfig(), overwrite=overwrite)

    return run_training(out, make, resume=resume, overwrite=overwrite, hooks=hooks, evaluate=evaluate)
