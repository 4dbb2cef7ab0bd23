"""The RGB stage's configuration: one dataclass, stored in ``RUN/config.json``.

Defaults follow gsplat's ``simple_trainer`` (which follows 3DGS): per-parameter Adam learning
rates (means ``1.6e-4 * scene_scale`` decaying exponentially to 1 % over the run), the loss
``(1 - ssim_lambda) * L1 + ssim_lambda * (1 - SSIM)`` with ``ssim_lambda = 0.2`` (3DGS' "L1 +
0.2 D-SSIM" weighting), SH degree ramp (+1 every ``sh_degree_interval`` steps), and
``DefaultStrategy`` densification with its thresholds.

Values left ``None`` are resolved from the run length by :meth:`TrainConfig.resolved`:
``refine_stop_iter`` = min(15000, steps // 2), ``refine_start_iter`` = min(500, steps // 4),
``refine_every`` = min(100, steps // 6): gsplat's defaults for runs of 2000+ steps, scaled
down for shorter ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple

__all__ = ["TrainConfig", "RESUME_MAY_CHANGE", "config_diff", "trained_sh_degree"]

Background = Literal["auto", "random", "white", "black"]
Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["auto", "cpu", "cuda", "torch", "gsplat"]


@dataclass
class TrainConfig:
    """Everything the RGB stage needs besides the dataset path and the run folder."""

    # --- run -------------------------------------------------------------------------
    steps: int = 30_000
    """Optimisation steps (``batch_size`` cameras per step, one by default)."""
    seed: int = 0
    """Seeds the initialisation, the camera order, random backgrounds and the global RNG
    (densification splits)."""
    device: Device = "auto"
    backend: Backend = "auto"
    """Renderer backend (see ``langfield.render.rasterization``)."""
    ckpt_every: int = 2_000
    """Write a checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep (0 keeps all)."""

    # --- data ------------------------------------------------------------------------
    downscale: int = 1
    test_every: int = 8
    """Hold out every N-th image when the dataset has no split of its own."""
    normalize: bool = True
    """gsplat's world normalisation (undone by ``langfield export``)."""
    background: Background = "auto"
    """``random`` (a random colour per step, rendered and composited into the RGBA target:
    no colour can be learnt as background), ``white``, ``black``; ``auto`` = random for RGBA
    images, black otherwise. Evaluation of RGBA data composites on white (random) or the
    fixed colour."""
    cache_images: bool = True
    """Keep decoded images in memory."""
    skip_bad_images: bool = False
    """Every image is checked before training starts (decoded in parallel, cached); a bad one
    stops the run at once with the list of bad files, or, with this, its frame is left out with
    a warning."""
    allow_outside: bool = False
    """Accept dataset entries whose paths lead outside the dataset folder (refused by default)."""

    # --- model -----------------------------------------------------------------------
    sh_degree: int = 3
    sh_degree_interval: int = 1_000
    init_opacity: float = 0.1
    init_scale: float = 1.0
    init_random: int = 100_000
    """Random Gaussians in the cameras' common view when the dataset has no points."""
    init_ply: Optional[str] = None
    """Start from a trained 3DGS PLY (Inria 3DGS, gsplat, nerfstudio, SuperSplat, ``langfield
    export``) in the dataset's own world frame, instead of from its points; ``steps`` may then
    be 0 (keep it as it is, e.g. to add a language field on top)."""
    init_ply_transform: Optional[str] = None
    """A JSON file with the similarity that maps the dataset's world to ``init_ply``'s frame,
    undone on import: nerfstudio's ``dataparser_transforms.json`` (``transform`` 3x4, ``scale``),
    for splats exported in nerfstudio's dataparser frame, or ``{"matrix": 4x4}``."""
    sh_degree_start: int = 0
    """SH degree at step 0 (the ramp adds one every ``sh_degree_interval`` steps); with
    ``init_ply``: the file's degree, set automatically."""

    # --- optimisation ------------------------------------------------------------------
    means_lr: float = 1.6e-4
    """Multiplied by the scene scale; decays exponentially to ``means_lr_final`` times it."""
    means_lr_final: float = 0.01
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    ssim_lambda: float = 0.2

    # --- batch and data parallelism (torchrun) -----------------------------------------
    batch_size: Optional[int] = None
    """Cameras per step over all ranks; under ``torchrun`` each of the N ranks renders
    ``batch_size / N`` of them (a multiple of N). Default: 1, or N under ``torchrun``. Stored
    resolved, so a run resumes with another number of ranks (any divisor of it)."""
    lr_batch_scaling: bool = True
    """With ``batch_size`` B > 1: learning rates x sqrt(B), Adam eps / sqrt(B), betas 1 - B (1 -
    beta), as gsplat's multi-GPU ``simple_trainer`` (divide ``steps`` and the refinement
    schedule by B yourself, as its ``steps_scaler``)."""
    sync_check_every: int = 100
    """Data-parallel runs: compare an exact hash of the Gaussians across ranks every N steps
    (and at every checkpoint); a divergence stops the run naming the tensor. Sharded runs:
    check that the shards still partition the Gaussians."""
    shard_gaussians: bool = False
    """Under ``torchrun``: each rank holds only a spatial (Morton) shard of the Gaussians with
    its optimiser state, for scenes beyond one device's memory; the results equal data-parallel
    training's. Checkpoints hold the whole scene, so a run resumes sharded or not, on any
    number of ranks. Without ``torchrun`` (one process) it changes nothing."""

    # --- densification (gsplat DefaultStrategy) ---------------------------------------
    densify: bool = True
    refine_start_iter: Optional[int] = None
    """Default min(500, steps // 4)."""
    refine_stop_iter: Optional[int] = None
    """Default min(15000, steps // 2)."""
    refine_every: Optional[int] = None
    """Default min(100, steps // 6)."""
    reset_every: int = 3_000
    grow_grad2d: Optional[float] = None
    """Default 2e-4, or 8e-4 with ``absgrad`` (gsplat's advice)."""
    grow_scale3d: float = 0.01
    prune_opa: float = 0.005
    prune_scale3d: float = 0.1
    absgrad: bool = False
    opacity_reset: bool = False
    """Reset opacities every ``reset_every`` steps within the refinement window, as 3DGS does.
    gsplat 1.5.3's DefaultStrategy never does (an operator-precedence slip), so the default
    matches gsplat's actual behaviour."""

    # --- output ------------------------------------------------------------------------
    progress: Optional[bool] = None
    """Progress bar; default: when stderr is a terminal."""
    save_renders: bool = True
    """Render the held-out views into RUN/renders/ at the end."""

    # ------------------------------------------------------------------------------------
    def resolved(self, world_size: int = 1) -> "TrainConfig":
        """A copy with the ``None`` defaults filled in from the run length (and the batch from
        the number of ranks)."""
        c = dataclasses.replace(self)
        if c.batch_size is None:
            c.batch_size = max(1, int(world_size))
        if c.refine_start_iter is None:
            c.refine_start_iter = min(500, c.steps // 4)
        if c.refine_every is None:
            c.refine_every = min(100, max(1, c.steps // 6))
        if c.refine_stop_iter is None:
            c.refine_stop_iter = min(15_000, c.steps // 2)
        if c.grow_grad2d is None:
            c.grow_grad2d = 8e-4 if c.absgrad else 2e-4
        return c

    def validate(self) -> None:
        """ValueError with a one-line message for impossible values."""
        def bad(msg):
            raise ValueError(msg)

        if not 0 <= self.sh_degree_start <= 3:
            bad(f"sh_degree_start must be 0..3, got {self.sh_degree_start}")
        if self.init_ply_transform and not self.init_ply:
            bad("--init-ply-transform needs --init-ply")
        if self.steps < (0 if self.init_ply else 1):
            bad(f"--steps must be >= 1 (or 0 with --init-ply), got {self.steps}")
        if self.ckpt_every < 1:
            bad(f"--ckpt-every must be >= 1, got {self.ckpt_every}")
        if not 0 <= self.sh_degree <= 3:
            bad(f"--sh-degree must be 0..3, got {self.sh_degree}")
        if self.sh_degree_interval < 1:
            bad(f"--sh-degree-interval must be >= 1, got {self.sh_degree_interval}")
        if self.test_every < 1:
            bad(f"--test-every must be >= 1, got {self.test_every}")
        if self.downscale < 1:
            bad(f"--downscale must be >= 1, got {self.downscale}")
        if not 0 <= self.ssim_lambda <= 1:
            bad(f"--ssim-lambda must be in [0, 1], got {self.ssim_lambda}")
        if not 0 < self.init_opacity < 1:
            bad(f"--init-opacity must be in (0, 1), got {self.init_opacity}")
        for k in ("means_lr", "scales_lr", "quats_lr", "opacities_lr", "sh0_lr", "shN_lr", "means_lr_final",
                  "init_scale"):
            if not getattr(self, k) > 0:
                bad(f"--{k.replace('_', '-')} must be > 0, got {getattr(self, k)}")
        if self.keep_checkpoints < 0:
            bad(f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints}")
        for k in ("refine_start_iter", "refine_stop_iter", "refine_every"):
            v = getattr(self, k)
            if v is not None and v < (1 if k == "refine_every" else 0):
                bad(f"--{k.replace('_', '-')} must be >= {1 if k == 'refine_every' else 0}, got {v}")
        if self.batch_size is not None and self.batch_size < 1:
            bad(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.sync_check_every < 1:
            bad(f"--sync-check-every must be >= 1, got {self.sync_check_every}")
        if self.reset_every < 1:
            bad(f"--reset-every must be >= 1, got {self.reset_every}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """From a stored dict; unknown keys (from a newer version) raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


# Options that may differ between the stored config and a ``--resume`` request: they do not
# change the optimisation (``steps`` may change too, see ``config_diff``).
RESUME_MAY_CHANGE = ("device", "ckpt_every", "keep_checkpoints", "progress", "save_renders", "cache_images",
                     "steps", "skip_bad_images", "allow_outside", "sync_check_every", "shard_gaussians")


def config_diff(stored: TrainConfig, requested: TrainConfig) -> List[Tuple[str, Any, Any]]:
    """(name, stored, requested) for every option that differs and matters for resuming."""
    out = []
    a, b = stored.to_dict(), requested.to_dict()
    for k in a:
        if k in RESUME_MAY_CHANGE:
            continue
        if a[k] != b.get(k):
            out.append((k, a[k], b.get(k)))
    return out


def trained_sh_degree(train: Mapping[str, Any], step: int, degree: int) -> int:
    """The SH degree a run trained with ``train`` (a config.json "train" section) had reached
    after ``step`` steps (the ramp's degree at its last step), capped by the Gaussians' ``degree``."""
    interval = int(train.get("sh_degree_interval", 1000)) or 1000
    start = int(train.get("sh_degree_start", 0))
    return min(start + max(step - 1, 0) // interval, int(train.get("sh_degree", degree)), degree)
