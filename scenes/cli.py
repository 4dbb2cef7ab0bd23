"""``langfield scenes list`` and ``langfield scenes make`` (dispatched by langfield.cli)."""

from __future__ import annotations

import pathlib
from typing import Annotated, Literal, Optional, Tuple

import tyro


def scenes_list() -> None:
    """List the built-in procedural scenes (name, default kind, objects, primitives)."""
    from langfield.scenes.builtin import describe

    rows = describe()
    print(f"{'name':<10} {'kind':<10} {'objects':>7} {'prims':>6}  description")
    for name, kind, desc, nobj, nprim in rows:
        print(f"{name:<10} {kind:<10} {nobj:>7} {nprim:>6}  {desc}")
    print("\nlangfield scenes make NAME --out DIR [--kind multiview|rgbd|dynamic] [--views N] [--size WxH] "
          "[--frames N] [--seed S]")


def scenes_make(
    name: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="NAME")],
    out: pathlib.Path,
    kind: Optional[Literal["multiview", "rgbd", "dynamic"]] = None,
    views: Optional[int] = None,
    size: str = "256x256",
    frames: Optional[int] = None,
    seed: int = 0,
    camera: Literal["orbit", "static"] = "orbit",
    fov: Optional[float] = None,
    aa: int = 2,
    test_every: int = 8,
    holdout: Literal["camera", "times"] = "camera",
    formats: Optional[Tuple[Literal["tum", "replica", "dnerf"], ...]] = None,
    workers: Optional[int] = None,
    points: int = 20_000,
    noise: bool = False,
    overwrite: bool = False,
) -> int:
    """Render a built-in scene with exact ground truth into OUT.

    Writes the nerfstudio layout (transforms.json, images/, depth/*.npy z-depth, labels/
    per level, points3d.ply), labels.json, queries.json with masks for held-out views, and
    per kind: TUM + Replica copies (rgbd), D-NeRF transforms_*.json (dynamic).

    Args:
        name: built-in scene (see `langfield scenes list`).
        out: output folder (created).
        kind: multiview (hemisphere views), rgbd (hand-held walk), dynamic (time range);
            default: the scene's own kind.
        views: cameras: multiview (default 64), rgbd frames if --frames is not given,
            dynamic with --camera static: fixed cameras (default 4).
        size: image size WIDTHxHEIGHT.
        frames: rgbd trajectory length (default 200) or dynamic time steps (default 24).
        seed: randomness of placements, cameras and jitter; same seed, same bytes.
        camera: dynamic scenes: one moving camera (orbit) or fixed cameras (static).
        fov: horizontal field of view in degrees (default 50, 65 for rgbd).
        aa: supersampling per axis at edges (1 = off).
        test_every: every N-th view is held out (split 'test', with queries); 0 = none.
        holdout: dynamic scenes with --camera static: camera 0 held out at every time (camera),
            or held-out times of seen cameras as the test split plus camera 0 never trained
            as the val split, with queries_val.json (times; needs 3+ views).
        formats: extra writers (default: tum replica for rgbd, dnerf for dynamic).
        workers: render processes (default 2 for 16+ views); output is identical.
        points: size of points3d.ply (surface samples from the training views' depth, like an
            SfM point cloud, used to initialise Gaussians).
        noise: Kinect-like sensor depth in the tum/ and replica/ copies (noise growing with
            distance, holes at depth edges and on dark surfaces; seeded); depth/*.npy stays exact.
        overwrite: replace a scene already in OUT (its files are removed first); without it
            such a folder is refused.
    """
    from langfield.scenes.builtin import SCENES
    import sys

    from langfield.scenes.make import SceneExistsError, make_scene

    from langfield.errors import CliError  # one line on stderr, exit status 2

    if name not in SCENES:
        raise CliError(f"langfield scenes make: unknown scene {name!r}; known scenes: {', '.join(SCENES)}")
    if points < 1:
        raise CliError("langfield scenes make: --points must be >= 1")
    try:
        res = make_scene(name, out, kind=kind, views=views, frames=frames, size=size, seed=seed, fov=fov, aa=aa,
                         camera=camera, test_every=test_every, holdout=holdout, formats=formats, workers=workers, progress=True,
                         max_points=points, noise=noise, overwrite=overwrite)
    except SceneExistsError as e:
        print(f"langfield scenes make: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        raise CliError(f"langfield scenes make: {e}") from None
    except OSError as e:  # a read-only or full --out
        raise CliError(f"langfield scenes make: --out {out}: cannot write {e.filename or out} "
                       f"({e.strerror or e})") from None
    t = res["timings"]
    print(f"wrote {t['views']} views of {name!r} ({res['kind']}, {res['width']}x{res['height']}) to {out} "
          f"in {t['total_s']:.1f} s (render {t['render_s']:.1f} s, {t['views'] / max(t['render_s'], 1e-9):.1f} views/s)")
    return 0
