"""The RGB stage: posed images -> Gaussians, in a resumable run folder.

One camera per step, in a random order (a fresh permutation of the training views per epoch,
from a seeded generator); Adam per parameter with 3DGS' learning rates (see
:mod:`langfield.train.config`); loss ``0.8 L1 + 0.2 (1 - SSIM)``; SH degree ramp;
densification and pruning by gsplat's ``DefaultStrategy`` fed with the renderer's ``meta``.

Run folder (``RUN/``)::

    config.json                 {"format": "langfield-run", "data": ..., "train": {...resolved
                                 TrainConfig...}, "dataset": {...transform, scene_scale...},
                                 "backend": ..., "langfield_version": ...}
    checkpoints/ckpt_XXXXXXX.safetensors + .json
    renders/test/NNNN_<name>.png and NNNN_<name>_gt_pred.png
    metrics.json                PSNR/SSIM on the held-out views, per view and mean

A checkpoint holds everything an exact resume needs: the parameters, each Adam's state, the
strategy's running statistics, the global torch RNG (densification splits draw from it), the
sampling generator and the current permutation. Resuming from it on the CPU backend gives
the same parameters, bit for bit, as a run that was never interrupted.

Resume policy: ``resume=True`` continues from the newest checkpoint with the stored
configuration. Options that do not change the optimisation (device, checkpoint cadence,
progress bar, ...) may be changed; ``steps`` may be changed to a value not below the
checkpoint's step (the means learning-rate decay is then recomputed for the new length,
and the densification window stays as stored); any other difference, or a different
dataset, is refused with a message naming it.

Batches and several processes: ``batch_size`` B > 1 renders B cameras per step (one render
call each, the loss of each divided by B) with gsplat's sqrt(B) learning-rate rule; under
``torchrun`` the N ranks each render B/N of them, gradients and densification statistics are
reduced over the ranks, and rank 0 alone writes (see :mod:`langfield.distributed.dp`). The
checkpoint is the same whatever N: a run resumes on any divisor of B.

Gaussian-sharded training (``shard_gaussians`` under ``torchrun``): each rank holds only its
Morton shard of the Gaussians (parameters, gradients, Adam moments, densification statistics;
every row with its global index), renders its cameras through
:class:`~langfield.distributed.shard.ShardedRenderer` (the visible rows of every shard gathered,
gradients and statistics sent back to the owners) and densifies its shard with
:func:`~langfield.distributed.shard.sharded_refine`, which takes the decisions a replicated
run takes; checkpoints gather the shards onto rank 0 in global order, so they equal a
data-parallel run's and resume sharded (re-cut into Morton shards for the new number of
ranks) or not. Shards are cut at the start and at every resume; densification grows each
shard where its Gaussians grow (no rebalancing in between). Rank 0 evaluates the gathered
Gaussians at the end (as ``langfield eval`` does).

Overwrite policy: an existing, non-empty ``RUN`` is refused unless ``resume`` or
``overwrite``; ``overwrite`` moves langfield's own artefacts (config.json, checkpoints/,
renders/, metrics.json, and later stages' features/, autoencoder.safetensors) into
``RUN/replaced-<timestamp>/`` and leaves every other file alone: nothing is deleted.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from langfield.io.checkpoint import atomic_write_json
from langfield.render.model import Cameras, render
from langfield.run import (RUN_ARTEFACTS, RUN_FORMAT, NonFiniteError, RunError, RunFolder, load_run,  # noqa: F401
                           open_dataset, resolve_device, update_metrics)
from langfield.errors import os_path, os_reason  # noqa: F401
from langfield.eval.views import composite_on, eval_background, evaluate_views, render_views  # noqa: F401
from langfield import distributed
from langfield.train.config import TrainConfig, config_diff
from langfield.train.progress import Progress
from langfield.train.sampler import EpochSampler

__all__ = ["RGBTrainer", "train_rgb", "RunError", "NonFiniteError", "RunFolder", "evaluate_views",
           "render_views", "load_run", "write_metrics", "RUN_ARTEFACTS"]

PathLike = Union[str, os.PathLike]
PARAM_ORDER = ("means", "quats", "scales", "opacities", "sh0", "shN", "lang")


def _load_dataset(data: PathLike, cfg: TrainConfig):
    return open_dataset(data, downscale=cfg.downscale, normalize=cfg.normalize, test_every=cfg.test_every,
                        cache_images=cfg.cache_images, verify=True, skip_bad=cfg.skip_bad_images,
                        allow_outside=cfg.allow_outside)


def _frame_alpha(ds, i: int) -> bool:
    return ds._cached_rgba(i)[1] is not None


def lr_means(cfg: TrainConfig, scene_scale: float, step: int) -> float:
    """gsplat's ExponentialLR(gamma = final ** (1 / steps)) in closed form."""
    return cfg.means_lr * scene_scale * cfg.means_lr_final ** (step / max(cfg.steps, 1))


# ------------------------------------------------------------------------------------------

class RGBTrainer(EpochSampler):
    """Owns the Gaussians, optimisers, strategy and RNG state of one run.

    Construct with :meth:`create` (fresh run) or :meth:`resume`; then :meth:`train` (optionally
    up to ``stop_at``), :meth:`finish` (metrics + renders). ``hooks`` passed to :meth:`train`
    are called as ``hook(trainer)`` after every completed step (``trainer.step`` = steps done).
    """

    def __init__(self, run: RunFolder, data: Path, cfg: TrainConfig, dataset, device: torch.device):
        self.run = run
        self.data = data
        self.cfg = cfg
        self.ds = dataset
        self.device = device
        self.train_idx = dataset.indices("train")
        self.test_idx = dataset.indices("test") or dataset.indices("val")
        if not self.train_idx:
            raise RunError(f"{data}: the dataset has no training views")
        self.has_alpha = _frame_alpha(dataset, self.train_idx[0])
        bg = cfg.background
        if bg == "auto":
            bg = "random" if self.has_alpha else "black"
        self.background = bg
        from langfield.render import resolve_backend

        try:
            self.backend = resolve_backend(cfg.backend, device, torch.float32)
        except Exception as e:
            raise RunError(f"--backend {cfg.backend}: {str(e).splitlines()[0]}") from None
        self.scene_scale = float(dataset.scene_scale) * 1.1  # as gsplat's simple_trainer
        self.step = 0
        self.train_time = 0.0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm = torch.zeros(0, dtype=torch.long)
        self.pos = 0
        self.gaussians = None
        self.job = distributed.get()
        self.batch = int(cfg.batch_size or 1)  # runs from before batches store none: one camera
        if self.batch % self.job.world:
            raise RunError(f"--batch-size {self.batch} is not a multiple of the {self.job.world} ranks of this job "
                           f"(each rank renders batch-size / ranks cameras per step); run with a divisor of it as "
                           f"--nproc_per_node x nodes, or start a new run with another --batch-size")
        # Gaussian-sharded training: this rank's rows (self.gaussians) with their global indices
        self.sharded = bool(getattr(cfg, "shard_gaussians", False)) and self.job.active
        self.ids: Optional[Tensor] = None
        self.n_global: Optional[int] = None
        self.sharder = None
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.strategy = None
        self.strategy_state: Dict[str, Any] = {}
        self.last_ckpt_step: Optional[int] = None
        self._cams = {i: Cameras.from_frame(dataset.frames[i], device) for i in self.train_idx}

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, data: PathLike, out: PathLike, cfg: TrainConfig, *, overwrite: bool = False,
               dataset=None) -> "RGBTrainer":
        """A fresh run in ``out`` (refused if ``out`` holds anything, unless ``overwrite``)."""
        try:
            cfg.validate()
        except ValueError as e:
            raise RunError(str(e)) from None
        _require_strategy(cfg)
        run = RunFolder(out)
        job = distributed.get()

        def check_out() -> None:
            if run.root.exists() and not run.root.is_dir():
                raise RunError(f"--out {run.root}: exists and is not a folder")
            if run.root.is_dir() and not run.is_empty_for_new_run():
                if not overwrite:
                    what = "a langfield run" if run.config.exists() else "files"
                    raise RunError(f"--out {run.root} already holds {what}; pass --resume to continue it or "
                                   f"--overwrite to start again (langfield's files are moved aside, not deleted)")

        job.on_main(check_out, errors=(RunError,), what="checking --out")  # rank 0 alone looks at the folder
        if cfg.shard_gaussians and not job.active:
            print("langfield: --shard-gaussians shards the Gaussians over the ranks of a torchrun job; one process "
                  "holds them all", file=sys.stderr)
        data = Path(data).expanduser().resolve()
        device = job.device(resolve_device(cfg.device))
        cfg = cfg.resolved(world_size=job.world)
        cfg = _resolve_init_paths(cfg)
        # bad data or a bad --init-ply fail here, before anything is moved or written
        ds = dataset if dataset is not None else _load_dataset(data, cfg)
        self = cls(run, data, cfg, ds, device)
        torch.manual_seed(cfg.seed)
        self._init_gaussians()
        self._sync_start()
        if overwrite and run.root.is_dir() and job.is_main:
            moved = run.move_aside()
            if moved is not None:
                print(f"langfield: moved the previous run's files to {moved}", file=sys.stderr)
        self._init_optim()
        if job.is_main:
            run.root.mkdir(parents=True, exist_ok=True)
            self._write_config()
        return self

    @classmethod
    def resume(cls, out: PathLike, data: Optional[PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
               *, dataset=None) -> "RGBTrainer":
        """Continue the run in ``out`` from its newest checkpoint (see the module docstring)."""
        run = RunFolder(out)
        if not run.root.is_dir():
            raise RunError(f"--resume: {run.root} does not exist (nothing to resume)")
        doc = run.read_config()
        if doc.get("stage", "rgb") != "rgb" or "train" not in doc:
            raise RunError(f"{run.config}: no RGB training configuration to resume")
        try:
            stored = TrainConfig.from_dict(doc["train"])
        except (TypeError, ValueError) as e:
            raise RunError(f"{run.config}: {e}") from None
        stored_data = Path(doc["data"])
        if data is not None:
            d = Path(data).expanduser().resolve()
            if d != stored_data:
                raise RunError(f"--resume: {run.root} was trained on {stored_data}, not {d}; resume with the same data")
        overrides = dict(overrides or {})
        try:
            new = _resolve_init_paths(replace(stored, **overrides))
        except TypeError as e:
            raise RunError(f"--resume: {e}") from None
        diff = config_diff(stored, new)
        if diff:
            lst = ", ".join(f"{k} (run: {a!r}, requested: {b!r})" for k, a, b in diff)
            raise RunError(f"--resume: options differ from the stored run: {lst}; start a new run (--out) or "
                           f"--overwrite instead")
        try:
            new.validate()
        except ValueError as e:
            raise RunError(str(e)) from None
        _require_strategy(new)
        main = distributed.get().is_main  # rank 0 alone moves a corrupt newest one aside
        _p, ckpt = run.store("rgb").latest(quarantine=main, warn=main)  # a corrupt newest one: warned, moved aside
        if ckpt is not None:
            if new.steps < ckpt.step:
                raise RunError(f"--steps {new.steps} is below the checkpoint's step {ckpt.step}")
        device = distributed.get().device(resolve_device(new.device))
        ds = dataset if dataset is not None else _load_dataset(stored_data, new)
        self = cls(run, stored_data, new, ds, device)
        if ckpt is None:
            if main:
                print(f"langfield: {run.root} has no checkpoint yet; starting from step 0", file=sys.stderr)
            torch.manual_seed(new.seed)
            self._init_gaussians()
            self._sync_start()
            self._init_optim()
        else:
            self._load_state(ckpt)
            self._sync_start()
        if main:
            self._write_config(resumed_from=None if ckpt is None else ckpt.step)
        return self

    def fingerprint(self) -> Dict[str, Any]:
        """What every rank of a data-parallel job must agree on before the first step: the
        configuration (without options that may differ per rank), the data, the start."""
        ds = self.ds
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in ("progress", "device")}
        frames = [(f.name, int(f.width), int(f.height)) for f in ds.frames]
        return {"langfield": __import__("langfield").__version__, "stage": type(self).__name__, "config": cfg,
                "data": str(self.data), "frames": frames, "train_views": list(self.train_idx),
                "scene_scale": float(self.scene_scale), "transform": np.asarray(ds.transform).round(9).tolist(),
                "backend": self.backend, "device_type": self.device.type, "step": self.step,
                "num_gaussians": self.num_global, "torch": torch.__version__}

    @property
    def num_global(self) -> int:
        """Gaussians of the whole scene (every shard's in sharded training)."""
        return int(self.n_global) if self.sharded and self.n_global is not None else self.gaussians.num

    def _sync_start(self) -> None:
        """Data-parallel jobs: refuse ranks that disagree on the configuration, data or start
        (one message on every rank); then rank 0's Gaussians everywhere and a hash check."""
        job = self.job
        if not job.active:
            return
        job.check_same("training configuration and data", self.fingerprint())
        if self.sharded:
            if self.ids is None:  # a fresh start, built whole (on the CPU) by every rank: rank 0's, then cut
                from langfield.distributed.shard import broadcast_chunked

                broadcast_chunked(job, self.gaussians.splats)
                job.check_params(self.gaussians.splats, self.step)
                self._take_shard({k: v.detach() for k, v in self.gaussians.splats.items()})
            self._check_shards()
            return
        distributed.broadcast_params(self.gaussians.splats)
        job.check_params(self.gaussians.splats, self.step)

    def _take_shard(self, splats: Mapping[str, Tensor]) -> Tensor:
        """Keep this rank's Morton shard of the whole ``splats`` (on the device); returns its
        global indices (CPU)."""
        from langfield.distributed.shard import morton_shards
        from langfield.scene import Gaussians

        n = int(splats["means"].shape[0])
        own = morton_shards(splats["means"], self.job.world)[self.job.rank]
        self.gaussians = Gaussians.from_dict({k: v[own] for k, v in splats.items()}, copy=True).to(self.device)
        self.ids = own.to(self.device)
        self.n_global = n
        return own

    def _check_shards(self) -> None:
        """Sharded training: the shards partition the global indices 0..N-1 (sizes and an exact
        sum checked across ranks); :class:`DistError` naming the step otherwise."""
        job = self.job
        n = int(self.n_global)
        mine = torch.tensor([self.ids.numel(), n, int(self.ids.sum())], dtype=torch.int64, device=job.device())
        got = job.all_gather(mine, what="shard check")
        if (sum(int(g[0]) for g in got) != n or any(int(g[1]) != n for g in got)
                or sum(int(g[2]) for g in got) != n * (n - 1) // 2):
            raise distributed.DistError(f"the Gaussian shards are inconsistent at step {self.step}: sizes "
                                        f"{[int(g[0]) for g in got]}, global counts {[int(g[1]) for g in got]}")

    def _init_gaussians(self) -> None:
        from langfield.scene import Gaussians

        cfg = self.cfg
        if cfg.init_ply:
            frame = read_frame_transform(Path(cfg.init_ply_transform)) if cfg.init_ply_transform else None
            g, degree = _gaussians_from_ply(Path(cfg.init_ply), self.ds, cfg.sh_degree, frame)
            self.gaussians = g if self.sharded else g.to(self.device)  # sharded: cut on the CPU first
            self.cfg = replace(cfg, sh_degree_start=min(degree, cfg.sh_degree))  # trained bands need no ramp
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random init is the norm for Blender data; reported in config
            g = Gaussians.from_dataset(self.ds, sh_degree=cfg.sh_degree, n_random=cfg.init_random,
                                       init_opacity=cfg.init_opacity, init_scale=cfg.init_scale, seed=cfg.seed)
        self.gaussians = g if self.sharded else g.to(self.device)  # sharded: cut on the CPU first

    def _lrs(self) -> Dict[str, float]:
        c = self.cfg
        f = self._batch_scaling()[0]
        return {"means": f * lr_means(c, self.scene_scale, self.step), "quats": f * c.quats_lr,
                "scales": f * c.scales_lr, "opacities": f * c.opacities_lr, "sh0": f * c.sh0_lr, "shN": f * c.shN_lr}

    def _batch_scaling(self):
        """``(lr factor, Adam kwargs)`` of the batch (see :mod:`langfield.distributed.dp`)."""
        from langfield.distributed.dp import batch_adam_kwargs

        return batch_adam_kwargs(getattr(self, "batch", 1), self.cfg.lr_batch_scaling)

    def _init_optim(self) -> None:
        cfg = self.cfg
        params = self.gaussians.splats
        lrs = self._lrs()
        # fused: one kernel per parameter instead of ~10 small ops (which cost milliseconds each
        # on a busy CPU); deterministic on the CPU like the loop version
        adam = self._batch_scaling()[1]  # eps 1e-15, betas (0.9, 0.999) for one camera per step
        self.optimizers = {k: torch.optim.Adam([{"params": params[k], "lr": lrs[k], "name": k}], fused=True, **adam)
                           for k in params.keys() if k in lrs}
        if cfg.densify:
            from gsplat.strategy import DefaultStrategy

            self.strategy = DefaultStrategy(prune_opa=cfg.prune_opa, grow_grad2d=cfg.grow_grad2d,
                                            grow_scale3d=cfg.grow_scale3d, prune_scale3d=cfg.prune_scale3d,
                                            refine_start_iter=cfg.refine_start_iter,
                                            refine_stop_iter=cfg.refine_stop_iter, reset_every=cfg.reset_every,
                                            refine_every=cfg.refine_every, absgrad=cfg.absgrad, verbose=False)
            self.strategy.check_sanity(params, self.optimizers)
            self.strategy_state = self.strategy.initialize_state(scene_scale=self.scene_scale)
        else:
            self.strategy = None
            self.strategy_state = {}

    # ---- config.json ---------------------------------------------------------------------
    def _write_config(self, resumed_from: Optional[int] = None) -> None:
        from langfield import __version__

        old = {}
        if self.run.config.is_file():
            try:
                old = self.run.read_config()
            except RunError:
                old = {}
        history = list(old.get("history", []))
        now = datetime.now().isoformat(timespec="seconds")
        history.append({"time": now, "event": "created" if resumed_from is None and not old else "resumed",
                        "step": self.step})
        ds = self.ds
        doc = {
            "format": RUN_FORMAT,
            "version": 1,
            "stage": "rgb",
            "langfield_version": __version__,
            "data": str(self.data),
            "backend": self.backend,
            "device": str(self.device),
            "train": self.cfg.to_dict(),
            "dataset": {
                "format": ds.format,
                "num_frames": len(ds),
                "num_train": len(self.train_idx),
                "num_test": len(self.test_idx),
                "scene_scale": float(ds.scene_scale),
                "transform": np.asarray(ds.transform).tolist(),
                "time_raw_range": ds.meta.get("time_raw_range"),  # times rescaled to [0, 1] from these
                "has_alpha": bool(self.has_alpha),
                "background": self.background,
                "init": "points" if ds.points is not None and len(ds.points) > 0 else "random",
            },
            "history": history,
        }
        if "language" in old:  # a language stage added to this run stays recorded
            doc["language"] = old["language"]
        atomic_write_json(self.run.config, doc)

    # ---- checkpoints -----------------------------------------------------------------------
    def state_tensors(self) -> Optional[Dict[str, Any]]:
        """Everything a checkpoint holds. Sharded training: a collective that gathers the
        shards onto rank 0 in global order (``None`` on the other ranks)."""
        if self.sharded:
            return self._gathered_state()
        params = self.gaussians.splats
        optim = {}
        for k, opt in self.optimizers.items():
            st = opt.state.get(params[k], {})
            if st:
                optim[k] = {n: v for n, v in st.items() if isinstance(v, Tensor)}
        strat = {k: v for k, v in self.strategy_state.items() if isinstance(v, Tensor)}
        rng = {"torch": torch.get_rng_state(), "sampler": self.gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        out = {"splats": {k: v.detach() for k, v in params.items()}, "rng": rng,
               "sampler": {"perm": self.perm.clone()}}
        if optim:
            out["optim"] = optim
        if strat:
            out["strategy"] = strat
        return out

    def _gathered_state(self) -> Optional[Dict[str, Any]]:
        from langfield.distributed.shard import gather_to_main

        params = self.gaussians.splats
        rows: Dict[str, Tensor] = {f"splats/{k}": v for k, v in params.items()}
        scalars: Dict[str, Dict[str, Tensor]] = {}
        for k, opt in self.optimizers.items():
            for n, v in opt.state.get(params[k], {}).items():
                if isinstance(v, Tensor):
                    if v.dim() > 0 and v.shape[0] == params[k].shape[0]:
                        rows[f"optim/{k}/{n}"] = v
                    else:
                        scalars.setdefault(k, {})[n] = v.detach().cpu()
        for k, v in self.strategy_state.items():
            if isinstance(v, Tensor):
                rows[f"strategy/{k}"] = v
        full = gather_to_main(self.job, self.ids, rows, self.n_global)
        if full is None:
            return None
        out: Dict[str, Any] = {"splats": {}, "rng": {"torch": torch.get_rng_state(), "sampler": self.gen.get_state()},
                               "sampler": {"perm": self.perm.clone()}}
        if self.device.type == "cuda":
            out["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        optim: Dict[str, Dict[str, Tensor]] = {k: dict(v) for k, v in scalars.items()}
        for key, v in full.items():
            part = key.split("/")
            if part[0] == "splats":
                out["splats"][part[1]] = v
            elif part[0] == "optim":
                optim.setdefault(part[1], {})[part[2]] = v
            else:
                out.setdefault("strategy", {})[part[1]] = v
        if optim:
            out["optim"] = optim
        return out

    def _params_finite(self) -> bool:
        ok = all(bool(torch.isfinite(p).all()) for p in self.gaussians.splats.values())
        if self.sharded:  # every rank decides together
            t = torch.tensor([1.0 if ok else 0.0], device=self.job.device())
            ok = bool(self.job.all_reduce(t, "min", what="finite check of the shards")[0] > 0)
        return ok

    def save_checkpoint(self) -> Path:
        if not self._params_finite():
            raise NonFiniteError(self._nonfinite_message("the parameters are not finite"), self.step,
                                 self.last_ckpt_step)
        tensors = None
        if self.sharded:  # the shards gathered onto rank 0, which writes them
            self._check_shards()
            tensors = self.state_tensors()
            if not self.job.is_main:
                self.last_ckpt_step = self.step
                return self.run.store("rgb").path(self.step)
        elif self.job.active:  # identical on every rank (checked), written by rank 0 alone
            self.job.check_params(self.gaussians.splats, self.step)
            if not self.job.is_main:
                self.last_ckpt_step = self.step
                return self.run.store("rgb").path(self.step)
        n = self.num_global
        cfg = {"stage": "rgb", "train": self.cfg.to_dict(), "sampler_pos": self.pos, "train_time_s": self.train_time,
               "num_gaussians": n, "sh_degree": self.gaussians.sh_degree, "lang_dim": 0,
               "num": n, "background": self.background}
        if tensors is None:
            tensors = self.state_tensors()
        try:
            p = self.run.store("rgb", self.cfg.keep_checkpoints).save(tensors, cfg, self.step)
        except OSError as e:  # a full disk, a read-only folder: the older checkpoints are untouched
            kept = (f"the checkpoint of step {self.last_ckpt_step} is intact" if self.last_ckpt_step is not None
                    else "no checkpoint had been written yet")
            raise RunError(f"cannot write the checkpoint of step {self.step} into {self.run.checkpoints} "
                           f"({os_reason(e)}); {kept}; free space or fix the folder, then --resume") from None
        self.last_ckpt_step = self.step
        return p

    def _load_state(self, ckpt) -> None:
        from langfield.scene import Gaussians

        t = ckpt.tensors
        n = int(t["splats"]["means"].shape[0])
        own = None
        if self.sharded:  # the checkpoint holds the whole scene in global order: cut this rank's shard
            own = self._take_shard(t["splats"])
        else:
            self.gaussians = Gaussians.from_dict(t["splats"], copy=False).to(self.device)

        def rows(v: Tensor) -> Tensor:
            return v[own] if own is not None and v.dim() > 0 and v.shape[0] == n else v
        self.step = int(ckpt.step)
        self._init_optim()
        params = self.gaussians.splats
        for k, st in t.get("optim", {}).items():
            if k in self.optimizers:
                self.optimizers[k].state[params[k]] = {n_: rows(v).to(self.device) for n_, v in st.items()}
        for k, v in t.get("strategy", {}).items():
            self.strategy_state[k] = rows(v).to(self.device)
        rng = t.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "sampler" in rng:
            self.gen.set_state(rng["sampler"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.perm = t.get("sampler", {}).get("perm", torch.zeros(0, dtype=torch.long)).long()
        self.pos = int(ckpt.config.get("sampler_pos", 0))
        self.train_time = float(ckpt.config.get("train_time_s", 0.0))
        self.last_ckpt_step = self.step

    def _nonfinite_message(self, what: str) -> str:
        keep = (f"the last good checkpoint (step {self.last_ckpt_step}) is kept in {self.run.checkpoints}"
                if self.last_ckpt_step is not None else "no checkpoint had been written yet")
        return (f"training stopped at step {self.step + 1}: {what}; nothing was saved from this step and {keep} "
                f"(try lower learning rates, or --resume to retry from it)")

    # ---- training ---------------------------------------------------------------------------
    def sh_degree_at(self, step: int) -> int:
        return min(self.cfg.sh_degree_start + step // self.cfg.sh_degree_interval, self.cfg.sh_degree)

    def _bg(self) -> Tensor:
        if self.background == "random":
            return torch.rand(3, generator=self.gen).to(self.device)
        v = 1.0 if self.background == "white" else 0.0
        return torch.full((3,), v, device=self.device)

    def _target(self, i: int, bg: Optional[Tensor]) -> Tensor:
        """Training image ``i`` on this device, composited on ``bg`` where it has alpha."""
        image, alpha = self.ds._cached_rgba(i)
        return composite_on(image.to(self.device), None if alpha is None else alpha.to(self.device), bg)

    @contextlib.contextmanager
    def _named_nonfinite(self, step: int):
        """A render's non-finite input (a ``ValueError`` of the rasterizer) raised as a
        :class:`NonFiniteError` that keeps the last checkpoint."""
        try:
            yield
        except ValueError as e:
            if "non-finite" in str(e):
                raise NonFiniteError(self._nonfinite_message("the parameters are not finite"), step,
                                     self.last_ckpt_step) from None
            raise

    def _render_step(self, model, cams, bg: Tensor, step: int):
        """The step's render of ``model`` (the one render path); see :meth:`_named_nonfinite`."""
        with self._named_nonfinite(step):
            return render(model, cams, sh_degree=self.sh_degree_at(step), background=bg, backend=self.backend,
                          absgrad=self.cfg.absgrad)

    def train_step(self) -> Dict[str, float]:
        """One optimisation step; returns {"loss", "psnr"} as floats (synchronises)."""
        from langfield.train.losses import rgb_loss

        if self.sharded:
            return self._train_step_sharded()
        if self.batch > 1 or self.job.active:
            return self._train_step_batch()
        cfg = self.cfg
        step = self.step
        params = self.gaussians.splats
        i = self._next_index()
        cams = self._cams[i]
        bg = self._bg()
        target = self._target(i, bg)
        lr = lr_means(cfg, self.scene_scale, step)
        for g in self.optimizers["means"].param_groups:
            g["lr"] = lr
        out = self._render_step(self.gaussians, cams, bg, step)
        pred, info = out.rgb[0], out.meta
        if self.strategy is not None:
            self.strategy.step_pre_backward(params, self.optimizers, self.strategy_state, step, info)
        loss, l1, _s = rgb_loss(pred, target, cfg.ssim_lambda)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise NonFiniteError(self._nonfinite_message(f"the loss is not finite ({lv})"), step, self.last_ckpt_step)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.strategy is not None:  # after the optimiser step, as gsplat's simple_trainer
            self.strategy.step_post_backward(params, self.optimizers, self.strategy_state, step, info)
            if (cfg.opacity_reset and step > 0 and step % cfg.reset_every == 0
                    and step < cfg.refine_stop_iter):
                from gsplat.strategy.ops import reset_opa

                reset_opa(params, self.optimizers, self.strategy_state, value=cfg.prune_opa * 2.0)
        with torch.no_grad():
            mse = float(((pred.detach() - target) ** 2).mean())
        self.step = step + 1
        return {"loss": lv, "psnr": -10.0 * math.log10(max(mse, 1e-12))}

    def _draw_batch(self, B: int) -> List[Tuple[int, Optional[Tensor]]]:
        """The step's ``B`` (view index, background) pairs, drawn by every rank so that the
        samplers stay in step; sets this step's learning rate of the means."""
        views = [(self._next_index(), self._bg()) for _ in range(B)]
        for g in self.optimizers["means"].param_groups:
            g["lr"] = self._lrs()["means"]
        return views

    def _render_share(self, views: List[Tuple[int, Optional[Tensor]]], step: int) -> Tuple[List[Any], Tensor]:
        """This rank's share of the batch ``views``: each camera rendered, gsplat's pre-backward
        hook, ``loss / B`` backpropagated. Returns the render infos (densification statistics)
        and the summed ``[loss, mse]`` (float64, to be reduced over the ranks)."""
        from langfield.train.losses import rgb_loss

        B, params = len(views), self.gaussians.splats
        infos = []
        stats = torch.zeros(2, dtype=torch.float64)
        for j in self.job.share(B):
            i, bg = views[j]
            target = self._target(i, bg)
            out = self._render_step(self.gaussians, self._cams[i], bg, step)
            pred, info = out.rgb[0], out.meta
            if self.strategy is not None:
                self.strategy.step_pre_backward(params, self.optimizers, self.strategy_state, step, info)
            loss, _l1, _s = rgb_loss(pred, target, self.cfg.ssim_lambda)
            (loss / B).backward()
            with torch.no_grad():
                stats += torch.stack([loss.detach().double().cpu(),
                                      ((pred.detach() - target) ** 2).mean().double().cpu()])
            infos.append(info)
        return infos, stats

    def _adam_after_reduction(self, stats: Tensor, B: int, step: int) -> Tuple[float, float]:
        """The reduced ``[loss, mse]`` sums of a batch of ``B`` -> their means, after Adam has
        stepped; a non-finite loss (the same on every rank: the reduced one) stops every rank."""
        lv, mse = float(stats[0]) / B, float(stats[1]) / B
        if not math.isfinite(lv):
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            raise NonFiniteError(self._nonfinite_message(f"the loss is not finite ({lv})"), step, self.last_ckpt_step)
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return lv, mse

    def _train_step_batch(self) -> Dict[str, float]:
        """A step on ``batch`` cameras, this rank's share of them rendered here (one camera per
        render call), gradients and densification statistics reduced over the ranks (see
        :mod:`langfield.distributed.dp`)."""
        from langfield.distributed.dp import strategy_post_backward

        cfg, job, B = self.cfg, self.job, self.batch
        step = self.step
        job.set_step(step)
        params = self.gaussians.splats
        views = self._draw_batch(B)
        infos, stats = self._render_share(views, step)
        stats = distributed.all_reduce_grads(list(params.values()), extra=stats, dist_=job)
        lv, mse = self._adam_after_reduction(stats, B, step)
        if self.strategy is not None:
            strategy_post_backward(self.strategy, params, self.optimizers, self.strategy_state, step, infos, B, job)
            if (cfg.opacity_reset and step > 0 and step % cfg.reset_every == 0
                    and step < cfg.refine_stop_iter):
                from gsplat.strategy.ops import reset_opa

                reset_opa(params, self.optimizers, self.strategy_state, value=cfg.prune_opa * 2.0)
        self.step = step + 1
        if job.active and self.step % cfg.sync_check_every == 0:
            job.check_params(params, self.step)
        return {"loss": lv, "psnr": -10.0 * math.log10(max(mse, 1e-12))}

    def _train_step_sharded(self) -> Dict[str, float]:
        """A step of Gaussian-sharded training: the batch drawn as in data-parallel training,
        each rank rendering its share of it from every shard's visible Gaussians; the gradients
        and densification statistics arrive at their owners, each rank's Adam steps its shard,
        and refinement is taken shard by shard (see :mod:`langfield.distributed.shard`)."""
        from langfield.distributed.dp import accumulate_stats, refine_due, reset_stats
        from langfield.distributed.shard import ShardedRenderer, sharded_refine
        from langfield.train.losses import rgb_loss

        cfg, job, B = self.cfg, self.job, self.batch
        step = self.step
        job.set_step(step)
        st = self.strategy
        stats_on = st is not None and step < st.refine_stop_iter
        if self.sharder is None:
            self.sharder = ShardedRenderer(job, st)
        views = self._draw_batch(B)
        stats = torch.zeros(2, dtype=torch.float64, device=job.device())  # summed on the device: no sync per camera
        for j in job.share(B):  # every rank renders as many cameras: one collective round each
            i, bg = views[j]
            target = self._target(i, bg)
            with self._named_nonfinite(step):
                pred, _a = self.sharder.render(self.gaussians, self._cams[i], sh_degree=self.sh_degree_at(step),
                                               background=bg, backend=self.backend, ids=self.ids,
                                               absgrad=cfg.absgrad, n_cameras=B if stats_on else None)
            loss, _l1, _s = rgb_loss(pred, target, cfg.ssim_lambda)
            (loss / B).backward()
            self.sharder.backward()
            with torch.no_grad():
                stats += torch.stack([loss.detach().double(),
                                      ((pred.detach() - target) ** 2).mean().double()]).to(stats.device)
        for p in self.gaussians.splats.values():  # no camera saw this shard: a zero gradient, as replicated
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
        stats = job.all_reduce(stats, "sum", what="all_reduce of the losses").cpu()
        lv, mse = self._adam_after_reduction(stats, B, step)
        if stats_on:
            accumulate_stats(self.strategy_state, self.sharder.take_stats())
            if refine_due(st, step):
                self.ids, self.n_global, _counts = sharded_refine(st, self.gaussians.splats, self.optimizers,
                                                                  self.strategy_state, step, self.ids, self.n_global,
                                                                  job)
                reset_stats(st, self.strategy_state)
            if cfg.opacity_reset and step > 0 and step % cfg.reset_every == 0:
                from gsplat.strategy.ops import reset_opa

                reset_opa(self.gaussians.splats, self.optimizers, self.strategy_state, value=cfg.prune_opa * 2.0)
        self.step = step + 1
        if self.step % cfg.sync_check_every == 0:
            self._check_shards()
        return {"loss": lv, "psnr": -10.0 * math.log10(max(mse, 1e-12))}

    def train(self, stop_at: Optional[int] = None, hooks: Sequence[Callable[["RGBTrainer"], None]] = ()) -> None:
        """Train until ``stop_at`` (default: the configured steps), writing checkpoints on the way.
        Raises :class:`NonFiniteError` (after writing nothing non-finite); KeyboardInterrupt
        propagates (the newest checkpoint stays the resume point)."""
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(int(stop_at), cfg.steps)
        if self.step >= end:
            return
        bar = Progress(cfg.steps, self.step, desc="train",
                       mode=_progress_mode(cfg.progress) if self.job.is_main else "off")
        ema_loss = ema_psnr = None
        try:
            t0 = time.perf_counter()
            while self.step < end:
                out = self.train_step()
                ema_loss = out["loss"] if ema_loss is None else 0.9 * ema_loss + 0.1 * out["loss"]
                ema_psnr = out["psnr"] if ema_psnr is None else 0.9 * ema_psnr + 0.1 * out["psnr"]
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.train_time += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint()
                if bar.active and (self.step % 10 == 0 or self.step == end):
                    bar.set(loss=ema_loss, psnr=ema_psnr, gaussians=self.num_global,
                            sh=self.sh_degree_at(self.step - 1))
                bar.update(1)
                for h in hooks:
                    h(self)
            self.train_time += time.perf_counter() - t0
        finally:
            bar.close()

    # ---- end of training -----------------------------------------------------------------
    def _whole_gaussians(self):
        """The Gaussians to evaluate: this rank's; in sharded training (rank 0, after the last
        checkpoint) the whole scene as gathered into that checkpoint."""
        if not self.sharded:
            return self.gaussians
        from langfield.scene import Gaussians

        _p, ckpt = self.run.store("rgb").latest()
        if ckpt is None or ckpt.step != self.step:
            raise RunError(f"{self.run.checkpoints}: no checkpoint of step {self.step} to evaluate the sharded run")
        return Gaussians.from_dict(ckpt.tensors["splats"], requires_grad=False, copy=False).to(self.device)

    def evaluate(self, write_renders: Optional[bool] = None, progress: bool = False) -> Dict[str, Any]:
        """Metrics on the held-out views (renders into RUN/renders/test/ when asked)."""
        write = self.cfg.save_renders if write_renders is None else write_renders
        g = self._whole_gaussians()
        g.eval()
        res = evaluate_views(g, self.ds, self.test_idx, background=eval_background(self.background),
                             sh_degree=self.sh_degree_at(max(self.step - 1, 0)), backend=self.backend,
                             out_dir=(self.run.renders / "test") if write else None, progress=progress)
        return res

    def finish(self, progress: bool = False) -> Dict[str, Any]:
        """Evaluate on the held-out views, write metrics.json (and renders); return the metrics."""
        res = self.evaluate(progress=progress)
        return write_metrics(self.run, res, step=self.step, train_time_s=self.train_time,
                             num_gaussians=self.num_global, background=eval_background(self.background),
                             split="test")


def _resolve_init_paths(cfg: TrainConfig) -> TrainConfig:
    """``init_ply`` / ``init_ply_transform`` as absolute paths (as stored in config.json)."""
    for k in ("init_ply", "init_ply_transform"):
        v = getattr(cfg, k)
        if v:
            cfg = replace(cfg, **{k: str(Path(v).expanduser().resolve())})
    return cfg


def read_frame_transform(path: Path) -> np.ndarray:
    """The 4x4 similarity in a frame-transform JSON: nerfstudio's ``dataparser_transforms.json``
    (``{"transform": 3x4, "scale": s}``: x' = s (R x + t)) or ``{"matrix": 4x4}``."""
    import json

    if not path.is_file():
        raise RunError(f"--init-ply-transform: {path} not found")
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"--init-ply-transform: {path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not ("transform" in doc or "matrix" in doc):
        raise RunError(f"--init-ply-transform: {path} needs a 'transform' (+ 'scale', nerfstudio's "
                       f"dataparser_transforms.json) or a 'matrix' field")
    key = "transform" if "transform" in doc else "matrix"
    try:
        m = np.asarray(doc[key], dtype=np.float64)
        scale = float(doc.get("scale", 1.0))
    except (TypeError, ValueError):
        raise RunError(f"--init-ply-transform: {path}: '{key}' must be a numeric 3x4 or 4x4 matrix") from None
    if m.shape not in ((3, 4), (4, 4)) or not np.isfinite(m).all() or not (np.isfinite(scale) and scale > 0):
        raise RunError(f"--init-ply-transform: {path}: '{key}' must be a finite 3x4 or 4x4 matrix and 'scale' a "
                       f"positive number, got shape {list(m.shape)}, scale {scale}")
    if m.shape == (4, 4) and not np.allclose(m[3], [0, 0, 0, 1]):
        raise RunError(f"--init-ply-transform: {path}: '{key}' bottom row must be [0, 0, 0, 1], got {m[3].tolist()}")
    T = np.eye(4)
    T[:3] = m[:3]
    T[:3] *= scale
    A = T[:3, :3]
    s = abs(np.linalg.det(A)) ** (1 / 3)
    if not (s > 0 and np.allclose(A @ A.T / s**2, np.eye(3), atol=1e-4) and np.linalg.det(A) > 0):
        raise RunError(f"--init-ply-transform: {path}: '{key}' is not a similarity (scaled rotation + translation)")
    U, _, Vt = np.linalg.svd(A / s)  # the nearest exact rotation (files carry rounded values)
    T[:3, :3] = s * (U @ Vt)
    return T


def _gaussians_from_ply(path: Path, ds, sh_degree: int, frame: Optional[np.ndarray] = None):
    """``(Gaussians, the file's SH degree)``: a trained splat file as the run's starting Gaussians,
    moved into the dataset's normalised frame (the file is in the dataset's own world frame, as
    COLMAP-based trainers and ``langfield export`` write it), SH bands cut or zero-padded to
    ``sh_degree``, language channels dropped. ``frame``: the similarity dataset world -> file
    (:func:`read_frame_transform`), undone first."""
    from langfield.io.ply import PlyError, read_ply
    from langfield.scene import Gaussians, num_sh_bases

    if path.is_dir():
        raise RunError(f"--init-ply: {path} is a folder; give a .ply file")
    if not path.is_file():
        raise RunError(f"--init-ply: {path} not found")
    try:
        g = read_ply(path)
    except PlyError as e:
        raise RunError(f"--init-ply: {e}") from None
    except (OSError, ValueError) as e:
        raise RunError(f"--init-ply: {path}: {e}") from None
    if g.num == 0:
        raise RunError(f"--init-ply: {path} holds no Gaussians")
    bad = nonfinite_ply_properties(g)
    if bad:
        lst = ", ".join(f"{name} in {count}" for name, count in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise RunError(f"--init-ply: {path}: non-finite values (NaN or infinite) in property {lst} of its "
                       f"{g.num} Gaussians; training cannot start from them: fix or drop those vertices") from None
    degree = g.sh_degree
    d = {k: v.detach() for k, v in g.splats.items() if k != "lang"}
    k = num_sh_bases(sh_degree) - 1
    shN = d["shN"][:, :k]
    if shN.shape[1] < k:
        shN = torch.cat([shN, shN.new_zeros(shN.shape[0], k - shN.shape[1], 3)], 1)
    d["shN"] = shN
    g = Gaussians.from_dict(d, requires_grad=True, copy=True)
    T = np.asarray(ds.transform, dtype=np.float64)
    if frame is not None:  # the file's frame -> the dataset's world -> langfield's normalised frame
        T = T @ np.linalg.inv(frame)
    if not np.allclose(T, np.eye(4)):
        try:
            g = g.transformed(T)
        except ValueError as e:
            raise RunError(f"--init-ply: cannot move {path} into the dataset's frame: {e}") from None
    _warn_if_outside_cameras(g, ds, path)
    return g, degree


_PLY_COLUMNS = {"means": ["x", "y", "z"], "quats": [f"rot_{i}" for i in range(4)],
                "scales": [f"scale_{i}" for i in range(3)], "opacities": ["opacity"]}


def nonfinite_ply_properties(g) -> list:
    """``[(PLY property name, number of Gaussians with a non-finite value), ...]`` of the
    standard 3DGS layout (x y z, f_dc_*, f_rest_* channel-major, opacity, scale_*, rot_*)."""
    out = []
    for key in ("means", "sh0", "shN", "opacities", "scales", "quats"):  # the file's order
        t = g.splats[key] if key in g.splats else None
        if t is None:
            continue
        x = t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach()[:, None]
        if x.numel() == 0:
            continue
        counts = (~torch.isfinite(x)).sum(0).tolist()
        if not any(counts):
            continue
        if key in _PLY_COLUMNS:
            names = _PLY_COLUMNS[key]
        elif key == "sh0":
            names = [f"f_dc_{c}" for c in range(x.shape[1])]
        elif key == "shN":  # [N, K, 3] stored channel-major in the file: f_rest_{c * K + k}
            k = t.shape[1]
            names = [f"f_rest_{c * k + j}" for j in range(k) for c in range(3)]
        else:  # pragma: no cover (every key above is named)
            names = []
        out += [(names[i] if i < len(names) else f"{key}[{i}]", int(c)) for i, c in enumerate(counts) if c]
    return out


def _warn_if_outside_cameras(g, ds, path: Path) -> None:
    """A warning when few Gaussians project into any training camera: the file is probably in
    another world frame (e.g. a nerfstudio export in its dataparser's frame)."""
    from langfield.scene import visible_counts

    with torch.no_grad():
        x = g.means.detach().double().cpu()
        if x.shape[0] > 100_000:  # a sample is enough for a fraction
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:100_000]]
        fr = ds.frames
        V = torch.from_numpy(np.stack([np.linalg.inv(f.camtoworld) for f in fr]))
        K = torch.from_numpy(np.stack([np.asarray(f.K, dtype=np.float64) for f in fr]))
        W = torch.tensor([float(f.width) for f in fr], dtype=torch.float64)
        H = torch.tensor([float(f.height) for f in fr], dtype=torch.float64)
        frac = float((visible_counts(x, V, K, W, H, cam_chunk=8) > 0).double().mean())
    if frac < 0.1:
        warnings.warn(f"{path}: only {100 * frac:.1f} % of its Gaussians are in view of any of the "
                      f"dataset's cameras; is the file in the dataset's world frame?", stacklevel=3)


def _require_strategy(cfg: TrainConfig) -> None:
    """Densification needs gsplat's DefaultStrategy: fail before any work when it is missing."""
    if not cfg.densify:
        return
    try:
        from gsplat.strategy import DefaultStrategy  # noqa: F401
    except ImportError as e:
        raise RunError(f"densification needs gsplat's DefaultStrategy, which cannot be imported ({e}); "
                       f"install it with `pip install gsplat==1.5.3`, or pass --no-densify") from None


def write_metrics(run: RunFolder, res: Dict[str, Any], *, step: int, train_time_s: Optional[float],
                  num_gaussians: int, background, split: str) -> Dict[str, Any]:
    """The RGB metrics at the top level of metrics.json (later stages' keys are kept)."""
    metrics = {"split": split, "step": int(step), "psnr": res["psnr"], "ssim": res["ssim"], "n_views": res["n_views"],
               "num_gaussians": int(num_gaussians), "train_time_s": train_time_s,
               "s_per_step": (train_time_s / step) if train_time_s and step else None,
               "background": list(background), "views": res["views"],
               "time": datetime.now().isoformat(timespec="seconds")}
    update_metrics(run.root, metrics, replace_top=True)
    return metrics


def _progress_mode(progress: Optional[bool]) -> Optional[str]:
    """``progress`` option -> Progress mode: None = bar on a terminal, log lines otherwise;
    False = off; True = a bar."""
    return None if progress is None else ("bar" if progress else "off")


def train_rgb(data: PathLike, out: PathLike, config: Optional[TrainConfig] = None, *, resume: bool = False,
              overwrite: bool = False, hooks: Sequence[Callable[[RGBTrainer], None]] = (), evaluate: bool = True,
              **options) -> Dict[str, Any]:
    """Train (or resume) a run and, at the end, write metrics.json and renders.

    Fresh run: ``config`` (default ``TrainConfig()``) with ``options`` applied. Resume:
    ``options`` are the changes requested against the stored configuration. Returns the
    metrics (or ``{}`` with ``evaluate=False``)."""
    def make() -> RGBTrainer:
        opts = options
        if resume:
            if config is not None:
                opts = {**{k: v for k, v in config.to_dict().items() if v != getattr(TrainConfig(), k)}, **opts}
            return RGBTrainer.resume(out, data, opts)
        return RGBTrainer.create(data, out, replace(config or TrainConfig(), **opts), overwrite=overwrite)

    return run_training(out, make, resume=resume, overwrite=overwrite, hooks=hooks, evaluate=evaluate)


def run_training(out: PathLike, make_trainer: Callable[[], "RGBTrainer"], *, resume: bool, overwrite: bool,
                 hooks: Sequence[Callable] = (), evaluate: bool = True) -> Dict[str, Any]:
    """The write session of every training command (RGB, dynamic): checks ``out``, takes the
    run lock, builds the trainer (``make_trainer()``: create or resume), trains, saves the last
    checkpoint, evaluates; write errors become one-line :class:`RunError`s, and a new folder in
    which nothing was written is removed again.

    In a data-parallel job (``torchrun``, :mod:`langfield.distributed`) rank 0 alone checks
    and locks the folder and writes config, checkpoints, metrics and renders (a refusal is
    raised on every rank with rank 0's message); every rank builds the same trainer and
    trains; an error on any rank is left in the job's store so the others name it."""
    job = distributed.get()
    root = Path(out)
    lock = None
    created = False

    def prepare() -> None:
        nonlocal lock, created
        if resume and overwrite:
            raise RunError("--resume and --overwrite exclude each other")
        if root.exists() and not root.is_dir():
            raise RunError(f"--out {root}: exists and is not a folder")
        created = not root.exists()
        if resume and created:
            raise RunError(f"--resume: {root} does not exist (nothing to resume)")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"--out {root}: cannot create the folder ({e.strerror or e})") from None
        lk = RunFolder(root).lock()
        try:
            lk.acquire()  # a second writer of the same run folder is refused here
        except OSError as e:
            raise RunError(f"--out {root}: cannot take the run folder's lock {lk.path} ({os_reason(e)})") from None
        lock = lk

    try:
        job.on_main(prepare, errors=(RunError,), what="checking and locking --out")
    except RunError as e:
        job.report(f"RunError: {e}")
        raise
    try:
        try:
            trainer = make_trainer()
            kind = type(trainer)  # a trainer with its own step needs its own batch step too
            batch_ok = kind.train_step is RGBTrainer.train_step or kind._train_step_batch is not RGBTrainer._train_step_batch
            if (trainer.batch > 1 or job.active) and not batch_ok:
                raise RunError(f"{type(trainer).__name__}: a batch of cameras (--batch-size {trainer.batch}) and "
                               f"data-parallel training (torchrun, {job.world} ranks) are not available for this "
                               f"kind of run yet; train it with one process and --batch-size 1")
            return _train_to_end(trainer, hooks, evaluate)
        except OSError as e:  # config, metrics or renders that cannot be written (checkpoints: save_checkpoint)
            raise RunError(f"{os_path(e, root)}: {os_reason(e)} (run folder {root}; its checkpoints are "
                           f"written atomically, the ones there are intact)") from None
    except BaseException as e:
        if job.active:
            job.report(f"{type(e).__name__}: {distributed.core.fail_line(e)}")
        if lock is not None and created and RunFolder(root).is_empty_for_new_run():  # nothing was written:
            lock.release()  # leave no empty folder
            lock = None
            try:
                (root / ".lock").unlink()
                root.rmdir()
            except OSError:
                pass
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_to_end(trainer: "RGBTrainer", hooks, evaluate: bool) -> Dict[str, Any]:
    job = trainer.job if hasattr(trainer, "job") else distributed.get()
    already = trainer.step >= trainer.cfg.steps
    trainer.train(hooks=hooks)
    if trainer.last_ckpt_step != trainer.step:
        trainer.save_checkpoint()
    if job.active:
        job.barrier("end of training")
        if not job.is_main:  # rank 0 evaluates and writes the metrics
            return {}
    if not evaluate:
        return {}
    if already and trainer.run.metrics.is_file():
        import json

        print(f"langfield: {trainer.run.root} is already trained to step {trainer.step} (raise --steps to continue)",
              file=sys.stderr)
        return json.loads(trainer.run.metrics.read_text("utf-8"))
    show = trainer.cfg.progress if trainer.cfg.progress is not None else sys.stderr.isatty()
    return trainer.finish(progress=show)

