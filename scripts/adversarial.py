#!/usr/bin/env python
"""The maintained adversarial sweep: broken inputs against the `langfield` CLI.

Builds tiny inputs in a temporary folder (a 4-view 32x32 tabletop scene, a PLY with
language latents and its sidecars, a 30-step run, a labels feature cache), then runs the CLI
as a subprocess for each case and checks:

* ``refuse``: exit status 2, a one-line error (the last stderr line, ``langfield ...: ...``),
  the file or option named (every ``match`` substring in stderr: the error or a warning
  before it), no Python traceback;
* ``ok``: exit status 0, no traceback, the expected warning/note (``match``) and output
  (``check``);
* ``refuse|warn``: either of the two (for cases where a fallback with a warning is as good as
  a refusal, e.g. a damaged newest checkpoint);
* for every case: no file of the inputs changed, appeared or disappeared except under the
  case's declared outputs (each case runs in its own working folder inside the temporary
  folder, with TMPDIR there too).

Prints a table ``case -> ok / FAIL (why)`` and exits 1 on any FAIL. ``known`` cases (a
defect owned elsewhere, with its reason) are shown as KNOWN and do not fail the sweep unless
``--strict``.

Special cases: ``wrap="readonly"`` (as root, setpriv drops the capabilities that bypass file
modes, so a 0555 folder is read-only), ``wrap="fsize:N"`` (RLIMIT_FSIZE with SIGXFSZ ignored:
writes past N bytes fail with EFBIG, as on a full disk), ``wrap="umask:027"``, ``serve=True``
(``view``: started, stopped with SIGINT once it serves), ``after`` (a second step, e.g. kill -9
of a lock holder and the takeover).

    python scripts/adversarial.py                 # every case (about 50; ~10 min on 2 idle cores)
    python scripts/adversarial.py --subset quick  # the pytest wrapper's subset
    python scripts/adversarial.py -k query,render --keep  # cases whose name contains one of these; keep the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ fixtures
class Fixtures:
    """Inputs built on first use under ``root/inputs``."""

    def __init__(self, root: Path):
        self.root = root
        self.inputs = root / "inputs"
        self.inputs.mkdir(parents=True, exist_ok=True)
        self._built: Dict[str, Path] = {}

    def _once(self, key: str, build: Callable[[], Path]) -> Path:
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    @property
    def data(self) -> Path:
        def build():
            out = self.inputs / "tab"
            r = cli(["scenes", "make", "tabletop", "--out", str(out), "--views", "4", "--size", "32x32"], self.inputs)
            if r.returncode != 0:
                raise RuntimeError(f"scenes make failed:\n{r.stderr[-2000:]}")
            return out
        return self._once("data", build)

    @property
    def ply(self) -> Path:
        def build():
            import torch

            from langfield.autoencoder import SceneAutoencoder
            from langfield.io import write_ply
            from langfield.scene import Gaussians

            torch.manual_seed(0)
            n, levels, L, D = 400, ["subpart", "part", "whole"], 3, 64
            means = torch.randn(n, 3) * torch.tensor([1.0, 1.0, 0.2])
            g = Gaussians.from_points(means, torch.rand(n, 3), sh_degree=0, init_opacity=0.8)
            g.set_lang(torch.randn(n, len(levels) * L), requires_grad=False)
            p = self.inputs / "model.ply"
            write_ply(p, g)
            SceneAutoencoder(in_dim=D, encoder_dims=(32, 16), latent_dim=L, decoder_dims=(16, 32)).eval().save(
                p.with_name("model.autoencoder.safetensors"))
            p.with_suffix(".json").write_text(json.dumps({"format": "langfield-ply", "language": {
                "levels": levels, "latent_dim": L, "text": {"type": "offline", "dim": D}}}))
            return p
        return self._once("ply", build)

    @property
    def run(self) -> Path:
        def build():
            out = self.inputs / "run"
            r = cli(["train", str(self.data), "--out", str(out), "--steps", "30", "--ckpt-every", "10", "--device",
                     "cpu", "--quiet"], self.inputs)
            if r.returncode != 0:
                raise RuntimeError(f"train failed:\n{r.stderr[-2000:]}")
            return out
        return self._once("run", build)

    @property
    def data_ho(self) -> Path:
        """4 views, 2 of them held out (split 'test', with queries)."""
        def build():
            out = self.inputs / "tab_ho"
            r = cli(["scenes", "make", "tabletop", "--out", str(out), "--views", "4", "--size", "32x32",
                     "--test-every", "2"], self.inputs)
            if r.returncode != 0:
                raise RuntimeError(f"scenes make failed:\n{r.stderr[-2000:]}")
            return out
        return self._once("data_ho", build)

    @property
    def lang_run(self) -> Path:
        """A run with a language field and two language checkpoints (steps 20 and 30)."""
        def build():
            out = self.inputs / "lrun"
            common = ["--out", str(out), "--device", "cpu", "--quiet", "--features", "labels", "--text-encoder",
                      "offline", "--ae-steps", "20"]
            for args in (["--steps", "20", "--ckpt-every", "10", "--lang-steps", "20"],
                         ["--resume", "--lang-steps", "30"]):
                r = cli(["train", str(self.data_ho), *common, *args], self.inputs)
                if r.returncode != 0:
                    raise RuntimeError(f"train failed:\n{r.stderr[-2000:]}")
            return out
        return self._once("lang_run", build)

    @property
    def features_run(self) -> Path:
        def build():
            out = self.inputs / "frun"
            r = cli(["extract", "--data", str(self.data), "--run", str(out), "--extractor", "labels",
                     "--text-encoder", "offline"], self.inputs)
            if r.returncode != 0:
                raise RuntimeError(f"extract failed:\n{r.stderr[-2000:]}")
            return out
        return self._once("features_run", build)


FSIZE_MAIN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from langfield.cli import main
sys.exit(main(sys.argv[2:]))
"""


def command(args: Sequence[str], wrap: Optional[str] = None) -> List[str]:
    """The argv of ``langfield ARGS``; ``wrap``: "readonly" (file modes are obeyed: as root, the
    capabilities that bypass them are dropped with setpriv) or "fsize:BYTES" (writes beyond
    BYTES fail with EFBIG, as on a full disk)."""
    base = [sys.executable, "-m", "langfield.cli", *map(str, args)]
    if wrap is None:
        return base
    if wrap == "readonly":
        if os.geteuid() != 0:
            return base
        if not shutil.which("setpriv"):
            raise RuntimeError("running as root without setpriv: read-only folders cannot be tested")
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *base]
    if wrap.startswith("umask:"):
        return ["sh", "-c", f"umask {wrap.split(':', 1)[1]} && exec \"$0\" \"$@\"", *base]
    if wrap.startswith("fsize:"):
        return [sys.executable, "-c", FSIZE_MAIN, wrap.split(":", 1)[1], *map(str, args)]
    raise ValueError(wrap)


def _env(cwd: Path) -> Dict[str, str]:
    env = dict(os.environ)
    tmp = cwd / ".tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    env.setdefault("LANGFIELD_CACHE_DIR", os.path.join(tempfile.gettempdir(), "langfield-test-cache"))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    return env


def cli(args: Sequence[str], cwd: Path, timeout: float = 600, wrap: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, wrap), cwd=str(cwd), env=_env(cwd), capture_output=True, text=True,
                          timeout=timeout)


def serve(args: Sequence[str], cwd: Path, ready: str = "open ", timeout: float = 300) -> subprocess.CompletedProcess:
    """Start a server command (``view``), wait until its stdout says ``ready`` (or it exits),
    stop it with SIGINT; exit status 0 when it served."""
    import signal
    import threading

    proc = subprocess.Popen(command(args), cwd=str(cwd), env=_env(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out: List[str] = []
    served = threading.Event()

    def read():
        for line in proc.stdout:
            out.append(line)
            if ready in line:
                served.set()
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t0 = time.perf_counter()
    while not served.is_set() and proc.poll() is None and time.perf_counter() - t0 < timeout:
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    t.join(5)
    err = proc.stderr.read()
    rc = 0 if served.is_set() else (proc.returncode or 1)
    return subprocess.CompletedProcess(args, rc, "".join(out), err)


# ------------------------------------------------------------------------------ cases
@dataclass
class Ctx:
    fx: Fixtures
    work: Path  # the case's own folder (its working directory)


@dataclass
class Case:
    name: str
    argv: Callable[[Ctx], List[str]]  # may set up inputs in ctx.work first
    expect: str  # "refuse" | "ok" | "refuse|warn"
    match: Sequence[str] = ()  # substrings of stderr (ok cases: or of stdout)
    check: Optional[Callable[[Ctx, subprocess.CompletedProcess], Optional[str]]] = None
    quick: bool = False  # in the pytest wrapper's subset
    known: Optional[str] = None  # a defect owned elsewhere: KNOWN instead of FAIL
    wrap: Optional[str] = None  # "readonly" | "fsize:BYTES" (see command())
    serve: bool = False  # a server command (view): started, stopped once it serves
    after: Optional[Callable[[Ctx, subprocess.CompletedProcess], Optional[str]]] = None  # always run; why not ok
    may_write: Sequence[str] = ()  # paths (substrings) a refusal may still change, e.g. a run's config history


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(p: Path, keep: int = 40) -> None:
    p.write_bytes(p.read_bytes()[:keep])


def _query_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _check_distinct(ctx: Ctx, r) -> Optional[str]:
    q = _query_json(ctx.work / "out" / "query.json")["queries"]
    files = {e["heatmap"] for e in q}
    return None if len(files) == 2 and all((ctx.work / "out" / f).is_file() for f in files) else \
        f"heatmaps {sorted(files)}"


def _check_long(ctx: Ctx, r) -> Optional[str]:
    e = _query_json(ctx.work / "out" / "query.json")["queries"][0]
    return None if len(e["heatmap"]) < 80 and (ctx.work / "out" / e["heatmap"]).is_file() else e["heatmap"][:100]


def _check_cache(ctx: Ctx, r) -> Optional[str]:
    from langfield.features import FeatureCache

    bad = FeatureCache(ctx.work / "frun" / "features").verify()
    return None if not bad else f"cache still damaged: {bad}"


def _with_file(ctx: Ctx, name: str, text: str = "precious") -> Path:
    p = ctx.work / name
    p.write_text(text)
    return p


def _corrupt_newest(ctx: Ctx) -> Path:
    run = _copy(ctx.fx.run, ctx.work / "run")
    newest = sorted((run / "checkpoints").glob("ckpt_*.safetensors"))[-1]
    _truncate(newest, 100)
    return run


def _tensors_outside(ctx: Ctx) -> Path:
    run = _copy(ctx.fx.run, ctx.work / "run")
    js = sorted((run / "checkpoints").glob("ckpt_*.json"))[-1]
    st = js.with_suffix(".safetensors")
    shutil.move(str(st), str(ctx.work / "outside.safetensors"))
    doc = json.loads(js.read_text())
    doc["tensors"] = "../../outside.safetensors"
    js.write_text(json.dumps(doc))
    return run


def _damaged_cache(ctx: Ctx) -> List[str]:
    frun = _copy(ctx.fx.features_run, ctx.work / "frun")
    victim = sorted((frun / "features").glob("*.safetensors"))[1]
    _truncate(victim)
    return ["extract", "--data", str(ctx.fx.data), "--run", str(frun), "--extractor", "labels",
            "--text-encoder", "offline"]


def _garbage_manifest(ctx: Ctx) -> List[str]:
    frun = _copy(ctx.fx.features_run, ctx.work / "frun")
    (frun / "features" / "manifest.json").write_text('{"format": 1, "images": ')
    return ["extract", "--data", str(ctx.fx.data), "--run", str(frun), "--extractor", "labels",
            "--text-encoder", "offline"]


# --- #12.8, #12.11, #12.12 inputs
def _nan_ply(ctx: Ctx) -> Path:
    from plyfile import PlyData

    ply = PlyData.read(str(ctx.fx.ply))
    ply["vertex"].data["x"][:7] = float("nan")
    out = ctx.work / "nan.ply"
    ply.write(str(out))
    return out


def _bad_images(ctx: Ctx) -> Path:
    d = _copy(ctx.fx.data, ctx.work / "d")
    _truncate(d / "images" / "frame_00001.png", 100)
    (d / "images" / "frame_00002.png").write_text("not an image")
    return d


def _heldout_jpeg(ctx: Ctx) -> Path:
    """The held-out frame 1 as a truncated JPEG (the final eval reads it after training)."""
    from PIL import Image

    d = _copy(ctx.fx.data_ho, ctx.work / "d")
    jpg = d / "images" / "frame_00001.jpg"
    Image.open(d / "images" / "frame_00001.png").convert("RGB").save(jpg, quality=95)
    _truncate(jpg, jpg.stat().st_size // 2)
    (d / "images" / "frame_00001.png").unlink()
    doc = json.loads((d / "transforms.json").read_text())
    doc["frames"][1]["file_path"] = "images/frame_00001.jpg"
    (d / "transforms.json").write_text(json.dumps(doc))
    return d


def _no_labels(ctx: Ctx) -> Path:
    d = _copy(ctx.fx.data, ctx.work / "d")
    doc = json.loads((d / "transforms.json").read_text())
    for f in doc["frames"]:
        f.pop("label_paths", None)
        f.pop("instance_path", None)
    (d / "transforms.json").write_text(json.dumps(doc))
    shutil.rmtree(d / "labels")
    (d / "labels.json").unlink()
    return d


def _readonly(p: Path) -> Path:
    for d in [p, *p.rglob("*")]:
        if d.is_dir():
            d.chmod(0o555)
    return p


def _readonly_run(ctx: Ctx) -> Path:
    return _readonly(_copy(ctx.fx.run, ctx.work / "run"))


def _fsize_limit(ctx: Ctx) -> int:
    """Bytes that hold config.json but not a checkpoint of the fixture run."""
    ck = ctx.fx.run / "checkpoints"
    return max(p.stat().st_size for p in ck.glob("*.json")) * 8


def _check_ckpts_intact(ctx: Ctx, r) -> Optional[str]:
    a = {p.name: p.read_bytes() for p in (ctx.fx.run / "checkpoints").glob("ckpt_*")}
    b = {p.name: p.read_bytes() for p in (ctx.work / "run" / "checkpoints").glob("ckpt_*")}
    return None if a == b else f"checkpoints changed: {sorted(set(a) ^ set(b)) or 'contents'}"


def _check_metrics(n_views: int):
    def check(ctx: Ctx, r) -> Optional[str]:
        m = json.loads((ctx.work / "run" / "metrics.json").read_text())
        return None if m.get("n_views") == n_views and m.get("psnr") else f"metrics.json: {m.get('n_views')} views"
    return check


def _damaged_newest(ctx: Ctx, run: Path, stage: str) -> Path:
    run = _copy(run, ctx.work / "run")
    folder = run / ("language/checkpoints" if stage == "language" else "checkpoints")
    _truncate(sorted(folder.glob("ckpt_*.safetensors"))[-1], 100)
    return run


def _check_resumed_newest(ctx: Ctx, r) -> Optional[str]:
    ck = sorted((ctx.work / "run" / "checkpoints").glob("ckpt_*.safetensors"))
    corrupt = list((ctx.work / "run" / "checkpoints" / "corrupt").glob("*"))
    from langfield.io.checkpoint import load_checkpoint

    try:
        step = load_checkpoint(ck[-1]).step
    except Exception as e:  # noqa: BLE001
        return f"the newest checkpoint still does not load: {e}"
    return None if step == 30 and corrupt else f"newest step {step}, quarantined {len(corrupt)}"


_BG: Dict[str, subprocess.Popen] = {}


def _two_writers(ctx: Ctx) -> List[str]:
    """A long training holds RUN; the case is a second training into it."""
    run = ctx.work / "run"
    proc = subprocess.Popen(command(["train", ctx.fx.data, "--out", run, "--steps", "100000", "--device", "cpu",
                                     "--quiet", "--no-densify"]), cwd=str(ctx.work), env=_env(ctx.work),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _BG[ctx.work.name] = proc
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 120 and proc.poll() is None:
        if (run / "config.json").is_file() and (run / ".lock").is_file() and str(proc.pid) in \
                (run / ".lock").read_text():
            break
        time.sleep(0.2)
    return ["train", ctx.fx.data, "--out", run, "--steps", "20", "--seed", "1", "--device", "cpu", "--quiet"]


def _two_writers_after(ctx: Ctx, r) -> Optional[str]:
    proc = _BG.pop(ctx.work.name)
    why = None
    if f"process {proc.pid}" not in r.stderr:
        why = f"the holder's PID {proc.pid} is not named: {r.stderr.strip()[-200:]!r}"
    proc.kill()  # kill -9: the lock is left behind, stale
    proc.wait()
    r2 = cli(["train", ctx.fx.data, "--out", ctx.work / "run", "--resume", "--steps", "5", "--device", "cpu",
              "--quiet"], ctx.work)
    if r2.returncode != 0:
        why = (why + "; " if why else "") + f"after kill -9 the lock was not taken over: {r2.stderr.strip()[-200:]!r}"
    return why


def _edited(ctx: Ctx, edit: Callable[[dict], None], name: str = "d") -> Path:
    """A copy of the tabletop scene with its transforms.json changed by ``edit``."""
    d = _copy(ctx.fx.data, ctx.work / name)
    doc = json.loads((d / "transforms.json").read_text())
    edit(doc)
    (d / "transforms.json").write_text(json.dumps(doc))
    return d


def _set_frame0(key: str, value):
    def edit(doc):
        doc["frames"][0][key] = value
    return edit


def _resized(ctx: Ctx, size) -> Path:
    from PIL import Image

    d = _copy(ctx.fx.data, ctx.work / "d")
    im = d / "images" / "frame_00001.png"
    Image.open(im).resize(size).save(im)
    return d


def _images_only(ctx: Ctx) -> Path:
    d = ctx.work / "shots"
    (d / "images").mkdir(parents=True)
    for im in sorted((ctx.fx.data / "images").glob("*.png")):
        shutil.copy(im, d / "images" / im.name)
    return d


def _broken_colmap(ctx: Ctx) -> Path:
    d = _images_only(ctx)
    (d / "sparse" / "0").mkdir(parents=True)
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        (d / "sparse" / "0" / name).write_bytes(bytes(range(64)))
    return d


def _check_modes(ctx: Ctx, r) -> Optional[str]:
    bad = [f"{p.name} {oct(p.stat().st_mode & 0o777)}" for p in (ctx.work / "r").rglob("*")
           if p.is_file() and p.name != ".lock" and p.stat().st_mode & 0o777 != 0o640]
    return f"modes not 0640 under umask 027: {bad[:4]}" if bad else None


def _check_lang_options_kept(ctx: Ctx, r) -> Optional[str]:
    cfg = json.loads((ctx.work / "run" / "config.json").read_text())["language"]["config"]
    return None if (cfg.get("steps"), cfg.get("ae_steps")) == (30, 20) else \
        f"stored language options changed: steps {cfg.get('steps')}, ae_steps {cfg.get('ae_steps')}"


LONG = "the red mug on the table " * 400  # 10,000 characters

CASES: List[Case] = [
    # --- query (#12.3, #12.5, #12.7, #12.11)
    Case("query-ply-orbit-views", lambda c: ["query", c.fx.ply, "red mug", "--out", c.work / "out"], "ok",
         ["no cameras", "--data"], quick=True),
    Case("query-ply-data-cameras", lambda c: ["query", c.fx.ply, "red mug", "--data", c.fx.data, "--out",
                                              c.work / "out"], "ok"),
    Case("query-stems-differ", lambda c: ["query", c.fx.ply, "query", "?", "--out", c.work / "out"], "ok",
         check=_check_distinct),
    Case("query-10000-chars", lambda c: ["query", c.fx.ply, LONG, "--out", c.work / "out"], "ok", check=_check_long),
    Case("query-ply-exists", lambda c: ["query", c.fx.ply, "red mug", "--ply", _with_file(c, "existing.ply"), "--out",
                                        c.work / "out"], "refuse", ["--ply", "existing.ply", "--overwrite"],
         quick=True),
    Case("query-threshold-nan", lambda c: ["query", c.fx.ply, "red mug", "--threshold", "nan"], "refuse",
         ["--threshold nan", "[0, 1]"], quick=True),
    Case("query-threshold-5", lambda c: ["query", c.fx.ply, "red mug", "--threshold", "5"], "refuse",
         ["--threshold 5"]),
    Case("query-out-is-a-file", lambda c: ["query", c.fx.ply, "red mug", "--out", _with_file(c, "afile")], "refuse",
         ["--out", "afile", "is a file"], quick=True),
    Case("query-ply-is-a-folder", lambda c: ["query", c.fx.ply, "red mug", "--ply", c.work], "refuse",
         ["--ply", "is a folder"]),
    Case("query-missing-run", lambda c: ["query", c.work / "nope", "red mug"], "refuse", ["nope", "not found"]),
    # --- checkpoints (#11.7, #12.9)
    Case("query-run-damaged-newest-checkpoint", lambda c: ["query", _corrupt_newest(c), "red mug"], "refuse|warn",
         ["ckpt_"]),
    Case("query-run-tensors-outside-folder", lambda c: ["query", _tensors_outside(c), "red mug"], "refuse",
         ["ckpt_", "'tensors'"]),
    # --- feature cache (#12.10)
    Case("extract-damaged-cache-entry", _damaged_cache, "ok", ["warning", ".safetensors", "recomputing"],
         check=_check_cache, quick=True),
    Case("extract-garbage-manifest", _garbage_manifest, "ok", ["manifest.json", "new manifest"], check=_check_cache),
    Case("extract-missing-dataset", lambda c: ["extract", "--data", c.work / "nodata", "--run", c.work / "r",
                                               "--extractor", "labels", "--text-encoder", "offline"], "refuse",
         ["nodata"]),
    Case("extract-run-is-a-file", lambda c: ["extract", "--data", c.fx.data, "--run", _with_file(c, "runfile"),
                                             "--extractor", "labels", "--text-encoder", "offline"], "refuse",
         ["runfile", "is a file"]),
    # --- #12.12: sizes, non-finite PLYs, bad images (#12.8)
    Case("scenes-make-size-1x1", lambda c: ["scenes", "make", "tabletop", "--out", c.work / "s", "--views", "2",
                                            "--size", "1x1"], "refuse", ["1x1", "8..8192"], quick=True),
    Case("scenes-make-size-0x5", lambda c: ["scenes", "make", "tabletop", "--out", c.work / "s", "--size", "0x5"],
         "refuse", ["0x5"]),
    Case("scenes-make-size-abc", lambda c: ["scenes", "make", "tabletop", "--out", c.work / "s", "--size", "abc"],
         "refuse", ["'abc'", "WIDTHxHEIGHT"]),
    Case("scenes-make-out-read-only", lambda c: ["scenes", "make", "tabletop", "--out",
                                                 _readonly(c.work / "ro") if (c.work / "ro").mkdir() is None else 0,
                                                 "--views", "2", "--size", "16x16"], "refuse",
         ["ro", "Permission denied"], wrap="readonly"),
    Case("train-init-ply-nan", lambda c: ["train", c.fx.data, "--out", c.work / "r", "--steps", "5", "--init-ply",
                                          _nan_ply(c), "--device", "cpu"], "refuse", ["nan.ply", "x in 7"],
         quick=True),
    Case("train-bad-images", lambda c: ["train", _bad_images(c), "--out", c.work / "r", "--steps", "5", "--device",
                                        "cpu"], "refuse", ["frame_00001.png", "frame_00002.png",
                                                           "--skip-bad-images"], quick=True),
    Case("train-skip-bad-images", lambda c: ["train", _bad_images(c), "--out", c.work / "r", "--steps", "5",
                                             "--device", "cpu", "--quiet", "--skip-bad-images"], "ok",
         ["skipping 2 of 4", "frame_00001.png"]),
    Case("train-heldout-jpeg-truncated", lambda c: ["train", _heldout_jpeg(c), "--out", c.work / "run", "--steps",
                                                    "5", "--device", "cpu", "--quiet"], "refuse",
         ["frame_00001.jpg", "truncated"]),
    Case("train-heldout-jpeg-skipped", lambda c: ["train", _heldout_jpeg(c), "--out", c.work / "run", "--steps",
                                                  "5", "--device", "cpu", "--quiet", "--skip-bad-images"], "ok",
         ["frame_00001.jpg", "held-out PSNR"], check=_check_metrics(1)),
    # --- #12.11: options and inputs refused before any work
    Case("train-test-every-negative", lambda c: ["train", c.fx.data, "--out", c.work / "r", "--test-every", "-3"],
         "refuse", ["--test-every", "-3"]),
    Case("train-latent-dim-0", lambda c: ["train", c.fx.data, "--out", c.work / "r", "--features", "labels",
                                          "--latent-dim", "0"], "refuse", ["--latent-dim"]),
    Case("train-labels-without-label-maps", lambda c: ["train", _no_labels(c), "--out", c.work / "r", "--steps", "5",
                                                       "--features", "labels", "--device", "cpu"], "refuse",
         ["--features labels", "label_paths", "dense-clip"], quick=True),
    Case("extract-labels-without-label-maps", lambda c: ["extract", "--data", _no_labels(c), "--run", c.work / "r",
                                                         "--extractor", "labels", "--text-encoder", "offline"],
         "refuse", ["--extractor labels", "label_paths", "dense-clip"]),
    Case("train-sam-clip-without-weights", lambda c: ["train", c.fx.data, "--out", c.work / "r", "--steps", "5",
                                                      "--features", "sam-clip", "--device", "cpu"], "refuse",
         ["--sam-checkpoint"]),
    Case("train-init-ply-is-a-folder", lambda c: ["train", c.fx.data, "--out", c.work / "r", "--init-ply", c.work],
         "refuse", ["--init-ply", "is a folder"]),
    Case("render-out-is-a-file", lambda c: ["render", c.fx.run, "--views", "train", "--out", _with_file(c, "afile"),
                                            "--device", "cpu"], "refuse", ["--out", "afile", "is a file"]),
    Case("render-no-held-out-views", lambda c: ["render", c.fx.run, "--out", c.work / "o", "--device", "cpu"],
         "refuse", ["no test views", "--views"]),
    Case("demo-size-1x1", lambda c: ["demo", "--out", c.work / "demo", "--size", "1x1"], "refuse", ["--size", "1x1"]),
    # --- #12.11: a read-only run folder, a full disk
    Case("train-out-in-read-only-folder", lambda c: ["train", c.fx.data, "--out",
                                                     _readonly(c.work / "ro") / "run" if (c.work / "ro").mkdir()
                                                     is None else 0, "--steps", "5", "--device", "cpu"],
         "refuse", ["--out", "ro/run", "Permission denied"], wrap="readonly"),
    Case("train-resume-read-only-run", lambda c: ["train", c.fx.data, "--out", _readonly_run(c), "--resume",
                                                  "--steps", "40", "--device", "cpu"], "refuse",
         ["run/config.json:", "Permission denied", "intact"], wrap="readonly"),
    Case("train-resume-full-disk", lambda c: ["train", c.fx.data, "--out", _copy(c.fx.run, c.work / "run"),
                                              "--resume", "--steps", "40", "--device", "cpu", "--quiet"], "refuse",
         ["checkpoint of step 40", "run/checkpoints", "step 30 is intact"], wrap="fsize:30000",
         after=_check_ckpts_intact, may_write=["run/config.json"]),
    Case("export-full-disk", lambda c: ["export", c.fx.run, "--ply", c.work / "out.ply"], "refuse",
         ["--ply", "out.ply", "too large"], wrap="fsize:30000"),
    # --- #12.9: a damaged newest checkpoint (RGB or language): warned, the older one used
    Case("train-resume-damaged-newest", lambda c: ["train", c.fx.data, "--out", _damaged_newest(c, c.fx.run, "rgb"),
                                                   "--resume", "--device", "cpu", "--quiet"], "ok",
         ["ckpt_0000030", "unreadable checkpoint"], check=_check_resumed_newest),
    Case("eval-damaged-newest-language", lambda c: ["eval", _damaged_newest(c, c.fx.lang_run, "language"),
                                                    "--device", "cpu"], "ok",
         ["language/checkpoints/ckpt_0000030", "unreadable checkpoint"]),
    Case("query-damaged-newest-language", lambda c: ["query", _damaged_newest(c, c.fx.lang_run, "language"),
                                                     "red mug", "--out", c.work / "q", "--device", "cpu"], "ok",
         ["language/checkpoints/ckpt_0000030", "unreadable checkpoint"]),
    Case("view-damaged-newest-language", lambda c: ["view", _damaged_newest(c, c.fx.lang_run, "language"),
                                                    "--port", "0", "--device", "cpu", "--reload-every", "0"], "ok",
         ["language/checkpoints/ckpt_0000030", "unreadable checkpoint"], serve=True),
    # --- #12.2: two writers of one run folder; the lock of a killed one is taken over
    Case("train-two-writers-one-folder", _two_writers, "refuse", ["is being written by process"],
         after=_two_writers_after, may_write=["run/"]),  # the holder and, after kill -9, the takeover write there
    # --- #12.4, #12.6, #12.11, #12.12: datasets and options
    Case("train-language-resume-keeps-options", lambda c: ["train", c.fx.data_ho, "--out", _copy(c.fx.lang_run,
                                                           c.work / "run"), "--features", "labels", "--resume",
                                                           "--device", "cpu", "--quiet"], "ok",
         ["language"], check=_check_lang_options_kept),
    Case("train-image-smaller-same-aspect", lambda c: ["train", _resized(c, (16, 16)), "--out", c.work / "r",
                                                       "--steps", "3", "--device", "cpu", "--quiet"], "ok",
         ["frame_00001.png is 16x16", "scaling their intrinsics"]),
    Case("train-image-other-aspect", lambda c: ["train", _resized(c, (32, 16)), "--out", c.work / "r", "--steps",
                                                "3", "--device", "cpu"], "refuse",
         ["frame_00001.png", "32x16", "aspect"]),
    Case("train-transforms-w-0", lambda c: ["train", _edited(c, lambda d: d.update(w=0)), "--out", c.work / "r"],
         "refuse", ["transforms.json", "'w'"]),
    Case("train-transforms-w-negative", lambda c: ["train", _edited(c, lambda d: d.update(w=-32)), "--out",
                                                   c.work / "r"], "refuse", ["transforms.json", "'w'"]),
    Case("train-file-path-leaves-dataset", lambda c: ["train", _edited(c, _set_frame0("file_path",
                                                                                     "../../etc/passwd")),
                                                      "--out", c.work / "r"], "refuse",
         ["frames[0].file_path", "leaves the dataset folder"]),
    Case("train-file-path-not-an-image", lambda c: ["train", _edited(c, _set_frame0("file_path", "labels.json")),
                                                    "--out", c.work / "r"], "refuse", ["labels.json", "not an image"]),
    Case("train-images-only-folder", lambda c: ["train", _images_only(c), "--out", c.work / "r"], "refuse",
         ["langfield process"]),
    Case("train-colmap-model-broken", lambda c: ["train", _broken_colmap(c), "--out", c.work / "r"], "refuse",
         ["sparse/0"]),
    Case("train-umask-027", lambda c: ["train", c.fx.data, "--out", c.work / "r", "--steps", "3", "--device", "cpu",
                                       "--quiet"], "ok", ["trained 3 steps"], check=_check_modes, wrap="umask:027"),
    # --- view and process (once exit 1; now one line, exit 2)
    Case("view-missing-run", lambda c: ["view", c.work / "nope", "--port", "0"], "refuse", ["nope", "not found"]),
    Case("process-missing-folder", lambda c: ["process", c.work / "nope", "--out", c.work / "x"], "refuse",
         ["nope", "does not exist"]),
    # --- #12 cases that behave already
    Case("scenes-make-over-existing", lambda c: ["scenes", "make", "tabletop", "--out", _copy(c.fx.data, c.work / "d"),
                                                 "--views", "2", "--size", "16x16"], "refuse", ["--overwrite"]),
    Case("export-ply-exists", lambda c: ["export", c.fx.run, "--ply", _with_file(c, "scene.ply")], "refuse",
         ["scene.ply", "--overwrite"]),
]


# ------------------------------------------------------------------------------ checking
def _snapshot(root: Path) -> Dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and ".tmp" not in p.relative_to(root).parts:
            out[str(p.relative_to(root))] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return out


def run_case(case: Case, fx: Fixtures) -> str:
    """"" when the case passes, else why not."""
    work = fx.root / "cases" / case.name
    work.mkdir(parents=True)
    ctx = Ctx(fx, work)
    argv = [str(a) for a in case.argv(ctx)]
    before = _snapshot(fx.root)
    try:
        r = serve(argv, work) if case.serve else cli(argv, work, wrap=case.wrap)
        post = case.after(ctx, r) if case.after is not None else None
    finally:
        for d in work.rglob("*"):  # read-only folders made by the case: writable again for the clean-up
            if d.is_dir() and not d.is_symlink():
                d.chmod(0o755)
    after = _snapshot(fx.root)
    err = r.stderr
    problems = []
    if case.expect == "ok":
        err = r.stdout + "\n" + err
    if "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in r.stdout:
        problems.append("traceback: " + err.strip().splitlines()[-1][:160])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    named = all(m in err for m in case.match)
    refused = r.returncode == 2 and last.startswith("langfield") and named
    warned = r.returncode == 0 and named
    if case.expect == "refuse" and not refused:
        problems.append(f"exit {r.returncode}, last stderr line {last[:200]!r}, wanted exit 2 naming {list(case.match)}")
    if case.expect == "ok" and not warned:
        problems.append(f"exit {r.returncode}, wanted 0 and {list(case.match)} in stderr: {last[:200]!r}")
    if case.expect == "refuse|warn" and not (refused or warned):
        problems.append(f"exit {r.returncode}: neither a refusal nor a warning naming {list(case.match)}: "
                        f"{last[:200]!r}")
    if case.check is not None and r.returncode == 0 and not problems:
        why = case.check(ctx, r)
        if why:
            problems.append(why)
    if post:
        problems.append(post)
    # nothing changed outside the case's own folder
    prefix = str(Path("cases") / case.name) + os.sep
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not k.startswith(prefix))
    if changed:
        problems.append(f"changed outside its folder: {changed[:5]}")
    # and inside it, the inputs the case set up were not replaced (refusals write nothing)
    if case.expect == "refuse" and r.returncode == 2:
        mine = sorted(k for k in set(before) | set(after) if k.startswith(prefix) and before.get(k) != after.get(k)
                      and not any(m in k for m in case.may_write))
        if mine:
            problems.append(f"a refusal still wrote {mine[:5]}")
    return "; ".join(problems)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=["all", "quick"], default="all")
    ap.add_argument("-k", default=None, help="only cases whose name contains this (or one of these, comma-separated)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--strict", action="store_true", help="KNOWN cases count as FAIL")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if (args.subset == "all" or c.quick) and (args.k is None or any(k in c.name for k in args.k.split(",")))]
    root = Path(tempfile.mkdtemp(prefix="langfield-adversarial-"))
    fx = Fixtures(root)
    rows = []
    t0 = time.perf_counter()
    try:
        for c in cases:
            t = time.perf_counter()
            try:
                why = run_case(c, fx)
            except Exception as e:  # a broken fixture or check is a FAIL of the sweep, not a crash
                why = f"sweep error: {type(e).__name__}: {str(e)[:300]}"
            if why and c.known and not args.strict:
                status = "KNOWN"
                why = f"{c.known} ({why})"
            else:
                status = "FAIL" if why else "ok"
            rows.append((c.name, status, time.perf_counter() - t, why))
            print(f"{c.name:<40} {status:<5} {time.perf_counter() - t:5.1f} s  {why}", flush=True)
    finally:
        if args.keep:
            print(f"inputs and outputs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    fails = [r for r in rows if r[1] == "FAIL"]
    print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.0f} s: {len(rows) - len(fails)} ok or known, "
          f"{len(fails)} FAIL")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
