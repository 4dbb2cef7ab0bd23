"""``langfield train DATA --out RUN [--dynamic]`` on time-stamped data: the dynamic (4D) pipeline.

Deformable Gaussians on time-stamped data (:func:`langfield.dynamic.train.train_dynamic`),
then, with ``--features``, the time-agnostic and time-sensitive language fields
(:func:`langfield.dynamic.language.train_dynamic_language`). ``langfield train DATA --dynamic``
(automatic when the data has time) is meant to call :func:`cli_train_dynamic` with the same
options.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Literal, Optional

import tyro
from typing_extensions import Annotated

__all__ = ["cli_train_dynamic"]

DataArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="DATA")]]


def _fail(msg: str) -> SystemExit:
    print(f"langfield: {msg}", file=sys.stderr)
    return SystemExit(2)


def cli_train_dynamic(
    data: DataArg,
    out: Path,
    steps: int = 6_000,
    warmup: Optional[int] = None,
    deform: Literal["hexplane", "mlp"] = "hexplane",
    resolutions: str = "32,64",
    time_resolution: int = 24,
    deform_color: bool = False,
    deform_opacity: bool = False,
    time_opacity_bins: int = 0,
    sh_degree: int = 3,
    init_random: int = 20_000,
    downscale: int = 1,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    backend: Literal["auto", "cpu", "cuda", "torch", "gsplat"] = "auto",
    ckpt_every: int = 2_000,
    seed: int = 0,
    no_densify: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    features: Optional[Literal["labels", "sam-clip", "dense-clip"]] = None,
    lang_steps: int = 3_000,
    states: int = 2,
    text_encoder: Literal["auto", "clip", "offline"] = "auto",
    batch_size: Optional[int] = None,
    no_lr_batch_scaling: bool = False,
) -> int:
    """Train deformable Gaussians on time-stamped frames (D-NeRF, nerfstudio with time, HyperNeRF,
    Neu3D, `langfield scenes make dynamic`) into OUT; with --features, then language over time.

    Args:
        data: the dataset folder; every frame must have a time.
        out: the run folder.
        steps: optimisation steps, one (camera, time) frame each.
        warmup: static steps first (deformation off); default min(3000, steps // 12).
        deform: the deformation field: hexplane (space-time planes + MLP head) or mlp (positional encoding).
        resolutions: hexplane spatial resolutions, comma-separated.
        time_resolution: hexplane samples along time.
        deform_color: the field also changes the DC colour over time (states that only change colour).
        deform_opacity: the field also changes the opacity over time.
        time_opacity_bins: per-Gaussian temporal opacity over this many bins of time (0: off; e.g. the
            number of frame times): Gaussians may exist over a time interval only, for small objects that
            move further than their own size (4DGS / STG style).
        sh_degree: highest SH degree (0..3).
        init_random: random Gaussians in the cameras' common view when the data has no points.
        downscale: integer image downscale.
        device: auto, cpu or cuda.
        backend: renderer backend.
        ckpt_every: checkpoint every N steps.
        seed: random seed.
        no_densify: no densification or pruning.
        resume: continue the run in OUT.
        overwrite: start again in an existing OUT (langfield's files are moved aside).
        quiet: no progress bar or lines.
        features: then train the language fields on these 2D features (labels | sam-clip | dense-clip).
        lang_steps: language optimisation steps.
        states: state prototypes per Gaussian of the time-sensitive field (0: time-agnostic only).
        text_encoder: for the labels features: auto, clip or offline.
        batch_size: (camera, time) frames per step over all ranks (default 1; under torchrun: the number of
            ranks, each rendering its share at its frames' times); learning rates of the Gaussians and of the
            deformation field scaled as gsplat's multi-GPU trainer (x sqrt(batch)); divide --steps by it yourself.
        no_lr_batch_scaling: keep the one-frame learning rates and Adam betas with --batch-size > 1.

    Under ``torchrun`` the RGB stage is data-parallel (every rank renders its share of the batch, one
    gradient all-reduce, densification statistics reduced, rank 0 writes); the language stage runs on
    rank 0 while the other ranks wait for it.
    """
    from langfield.dynamic.train import DynamicConfig, train_dynamic
    from langfield.run import NonFiniteError, RunError

    try:
        res = tuple(int(r) for r in resolutions.split(",") if r.strip())
    except ValueError:
        raise _fail(f"--resolutions must be comma-separated integers, got {resolutions!r}") from None
    dyn = DynamicConfig(deform=deform, resolutions=res, time_resolution=time_resolution, warmup=warmup,
                        deform_color=deform_color, deform_opacity=deform_opacity,
                        time_opacity_bins=time_opacity_bins)
    from langfield.distributed import DistError, alone, get as _job

    job = _job()
    batch = {} if batch_size is None else {"batch_size": int(batch_size)}
    if no_lr_batch_scaling:
        batch["lr_batch_scaling"] = False
    opts = dict(steps=steps, sh_degree=sh_degree, init_random=init_random, downscale=downscale, device=device,
                backend=backend, ckpt_every=ckpt_every, seed=seed, densify=not no_densify,
                progress=False if quiet or not job.is_main else None, **batch)
    try:
        if resume:
            m = train_dynamic(data, out, resume=True, steps=steps, ckpt_every=ckpt_every, device=device,
                              progress=opts["progress"], **batch)
        else:
            m = train_dynamic(data, out, dynamic=dyn, overwrite=overwrite, **opts)
    except (RunError, NonFiniteError, DistError, ValueError) as e:  # ValueError: a batch the ranks cannot share, ...
        raise _fail(str(e).splitlines()[0]) from None
    if not job.is_main:  # rank 0 reports (and trains the language stage below); the others wait for it
        m = None
    if m and m.get("psnr") is not None:
        print(f"held-out (view, time) pairs: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} over {m['n_views']} views; "
              f"{m['num_gaussians']:,} Gaussians")
    elif m:
        print(f"trained {m.get('step')} steps; the dataset has no held-out views, no metrics")
    if features is not None:
        from langfield.dynamic.language import train_dynamic_language
        from langfield.train.language import LanguageError

        def language() -> Dict[str, Any]:
            with alone():  # rank 0 alone (the dynamic language stage is not data-parallel)
                r = train_dynamic_language(out, states=states, steps=lang_steps, features=features,
                                           text_encoder=text_encoder, device=device, backend=backend,
                                           progress=False if quiet else None, resume=resume)
            return {"metrics": json.loads(json.dumps(r.get("metrics") or {}, default=float))}

        try:
            r = job.on_main(language, errors=(LanguageError, RunError), what="the dynamic language stage")
        except (LanguageError, RunError, DistError) as e:
            raise _fail(str(e).splitlines()[0]) from None
        if not job.is_main:
            return 0
        mt = r.get("metrics") or {}
        ta, ts = mt.get("time_agnostic") or {}, mt.get("time_sensitive") or {}
        if ta:
            print(f"time-agnostic queries: mIoU {ta['miou']:.3f}, localisation {ta['loc']:.3f}")
        if ts and ts.get("acc") is not None:
            print(f"time-sensitive queries: Acc {ts['acc']:.3f}, vIoU {ts['viou'] or 0:.3f}")
        uts = (mt.get("unseen_camera") or {}).get("time_sensitive") or {}
        if uts.get("acc") is not None:
            print(f"  on the camera never trained on: Acc {uts['acc']:.3f}, vIoU {uts['viou'] or 0:.3f}")
    return 0
