"""The run folder: its layout, its config, the checkpoints of every stage, metrics, the lock,
and which checkpoint a run *means*. Every verb reads and writes runs through this module.

Layout (``RUN/``)::

    config.json                 {"format": "langfield-run", "data", "train", "dataset", "language", "history", ...}
    checkpoints/ckpt_XXXXXXX.{json,safetensors}            RGB stage (or a mapping run's map)
    language/checkpoints/ckpt_XXXXXXX.{json,safetensors}   language stage (all Gaussian parameters + lang)
    features/                   the feature cache (langfield.features)
    autoencoder.safetensors     the language codec (the file named in config.json "language.codec")
    renders/, metrics.json      evaluation outputs
    .lock                       held (flock) by the one process writing the run; PID inside

**Which checkpoint a run means** (:func:`scene_checkpoint`): the newest valid checkpoint of the
language stage when the run has one, else the newest valid RGB checkpoint. ``render``, ``eval``,
``export``, ``query`` and ``view`` all use it, so for a ``--joint`` run the PSNR that ``eval``
reports describes the Gaussians that ``export`` writes.

**Corrupt checkpoints**: a checkpoint that fails to load is skipped with a warning naming it;
writers (training, resume) move it into ``<checkpoints>/corrupt/`` so that nothing is deleted
and the next save does not trip over it; readers leave it where it is.

**Lock**: a process that writes a run holds ``RUN/.lock`` (an OS file lock, released when the
process dies, so a lock left by ``kill -9`` is simply taken over). A second writer gets a
:class:`RunError` naming the holder's PID. Readers (``eval`` without writing, ``query``,
``view``) never take it. ``metrics.json`` updates go through :func:`update_metrics` under their
own short lock, so an ``eval`` and a training never lose each other's keys.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from langfield.io.checkpoint import atomic_write_json, load_checkpoint, quarantine_checkpoint, save_checkpoint

__all__ = ["RunError", "NonFiniteError", "RunFolder", "RunLock", "RUN_FORMAT", "RUN_ARTEFACTS", "LANGUAGE_DIR",
           "resolve_device", "CheckpointStore", "scene_checkpoint", "update_metrics", "read_metrics", "load_run",
           "read_json"]

PathLike = Union[str, os.PathLike]
RUN_FORMAT = "langfield-run"
LANGUAGE_DIR = "language"
# everything langfield writes into a run folder (moved aside together by --overwrite)
RUN_ARTEFACTS = ("config.json", "checkpoints", "renders", "metrics.json", "features", "autoencoder.safetensors",
                 "autoencoder.json", "codebook.safetensors", "codebook.json", "language", "trajectory.txt",
                 "keyframes.json", "slam")
LOCK_NAME = ".lock"


class RunError(ValueError):
    """A user error about a run folder or its options (one-line message)."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or parameters; nothing non-finite was written."""

    def __init__(self, message: str, step: int, last_checkpoint_step: Optional[int]):
        super().__init__(message)
        self.step = step
        self.last_checkpoint_step = last_checkpoint_step


def resolve_device(device: Union[str, torch.device, None] = "auto", error=RunError) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device; a clear
    ``error`` when CUDA is asked for and absent. The one copy of this rule."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise error(f"--device must be auto, cpu or cuda, got {device!r}") from None
    if d.type not in ("cpu", "cuda"):
        raise error(f"--device must be auto, cpu or cuda, got {device!r}")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return d


def read_json(path: Path, what: str = "JSON") -> Any:
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: corrupt {what} ({e})") from None


# ------------------------------------------------------------------------------------------
# lock

_held: Dict[str, Tuple[Any, int]] = {}  # resolved lock path -> (file object, depth) held by this process
_held_guard = threading.Lock()


class RunLock:
    """The write lock of a run folder (re-entrant within a process). Use as a context manager
    or :meth:`acquire` / :meth:`release`."""

    def __init__(self, root: PathLike):
        self.path = Path(root) / LOCK_NAME
        self._mine = False

    def holder(self) -> Optional[int]:
        try:
            return int(json.loads(self.path.read_text("utf-8")).get("pid"))
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def acquire(self) -> "RunLock":
        key = str(self.path.resolve())
        with _held_guard:
            if key in _held:
                f, depth = _held[key]
                _held[key] = (f, depth + 1)
                self._mine = True
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
            try:
                _lock_file(f)
            except BlockingIOError:
                f.close()
                pid = self.holder()
                who = f"process {pid}" if pid else "another process"
                raise RunError(f"{self.path.parent} is being written by {who} (lock {self.path}); wait for it to "
                               f"finish, or stop it first") from None
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": _hostname(),
                                "since": datetime.now().isoformat(timespec="seconds")}))
            f.flush()
            _held[key] = (f, 1)
            self._mine = True
            return self

    def release(self) -> None:
        if not self._mine:
            return
        key = str(self.path.resolve())
        with _held_guard:
            f, depth = _held.get(key, (None, 0))
            if f is None:
                return
            if depth > 1:
                _held[key] = (f, depth - 1)
            else:
                del _held[key]
                try:
                    f.seek(0)
                    f.truncate()
                    _unlock_file(f)
                finally:
                    f.close()
        self._mine = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _hostname() -> str:
    import socket

    try:
        return socket.gethostname()
    except OSError:
        return ""


try:
    import fcntl

    def _lock_file(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_file(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _lock_file(f) -> None:
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None

    def _unlock_file(f) -> None:
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


# ------------------------------------------------------------------------------------------
# checkpoints

class CheckpointStore:
    """The checkpoints of one stage (``RUN/checkpoints`` or ``RUN/language/checkpoints``):
    atomic save with rotation, newest-valid lookup with fallback, exact-resume payloads."""

    def __init__(self, folder: PathLike, keep: int = 3):
        self.folder = Path(folder)
        self.keep = int(keep)

    def steps(self) -> List[int]:
        out = []
        if self.folder.is_dir():
            for p in self.folder.glob("ckpt_*.json"):
                s = p.stem[5:]
                if s.isdigit():
                    out.append(int(s))
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.folder / f"ckpt_{int(step):07d}.json"

    def save(self, tensors: Mapping[str, Any], config: Mapping[str, Any], step: int) -> Path:
        p = Path(save_checkpoint(self.folder, tensors, dict(config), int(step)))
        self.rotate()
        return p

    def rotate(self) -> None:
        if self.keep <= 0:
            return
        for s in self.steps()[:-self.keep]:
            for ext in (".json", ".safetensors"):  # JSON first: a reader never finds a JSON without tensors
                try:
                    (self.folder / f"ckpt_{s:07d}{ext}").unlink()
                except FileNotFoundError:
                    pass

    def latest(self, *, quarantine: bool = False, warn: bool = True):
        """``(path, Checkpoint)`` of the newest checkpoint that loads, or ``(None, None)``.
        Broken newer ones are reported (a warning naming each) and, with ``quarantine`` (writers
        only), moved into ``corrupt/`` beside them."""
        for s in reversed(self.steps()):
            p = self.path(s)
            try:
                return p, load_checkpoint(p)
            except FileNotFoundError:
                continue  # rotated away while we looked
            except Exception as e:  # corrupt JSON, truncated tensors, bad header, ...
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                where = ""
                if quarantine:
                    moved = quarantine_checkpoint(p)
                    where = f"; moved to {moved[0].parent}" if moved else ""
                if warn:
                    warnings.warn(f"{p}: unreadable checkpoint ({msg}); using an older one{where}", stacklevel=2)
        return None, None

    def latest_path(self) -> Optional[Path]:
        """The newest checkpoint's path without loading it (may be corrupt; see :meth:`latest`)."""
        st = self.steps()
        return self.path(st[-1]) if st else None


# ------------------------------------------------------------------------------------------
# the folder

class RunFolder:
    """Paths, config, checkpoints, lock and metrics of one run folder."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    # paths
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def language_checkpoints(self) -> Path:
        return self.root / LANGUAGE_DIR / "checkpoints"

    @property
    def renders(self) -> Path:
        return self.root / "renders"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def features(self) -> Path:
        return self.root / "features"

    def lock(self) -> RunLock:
        return RunLock(self.root)

    # config
    def exists(self) -> bool:
        return self.config.is_file()

    def read_config(self) -> Dict[str, Any]:
        if not self.config.is_file():
            raise RunError(f"{self.root}: not a langfield run folder (no config.json)")
        doc = read_json(self.config, "JSON")
        if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
            raise RunError(f"{self.config}: not a langfield run config (no \"format\": \"{RUN_FORMAT}\")")
        return doc

    def write_config(self, doc: Mapping[str, Any]) -> None:
        atomic_write_json(self.config, dict(doc))

    def update_config(self, **sections: Any) -> Dict[str, Any]:
        """Read config.json, set the given top-level sections, write it back; returns it."""
        doc = self.read_config()
        doc.update(sections)
        self.write_config(doc)
        return doc

    # checkpoints
    def store(self, stage: str = "rgb", keep: int = 3) -> CheckpointStore:
        return CheckpointStore(self.language_checkpoints if stage == "language" else self.checkpoints, keep)

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest RGB checkpoint path (no validation; see :meth:`CheckpointStore.latest`)."""
        return self.store("rgb").latest_path()

    def checkpoint_steps(self) -> List[int]:
        return self.store("rgb").steps()

    def has_language(self) -> bool:
        return bool(self.store("language").steps())

    def is_empty_for_new_run(self) -> bool:
        return not self.root.exists() or not any(p.name != LOCK_NAME for p in self.root.iterdir())

    def move_aside(self, names=RUN_ARTEFACTS, prefix: str = "replaced") -> Optional[Path]:
        """Move langfield's artefacts into ``<prefix>-<timestamp>/``; returns that folder."""
        present = [self.root / n for n in names if (self.root / n).exists()]
        if not present:
            return None
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = self.root / f"{prefix}-{stamp}"
        k = 1
        while dest.exists():
            dest = self.root / f"{prefix}-{stamp}-{k}"
            k += 1
        dest.mkdir(parents=True)
        for p in present:
            os.replace(p, dest / p.name)
        return dest


def scene_checkpoint(run: PathLike, *, quarantine: bool = False):
    """The checkpoint a run means: ``(stage, path, Checkpoint)`` with stage ``"language"`` (the
    newest valid language checkpoint) or ``"rgb"``; ``(None, None, None)`` when there is none."""
    rf = RunFolder(run)
    p, ck = rf.store("language").latest(quarantine=quarantine)
    if ck is not None:
        return "language", p, ck
    p, ck = rf.store("rgb").latest(quarantine=quarantine)
    if ck is not None:
        return "rgb", p, ck
    return None, None, None


# ------------------------------------------------------------------------------------------
# metrics

def read_metrics(run: PathLike) -> Dict[str, Any]:
    p = RunFolder(run).metrics
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        warnings.warn(f"{p}: corrupt JSON; starting it again", stacklevel=2)
        return {}
    return doc if isinstance(doc, dict) else {}


def update_metrics(run: PathLike, values: Mapping[str, Any], *, key: Optional[str] = None,
                   replace_top: bool = False) -> Dict[str, Any]:
    """Merge ``values`` into ``metrics.json`` (under ``key``, or at the top level) under a short
    file lock; other keys are kept. ``replace_top``: the top level is replaced by ``values``
    except for the stage keys (``language``, ``slam``, ``dynamic``, ...) already there."""
    from filelock import FileLock

    rf = RunFolder(run)
    rf.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(rf.root / ".metrics.lock"), timeout=60):
        doc = read_metrics(run)
        if key is not None:
            doc[key] = dict(values)
        elif replace_top:
            keep = {k: v for k, v in doc.items() if isinstance(v, dict) and k in _STAGE_KEYS}
            doc = {**dict(values), **{k: v for k, v in keep.items() if k not in values}}
        else:
            doc.update(values)
        atomic_write_json(rf.metrics, doc)
    return doc


_STAGE_KEYS = ("language", "slam", "trajectory", "dynamic", "dynamic_other", "time_sensitive")


# ------------------------------------------------------------------------------------------
# loading a run (render / eval / export)

def load_run(run: PathLike, device: str = "auto", need_data: bool = True):
    """``(doc, gaussians, dataset or None, checkpoint)`` for the checkpoint the run means
    (:func:`scene_checkpoint`). The Gaussians carry ``lang`` when that is a language checkpoint.
    The dataset is loaded (images lazily) when ``need_data``."""
    rf = RunFolder(run)
    if not rf.root.is_dir():
        raise RunError(f"{rf.root}: run folder not found")
    doc = rf.read_config()
    stage, path, ckpt = scene_checkpoint(rf.root)
    if ckpt is None:
        raise RunError(f"{rf.root}: no readable checkpoint in {rf.checkpoints} (train first)")
    dev = resolve_device(device)
    g = model_from_checkpoint(doc, ckpt, dev)
    ds = None
    if need_data:
        ds = load_run_dataset(doc)
    return doc, g, ds, ckpt


# scene-model kinds a run may hold: config.json "model": {"kind": ...}; each class has
# ``from_checkpoint(doc, ckpt, device, requires_grad=False)`` and implements ``activated(t)``
MODEL_KINDS: Dict[str, Tuple[str, str]] = {
    "gaussians": ("langfield.scene", "Gaussians"),
    "deformable": ("langfield.dynamic.model", "DeformableGaussians"),
}


def model_from_checkpoint(doc: Mapping[str, Any], ckpt, device, requires_grad: bool = False):
    """The scene model of a run's checkpoint: static :class:`~langfield.scene.Gaussians`, or the
    kind named in config.json's ``model`` section (a deformable or mapping model registered in
    :data:`MODEL_KINDS`), on ``device``."""
    import importlib

    kind = (doc.get("model") or {}).get("kind", "gaussians")
    if kind not in MODEL_KINDS:
        raise RunError(f"the run's scene model {kind!r} is not known to this langfield "
                       f"(known: {', '.join(MODEL_KINDS)})")
    mod, cls = MODEL_KINDS[kind]
    model_cls = getattr(importlib.import_module(mod), cls)
    return model_cls.from_checkpoint(doc, ckpt, device, requires_grad=requires_grad)


def run_cameras_file(run: PathLike) -> Path:
    """``RUN/cameras.json``: cameras a run carries itself (mapping runs: the keyframes), read by
    query / eval / view when the run's dataset cannot give them."""
    return Path(run) / "cameras.json"


def load_run_dataset(doc: Mapping[str, Any], cache_images: bool = False, verify: bool = False):
    """The dataset a run was trained on, with the run's loading options (the frames its
    training left out as bad images are left out again when ``verify``)."""
    from langfield.train.config import TrainConfig

    data = Path(doc["data"])
    if not data.exists():
        raise RunError(f"the run's dataset {data} is missing (moved or deleted)")
    cfg = TrainConfig.from_dict(doc["train"])
    return open_dataset(data, downscale=cfg.downscale, normalize=cfg.normalize, test_every=cfg.test_every,
                        cache_images=cache_images, verify=verify, skip_bad=cfg.skip_bad_images,
                        allow_outside=cfg.allow_outside)


def open_dataset_in_run_world(doc: Mapping[str, Any], data: PathLike, cache_images: bool = False):
    """Another capture of a run's scene (e.g. the same cameras at other times) with the run's
    loading options, in the run's world and on its time axis: its poses take the normalisation
    the run's own dataset got (``config.json`` ``dataset.transform``), not one of their own, and
    its frame times the run's rescaling of raw times to [0, 1] (``dataset.time_raw_range``, or
    the run's dataset when the config predates it), so that both agree with the trained
    Gaussians. Times outside the run's range are an error (a deformation does not extrapolate)."""
    import numpy as np

    from langfield.data.base import rescale_times
    from langfield.train.config import TrainConfig

    cfg = TrainConfig.from_dict(doc["train"])
    dmeta = doc.get("dataset") or {}
    ds = open_dataset(data, downscale=cfg.downscale, normalize=False, test_every=cfg.test_every,
                      cache_images=cache_images, allow_outside=cfg.allow_outside)
    if cfg.normalize:
        T = dmeta.get("transform")
        if T is None:
            raise RunError("config.json has no dataset.transform (the run's normalisation): another capture "
                           "cannot be put in the run's world")
        try:
            ds = ds.transformed(np.asarray(T, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise RunError(f"config.json dataset.transform: not a 4x4 similarity ({e})") from None
    if not any(f.time is not None for f in ds.frames):
        return ds
    if "time_raw_range" in dmeta:
        rng = dmeta["time_raw_range"]
    else:  # a config from before the range was recorded: the run's dataset says
        try:
            rng = load_run_dataset(doc).meta.get("time_raw_range")
        except RunError:
            if ds.meta.get("time_raw_range") is not None:
                raise RunError(f"{data}: its times are rescaled to [0, 1] and the run's own time range is unknown "
                               f"(its dataset is missing): the two time axes cannot be matched") from None
            rng = None
    lo, hi = (0.0, 1.0) if rng is None else (float(rng[0]), float(rng[1]))
    frames, bad = rescale_times(ds.frames, lo, hi)
    if bad:
        raise RunError(f"{data}: {len(bad)} frame(s) at times outside the run's range [{lo:g}, {hi:g}] "
                       f"(e.g. {bad[0]:g}); a dynamic run is evaluated within the times it was trained on")
    ds.frames = frames
    return ds


def open_dataset(data: PathLike, *, downscale: int = 1, normalize: bool = True, test_every: int = 8,
                 cache_images: bool = True, verify: bool = False, skip_bad: bool = False,
                 allow_outside: bool = False):
    """``langfield.data.load_dataset`` with its errors as one-line :class:`RunError`s.
    ``verify``: check every image now (training does; a bad one fails at once with the list,
    or with ``skip_bad`` its frame is dropped with a warning)."""
    from langfield.data import DatasetError, load_dataset

    if test_every < 1:
        raise RunError(f"--test-every must be >= 1, got {test_every}")
    try:
        return load_dataset(data, downscale=downscale, normalize=normalize, test_every=test_every,
                            background=(1.0, 1.0, 1.0), cache_images=cache_images, verify_images=verify,
                            skip_bad_images=skip_bad and verify, allow_outside=allow_outside)
    except (DatasetError, FileNotFoundError) as e:
        raise RunError(f"cannot load the dataset: {e}") from None
    except OSError as e:
        raise RunError(f"cannot load the dataset {data}: {e.strerror or e}") from None


def stderr(msg: str) -> None:
    print(f"langfield: {msg}", file=sys.stderr)


def iter_stage_checkpoints(run: PathLike) -> Iterator[Tuple[str, Path]]:
    rf = RunFolder(run)
    for stage in ("rgb", "language"):
        st = rf.store(stage)
        for s in st.steps():
            yield stage, st.path(s)
