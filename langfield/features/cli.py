"""``langfield extract``: build an extractor from names and fill a run's feature cache."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

import tyro
from typing_extensions import Annotated

from .base import WeightsError
from .factory import EXTRACTORS, make_extractor, make_text_encoder  # noqa: F401 (the old import path)
from .models import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, clip_weights_cached  # noqa: F401

__all__ = ["cli_extract", "make_extractor", "make_text_encoder", "EXTRACTORS", "labels_problem"]

_LABELS_INSTEAD = ("the labels extractor works on `langfield scenes make` datasets (ground-truth label maps); "
                   "for other data use dense-clip (fast) or sam-clip (LangSplat) instead")


def labels_problem(ds) -> Optional[str]:
    """Why the ``labels`` extractor cannot run on the dataset ``ds`` (one line naming what is
    missing and what to use instead), or None when every frame has its label maps and the
    dataset its labels.json. Only file names are checked (cheap), before any work starts."""
    root = Path(getattr(ds, "root", "."))
    frames = list(ds.frames)
    if not frames:
        return None
    without = [f for f in frames if not isinstance(getattr(f, "extras", {}).get("label_paths"), dict)]
    if without:
        name = without[0].name or Path(without[0].image_path).name
        return (f"{root}: {len(without)} of {len(frames)} frames have no ground-truth label maps (no 'label_paths' "
                f"in the dataset, e.g. frame {name!r}); {_LABELS_INSTEAD}")
    if not (root / "labels.json").is_file():
        return f"{root / 'labels.json'}: not found (label id -> name per level); {_LABELS_INSTEAD}"
    missing = []
    for f in frames:
        paths = f.extras["label_paths"]
        for level in ("subpart", "part", "whole"):
            rel = paths.get(level)
            if not isinstance(rel, str) or not (root / rel).is_file():
                missing.append(f"{root / rel}" if isinstance(rel, str) else f"{f.name}: no {level!r} map")
    if missing:
        return (f"{root}: {len(missing)} label map file(s) missing (e.g. {missing[0]}); regenerate the scene, or "
                f"{_LABELS_INSTEAD.split('; ')[1]}")
    return None


def cli_extract(
    data: Path,
    run: Annotated[Path, tyro.conf.arg(aliases=("--out",))],
    extractor: Literal["sam-clip", "dense-clip", "labels"] = "sam-clip",
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    clip_checkpoint: Optional[Path] = None,
    sam_model: Literal["vit_h", "vit_l", "vit_b"] = "vit_h",
    sam_checkpoint: Optional[Path] = None,
    text_encoder: Literal["auto", "clip", "offline"] = "auto",
    split: Literal["all", "train", "test"] = "all",
    downscale: int = 1,
    batch_size: int = 1,
    points_per_side: int = 32,
    short_side: int = 448,
    label_noise: float = 0.0,
    label_drop: float = 0.0,
    label_merge: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
) -> int:
    """Extract 2D language features of a dataset into RUN/features (resumable).

    Args:
        data: dataset folder (COLMAP, nerfstudio, Blender).
        run: run directory; features go to RUN/features (``--out`` is the same: under ``torchrun``,
            whose own ``--run-path`` option makes ``--run`` ambiguous, write ``--out``).
        extractor: sam-clip (LangSplat: SAM masks x 3 levels + CLIP), dense-clip (MaskCLIP per patch, fast),
            labels (ground-truth label maps + text embeddings of their names).
        clip_model: open_clip model name.
        clip_pretrained: open_clip pretrained tag.
        clip_checkpoint: local open_clip checkpoint file (instead of the tag's download).
        sam_model: SAM architecture of --sam-checkpoint.
        sam_checkpoint: SAM checkpoint file (sam_vit_h_4b8939.pth, ...).
        text_encoder: labels only: clip, offline (hashed names, not semantic) or auto (CLIP if its weights are here).
        split: which images.
        downscale: image downscale factor of the dataset.
        batch_size: images per extractor call.
        points_per_side: sam-clip point grid.
        short_side: dense-clip working resolution (short side, pixels).
        label_noise: labels: per-view embedding noise (norm).
        label_drop: labels: per-view probability of dropping a region.
        label_merge: labels: per-view probability of merging a region into a neighbour.
        seed: labels perturbation seed.
        device: auto, cpu or cuda.
        overwrite: replace a cache made with another configuration.
    """
    from langfield.distributed import DistError, guard_main, init as _init_job, shutdown as _end_job

    try:
        _init_job(device=device)
    except DistError as e:
        print(f"langfield extract: {e}", file=sys.stderr)
        return 2
    try:
        return guard_main(lambda: _cli_extract(
            data, run, extractor, clip_model, clip_pretrained, clip_checkpoint, sam_model, sam_checkpoint,
            text_encoder, split, downscale, batch_size, points_per_side, short_side, label_noise, label_drop,
            label_merge, seed, device, overwrite))
    except DistError as e:
        print(f"langfield extract: {e}", file=sys.stderr)
        return 2
    finally:
        _end_job()


def _err(msg: str) -> int:
    """Print a one-line error; in a distributed job, leave it for the other ranks to name."""
    from langfield.distributed import get

    print(msg, file=sys.stderr)
    get().report(msg)
    return 2


def _cli_extract(data, run, extractor, clip_model, clip_pretrained, clip_checkpoint, sam_model, sam_checkpoint,
                 text_encoder, split, downscale, batch_size, points_per_side, short_side, label_noise, label_drop,
                 label_merge, seed, device, overwrite) -> int:
    from langfield.distributed import get as _job

    from ..data import load_dataset
    from .cache import extract_dataset
    from .dense_clip import DenseClipParams
    from .labels import LabelsParams
    from .sam_clip import SamClipParams

    from ..data import DatasetError
    from .cache import CacheCorruptError, CacheMismatchError

    try:
        ds = load_dataset(data, downscale=downscale)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        return _err(f"langfield extract: {e}")
    if split != "all":
        ds = ds.split(split) if split == "train" else ds.test
    if extractor == "labels":
        problem = labels_problem(ds)
        if problem:
            return _err(f"langfield extract: --extractor labels: {problem}")
    try:
        ex = make_extractor(extractor, clip_model=clip_model, clip_pretrained=clip_pretrained,
                            clip_checkpoint=clip_checkpoint, sam_model=sam_model, sam_checkpoint=sam_checkpoint,
                            text_encoder=text_encoder, device=device,
                            sam_params=SamClipParams(points_per_side=points_per_side),
                            dense_params=DenseClipParams(short_side=short_side),
                            labels_params=LabelsParams(label_noise, label_drop, label_merge, seed))
    except WeightsError as e:
        return _err(f"langfield extract: {e}")
    if Path(run).exists() and not Path(run).is_dir():
        return _err(f"langfield extract: RUN {run} is a file; expected a run folder")
    try:
        cache = extract_dataset(ds, ex, Path(run) / "features", batch_size=batch_size, overwrite=overwrite,
                                log=lambda m: print(m, file=sys.stderr if "warning" in m else sys.stdout))
    except CacheMismatchError as e:
        return _err(f"langfield extract: {e}; --overwrite re-extracts")
    except CacheCorruptError as e:
        return _err(f"langfield extract: {e}")
    except ValueError as e:  # a dataset the extractor cannot read (e.g. a label id missing from labels.json)
        return _err(f"langfield extract: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except OSError as e:  # a full disk, a read-only run folder
        return _err(f"langfield extract: {e.filename or Path(run) / 'features'}: {e.strerror or e} (the cache "
                    f"entries written so far are kept; rerun to continue)")
    if not _job().is_main:
        return 0
    text = cache.text_config
    if text["type"] == "offline":
        text_name = "offline (hashed names, not CLIP)"
    else:
        text_name = f"{text.get('model')}/{text.get('checkpoint') or text.get('pretrained')}"
    print(f"features: {len(cache)} images in {cache.folder} ({cache.extractor}, {cache.dim}-d, levels "
          f"{', '.join(cache.levels)}); text encoder: {text_name}")
    return 0
