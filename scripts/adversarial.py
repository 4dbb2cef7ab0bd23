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

    python scripts/adversarial.py                 # every case (about a minute on 2 cores)
    python scripts/adversarial.py --subset quick  # the pytest wrapper's subset
    python scripts/adversarial.py -k query --keep # cases whose name contains "query"; keep the folder
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
from dataclasses import dataclass, field
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
            r = cli(["train", str(self.data), "--out", str(out), "--steps", "30", "--device", "cpu"], self.inputs)
            if r.returncode != 0:
                raise RuntimeError(f"train failed:\n{r.stderr[-2000:]}")
            return out
        return self._once("run", build)

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


def cli(args: Sequence[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    tmp = cwd / ".tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    env.setdefault("LANGFIELD_CACHE_DIR", os.path.join(tempfile.gettempdir(), "langfield-test-cache"))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "langfield.cli", *map(str, args)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)


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


LONG = "the red mug on the table " * 400  # 10,000 characters

CASES: List[Case] = [
    # --- query (#12.3, #12.5, #12.7, #12.11)
    Case("query-ply-orbit-views", lambda c: ["query", c.fx.ply, "red mug", "--out", c.work / "out"], "ok",
         ["no cameras", "--data"], quick=True),
    Case("query-ply-data-cameras", lambda c: ["query", c.fx.ply, "red mug", "--data", c.fx.data, "--out",
                                              c.work / "out"], "ok"),
    Case("query-stems-differ", lambda c: ["query", c.fx.ply, "query", "?", "--out", c.work / "out"], "ok",
         check=_check_distinct, quick=True),
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
    # --- #12 cases that behave already
    Case("scenes-make-over-existing", lambda c: ["scenes", "make", "tabletop", "--out", _copy(c.fx.data, c.work / "d"),
                                                 "--views", "2", "--size", "16x16"], "refuse", ["--overwrite"]),
    Case("export-ply-exists", lambda c: ["export", c.fx.run, "--ply", _with_file(c, "scene.ply")], "refuse",
         ["scene.ply", "--overwrite"], known="train/cli.py's _fail exits with status 1 (SystemExit(str)), not 2"),
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
    r = cli(argv, work)
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
    # nothing changed outside the case's own folder
    prefix = str(Path("cases") / case.name) + os.sep
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not k.startswith(prefix))
    if changed:
        problems.append(f"changed outside its folder: {changed[:5]}")
    # and inside it, the inputs the case set up were not replaced (refusals write nothing)
    if case.expect == "refuse" and r.returncode == 2:
        mine = sorted(k for k in set(before) | set(after) if k.startswith(prefix) and before.get(k) != after.get(k))
        if mine:
            problems.append(f"a refusal still wrote {mine[:5]}")
    return "; ".join(problems)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=["all", "quick"], default="all")
    ap.add_argument("-k", default=None, help="only cases whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--strict", action="store_true", help="KNOWN cases count as FAIL")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if (args.subset == "all" or c.quick) and (args.k is None or args.k in c.name)]
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
