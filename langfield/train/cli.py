"""``langfield train | render | eval | export``: thin commands over :mod:`langfield.train.rgb`.

Options left unset on ``train --resume`` keep the run's stored values; see
:mod:`langfield.train.rgb` for the resume and overwrite policies.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from typing_extensions import Annotated

import tyro

from langfield.errors import fail, os_path, os_reason, plain_warnings

DataArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="DATA")]]
RunArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="RUN")]]

__all__ = ["cli_train", "cli_render", "cli_eval", "cli_export"]


CLI_LANG_LR = 0.01  # the command's default latent learning rate for a new language stage


def _fail(msg: str) -> "SystemExit":
    return fail(msg)


def cli_train(
    data: DataArg,
    out: Path,
    steps: Optional[int] = None,
    downscale: Optional[int] = None,
    device: Optional[Literal["auto", "cpu", "cuda"]] = None,
    sh_degree: Optional[int] = None,
    background: Optional[Literal["auto", "random", "white", "black"]] = None,
    resume: bool = False,
    overwrite: bool = False,
    ckpt_every: Optional[int] = None,
    keep_checkpoints: Optional[int] = None,
    test_every: Optional[int] = None,
    seed: Optional[int] = None,
    backend: Optional[Literal["auto", "cpu", "cuda", "torch", "gsplat"]] = None,
    absgrad: bool = False,
    opacity_reset: bool = False,
    no_densify: bool = False,
    refine_stop_iter: Optional[int] = None,
    init_random: Optional[int] = None,
    init_ply: Optional[Path] = None,
    init_ply_transform: Optional[Path] = None,
    quiet: bool = False,
    no_renders: bool = False,
    skip_bad_images: bool = False,
    allow_outside: bool = False,
    features: Optional[Literal["labels", "sam-clip", "dense-clip"]] = None,
    codec: Optional[Literal["autoencoder", "codebook"]] = None,
    codebook_size: Optional[int] = None,
    lang_steps: Optional[int] = None,
    lang_lr: Optional[float] = None,
    latent_dim: Optional[int] = None,
    joint: bool = False,
    ae_steps: Optional[int] = None,
    text_encoder: Optional[Literal["auto", "clip", "offline"]] = None,
    clip_model: Optional[str] = None,
    clip_pretrained: Optional[str] = None,
    clip_checkpoint: Optional[Path] = None,
    sam_model: Optional[Literal["vit_h", "vit_l", "vit_b"]] = None,
    sam_checkpoint: Optional[Path] = None,
    points_per_side: Optional[int] = None,
    short_side: Optional[int] = None,
    label_noise: Optional[float] = None,
    label_drop: Optional[float] = None,
    label_merge: Optional[float] = None,
    overwrite_language: bool = False,
    dynamic: bool = False,
    static: bool = False,
    deform: Optional[Literal["hexplane", "mlp"]] = None,
    warmup: Optional[int] = None,
    deform_color: bool = False,
    states: Optional[int] = None,
    time_opacity_bins: Optional[int] = None,
    batch_size: Optional[int] = None,
    no_lr_batch_scaling: bool = False,
    shard_gaussians: bool = False,
) -> int:
    """Train Gaussians on a dataset (COLMAP, nerfstudio, Blender) into the run folder OUT; with
    --features, then the language stage (2D features -> autoencoder -> per-Gaussian latents of
    every level). On a run whose RGB stage is finished, --features adds (or continues) the
    language stage only.

    Args:
        data: the dataset folder (or transforms*.json).
        out: the run folder (config.json, checkpoints/, renders/, metrics.json).
        steps: optimisation steps, one camera each (default 30000; dynamic runs 6000).
        downscale: integer image downscale factor (default 1).
        device: auto (CUDA when available), cpu or cuda.
        sh_degree: highest SH degree (0..3, default 3), reached by +1 every 1000 steps.
        background: random (per step; for RGBA data), white, black; auto = random for RGBA images, else black.
        resume: continue the run in OUT from its newest checkpoint (unset options keep the stored values).
        overwrite: start again in an existing OUT; langfield's files there are moved to OUT/replaced-<time>/.
        ckpt_every: checkpoint every N steps (default 2000; always at the end).
        keep_checkpoints: keep the newest N checkpoints (default 3; 0 = all).
        test_every: hold out every N-th image when the dataset has no split (default 8).
        seed: random seed (default 0).
        backend: renderer backend (default auto: native CPU/CUDA).
        absgrad: AbsGS gradients for densification (grow threshold 8e-4).
        opacity_reset: 3DGS' opacity reset every 3000 steps (gsplat 1.5.3 never resets).
        no_densify: no densification or pruning (gsplat's DefaultStrategy is on by default).
        refine_stop_iter: last densification step (default min(15000, steps/2)).
        init_random: random Gaussians when the dataset has no points (default 100000).
        init_ply: start from a trained splat PLY (Inria 3DGS, gsplat, nerfstudio, SuperSplat, langfield export)
            in the dataset's world frame; with --steps 0 it is kept as it is (e.g. to add --features on top);
            to fine-tune it, --no-densify keeps its Gaussians (it is densified already).
        init_ply_transform: with --init-ply in another frame: nerfstudio's dataparser_transforms.json (for a
            splat exported in nerfstudio's dataparser frame) or {"matrix": 4x4} (dataset world -> file), undone.
        quiet: no progress bar (it is shown when stderr is a terminal).
        no_renders: do not write held-out renders to OUT/renders/ at the end.
        skip_bad_images: leave out (with a warning) the frames whose image is truncated or unreadable; by default
            every image is checked before training starts and a bad one stops the run with the list of files.
        allow_outside: accept dataset entries whose file paths lead outside the dataset folder.
        features: language stage after RGB: labels (ground-truth label maps of `langfield scenes` data),
            sam-clip (LangSplat: SAM masks x 3 levels + CLIP; needs --sam-checkpoint) or dense-clip (MaskCLIP, fast).
        codec: the language codec: autoencoder (LangSplat: 3-D latents per level, default) or codebook
            (LangSplatV2: sparse top-4 weights over a k-means codebook of CLIP features; queries need no decoder).
        codebook_size: codebook entries per level with --codec codebook (default 64).
        lang_steps: language stage steps (default 3000).
        lang_lr: learning rate of the latents (default 0.01).
        latent_dim: latent size per level (default 3, LangSplat's).
        joint: fine-tune geometry and colour with the latents (default: frozen).
        ae_steps: scene autoencoder steps (default 3000).
        text_encoder: labels only: clip, offline (hashed names, not CLIP) or auto (CLIP if its weights are here).
        clip_model: open_clip model name.
        clip_pretrained: open_clip pretrained tag.
        clip_checkpoint: local open_clip checkpoint file.
        sam_model: SAM architecture of --sam-checkpoint.
        sam_checkpoint: SAM checkpoint file (sam-clip).
        points_per_side: sam-clip point grid.
        short_side: dense-clip working resolution.
        label_noise: labels: per-view embedding noise (imitates inconsistent 2D features).
        label_drop: labels: per-view probability of dropping a region.
        label_merge: labels: per-view probability of merging a region into a neighbour.
        overwrite_language: train the language stage again (its files are moved aside).
        dynamic: deformable Gaussians (4D: a deformation field over time) and, with --features, language over
            time; automatic when every frame of the data has a time (D-NeRF, nerfstudio with time, HyperNeRF, Neu3D).
        static: train a static scene even when the data has time.
        deform: dynamic: the deformation field, hexplane (space-time planes + MLP head, default) or mlp
            (positional encoding, Deformable-3DGS style).
        warmup: dynamic: static steps first (default min(3000, steps // 12)).
        deform_color: dynamic: the field also changes colour over time (states that only change colour).
        states: dynamic language: state prototypes per Gaussian for time-sensitive queries (default 2).
        time_opacity_bins: dynamic: per-Gaussian temporal opacity over this many bins of time (default 0: off;
            e.g. the number of frame times, for small objects that move further than their own size).
        batch_size: cameras per step over all ranks (default 1; under torchrun: the number of ranks, each
            rendering batch-size / ranks of them); learning rates are scaled for it as gsplat's multi-GPU
            trainer (x sqrt(batch)); divide --steps by it yourself.
        no_lr_batch_scaling: keep the one-camera learning rates and Adam betas with --batch-size > 1.
        shard_gaussians: under torchrun, each rank holds only a spatial shard of the Gaussians (parameters, Adam
            state, densification statistics) and renders its cameras from every shard's visible Gaussians: for
            scenes beyond one GPU's memory; same results as data-parallel training; checkpoints hold the whole
            scene (resume sharded or not, on any number of ranks).
    """
    from langfield.distributed import DistError, init as _join_job

    try:
        _join_job(device=device or "auto")  # torchrun's ranks join here; nothing without WORLD_SIZE
    except DistError as e:
        raise _fail(str(e)) from None
    if dynamic and static:
        raise _fail("--dynamic and --static exclude each other")
    if not static and (dynamic or _is_dynamic(Path(data), Path(out))):
        from langfield.dynamic.cli import cli_train_dynamic

        dyn = {k: v for k, v in dict(
            steps=steps, sh_degree=sh_degree, init_random=init_random, downscale=downscale, device=device,
            backend=backend, ckpt_every=ckpt_every, seed=seed, no_densify=no_densify or None, resume=resume or None,
            overwrite=overwrite or None, quiet=quiet or None, features=features, lang_steps=lang_steps,
            text_encoder=text_encoder, deform=deform, warmup=warmup, deform_color=deform_color or None,
            states=states, time_opacity_bins=time_opacity_bins).items() if v is not None}
        if not dynamic:
            print("langfield: the data has time: training a dynamic (4D) scene (--static for a static one)",
                  file=sys.stderr)
        if shard_gaussians:
            raise _fail("--shard-gaussians is not available for dynamic runs (static scenes only)")
        if batch_size is not None:
            dyn["batch_size"] = batch_size
        if no_lr_batch_scaling:
            dyn["no_lr_batch_scaling"] = True
        return cli_train_dynamic(data, out, **dyn)
    if time_opacity_bins is not None:
        raise _fail("--time-opacity-bins is for dynamic runs (data with time, or --dynamic)")
    plain_warnings()
    from langfield.run import NonFiniteError, RunError
    from langfield.train.rgb import train_rgb

    given: Dict[str, Any] = {k: v for k, v in dict(
        steps=steps, downscale=downscale, device=device, sh_degree=sh_degree, background=background,
        ckpt_every=ckpt_every, keep_checkpoints=keep_checkpoints, test_every=test_every, seed=seed, backend=backend,
        absgrad=absgrad or None, opacity_reset=opacity_reset or None, densify=False if no_densify else None,
        refine_stop_iter=refine_stop_iter, init_random=init_random,
        init_ply=str(init_ply) if init_ply is not None else None,
        init_ply_transform=str(init_ply_transform) if init_ply_transform is not None else None,
        progress=False if quiet else None,
        save_renders=False if no_renders else None, skip_bad_images=skip_bad_images or None,
        allow_outside=allow_outside or None, batch_size=batch_size,
        lr_batch_scaling=False if no_lr_batch_scaling else None,
        shard_gaussians=True if shard_gaussians else None).items() if v is not None}
    lang_given: Dict[str, Any] = {}
    lang_base = None
    if features is not None:  # every language option is checked before any work starts
        from langfield.train.language import LangConfig, stored_language_config

        lang_given = {k: v for k, v in dict(
            features=features, codec=codec, steps=lang_steps, lr=lang_lr,
            latent_dim=codebook_size if codebook_size is not None else (
                latent_dim if latent_dim is not None or codec != "codebook" else 64), joint=joint or None,
            ae_steps=ae_steps, text_encoder=text_encoder, clip_model=clip_model, clip_pretrained=clip_pretrained,
            clip_checkpoint=None if clip_checkpoint is None else str(clip_checkpoint), sam_model=sam_model,
            sam_checkpoint=None if sam_checkpoint is None else str(sam_checkpoint),
            points_per_side=points_per_side, short_side=short_side, label_noise=label_noise, label_drop=label_drop,
            label_merge=label_merge, device=device, backend=backend, progress=False if quiet else None,
            seed=seed).items() if v is not None}
        stored_lang = None if (overwrite or overwrite_language) else stored_language_config(Path(out))
        lang_base = stored_lang if stored_lang is not None else LangConfig(lr=CLI_LANG_LR)
        from dataclasses import replace as _replace

        try:
            lang_cfg = _replace(lang_base, **lang_given)
            lang_cfg.validate()
        except ValueError as e:
            raise _fail(str(e)) from None
        _check_weights(lang_cfg)
        if stored_lang is not None:
            lang_base = None  # train_language keeps the stored options (unset ones are not passed)
    if features == "labels":  # label maps missing: say so now, not after the whole RGB stage
        _check_labels(data, allow_outside)
    rgb_done = False
    if features is not None and not overwrite and (Path(out) / "config.json").is_file():
        rgb_done = _rgb_finished(Path(out), data, steps)
    try:
        if rgb_done:
            metrics = {}
            print(f"langfield: {out} holds a finished RGB run; adding the language stage", file=sys.stderr)
        else:
            metrics = train_rgb(data, out, resume=resume, overwrite=overwrite, **given)
    except (RunError, DistError) as e:
        raise _fail(str(e)) from None
    except NonFiniteError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        from langfield.run import RunFolder

        steps_done = RunFolder(out).checkpoint_steps()
        where = f"the newest checkpoint is step {steps_done[-1]}" if steps_done else "no checkpoint was written"
        print(f"\nlangfield: interrupted; {where}; continue with: langfield train {data} --out {out} --resume",
              file=sys.stderr)
        return 130
    from langfield.distributed import get as _job

    if not _job().is_main:
        pass  # rank 0 reports
    elif metrics.get("psnr") is not None:
        print(f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} on {metrics['n_views']} views; "
              f"{metrics['num_gaussians']} Gaussians; {metrics['step']} steps"
              + (f" at {metrics['s_per_step']:.3f} s/step" if metrics.get("s_per_step") else "")
              + f" -> {Path(out) / 'metrics.json'}")
    elif not rgb_done:
        print(f"trained {metrics.get('step')} steps; the dataset has no held-out views, no metrics")
    if features is None:
        return 0
    from langfield.features import WeightsError
    from langfield.train.language import LanguageError, train_language

    try:
        train_language(out, lang_base, resume=resume, overwrite=overwrite_language or overwrite, **lang_given)
    except (LanguageError, WeightsError, RunError, DistError) as e:
        raise _fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except OSError as e:  # a full disk or a read-only run folder during the language stage
        raise _fail(f"{os_path(e, out)}: {os_reason(e)} (run folder {out}; the checkpoints there are intact; "
                    f"continue with --features {features} --resume)") from None
    except KeyboardInterrupt:
        print(f"\nlangfield: interrupted; continue the language stage with: langfield train {data} --out {out} "
              f"--features {features} --resume", file=sys.stderr)
        return 130
    if _job().is_main:
        print(f"language field ready: langfield query {out} \"the red mug\"  |  langfield view {out}")
    return 0


def _check_labels(data: Path, allow_outside: bool) -> None:
    """--features labels on a dataset without ground-truth label maps: a one-line error now."""
    from langfield.data import load_dataset
    from langfield.features.cli import labels_problem

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the RGB stage reports the dataset's own warnings
            ds = load_dataset(data, allow_outside=allow_outside, normalize=False)
    except Exception:  # a bad dataset is reported by the RGB stage with its own message
        return
    problem = labels_problem(ds)
    if problem:
        raise _fail(f"--features labels: {problem}")


def _check_weights(cfg) -> None:
    """The model weights the language stage will load, checked for presence before the RGB
    stage (their contents are checked when they load)."""
    from langfield.features import WeightsError
    from langfield.features.models import check_sam_checkpoint, clip_weights_cached, hub_reachable

    needs_clip = cfg.features in ("sam-clip", "dense-clip") or cfg.text_encoder == "clip"
    try:
        if cfg.features == "sam-clip":
            check_sam_checkpoint(cfg.sam_model, cfg.sam_checkpoint)
    except (WeightsError, ValueError) as e:
        raise _fail(str(e)) from None
    if not needs_clip:
        return
    if cfg.clip_checkpoint:
        if not Path(cfg.clip_checkpoint).expanduser().is_file():
            raise _fail(f"--clip-checkpoint {cfg.clip_checkpoint}: not found (an open_clip checkpoint file for "
                        f"{cfg.clip_model})")
        return
    try:
        cached = clip_weights_cached(cfg.clip_model, cfg.clip_pretrained)
    except Exception:  # an unknown model or tag: load_clip names it when the stage starts
        return
    if cached is False and not hub_reachable():
        raise _fail(f"--features {cfg.features}: CLIP weights {cfg.clip_model}/{cfg.clip_pretrained} are not on "
                    f"this machine and huggingface.co cannot be reached; pass --clip-checkpoint PATH"
                    + (", or --text-encoder offline" if cfg.features == "labels" else ""))


def _is_dynamic(data: Path, out: Path) -> bool:
    """A dynamic run to continue, or (for a new run) data whose every frame has a time."""
    from langfield.run import RunError, RunFolder

    rf = RunFolder(out)
    if rf.config.is_file():
        try:
            return (rf.read_config().get("model") or {}).get("kind") == "deformable"
        except RunError:
            return False
    try:
        from langfield.data import load_dataset

        return bool(load_dataset(data, cache_images=False).has_time)
    except Exception:  # the static path reports bad data with its own one-line errors
        return False


def _rgb_finished(out: Path, data: Path, steps: Optional[int]) -> bool:
    """True when ``out`` holds an RGB run on ``data`` trained to its (or the requested) length."""
    from langfield.run import RunError, RunFolder

    rf = RunFolder(out)
    try:
        doc = rf.read_config()
    except RunError:
        return False
    if Path(doc.get("data", "")) != Path(data).expanduser().resolve():
        raise _fail(f"{out} was trained on {doc.get('data')}, not {Path(data).resolve()}")
    done = rf.checkpoint_steps()
    want = int(steps if steps is not None else doc.get("train", {}).get("steps", 0))
    return bool(done) and done[-1] >= want


def _parse_views(views: str, ds) -> List[int]:
    if views in ("test", "train", "all"):
        if views == "test":
            return ds.indices("test") or ds.indices("val")
        return ds.indices(views)
    try:
        idx = [int(v) for v in views.split(",") if v.strip()]
    except ValueError:
        raise _fail(f"--views must be test, train, all or comma-separated frame indices, got {views!r}") from None
    bad = [i for i in idx if not 0 <= i < len(ds)]
    if bad or not idx:
        raise _fail(f"--views: frame indices must be in 0..{len(ds) - 1}, got {views!r}")
    return idx


def _trained_sh_degree(doc: Dict[str, Any], ckpt, g) -> int:
    """The SH degree the run's RGB stage had reached (a language checkpoint records its RGB step)."""
    from langfield.train.config import trained_sh_degree

    return trained_sh_degree(doc.get("train", {}), int(ckpt.config.get("rgb_step", ckpt.step)), g.sh_degree)


def _run_kind(run: Path) -> Optional[str]:
    """"slam" for a mapping run, "deformable" for a dynamic one, else None (a per-scene run)."""
    from langfield.run import RunError, RunFolder

    try:
        doc = RunFolder(run).read_config()
    except RunError:
        return None
    if "slam" in doc:
        return "slam"
    return (doc.get("model") or {}).get("kind") if (doc.get("model") or {}).get("kind") == "deformable" else None


def cli_render(
    run: RunArg,
    views: str = "test",
    out: Optional[Path] = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
) -> int:
    """Render a trained run's views (prediction, and ground truth | prediction side by side).

    Args:
        run: the run folder.
        views: test, train, all, or comma-separated frame indices (e.g. 0,3,5).
        out: output folder (default RUN/renders/<views>).
        device: auto, cpu or cuda.
    """
    plain_warnings()
    from langfield.run import RunError, load_run
    from langfield.eval.views import eval_background, evaluate_views

    try:
        doc, g, ds, ckpt = load_run(run, device=device)
    except (RunError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise _fail(f"--out {out} is a file; renders go into a folder")
    idx = _parse_views(views, ds)
    if not idx:
        raise _fail(f"{run}: the dataset has no {views} views; pass --views train, all or frame indices "
                    f"(0..{len(ds) - 1})")
    name = views if views in ("test", "train", "all") else "views"
    dest = Path(out) if out is not None else Path(run) / "renders" / name
    bg = eval_background(doc.get("dataset", {}).get("background", "white"))
    try:
        res = evaluate_views(g, ds, idx, background=bg, sh_degree=_trained_sh_degree(doc, ckpt, g),
                             backend=doc["train"].get("backend", "auto"), out_dir=dest, progress=sys.stderr.isatty())
    except OSError as e:
        raise _fail(f"--out {dest}: cannot write {os_path(e, 'the renders')} ({os_reason(e)})") from None
    print(f"rendered {len(idx)} views (step {ckpt.step}) -> {dest}"
          + (f"; PSNR {res['psnr']:.2f} dB" if res["psnr"] is not None else ""))
    return 0


OptRunArg = tyro.conf.Positional[Annotated[Optional[Path], tyro.conf.arg(metavar="RUN")]]


def _dynamic_summary(m: Dict[str, Any]) -> Dict[str, Any]:
    """The headline numbers of evaluate_dynamic_run's result (the whole is in metrics.json)."""
    from langfield.dynamic.language import metrics_headline

    out = {k: v for k, v in m.items() if not isinstance(v, (list, dict))}
    out.update({k: v for k, v in metrics_headline(m).items() if k != "per_query"})
    if m.get("unseen_camera"):
        out["unseen_camera"] = {k: v for k, v in metrics_headline(m["unseen_camera"]).items() if k != "per_query"}
    return out


def cli_eval(
    run: OptRunArg = None,
    queries: Optional[Path] = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    renders: bool = False,
    min_pixels: int = 0,
    no_3d: bool = False,
    threshold: float = 0.4,
    trajectory: Optional[Path] = None,
    reference: Optional[Path] = None,
    max_diff: float = 0.01,
    data: Optional[Path] = None,
    new_times: bool = False,
) -> int:
    """Evaluate a trained run -> RUN/metrics.json: PSNR/SSIM on its held-out views and, for a run
    with a language field, text queries (LERF-ovs protocol: localization, mIoU; and 3D selection).

    Args:
        run: the run folder.
        queries: evaluate text queries from this file only (langfield scenes' queries.json, or a LERF-ovs
            label folder); default: RGB metrics, plus the dataset's queries.json when the run has a language field.
        device: auto, cpu or cuda.
        renders: also write the RGB renders to RUN/renders/test/.
        min_pixels: skip ground-truth masks smaller than this (default 0: none).
        no_3d: skip the 3D protocol (selection of Gaussians, rendered footprint).
        threshold: mask threshold on the normalised relevancy (LangSplat: 0.4).
        trajectory: with --reference and no RUN: compare two TUM-format trajectory files (ATE RMSE after SE(3)
            Umeyama alignment, as `evo_ape tum --align`, and RPE), timestamps associated like evo.
        reference: the reference (ground-truth) TUM trajectory for --trajectory.
        max_diff: largest timestamp difference (s) for associating --trajectory and --reference poses.
        data: dynamic runs: evaluate on another capture of the run's scene (e.g. the same cameras at more times),
            put in the run's world; results go to metrics.json under dynamic_other.
        new_times: dynamic runs: only the views at times the run has no training frame at (between its frame
            times; with --data or on the run's own dataset).
    """
    plain_warnings()
    from langfield.run import RunError, RunFolder, load_run
    from langfield.eval.views import eval_background, evaluate_views

    if trajectory is not None or reference is not None:
        if trajectory is None or reference is None:
            raise _fail("--trajectory and --reference go together (two TUM-format trajectory files)")
        from langfield.eval.trajectory import TrajectoryError, format_report, trajectory_report

        try:
            rep = trajectory_report(trajectory, reference, max_diff=max_diff)
        except (TrajectoryError, OSError, ValueError) as e:
            raise _fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        print(format_report(rep))
        return 0
    if run is None:
        raise _fail("give a run folder (or --trajectory EST --reference REF)")
    kind = _run_kind(Path(run))
    if (data is not None or new_times) and kind != "deformable":
        raise _fail("--data and --new-times are for dynamic runs (deformable Gaussians)")
    if data is not None and not Path(data).is_dir():
        raise _fail(f"--data {data}: not a folder")
    if kind == "slam" and queries is None:
        from langfield.slam.evaluate import evaluate_slam_run, format_slam_eval

        try:
            print(format_slam_eval(evaluate_slam_run(run, device=device)))
        except (RunError, ValueError, OSError) as e:
            raise _fail(str(e).splitlines()[0]) from None
        return 0
    if kind == "deformable":
        from langfield.dynamic.language import evaluate_dynamic_run

        try:
            m = evaluate_dynamic_run(run, queries, device=device, threshold=threshold, data=data,
                                     new_times_only=new_times)
        except (RunError, ValueError, OSError) as e:
            raise _fail(str(e).splitlines()[0]) from None
        print(json.dumps(_dynamic_summary(m), indent=1, default=str))
        return 0

    if queries is None:
        try:
            doc, g, ds, ckpt = load_run(run, device=device)
        except (RunError, FileNotFoundError, ValueError) as e:
            raise _fail(str(e)) from None
        idx = ds.indices("test") or ds.indices("val")
        if not idx:
            raise _fail(f"{run}: the dataset has no held-out views to evaluate")
        rf = RunFolder(run)
        bg = eval_background(doc.get("dataset", {}).get("background", "white"))
        from langfield.train.rgb import write_metrics  # the RGB metrics' one writer

        try:
            res = evaluate_views(g, ds, idx, background=bg, sh_degree=_trained_sh_degree(doc, ckpt, g),
                                 backend=doc["train"].get("backend", "auto"),
                                 out_dir=(rf.renders / "test") if renders else None, progress=sys.stderr.isatty())
            m = write_metrics(rf, res, step=ckpt.step, train_time_s=ckpt.config.get("train_time_s"),
                              num_gaussians=g.num, background=bg, split="test")
        except OSError as e:
            raise _fail(f"{os_path(e, rf.metrics)}: {os_reason(e)} (nothing of the run was changed)") from None
        print(f"step {ckpt.step}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} on {m['n_views']} held-out views "
              f"-> {rf.metrics}")
        from langfield.field import latest_language_checkpoint
        from langfield.train.language import find_queries

        if latest_language_checkpoint(run) is None:
            return 0
        queries = find_queries(Path(doc["data"]))
        if queries is None:
            print("the run has a language field but its dataset has no queries.json; pass --queries FILE")
            return 0
    from langfield.eval.language import QueriesError, evaluate_run
    from langfield.field import FieldError

    try:
        evaluate_run(run, queries, device=device, min_pixels=min_pixels, three_d=not no_3d, threshold=threshold,
                     progress=sys.stderr.isatty())
    except (QueriesError, FieldError) as e:
        raise _fail(str(e)) from None
    except OSError as e:
        raise _fail(f"{os_path(e, run)}: {os_reason(e)}") from None
    return 0


def cli_export(
    run: RunArg,
    ply: Path,
    overwrite: bool = False,
    normalized: bool = False,
    no_language: bool = False,
) -> int:
    """Export a trained run as a standard 3DGS PLY in the dataset's original world frame. A run
    with a language field adds lang_* properties, and writes PLY.json (levels, latent size, text
    encoder) and PLY's autoencoder next to it, so `langfield query|view PLY` work on the file.

    Args:
        run: the run folder.
        ply: the output .ply file.
        overwrite: replace an existing file.
        normalized: keep langfield's normalised world (skip the inverse of the dataset transform).
        no_language: leave the language latents out (a plain RGB 3DGS file).
    """
    plain_warnings()
    import numpy as np

    from langfield.field import FieldError, LanguageField
    from langfield.io import write_ply
    from langfield.run import RunError, RunFolder

    ply = Path(ply)
    if ply.exists() and not overwrite:
        raise _fail(f"--ply {ply} exists; pass --overwrite to replace it")
    if ply.is_dir():
        raise _fail(f"--ply {ply} is a folder")
    try:
        doc = RunFolder(run).read_config()
        field = LanguageField.load(run, device="cpu", need_cameras=False)
    except (RunError, FieldError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    g = field.gaussians
    lang = field.has_language and not no_language
    if not lang and g.lang is not None:
        g = g.clone().set_lang(None)
    T = np.asarray(doc.get("dataset", {}).get("transform", np.eye(4).tolist()), dtype=np.float64)
    if not normalized and not np.allclose(T, np.eye(4)):
        g = g.transformed(np.linalg.inv(T))
    try:
        ply.parent.mkdir(parents=True, exist_ok=True)
        write_ply(ply, g)
    except OSError as e:
        raise _fail(f"--ply {ply}: cannot write it ({os_reason(e)})") from None
    extra = ""
    if lang:
        from langfield.io.checkpoint import atomic_write_json

        from langfield.codec import codec_file

        stem = Path(codec_file(field.codec.kind)).stem
        try:
            atomic_write_json(ply.with_suffix(".json"), {
                "format": "langfield-ply", "run": str(Path(run).resolve()), "step": field.step, "language": {
                    "levels": field.levels, "latent_dim": field.latent_dim,
                    "text": (doc.get("language") or {}).get("text"), "codec": {"kind": field.codec.kind}},
                "normalized": bool(normalized)})
            field.codec.save(ply.with_name(f"{ply.stem}.{stem}.safetensors"))
        except OSError as e:
            raise _fail(f"--ply {ply}: cannot write its sidecar {os_path(e, ply.with_suffix('.json'))} "
                        f"({os_reason(e)})") from None
        extra = (f" with {g.lang.shape[1]} language channels (+ {ply.with_suffix('.json').name}, "
                 f"{ply.stem}.{stem}.*)")
    print(f"exported {g.num} Gaussians (step {field.step}){extra} -> {ply}")
    return 0
