"""``langfield demo``: the whole pipeline on the built-in tabletop scene, offline, on a CPU.

1. ``langfield scenes make tabletop`` (64 views at 256x256, exact labels and query masks);
2. RGB training (2000 steps by default);
3. the language stage with ``labels`` features (the scene's ground-truth label maps named by
   the text encoder: CLIP when its weights are on this machine, else the offline encoder);
4. evaluation of every query of the held-out views (LERF-ovs protocol: localization, mIoU; and
   the 3D protocol), a summary table, where the renders are, and the command that opens the
   viewer.

Every step is resumable: running the demo again reuses what is done (``--overwrite`` starts
again).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

__all__ = ["cli_demo", "run_demo"]


def run_demo(out: Path, *, steps: int = 2000, lang_steps: int = 1500, views: int = 64, size: str = "256x256",
             device: str = "auto", text_encoder: str = "auto", overwrite: bool = False, quiet: bool = False,
             ae_steps: int = 3000, log=print) -> dict:
    from langfield.eval.language import format_summary
    from langfield.scenes import make_scene
    from langfield.train.language import train_language
    from langfield.run import RunFolder
    from langfield.train.rgb import train_rgb

    out = Path(out)
    data, run = out / "data", out / "run"
    if overwrite and out.exists():
        for p in (data, run):
            if p.exists():
                shutil.rmtree(p)
    t0 = time.perf_counter()
    timings = {}
    spec = {"scene": "tabletop", "views": views, "size": size}
    stamp = data / "demo.json"
    if not (stamp.is_file() and json.loads(stamp.read_text("utf-8")) == spec):
        if data.exists():
            shutil.rmtree(data)
        log(f"[demo] 1/4 making the tabletop scene ({views} views, {size}) -> {data}")
        make_scene("tabletop", data, views=views, size=size, progress=not quiet)
        stamp.write_text(json.dumps(spec), "utf-8")
    else:
        log(f"[demo] 1/4 scene: reusing {data}")
    timings["scene_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    rf = RunFolder(run)
    done = rf.checkpoint_steps() if rf.config.is_file() else []
    progress = False if quiet else None
    if done and done[-1] >= steps and rf.metrics.is_file():
        log(f"[demo] 2/4 RGB: reusing {run} (step {done[-1]})")
        rgb = json.loads(rf.metrics.read_text("utf-8"))
    else:
        log(f"[demo] 2/4 RGB training, {steps} steps -> {run}")
        rgb = train_rgb(data, run, resume=rf.config.is_file(), steps=steps, device=device, progress=progress,
                        ckpt_every=max(500, steps // 4))
    timings["rgb_s"] = time.perf_counter() - t1
    log(f"[demo]     held-out PSNR {rgb['psnr']:.2f} dB, SSIM {rgb['ssim']:.4f}, {rgb['num_gaussians']} Gaussians")

    t2 = time.perf_counter()
    log(f"[demo] 3/4 language stage (labels features, {lang_steps} steps) and 4/4 evaluation")
    res = train_language(run, features="labels", steps=lang_steps, device=device, text_encoder=text_encoder,
                         ae_steps=ae_steps,
                         progress=progress, ckpt_every=max(500, lang_steps // 3), log=log)
    timings["language_and_eval_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    m = res["metrics"]
    if m is None:  # already trained and evaluated earlier
        m = json.loads(rf.metrics.read_text("utf-8")).get("language")
    prim = m[m["primary"]]
    log("")
    log("langfield demo: tabletop scene, labels features, " + ("offline text encoder" if m["text_encoder"] == "offline"
                                                              else "CLIP text encoder"))
    log(f"  RGB        PSNR {rgb['psnr']:.2f} dB  SSIM {rgb['ssim']:.4f}  ({rgb['num_gaussians']} Gaussians)")
    log(f"  queries    mIoU {prim['miou']:.3f}  localization {prim['loc']:.3f}  3D mIoU {prim['miou_3d']:.3f}  "
        f"({prim['n']} {m['primary']} queries on {m['n_views']} held-out views)")
    log(format_summary(m))
    log(f"  time       {timings['total_s']:.0f} s (scene {timings['scene_s']:.0f}, RGB {timings['rgb_s']:.0f}, "
        f"language + eval {timings['language_and_eval_s']:.0f})")
    log(f"  renders    {run / 'renders' / 'test'} (RGB), {run / 'renders' / 'queries'} (heatmaps, masks)")
    log(f"  metrics    {run / 'metrics.json'}")
    log("")
    log(f"open the viewer:  langfield view {run}")
    summary = {"rgb": {k: rgb[k] for k in ("psnr", "ssim", "num_gaussians")}, "language": {
        "primary": m["primary"], "miou": prim["miou"], "loc": prim["loc"], "miou_3d": prim["miou_3d"], "n": prim["n"],
        "all": m["all"], "text_encoder": m["text_encoder"]}, "timings": timings, "run": str(run)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    return summary


def cli_demo(
    out: Path = Path("langfield-demo"),
    steps: int = 2000,
    lang_steps: int = 1500,
    views: int = 64,
    size: str = "256x256",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    text_encoder: Literal["auto", "clip", "offline"] = "auto",
    overwrite: bool = False,
    quiet: bool = False,
) -> int:
    """The whole pipeline on the built-in tabletop scene, offline: scene -> RGB training ->
    labels features -> language stage -> query evaluation; prints a summary and the viewer command.

    Args:
        out: output folder (OUT/data: the scene, OUT/run: the run).
        steps: RGB training steps.
        lang_steps: language stage steps.
        views: camera views of the scene (every 8th held out).
        size: image size WxH.
        device: auto, cpu or cuda.
        text_encoder: auto (CLIP when its weights are here, else the offline encoder), clip or offline.
        overwrite: start again (OUT/data and OUT/run are deleted first).
        quiet: no progress bars.
    """
    from langfield.errors import fail as _fail, os_path as _os_path, os_reason as _os_reason, plain_warnings as _plain_warnings

    _plain_warnings()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise _fail(f"--out {out} is a file; the demo writes a folder (OUT/data, OUT/run)")
    if steps < 1 or lang_steps < 1 or views < 2:
        raise _fail(f"--steps and --lang-steps must be >= 1 and --views >= 2 (got {steps}, {lang_steps}, {views})")
    from langfield.scenes.make import parse_size

    try:
        parse_size(size)  # before anything is made or removed
    except ValueError as e:
        raise _fail(f"--size: {e}") from None
    from langfield.features import WeightsError
    from langfield.run import NonFiniteError, RunError
    from langfield.train.language import LanguageError

    try:
        run_demo(out, steps=steps, lang_steps=lang_steps, views=views, size=size, device=device,
                 text_encoder=text_encoder, overwrite=overwrite, quiet=quiet)
    except (RunError, NonFiniteError, LanguageError, WeightsError) as e:
        raise _fail(str(e).splitlines()[0]) from None
    except OSError as e:
        raise _fail(f"{_os_path(e, out)}: {_os_reason(e)} (rerun the demo to continue from what is done)") from None
    except KeyboardInterrupt:
        print("\nlangfield: interrupted; run the same command again to continue (every step resumes)",
              file=__import__("sys").stderr)
        return 130
    return 0
