"""``langfield train | render | eval | export``: thin commands over :mod:`langfield.train.rgb`.

Options left unset on ``train --resume`` keep the run's stored values; see
:mod:`langfield.train.rgb` for the resume and overwrite policies.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from typing_extensions import Annotated

import tyro

DataArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="DATA")]]
RunArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="RUN")]]

__all__ = ["cli_train", "cli_render", "cli_eval", "cli_export"]


def _fail(msg: str) -> "SystemExit":
    return SystemExit(f"langfield: {msg}")


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
    quiet: bool = False,
    no_renders: bool = False,
) -> int:
    """Train Gaussians on a dataset (COLMAP, nerfstudio, Blender) into the run folder OUT.

    Args:
        data: the dataset folder (or transforms*.json).
        out: the run folder (config.json, checkpoints/, renders/, metrics.json).
        steps: optimisation steps, one camera each (default 30000).
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
        quiet: no progress bar (it is shown when stderr is a terminal).
        no_renders: do not write held-out renders to OUT/renders/ at the end.
    """
    from langfield.train.rgb import NonFiniteError, RunError, train_rgb

    given: Dict[str, Any] = {k: v for k, v in dict(
        steps=steps, downscale=downscale, device=device, sh_degree=sh_degree, background=background,
        ckpt_every=ckpt_every, keep_checkpoints=keep_checkpoints, test_every=test_every, seed=seed, backend=backend,
        absgrad=absgrad or None, opacity_reset=opacity_reset or None, densify=False if no_densify else None,
        refine_stop_iter=refine_stop_iter, init_random=init_random, progress=False if quiet else None,
        save_renders=False if no_renders else None).items() if v is not None}
    try:
        metrics = train_rgb(data, out, resume=resume, overwrite=overwrite, **given)
    except RunError as e:
        raise _fail(str(e)) from None
    except NonFiniteError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        from langfield.train.rgb import RunFolder

        steps_done = RunFolder(out).checkpoint_steps()
        where = f"the newest checkpoint is step {steps_done[-1]}" if steps_done else "no checkpoint was written"
        print(f"\nlangfield: interrupted; {where}; continue with: langfield train {data} --out {out} --resume",
              file=sys.stderr)
        return 130
    if metrics.get("psnr") is not None:
        print(f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} on {metrics['n_views']} views; "
              f"{metrics['num_gaussians']} Gaussians; {metrics['step']} steps"
              + (f" at {metrics['s_per_step']:.3f} s/step" if metrics.get("s_per_step") else "")
              + f" -> {Path(out) / 'metrics.json'}")
    else:
        print(f"trained {metrics.get('step')} steps; the dataset has no held-out views, no metrics")
    return 0


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


def _trained_sh_degree(doc: Dict[str, Any], step: int, g) -> int:
    t = doc.get("train", {})
    interval = int(t.get("sh_degree_interval", 1000)) or 1000
    return min(max(step - 1, 0) // interval, int(t.get("sh_degree", g.sh_degree)), g.sh_degree)


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
    from langfield.train.rgb import RunError, _eval_background, evaluate_views, load_run

    try:
        doc, g, ds, ckpt = load_run(run, device=device)
    except (RunError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    idx = _parse_views(views, ds)
    name = views if views in ("test", "train", "all") else "views"
    dest = Path(out) if out is not None else Path(run) / "renders" / name
    bg = _eval_background(doc.get("dataset", {}).get("background", "white"))
    res = evaluate_views(g, ds, idx, background=bg, sh_degree=_trained_sh_degree(doc, ckpt.step, g),
                         backend=doc["train"].get("backend", "auto"), out_dir=dest, progress=sys.stderr.isatty())
    print(f"rendered {len(idx)} views (step {ckpt.step}) -> {dest}"
          + (f"; PSNR {res['psnr']:.2f} dB" if res["psnr"] is not None else ""))
    return 0


def cli_eval(
    run: RunArg,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    renders: bool = False,
) -> int:
    """PSNR/SSIM of a trained run's newest checkpoint on its held-out views -> RUN/metrics.json.

    Args:
        run: the run folder.
        device: auto, cpu or cuda.
        renders: also write the renders to RUN/renders/test/.
    """
    from langfield.train.rgb import RunError, RunFolder, _eval_background, evaluate_views, load_run, write_metrics

    try:
        doc, g, ds, ckpt = load_run(run, device=device)
    except (RunError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    idx = ds.indices("test") or ds.indices("val")
    if not idx:
        raise _fail(f"{run}: the dataset has no held-out views to evaluate")
    rf = RunFolder(run)
    bg = _eval_background(doc.get("dataset", {}).get("background", "white"))
    res = evaluate_views(g, ds, idx, background=bg, sh_degree=_trained_sh_degree(doc, ckpt.step, g),
                         backend=doc["train"].get("backend", "auto"),
                         out_dir=(rf.renders / "test") if renders else None, progress=sys.stderr.isatty())
    m = write_metrics(rf, res, step=ckpt.step, train_time_s=ckpt.config.get("train_time_s"), num_gaussians=g.num,
                      background=bg, split="test")
    print(f"step {ckpt.step}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} on {m['n_views']} held-out views "
          f"-> {rf.metrics}")
    return 0


def cli_export(
    run: RunArg,
    ply: Path,
    overwrite: bool = False,
    normalized: bool = False,
) -> int:
    """Export a trained run as a standard 3DGS PLY in the dataset's original world frame.

    Args:
        run: the run folder.
        ply: the output .ply file.
        overwrite: replace an existing file.
        normalized: keep langfield's normalised world (skip the inverse of the dataset transform).
    """
    import numpy as np

    from langfield.io import write_ply
    from langfield.train.rgb import RunError, load_run

    ply = Path(ply)
    if ply.exists() and not overwrite:
        raise _fail(f"--ply {ply} exists; pass --overwrite to replace it")
    if ply.is_dir():
        raise _fail(f"--ply {ply} is a folder")
    try:
        doc, g, _ds, ckpt = load_run(run, device="cpu", need_data=False)
    except (RunError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    T = np.asarray(doc.get("dataset", {}).get("transform", np.eye(4).tolist()), dtype=np.float64)
    if not normalized and not np.allclose(T, np.eye(4)):
        g = g.transformed(np.linalg.inv(T))
    ply.parent.mkdir(parents=True, exist_ok=True)
    write_ply(ply, g)
    print(f"exported {g.num} Gaussians (step {ckpt.step}) -> {ply}")
    return 0
