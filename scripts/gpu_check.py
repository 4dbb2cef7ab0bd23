#!/usr/bin/env python3
"""The GPU check: parity of the CUDA backend with the CPU backend and gsplat 1.5.3, and timings.

Run by ``scripts/gpu_check.sh`` on a CUDA machine (one device call); runnable alone:

    python3 scripts/gpu_check.py [--out DIR] [--cpu-only] [--quick] [--deadline EPOCH]
                                 [--gsplat-status FILE] [--gsplat-deadline EPOCH] [--gsplat-pid PGID]
    python3 scripts/gpu_check.py --build-gsplat --gsplat-status FILE   # background gsplat JIT build

Sections, each check in its own try/except so one failure hides nothing:

1. parity, CUDA vs CPU backend (same process, same inputs): renders and alphas within 1e-4
   (renders scaled by max(1, max|ref|), for depth channels), radii exactly equal, last_ids
   mismatch under 1e-3 of pixels, gradients of means, quats, scales, opacities, colors,
   viewmats and backgrounds (and ``meta["means2d"].absgrad`` for cases with absgrad) within 1e-3
   relative (||a - b|| / ||b||). The loss is <renders, u> + <alphas, v> with random u, v, so the
   backward always sees non-zero v_render_alphas. The CUDA library runs this section with
   lf_cuda_set_sync(1) (LANGFIELD_CUDA_SYNC, see cuda/cuda/common.cuh: a kernel fault is reported
   by the call that launched it) when it exports that switch, and sections 3-4 with it off.
2. parity, CUDA vs gsplat (``backend="gsplat"``) on the same scenes, same tolerances.
3. timings at 1920x1080 with 1M Gaussians, forward and forward+backward (CUDA events, warm-up,
   median of >= 10 repeats, peak memory): RGB, RGB (SH degree 3), RGB+ED, RGB + 9 feature
   channels in one pass; ours vs gsplat, plus gsplat rendering RGB and the 9 features in two
   passes. Targets: ours >= gsplat for RGB, >= 1.3x gsplat's two passes for RGB+features.
4. CPU backend vs CUDA on one small case, for reference.
5. the modes (``scripts/gpu_sections.py``): online mapping frames/s with language at 640x480
   (target >= 5), codebook relevancy parity and frames/s at 1080p with 1M Gaussians (target
   >= 500), dynamic query frames/s at a new time (target >= 100). Each starts only while enough
   time is left before ``--deadline``.

Writes ``$OUT/gpu_check.json`` after every section (so a timeout still leaves numbers) and
prints markdown tables. The exit code is 0 whatever the checks say: read the FAIL lines and
the JSON. ``--cpu-only`` (also chosen automatically without a CUDA device) runs the same code
paths on this machine with the CPU backend standing in for CUDA and the torch reference for
CPU and gsplat, on smaller sizes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

import torch  # noqa: E402

from _util import print_table  # noqa: E402  (bench/_util.py)

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
GRAD_KEYS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "backgrounds", "means2d_absgrad")
FWD_TOL = 1e-4        # renders (scaled by max(1, max|ref|)) and alphas, max abs
GRAD_RTOL = 1e-3      # ||a - b|| / ||b|| per parameter
LAST_IDS_TOL = 1e-3   # fraction of pixels whose last contributor differs
T0 = time.time()


def log(msg: str = "") -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}" if msg else "", flush=True)


def short_exc(e: BaseException) -> str:
    tb = traceback.format_exc()
    msg = str(e)
    if len(msg) > 4000:  # compiler logs: keep the head (command) and the tail (the error)
        msg = msg[:1000] + "\n...\n" + msg[-3000:]
    return f"{type(e).__name__}: {msg}\n{tb[-3000:]}"


def version_of(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except Exception:
        return None


# =============================================================================== results
class Results:
    def __init__(self, path: Path, mode: str):
        self.path = path
        self.data: Dict[str, Any] = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "env": {}, "build": {}, "parity_cpu": [], "parity_gsplat": [],
                                     "gsplat": {}, "timings": [], "ratios": [], "cpu_reference": [],
                                     "errors": [], "summary": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# ================================================================================ scenes
def parity_cases(quick: bool) -> List[Dict[str, Any]]:
    """Small scenes covering channels, cameras, render modes, SH, antialiasing, odd sizes."""
    cases: List[Dict[str, Any]] = []
    for D in (3, 12, 64, 128):
        for C in (1, 3):
            n = 3000 if D <= 12 else 1500
            cases.append(dict(name=f"D{D} C{C} RGB", N=n, C=C, W=64, H=48, D=D, bg=(C == 3), seed=D * 10 + C))
    for mode in RENDER_MODES:
        cases.append(dict(name=f"SH3 C2 {mode}", N=3000, C=2, W=64, H=48, sh=3, mode=mode, bg=True, seed=7))
    cases += [
        dict(name="D12 C3 RGB+ED", N=3000, C=3, W=64, H=48, D=12, mode="RGB+ED", bg=True, seed=11),
        dict(name="D64 C1 RGB+D", N=1500, C=1, W=48, H=40, D=64, mode="RGB+D", bg=True, seed=12),
        dict(name="SH3 C2 antialiased", N=3000, C=2, W=64, H=48, sh=3, aa=True, bg=True, seed=13),
        dict(name="D12 C1 antialiased RGB+ED", N=3000, C=1, W=64, H=48, D=12, aa=True, mode="RGB+ED", seed=14),
        dict(name="1x1 image C2", N=500, C=2, W=1, H=1, D=3, focal=2.0, bg=True, seed=15),
        dict(name="17x33 image C2 D12", N=800, C=2, W=17, H=33, D=12, focal=66.0, seed=16),
        dict(name="N=0 C2", N=0, C=2, W=20, H=10, D=3, bg=True, seed=17),
        dict(name="tile 8, 37x29 SH3", N=2000, C=1, W=37, H=29, sh=3, tile=8, seed=18),
        dict(name="opaque, saturating", N=3000, C=1, W=48, H=48, D=3, scale_range=(0.1, 0.4),
             opacity_range=(0.9, 1.0), seed=19),
        dict(name="dense 50k 128x96 D12 RGB+ED", N=50_000, C=1, W=128, H=96, D=12, mode="RGB+ED",
             scale_range=(0.01, 0.08), seed=20),
        # channel chunks in the CUDA backward (32 wide, narrower for big tiles), absgrad across
        # chunks (its own pass when D > chunk), backgrounds; the alphas are always in the loss
        dict(name="absgrad D3 C2", N=2000, C=2, W=64, H=48, D=3, bg=True, absgrad=True, seed=21),
        dict(name="absgrad D40 C2", N=1500, C=2, W=64, H=48, D=40, bg=True, absgrad=True, seed=22),
        dict(name="D40 C2 bg", N=1500, C=2, W=64, H=48, D=40, bg=True, seed=23),
        dict(name="absgrad D64 C1 bg", N=1500, C=1, W=48, H=40, D=64, bg=True, absgrad=True, seed=24),
        # block sizes: tile^2 padded to a multiple of 32 (25 -> 32, 289 -> 320), 1024 threads
        dict(name="tile 5, 37x29 D12 absgrad", N=2000, C=1, W=37, H=29, D=12, tile=5, bg=True,
             absgrad=True, seed=25),
        dict(name="tile 17, 45x38 D40 absgrad", N=2000, C=2, W=45, H=38, D=40, tile=17, bg=True,
             absgrad=True, seed=26),
        dict(name="tile 32, 70x50 D3 absgrad", N=2000, C=1, W=70, H=50, D=3, tile=32, bg=True,
             absgrad=True, seed=27),
        dict(name="tile 32, 70x50 D17 absgrad", N=2000, C=1, W=70, H=50, D=17, tile=32, bg=True,
             absgrad=True, seed=28),
        dict(name="tile 32, 70x50 D40 bg", N=2000, C=2, W=70, H=50, D=40, tile=32, bg=True, seed=29),
    ]
    if quick:  # the torch reference stands in on the CPU: keep it small
        for c in cases:
            c["N"] = min(c["N"], 800)
    return cases


def make_inputs(cfg: Dict[str, Any]):
    """CPU tensors for a parity case (deterministic in cfg['seed'])."""
    from langfield.render.synthetic import random_scene

    kw = {}
    if "scale_range" in cfg:
        kw["scale_range"] = cfg["scale_range"]
    if "opacity_range" in cfg:
        kw["opacity_range"] = cfg["opacity_range"]
    s = random_scene(cfg["N"], C=cfg["C"], width=cfg["W"], height=cfg["H"], D=cfg.get("D", 3),
                     sh_degree=cfg.get("sh"), seed=cfg["seed"], **kw)
    if "focal" in cfg:
        s.Ks[:, 0, 0] = s.Ks[:, 1, 1] = cfg["focal"]
    g = torch.Generator().manual_seed(cfg["seed"] + 1000)
    D_bg = 3 if cfg.get("sh") is not None else cfg.get("D", 3)
    bg = torch.rand(cfg["C"], D_bg, generator=g) if cfg.get("bg") else None
    return s, bg


def run_case(cfg: Dict[str, Any], backend: str, device: str, upstream=None):
    """Forward + backward of one case; everything returned on the CPU in float64."""
    from langfield.render import rasterization

    s, bg = make_inputs(cfg)
    leaves = {k: getattr(s, k).clone().to(device).requires_grad_(True)
              for k in ("means", "quats", "scales", "opacities", "colors", "viewmats")}
    if bg is not None:
        leaves["backgrounds"] = bg.to(device).requires_grad_(True)
    renders, alphas, meta = rasterization(
        leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["colors"],
        leaves["viewmats"], s.Ks.to(device), s.width, s.height, sh_degree=cfg.get("sh"),
        backgrounds=leaves.get("backgrounds"), render_mode=cfg.get("mode", "RGB"),
        rasterize_mode="antialiased" if cfg.get("aa") else "classic", tile_size=cfg.get("tile", 16),
        absgrad=bool(cfg.get("absgrad")), backend=backend)
    if upstream is None:
        g = torch.Generator().manual_seed(cfg["seed"] + 2000)
        upstream = (torch.randn(renders.shape, generator=g), torch.randn(alphas.shape, generator=g))
    outs = [(t, u.to(device=t.device, dtype=t.dtype)) for t, u in zip((renders, alphas), upstream)
            if t.requires_grad]
    if outs:
        torch.autograd.backward([o for o, _ in outs], [u for _, u in outs])
    res = {
        "renders": renders.detach().double().cpu(),
        "alphas": alphas.detach().double().cpu(),
        "radii": meta["radii"].detach().cpu(),
        "last_ids": meta.get("last_ids").cpu() if meta.get("last_ids") is not None else None,
        "n_isects": int(meta["flatten_ids"].numel()) if meta.get("flatten_ids") is not None else None,
        "grads": {k: (None if v.grad is None else v.grad.double().cpu()) for k, v in leaves.items()},
    }
    if cfg.get("absgrad"):
        ag = getattr(meta["means2d"], "absgrad", None)
        res["grads"]["means2d_absgrad"] = None if ag is None else ag.detach().double().cpu()
    return res, upstream


def set_cuda_sync(on: bool) -> Optional[int]:
    """lf_cuda_set_sync of the CUDA library (LANGFIELD_CUDA_SYNC at run time); None if unavailable.

    Returns the previous setting. The CUDA library reads LANGFIELD_CUDA_SYNC once, when it is
    loaded; this switch works at any time, so parity (synchronised: a kernel fault is reported by
    the call that caused it) and timings (not synchronised) share one process."""
    import ctypes

    from langfield.render._build import load_library

    try:
        fn = getattr(load_library("cuda"), "lf_cuda_set_sync", None)
    except Exception:  # noqa: BLE001 - no CUDA library: nothing to switch
        return None
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return int(fn(1 if on else 0))


def compare(test: Dict[str, Any], ref: Dict[str, Any]) -> Dict[str, Any]:
    """Metrics and the list of failed criteria (empty: pass)."""
    m: Dict[str, Any] = {}
    fails: List[str] = []
    for key in ("renders", "alphas"):
        a, b = test[key], ref[key]
        if a.shape != b.shape:
            fails.append(f"{key} shape {list(a.shape)} != {list(b.shape)}")
            continue
        if a.numel() == 0:
            m[f"{key}_max_abs"] = 0.0
            continue
        diff = (a - b).abs()
        bad_nan = int((~torch.isfinite(a)).sum())
        scale = max(1.0, float(b.abs().max())) if key == "renders" else 1.0
        mx = float(diff.max())
        m[f"{key}_max_abs"] = mx
        m[f"{key}_scale"] = scale
        m[f"{key}_frac_over_tol"] = float((diff > FWD_TOL * scale).double().mean())
        if bad_nan:
            fails.append(f"{key}: {bad_nan} non-finite values")
        if not mx <= FWD_TOL * scale:
            fails.append(f"{key} max abs {mx:.3g} > {FWD_TOL * scale:.3g}")
    ra, rb = test["radii"], ref["radii"]
    if ra.shape != rb.shape:
        fails.append(f"radii shape {list(ra.shape)} != {list(rb.shape)}")
    else:
        n_diff = int((ra.long() != rb.long()).any(dim=-1).sum()) if ra.numel() else 0
        m["radii_mismatch"] = n_diff
        if n_diff:
            fails.append(f"radii differ for {n_diff} (camera, gaussian) pairs")
    if test.get("last_ids") is not None and ref.get("last_ids") is not None and test["last_ids"].numel():
        frac = float((test["last_ids"] != ref["last_ids"]).double().mean())
        m["last_ids_mismatch_frac"] = frac
        if frac > LAST_IDS_TOL:
            fails.append(f"last_ids differ at {frac:.2e} of pixels")
    m["n_isects"] = [test.get("n_isects"), ref.get("n_isects")]
    grads: Dict[str, Any] = {}
    for k in GRAD_KEYS:
        ga, gb = test["grads"].get(k, "absent"), ref["grads"].get(k, "absent")
        if isinstance(ga, str) and isinstance(gb, str):
            continue
        if ga is None and gb is None:
            grads[k] = "none"
            continue
        if isinstance(ga, str) or isinstance(gb, str):
            fails.append(f"grad {k}: present on one side only")
            continue
        note = ""
        if ga is None or gb is None:
            note = "None on " + ("test" if ga is None else "ref") + " side, taken as zeros"
            ga = torch.zeros_like(gb) if ga is None else ga
            gb = torch.zeros_like(ga) if gb is None else gb
        if ga.shape != gb.shape:
            fails.append(f"grad {k} shape {list(ga.shape)} != {list(gb.shape)}")
            continue
        if ga.numel() == 0:
            grads[k] = {"rel": 0.0, "norm": 0.0}
            continue
        nb = float(gb.norm())
        nd = float((ga - gb).norm())
        rel = nd / nb if nb > 1e-12 else nd
        grads[k] = {"rel": rel, "norm": nb, "max_abs": float((ga - gb).abs().max())}
        if note:
            grads[k]["note"] = note
        if not torch.isfinite(ga).all():
            fails.append(f"grad {k}: non-finite values")
        elif not rel <= GRAD_RTOL:
            fails.append(f"grad {k} rel {rel:.3g} > {GRAD_RTOL:g}")
    m["grads"] = grads
    m["worst_grad_rel"] = max([g["rel"] for g in grads.values() if isinstance(g, dict)], default=0.0)
    return {"metrics": m, "fails": fails}


def parity_section(res: Results, name: str, test_be: str, test_dev: str, ref_be: str, ref_dev: str,
                   cases: List[Dict[str, Any]], deadline: float) -> None:
    rows = res.data[name]
    log(f"== {name}: {test_be}@{test_dev} vs {ref_be}@{ref_dev}, {len(cases)} cases")
    for cfg in cases:
        row: Dict[str, Any] = {"case": cfg["name"], "test": test_be, "ref": ref_be, "cfg": cfg}
        if time.time() > deadline:
            row.update(status="SKIP", error="no time left")
            rows.append(row)
            continue
        t0 = time.time()
        try:
            ref, up = run_case(cfg, ref_be, ref_dev)
            test, _ = run_case(cfg, test_be, test_dev, upstream=up)
            cmp = compare(test, ref)
            row.update(cmp["metrics"])
            row["fails"] = cmp["fails"]
            row["status"] = "FAIL" if cmp["fails"] else "PASS"
        except Exception as e:  # noqa: BLE001 - record and go on
            row.update(status="ERROR", error=short_exc(e))
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        if row["status"] == "PASS":
            log(f"  PASS  {cfg['name']:<30} fwd {row.get('renders_max_abs', 0):.2e} "
                f"alpha {row.get('alphas_max_abs', 0):.2e} grad {row.get('worst_grad_rel', 0):.2e}")
        elif row["status"] == "FAIL":
            log(f"  FAIL  {cfg['name']:<30} " + "; ".join(row["fails"]))
        else:
            first = row.get("error", "").strip().splitlines()[0] if row.get("error") else ""
            log(f"  {row['status']} {cfg['name']:<30} {first}")
        res.save()
    table = [{"case": r["case"], "status": r["status"], "renders": r.get("renders_max_abs", ""),
              "alphas": r.get("alphas_max_abs", ""), "radii_diff": r.get("radii_mismatch", ""),
              "last_ids": r.get("last_ids_mismatch_frac", ""), "grad_rel": r.get("worst_grad_rel", ""),
              "s": r.get("seconds", "")} for r in rows]
    print()
    print_table(table, ["case", "status", "renders", "alphas", "radii_diff", "last_ids", "grad_rel", "s"])
    print()


# =========================================================================== gsplat build
def build_gsplat(status_file: Path) -> int:
    """Background job: JIT-build gsplat's extension and run one tiny render; write status."""
    t0 = time.time()

    def write(d):
        d["seconds"] = round(time.time() - t0, 1)
        tmp = status_file.with_name(status_file.name + ".tmp")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, status_file)

    write({"state": "building"})
    try:
        import shutil

        # gsplat's _backend removes its build folder before a build from scratch; with that
        # disabled an interrupted build resumes (ninja) on a rerun on the same warm machine.
        orig = shutil.rmtree
        shutil.rmtree = lambda *a, **k: None
        try:
            from gsplat.cuda._backend import _C
        finally:
            shutil.rmtree = orig
        if _C is None:
            raise RuntimeError("gsplat's CUDA extension is unavailable (no CUDA toolkit found?)")
        import gsplat
        from langfield.render.synthetic import random_scene

        s = random_scene(100, C=1, width=32, height=24).to("cuda")
        r, a, _ = gsplat.rasterization(s.means, s.quats, s.scales, s.opacities, s.colors, s.viewmats, s.Ks,
                                       s.width, s.height)
        torch.cuda.synchronize()
        write({"state": "ok", "version": gsplat.__version__, "tiny_alpha_mean": float(a.mean())})
        print(f"gsplat build ok in {time.time() - t0:.1f}s", flush=True)
        return 0
    except BaseException as e:  # noqa: BLE001
        write({"state": "failed", "error": short_exc(e)})
        traceback.print_exc()
        return 1


def wait_for_gsplat(res: Results, args) -> bool:
    info = res.data["gsplat"]
    info["version_installed"] = version_of("gsplat")
    if args.cpu_only:
        info.update(available=False, reason="cpu-only run")
        return False
    if info["version_installed"] is None:
        info.update(available=False, reason="gsplat is not installed (carry .whl with gsplat-1.5.3)")
        return False
    status_file = Path(args.gsplat_status) if args.gsplat_status else None
    if status_file is None:  # no background build: build here, in-process
        log("gsplat: no background build given; building in this process")
        try:
            from gsplat.cuda._backend import _C

            ok = _C is not None
            info.update(available=ok, reason=None if ok else "gsplat's _C is None")
            return ok
        except Exception as e:  # noqa: BLE001
            info.update(available=False, reason=short_exc(e))
            return False
    t_wait = time.time()
    last = None
    while True:
        st = None
        try:
            st = json.loads(status_file.read_text())
        except Exception:
            pass
        state = (st or {}).get("state")
        if state != last:
            log(f"gsplat build: {state}")
            last = state
        if state == "ok":
            info.update(available=True, build=st, waited_s=round(time.time() - t_wait, 1))
            break
        if state == "failed":
            info.update(available=False, reason="gsplat build failed", build=st)
            return False
        if time.time() > args.gsplat_deadline:
            info.update(available=False, reason=f"gsplat build not done by the deadline "
                                                f"({time.time() - t_wait:.0f}s waited here); status {st}")
            if args.gsplat_pid:
                try:
                    os.killpg(int(args.gsplat_pid), signal.SIGTERM)
                    info["killed_build"] = True
                except Exception as e:  # noqa: BLE001
                    info["kill_error"] = str(e)
            return False
        time.sleep(2)
    try:  # the extension is built: load it here (ninja finds nothing to do)
        t = time.time()
        import gsplat
        from gsplat.cuda._backend import _C

        info["load_s"] = round(time.time() - t, 1)
        info["version"] = gsplat.__version__
        if _C is None:
            info.update(available=False, reason="gsplat's _C is None after the build")
            return False
        return True
    except Exception as e:  # noqa: BLE001
        info.update(available=False, reason="loading the built extension failed: " + short_exc(e))
        return False


# ================================================================================ timings
class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn: Callable[[], Any], warmup: int, repeats: int) -> Dict[str, float]:
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(repeats):
            if self.cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return {"median_ms": statistics.median(ts), "min_ms": ts[0], "max_ms": ts[-1], "repeats": repeats}


class NativePool:
    """High-water mark of the device's default memory pool (our library's cudaMallocAsync)."""

    def __init__(self):
        self.ok = False
        try:
            # the checkout's top-level cuda/ (a package named "cuda") shadows NVIDIA's "cuda"
            # namespace (cuda-bindings) while the repo root is on sys.path: look past it
            mod = sys.modules.get("cuda")
            if mod is not None and str(ROOT) in str(getattr(mod, "__file__", "") or getattr(mod, "__path__", "")):
                del sys.modules["cuda"]
            saved = sys.path[:]
            sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
            try:
                from cuda.bindings import driver as cu
            finally:
                sys.path[:] = saved

            self.cu = cu
            cu.cuInit(0)
            err, dev = cu.cuDeviceGet(torch.cuda.current_device())
            err, self.pool = cu.cuDeviceGetDefaultMemPool(dev)
            self.attr = cu.CUmemPool_attribute.CU_MEMPOOL_ATTR_USED_MEM_HIGH
            self.ok = int(err) == 0
        except Exception:
            pass

    def reset(self):
        if self.ok:
            self.cu.cuMemPoolSetAttribute(self.pool, self.attr, self.cu.cuuint64_t(0))

    def peak_mb(self) -> Optional[float]:
        if not self.ok:
            return None
        err, v = self.cu.cuMemPoolGetAttribute(self.pool, self.attr)
        return int(v) / 2**20 if int(err) == 0 else None


def timing_section(res: Results, args, contenders: Dict[str, str], device: str, gsplat_ok: bool) -> None:
    """1080p cases: ours vs gsplat (or the stand-ins of a CPU-only run)."""
    from langfield.render import rasterization
    from langfield.render.synthetic import random_scene

    cuda = device == "cuda"
    timer = Timer(cuda)
    pool = NativePool() if cuda else None
    N, W, H = args.time_n, args.time_w, args.time_h
    warmup, repeats = args.warmup, args.repeats
    log(f"== timings: N={N} {W}x{H}, warmup {warmup}, median of {repeats}; contenders {contenders}")
    base = random_scene(N, C=1, width=W, height=H, D=12, seed=0, scale_range=(0.002, 0.02), radius=3.0)
    sh = random_scene(N, C=1, width=W, height=H, sh_degree=3, seed=0, scale_range=(0.002, 0.02), radius=3.0)
    dev = lambda t: t.to(device).contiguous()  # noqa: E731
    P = {k: dev(getattr(base, k)) for k in ("means", "quats", "scales", "opacities", "viewmats", "Ks")}
    rgb, feat = dev(base.colors[:, :3]), dev(base.colors[:, 3:])
    shc = dev(sh.colors)

    # case -> list of passes: (colors provider, sh_degree, render_mode); several passes = several renders
    cases = {
        "RGB D=3": dict(passes=[("rgb", None, "RGB")]),
        "RGB SH3": dict(passes=[("sh", 3, "RGB")]),
        "RGB+ED D=3": dict(passes=[("rgb", None, "RGB+ED")]),
        "RGB+9 feats D=12 (1 pass)": dict(passes=[("rgb+feat", None, "RGB")]),
        "RGB, then 9 feats (2 passes)": dict(passes=[("rgb", None, "RGB"), ("feat", None, "RGB")]),
    }
    plan = []  # (case, contender label, backend)
    for case in cases:
        for label, be in contenders.items():
            if label.startswith("gsplat") and not gsplat_ok:
                continue
            two_pass = "2 passes" in case
            if two_pass and not label.startswith("gsplat"):
                continue  # ours renders RGB+features in one pass
            plan.append((case, label, be))

    scene_stats_done = False
    for case, label, be in plan:
        for backward in (False, True):
            row: Dict[str, Any] = {"case": case, "who": label, "backend": be, "pass": "fwd+bwd" if backward else "fwd",
                                   "N": N, "image": f"{W}x{H}"}
            if time.time() > args.deadline - 15:
                row.update(status="SKIP", error="no time left")
                res.data["timings"].append(row)
                continue
            try:
                leaves = {"rgb": rgb, "feat": feat, "sh": shc}
                params = dict(P)
                if backward:
                    params = {k: (v.detach().clone().requires_grad_(True) if k not in ("viewmats", "Ks") else v)
                              for k, v in params.items()}
                    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}

                def render_pass(which, sh_degree, mode):
                    if which == "rgb+feat":
                        colors = torch.cat([leaves["rgb"], leaves["feat"]], dim=-1)
                    else:
                        colors = leaves[which]
                    if be == "gsplat":  # gsplat's own call, as its users make it (its trainer's packed=False)
                        import gsplat

                        return gsplat.rasterization(
                            params["means"], params["quats"], params["scales"], params["opacities"], colors,
                            params["viewmats"], params["Ks"], W, H, sh_degree=sh_degree, render_mode=mode,
                            packed=False)
                    return rasterization(params["means"], params["quats"], params["scales"], params["opacities"],
                                         colors, params["viewmats"], params["Ks"], W, H, sh_degree=sh_degree,
                                         render_mode=mode, backend=be)

                passes = cases[case]["passes"]
                # upstream gradients: random, made once per (case, pass), outside the timed region
                with torch.no_grad():
                    shapes = [render_pass(*p)[:2] for p in passes]
                g = torch.Generator(device="cpu").manual_seed(1)
                ups = [[dev(torch.randn(t.shape, generator=g)) for t in pair] for pair in shapes]
                if not scene_stats_done:
                    with torch.no_grad():
                        r0, a0, m0 = render_pass("rgb", None, "RGB")
                    st = {"mean_alpha": float(a0.float().mean()), "frac_alpha_gt_0.5": float((a0 > 0.5).float().mean()),
                          "visible_frac": float((m0["radii"] > 0).all(-1).float().mean()),
                          "n_isects": int(m0["flatten_ids"].numel()) if m0.get("flatten_ids") is not None
                          else int(m0["isect_ids"].numel()), "backend": be}
                    res.data["scene_1080p"] = st
                    log(f"  scene: mean alpha {st['mean_alpha']:.3f}, visible {st['visible_frac']:.3f}, "
                        f"{st['n_isects']:,} intersections")
                    if st["mean_alpha"] < 0.3:
                        log("  WARNING: the timing scene is mostly empty (mean alpha < 0.3)")
                    scene_stats_done = True
                    del r0, a0, m0
                del shapes

                def step():
                    for (which, shd, mode), (gr, ga) in zip(passes, ups):
                        if backward:
                            r, a, _ = render_pass(which, shd, mode)
                            # the alpha of a second pass repeats the first: a user would not use it
                            torch.autograd.backward([r, a] if which != "feat" else [r], [gr, ga] if which != "feat" else [gr])
                        else:
                            with torch.no_grad():
                                render_pass(which, shd, mode)
                    if backward:
                        for v in list(params.values()) + list(leaves.values()):
                            v.grad = None

                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    mem0 = torch.cuda.memory_allocated()
                    if pool:
                        pool.reset()
                    step()
                    torch.cuda.synchronize()
                    row["torch_peak_mb"] = round((torch.cuda.max_memory_allocated() - mem0) / 2**20, 1)
                    if pool:
                        p = pool.peak_mb()
                        row["native_pool_peak_mb"] = None if p is None else round(p, 1)
                row.update(timer.measure(step, warmup, repeats))
                row["status"] = "OK"
                log(f"  {case:<30} {label:<8} {row['pass']:<8} {row['median_ms']:9.2f} ms "
                    f"(min {row['min_ms']:.2f}) peak {row.get('torch_peak_mb', '-')} MB "
                    f"+ pool {row.get('native_pool_peak_mb', '-')} MB")
            except Exception as e:  # noqa: BLE001
                row.update(status="ERROR", error=short_exc(e))
                log(f"  ERROR {case} {label} {row['pass']}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            res.data["timings"].append(row)
            res.save()
            if cuda:
                torch.cuda.empty_cache()

    # what langfield's input validation (finite checks: one host sync per tensor) costs per call
    try:
        from langfield.render import api

        def chk():
            api._check_inputs(P["means"], P["quats"], P["scales"], P["opacities"], rgb, P["viewmats"], P["Ks"],
                              W, H, None, None)

        res.data["input_checks_ms"] = timer.measure(chk, 2, 10)["median_ms"]
        log(f"  input checks of rasterization(): {res.data['input_checks_ms']:.3f} ms per call")
    except Exception as e:  # noqa: BLE001
        res.data["input_checks_ms"] = short_exc(e)

    # output agreement at full size (ours vs the other contender), one forward
    if gsplat_ok or not cuda:
        other = [b for lbl, b in contenders.items() if lbl.startswith("gsplat")]
        if other:
            try:
                with torch.no_grad():
                    args_ = (P["means"], P["quats"], P["scales"], P["opacities"], torch.cat([rgb, feat], -1),
                             P["viewmats"], P["Ks"], W, H)
                    ro, ao, _ = rasterization(*args_, render_mode="RGB+ED", backend=contenders["ours"])
                    rg, ag, _ = rasterization(*args_, render_mode="RGB+ED", backend=other[0])
                    dr = (ro[..., :-1] - rg[..., :-1]).abs()
                    res.data["full_size_agreement"] = {
                        "vs": other[0], "features_max_abs": float(dr.max()), "alphas_max_abs": float((ao - ag).abs().max()),
                        "features_frac_over_1e-4": float((dr > 1e-4).float().mean()),
                        "depth_max_abs_where_alpha>0.5": float((ro[..., -1] - rg[..., -1]).abs()[ao[..., 0] > 0.5].max())
                        if bool((ao > 0.5).any()) else 0.0}
                    log(f"  full-size agreement: {res.data['full_size_agreement']}")
            except Exception as e:  # noqa: BLE001
                res.data["full_size_agreement"] = {"error": short_exc(e)}

    # ratios: other / ours (> 1: ours faster)
    ours_lbl = "ours"
    other_lbl = next((lbl for lbl in contenders if lbl.startswith("gsplat")), "gsplat")

    def med(case, who, p):
        for r in res.data["timings"]:
            if r["case"] == case and r["who"] == who and r["pass"] == p and r.get("status") == "OK":
                return r["median_ms"]
        return None

    targets = {"RGB D=3": 1.0, "RGB SH3": 1.0, "RGB+ED D=3": 1.0}
    ratios = []
    for p in ("fwd", "fwd+bwd"):
        for case in ("RGB D=3", "RGB SH3", "RGB+ED D=3", "RGB+9 feats D=12 (1 pass)"):
            o, g_ = med(case, ours_lbl, p), med(case, other_lbl, p)
            if o and g_:
                ratios.append({"what": f"{case}: {other_lbl} / ours", "pass": p, "ratio": g_ / o,
                               "target": targets.get(case), "met": (g_ / o >= targets[case]) if case in targets else None})
        o, g2 = med("RGB+9 feats D=12 (1 pass)", ours_lbl, p), med("RGB, then 9 feats (2 passes)", other_lbl, p)
        if o and g2:
            ratios.append({"what": f"RGB+9 feats: {other_lbl} 2 passes / ours 1 pass", "pass": p, "ratio": g2 / o,
                           "target": 1.3, "met": g2 / o >= 1.3})
    res.data["ratios"] = ratios
    res.save()
    print()
    print_table([{k: r.get(k, "") for k in ("case", "who", "pass", "median_ms", "min_ms", "torch_peak_mb",
                                              "native_pool_peak_mb", "status")} for r in res.data["timings"]],
                ["case", "who", "pass", "median_ms", "min_ms", "torch_peak_mb", "native_pool_peak_mb", "status"])
    print()
    if ratios:
        print_table(ratios, ["what", "pass", "ratio", "target", "met"])
        print()


def cpu_reference_section(res: Results, args, cuda: bool) -> None:
    """The CPU backend on one small case (bench/render.py's 100k 640x480), vs CUDA when present."""
    from langfield.render import rasterization
    from langfield.render.synthetic import random_scene

    N, W, H = (100_000, 640, 480) if not args.quick else (20_000, 256, 256)
    log(f"== CPU reference: N={N} {W}x{H} RGB, threads {torch.get_num_threads()}")
    s = random_scene(N, C=1, width=W, height=H, D=3, seed=0, scale_range=(0.005, 0.04), radius=3.0)
    out: Dict[str, Any] = {}
    for be, dev in (("cpu", "cpu"), ("cuda", "cuda")) if cuda else (("cpu", "cpu"),):
        p = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in s.params().items()}
        timer = Timer(dev == "cuda")
        for backward in (False, True):
            if time.time() > args.deadline - 5:
                break
            try:
                q = {k: (v.detach().clone().requires_grad_(True)
                         if isinstance(v, torch.Tensor) and k not in ("viewmats", "Ks") and backward else v)
                     for k, v in p.items()}

                def step():
                    if backward:
                        r, a, _ = rasterization(**q, backend=be)
                        (r.sum() + a.sum()).backward()
                        for v in q.values():
                            if isinstance(v, torch.Tensor):
                                v.grad = None
                    else:
                        with torch.no_grad():
                            rasterization(**q, backend=be)

                t = timer.measure(step, 1, 5 if dev == "cpu" else 10)
                out[f"{be}_{'fwd+bwd' if backward else 'fwd'}_ms"] = t["median_ms"]
                log(f"  {be:<5} {'fwd+bwd' if backward else 'fwd':<8} {t['median_ms']:9.2f} ms")
            except Exception as e:  # noqa: BLE001
                out[f"{be}_{'fwd+bwd' if backward else 'fwd'}_error"] = short_exc(e)
    for p in ("fwd", "fwd+bwd"):
        c, g = out.get(f"cpu_{p}_ms"), out.get(f"cuda_{p}_ms")
        if c and g:
            out[f"cpu_over_cuda_{p}"] = c / g
    res.data["cpu_reference"] = [{"case": f"{N // 1000}k {W}x{H} RGB", **out}]
    res.save()


# =================================================================================== main
def env_section(res: Results, cuda: bool) -> None:
    e = res.data["env"]
    e.update(python=sys.version.split()[0], platform=platform.platform(), cpus=os.cpu_count(),
             torch=torch.__version__, torch_cuda=torch.version.cuda, torch_threads=torch.get_num_threads(),
             gsplat=version_of("gsplat"), numpy=version_of("numpy"), filelock=version_of("filelock"))
    if cuda:
        pr = torch.cuda.get_device_properties(0)
        e.update(gpu=pr.name, sm=f"{pr.major}.{pr.minor}", sms=pr.multi_processor_count,
                 gpu_mem_gb=round(pr.total_memory / 2**30, 1))
        try:
            e["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as ex:  # noqa: BLE001
            e["nvidia_smi"] = str(ex)
    for k in ("LANGFIELD_CUDA_ARCHS", "LANGFIELD_CACHE_DIR", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TORCH_EXTENSIONS_DIR"):
        e[k] = os.environ.get(k)
    log(f"env: {json.dumps({k: v for k, v in e.items() if k != 'nvidia_smi'})}")


def build_section(res: Results, kinds) -> Dict[str, bool]:
    from langfield.render._build import build_library, load_library

    ok = {}
    for kind in kinds:
        t0 = time.time()
        try:
            b = build_library(kind)
            lib = load_library(kind)
            res.data["build"][kind] = {"ok": True, "path": str(b.path), "built_now": b.built,
                                       "seconds": round(time.time() - t0, 1), "command": " ".join(b.command),
                                       "num_threads_or_devices": int(lib.lf_num_threads())}
            ok[kind] = True
            log(f"build {kind}: ok ({'built' if b.built else 'cached'}) {b.path}")
        except Exception as e:  # noqa: BLE001
            res.data["build"][kind] = {"ok": False, "error": short_exc(e)}
            ok[kind] = False
            log(f"FAIL build {kind}: {str(e)[:2000]}")
    res.save()
    return ok


def summarize(res: Results) -> str:
    d = res.data
    s: Dict[str, Any] = {}
    for sec in ("parity_cpu", "parity_gsplat"):
        rows = d[sec]
        cnt = {k: sum(r["status"] == k for r in rows) for k in ("PASS", "FAIL", "ERROR", "SKIP")}
        s[sec] = cnt
    s["gsplat_available"] = d["gsplat"].get("available")
    s["timings_ok"] = sum(r.get("status") == "OK" for r in d["timings"])
    s["timings_total"] = len(d["timings"])
    s["targets"] = {f"{r['what']} [{r['pass']}]": round(r["ratio"], 3) for r in d["ratios"] if r.get("target")}
    s["targets_met"] = all(r["met"] for r in d["ratios"] if r.get("target")) if d["ratios"] else None
    s["elapsed_s"] = round(time.time() - T0, 1)
    d["summary"] = s
    res.save()

    def c(sec):
        x = s[sec]
        return f"{x['PASS']}/{sum(x.values())} pass" + "".join(f", {x[k]} {k}" for k in ("FAIL", "ERROR", "SKIP") if x[k])

    line = (f"GPU_CHECK mode={d['mode']} build={'/'.join(k + ':' + ('ok' if v.get('ok') else 'FAIL') for k, v in d['build'].items())}"
            f" | parity vs CPU: {c('parity_cpu')} | parity vs gsplat: {c('parity_gsplat')}"
            f" | gsplat={'yes' if s['gsplat_available'] else 'no'} | timings {s['timings_ok']}/{s['timings_total']}"
            f" | targets met: {s['targets_met']} | {s['elapsed_s']}s")
    d["summary"]["line"] = line
    res.save()
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--cpu-only", "--dry-run", dest="cpu_only", action="store_true",
                    help="no CUDA: CPU backend stands in for CUDA, torch reference for CPU and gsplat")
    ap.add_argument("--quick", action="store_true", help="smaller parity scenes (implied by --cpu-only)")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds: stop starting work after this")
    ap.add_argument("--gsplat-status", default=None, help="status file of the background gsplat build")
    ap.add_argument("--gsplat-deadline", type=float, default=None, help="epoch seconds: give up waiting for gsplat")
    ap.add_argument("--gsplat-pid", default=None, help="process group of the background build (killed on give-up)")
    ap.add_argument("--build-gsplat", action="store_true", help="be the background gsplat build job")
    ap.add_argument("--time-n", type=int, default=None)
    ap.add_argument("--time-w", type=int, default=None)
    ap.add_argument("--time-h", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: parity_cpu,parity_gsplat,timings,cpu_ref,"
                    "codebook,dynamic,slam")
    args = ap.parse_args(argv)

    if args.build_gsplat:
        if not args.gsplat_status:
            ap.error("--build-gsplat needs --gsplat-status")
        return build_gsplat(Path(args.gsplat_status))

    cuda_dev = torch.cuda.is_available()
    if not cuda_dev and not args.cpu_only:
        log("no CUDA device visible to torch: running the --cpu-only variant")
        args.cpu_only = True
    if args.cpu_only:
        args.quick = True
    now = time.time()
    args.deadline = args.deadline or now + 3600
    args.gsplat_deadline = min(args.gsplat_deadline or now + 360, args.deadline - 60)
    gpu = not args.cpu_only
    args.time_n = args.time_n or (1_000_000 if gpu else 5_000)
    args.time_w = args.time_w or (1920 if gpu else 320)
    args.time_h = args.time_h or (1080 if gpu else 180)
    args.repeats = args.repeats or (15 if gpu else 3)
    args.warmup = args.warmup or (3 if gpu else 1)
    skip = set(filter(None, args.skip.split(",")))

    out = Path(args.out)
    res = Results(out / "gpu_check.json", "gpu" if gpu else "cpu-only")
    res.data["args"] = {k: v for k, v in vars(args).items()}
    try:
        env_section(res, gpu)
    except Exception as e:  # noqa: BLE001
        res.data["errors"].append({"where": "env", "error": short_exc(e)})
    res.save()

    built = build_section(res, ["cpu", "cuda"] if gpu else ["cpu"])
    cases = parity_cases(args.quick)

    # parity with LANGFIELD_CUDA_SYNC on (faults reported by the call that caused them)
    if gpu and built.get("cuda"):
        prev = set_cuda_sync(True)
        res.data["env"]["cuda_sync_parity"] = "unavailable" if prev is None else f"on (was {prev})"
        log(f"CUDA sync after every launch for the parity sections: {res.data['env']['cuda_sync_parity']}")

    # 1. CUDA vs CPU (cpu-only: CPU vs torch reference)
    if "parity_cpu" not in skip:
        try:
            if gpu:
                if built.get("cuda") and built.get("cpu"):
                    parity_section(res, "parity_cpu", "cuda", "cuda", "cpu", "cpu", cases, args.deadline - 200)
                else:
                    res.data["errors"].append({"where": "parity_cpu", "error": "a native library did not build"})
            else:
                parity_section(res, "parity_cpu", "cpu", "cpu", "torch", "cpu", cases, args.deadline - 60)
        except Exception as e:  # noqa: BLE001
            res.data["errors"].append({"where": "parity_cpu", "error": short_exc(e)})

    # 2. gsplat
    gsplat_ok = False
    try:
        gsplat_ok = wait_for_gsplat(res, args)
    except Exception as e:  # noqa: BLE001
        res.data["gsplat"].update(available=False, reason=short_exc(e))
    if not gsplat_ok:
        log(f"gsplat parts skipped: {str(res.data['gsplat'].get('reason'))[:500]}")
    res.save()
    if "parity_gsplat" not in skip:
        try:
            if gpu and gsplat_ok and built.get("cuda"):
                parity_section(res, "parity_gsplat", "cuda", "cuda", "gsplat", "cuda", cases, args.deadline - 150)
            elif not gpu:  # exercise the code path: CPU backend vs torch reference, a few cases
                parity_section(res, "parity_gsplat", "cpu", "cpu", "torch", "cpu", cases[:3], args.deadline - 60)
        except Exception as e:  # noqa: BLE001
            res.data["errors"].append({"where": "parity_gsplat", "error": short_exc(e)})

    # timings without the per-launch synchronisation
    if gpu and built.get("cuda"):
        set_cuda_sync(False)
        res.data["env"]["cuda_sync_timings"] = "off"
    res.save()

    # 3. timings
    if "timings" not in skip:
        try:
            if gpu:
                if built.get("cuda"):
                    timing_section(res, args, {"ours": "cuda", "gsplat": "gsplat"}, "cuda", gsplat_ok)
            else:
                timing_section(res, args, {"ours": "cpu", "gsplat(torch)": "torch"}, "cpu", True)
        except Exception as e:  # noqa: BLE001
            res.data["errors"].append({"where": "timings", "error": short_exc(e)})

    # 4. CPU reference
    if "cpu_ref" not in skip:
        try:
            cpu_reference_section(res, args, gpu and bool(built.get("cuda")))
            if res.data["cpu_reference"]:
                r = res.data["cpu_reference"][0]
                print_table([r], [k for k in r if not k.endswith("_error")])
                print()
        except Exception as e:  # noqa: BLE001
            res.data["errors"].append({"where": "cpu_reference", "error": short_exc(e)})

    # 5. the modes: fastest first, each only with enough time left
    import gpu_sections  # noqa: E402  (scripts/gpu_sections.py)
    for name, need_s, fn in (("codebook", 90, gpu_sections.codebook_section),
                             ("dynamic", 60, getattr(gpu_sections, "dynamic_section", None)),
                             ("slam", 120, gpu_sections.slam_section)):
        if fn is None or name in skip:
            continue
        if time.time() + need_s > args.deadline:
            res.data["errors"].append({"where": name, "error": f"skipped: under {need_s}s left before the deadline"})
            continue
        log(f"\n== {name} ==")
        try:
            fn(res, args, gpu and bool(built.get("cuda")))
        except Exception as e:  # noqa: BLE001
            res.data["errors"].append({"where": name, "error": short_exc(e)})
        res.save()

    line = summarize(res)
    fails = []
    for sec in ("parity_cpu", "parity_gsplat"):
        for r in res.data[sec]:
            if r["status"] in ("FAIL", "ERROR"):
                why = "; ".join(r.get("fails") or []) or ((r.get("error") or "").strip().splitlines() or [""])[0]
                fails.append(f"{sec}: {r['case']}: {r['status']} {why}")
    for b, v in res.data["build"].items():
        if not v.get("ok"):
            fails.append(f"build {b}: FAIL")
    for e in res.data["errors"]:
        fails.append(f"{e['where']}: ERROR " + ((e["error"] or "").strip().splitlines() or [""])[0])
    for r in res.data["ratios"]:
        if r.get("target") and not r.get("met"):
            fails.append(f"target missed: {r['what']} [{r['pass']}] = {r['ratio']:.3f} < {r['target']}")
    if gpu and not res.data["gsplat"].get("available"):
        print(f"\nNOTE gsplat parts skipped: {str(res.data['gsplat'].get('reason'))[:300]}")
    if fails:
        print("\n" + "!" * 80)
        for f in fails:
            print("FAIL " + f)
        print("!" * 80)
    print(f"\nwrote {res.path}")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
