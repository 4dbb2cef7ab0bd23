"""``langfield slam DATA --out RUN``: online mapping of an RGB-D sequence into a run folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

import tyro
from typing_extensions import Annotated

__all__ = ["cli_slam"]

DataArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="DATA")]]


def _fail(msg: str) -> SystemExit:
    print(f"langfield slam: {msg}", file=sys.stderr)
    return SystemExit(2)


def _size(text: str):
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(int(p) for p in parts) < 8:
        raise _fail(f"--size must be WIDTHxHEIGHT (e.g. 320x240) or 'native', got {text!r}")
    return int(parts[0]), int(parts[1])


def cli_slam(
    data: DataArg,
    out: Path,
    features: Literal["none", "labels", "dense-clip", "sam-clip"] = "none",
    max_frames: Optional[int] = None,
    stride: int = 1,
    size: str = "320x240",
    resume: bool = False,
    overwrite: bool = False,
    device: Literal["auto", "cpu", "cuda"] = "cpu",
    save_every: int = 20,
    seed: int = 0,
    map_iters: Optional[int] = None,
    threads: Optional[int] = None,
    concurrent: bool = False,
    quiet: bool = False,
) -> int:
    """Online RGB-D mapping: track every frame against the Gaussian map, grow and optimise the
    map on keyframes (and, with --features, learn its language latents), into a run folder
    that `langfield query | eval | view | export` read as any other.

    DATA is a TUM RGB-D, Replica, 7-Scenes or numbered colour/depth folder, or a scene from
    `langfield scenes make NAME --kind rgbd`. RUN gets config.json, checkpoints/, cameras.json
    (keyframes), trajectory.txt (TUM, every frame), keyframes.json and metrics.json ("slam").

    Args:
        data: the RGB-D sequence folder.
        out: the run folder.
        features: online language: labels (langfield scenes), dense-clip, sam-clip, or none.
        max_frames: use at most this many frames (after --stride).
        stride: use every stride-th frame.
        size: working size WIDTHxHEIGHT, or 'native' for the frames' own size.
        resume: continue a run that stopped (from its last saved state).
        overwrite: move a previous run in OUT aside and start again.
        device: cpu (default), cuda or auto.
        save_every: save the whole state every this many frames (and at the end).
        seed: randomness of the older keyframes picked for mapping.
        map_iters: mapping iterations per keyframe (default 20).
        threads: CPU threads for torch and the renderer (default: torch's; 1 is often fastest on a
            busy machine).
        concurrent: map keyframes in a back-end thread while the next frames are tracked (uses two
            cores with --threads 1; results then vary slightly with timing: the default is
            sequential and reproducible).
        quiet: no progress output.
    """
    from dataclasses import replace

    from langfield.run import RunError
    from langfield.slam.online import SlamConfig
    from langfield.slam.run import run_slam

    wh = None if size.strip().lower() == "native" else _size(size)
    if threads is not None:
        if threads < 1:
            raise _fail(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(int(threads))
    cfg = SlamConfig(seed=seed, concurrent=bool(concurrent))
    if map_iters is not None:
        if map_iters < 1:
            raise _fail(f"--map-iters must be >= 1, got {map_iters}")
        cfg = replace(cfg, mapper=replace(cfg.mapper, iters=int(map_iters)))
    try:
        res = run_slam(data, out, features=features, max_frames=max_frames, stride=stride, size=wh, resume=resume,
                       overwrite=overwrite, device=device, save_every=save_every, config=cfg, quiet=quiet)
    except RunError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        print(f"langfield slam: interrupted; `langfield slam {data} --out {out} --resume` continues from the last "
              "saved state", file=sys.stderr)
        return 130
    line = (f"mapped {res['frames']} frames: {res['keyframes']} keyframes, {res['gaussians']} Gaussians, "
            f"{res['frames_per_s']:.2f} frames/s (tracking {res['track_ms_per_frame']:.0f} ms/frame, mapping "
            f"{res['map_ms_per_keyframe']:.0f} ms/keyframe)")
    if res.get("ate_rmse_running") is not None:
        line += f", ATE RMSE {100 * res['ate_rmse_running']:.2f} cm"
    print(line)
    print(f"run folder: {out}")
    return 0
