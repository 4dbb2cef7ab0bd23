"""Self-test of a native backend against the pure-torch reference, once per library and device.

The CUDA library is compiled on the user's machine for GPUs nobody here ran it on, so before
``backend="auto"`` trusts it on a device, :func:`ensure_selftest` renders two small
deterministic scenes (SH degree 3 colours; RGB + 33 feature channels, antialiased; both C=2,
RGB+ED, with backgrounds) with it and with the torch reference on the CPU, and compares the
forward pass (renders, alphas, radii) and the gradients of every input (means, quats, scales,
opacities, colours, features, backgrounds, viewmats). A mismatch gives ONE warning naming the
worst quantity; ``resolve_backend("auto", ...)`` then picks gsplat's rasterizer when it is
installed, already built and passes the same test, else the torch reference. An explicit
``backend="cuda"`` keeps using CUDA.

The result is kept in memory for the process and as ``selftest-<device>.json`` next to the
built library (its folder is keyed like the library: sources, flags, compiler), so the next
process neither redoes a failed check nor pays for a passed one. ``LANGFIELD_SKIP_SELFTEST=1``
skips the test; ``LANGFIELD_FORCE_SELFTEST=1`` (or ``langfield build``) runs it again. The CPU
library is never tested automatically (the test suite covers it; its first render must stay
fast), but a failing record for it is honoured the same way.

:func:`selftest` is the comparison itself, generic over the backend, with an injectable render
function so that its failure path is tested on the CPU.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["SelftestResult", "selftest", "ensure_selftest", "selftest_failed", "fallback_backend", "gsplat_ready",
           "record_path", "clear_cache", "FWD_TOL", "GRAD_RTOL"]

FWD_TOL = 1e-4  # renders: max |err| <= FWD_TOL * max(1, max |ref|); alphas: max |err| <= FWD_TOL
GRAD_RTOL = 2e-3  # gradients: max |err| <= GRAD_RTOL * max |ref grad| + 1e-6 (the CPU parity tests use 1e-3)
RADII_FRAC = 1e-3  # radii: at most this fraction of (camera, Gaussian) pairs off, by at most 1 pixel
RECORD_VERSION = 1

GRAD_KEYS = ("means", "quats", "scales", "opacities", "colors", "features", "backgrounds", "viewmats")


@dataclass
class SelftestResult:
    """Outcome of one self-test: ``passed``, the worst quantity and every measured error."""

    kind: str
    device: str
    device_name: str
    passed: bool
    worst: str  # "<case>/<quantity>" with the highest error / tolerance, or "exception"
    error: float
    tolerance: float
    errors: Dict[str, List[float]] = field(default_factory=dict)  # "<case>/<quantity>" -> [error, tolerance]
    exception: Optional[str] = None
    seconds: float = 0.0
    library: Optional[str] = None
    source: str = "run"  # "run" (this process) or "record" (read from the JSON next to the library)

    def summary(self) -> str:
        if self.exception:
            return f"FAILED on {self.device_name}: {self.exception}"
        verdict = "passed" if self.passed else "FAILED"
        return (f"{verdict} on {self.device_name} ({len(self.errors)} quantities; worst {self.worst}: "
                f"error {self.error:.3g}, tolerance {self.tolerance:.3g}; {self.seconds:.2f}s)")

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["record_version"] = RECORD_VERSION
        for k in ("error", "tolerance"):  # JSON has no inf/nan
            d[k] = _finite(d[k])
        d["errors"] = {k: [_finite(a), _finite(b)] for k, (a, b) in d["errors"].items()}
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SelftestResult":
        if not isinstance(d, dict) or d.get("record_version") != RECORD_VERSION:
            raise ValueError("not a self-test record of this version")
        names = {f for f in cls.__dataclass_fields__}
        res = cls(**{k: v for k, v in d.items() if k in names})
        if not isinstance(res.passed, bool) or not isinstance(res.worst, str):
            raise ValueError("malformed self-test record")
        res.error, res.tolerance = float(res.error), float(res.tolerance)
        return res


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else 1e30


# ---------------------------------------------------------------------------------- cases
def _cases(with_features: bool = True) -> List[Tuple[str, Dict[str, Any]]]:
    """The deterministic scenes (CPU tensors): a few hundred Gaussians, C=2, RGB+ED."""
    from langfield.render.synthetic import random_scene

    g = torch.Generator().manual_seed(1234)
    a = random_scene(300, C=2, width=40, height=28, sh_degree=3, seed=101)
    cases = [("sh3", dict(a.params(), sh_degree=3, render_mode="RGB+ED", backgrounds=torch.rand(2, 3, generator=g)))]
    if with_features:
        b = random_scene(300, C=2, width=37, height=29, D=3, seed=102)
        feats = torch.randn(300, 33, generator=g) * 0.5
        cases.append(("features", dict(b.params(), features=feats, render_mode="RGB+ED", rasterize_mode="antialiased",
                                       backgrounds=torch.rand(2, 3, generator=g))))
    return cases


def _run_case(fn: Callable, kw: Dict[str, Any], device: torch.device) -> Dict[str, Tensor]:
    p = {k: (v.detach().to(device).clone().requires_grad_(k in GRAD_KEYS) if isinstance(v, Tensor) else v)
         for k, v in kw.items()}
    out, alpha, meta = fn(**p)
    g = torch.Generator().manual_seed(7)
    wo = torch.randn(tuple(out.shape), generator=g).to(device)
    wa = torch.randn(tuple(alpha.shape), generator=g).to(device)
    loss = (out * wo).sum() + (alpha * wa).sum()
    keys = [k for k in GRAD_KEYS if k in p and isinstance(p[k], Tensor)]
    grads = torch.autograd.grad(loss, [p[k] for k in keys], allow_unused=True)
    res = {"renders": out.detach().float().cpu(), "alphas": alpha.detach().float().cpu(),
           "radii": meta["radii"].detach().cpu()}
    for k, gr in zip(keys, grads):
        if gr is not None:
            res["grad_" + k] = gr.detach().float().cpu()
    return res


def _compare(case: str, test: Dict[str, Tensor], ref: Dict[str, Tensor]) -> Dict[str, List[float]]:
    errs: Dict[str, List[float]] = {}
    inf = float("inf")

    def maxabs(a: Tensor, b: Tensor) -> float:
        if a.shape != b.shape:
            return inf
        if a.numel() == 0:
            return 0.0
        d = (a - b).abs()
        return inf if not torch.isfinite(d).all() else float(d.max())

    r = ref["renders"]
    errs[f"{case}/renders"] = [maxabs(test["renders"], r), FWD_TOL * max(1.0, float(r.abs().max()) if r.numel() else 1.0)]
    errs[f"{case}/alphas"] = [maxabs(test["alphas"], ref["alphas"]), FWD_TOL]
    ra, rb = test["radii"], ref["radii"]
    if ra.shape != rb.shape:
        errs[f"{case}/radii"] = [inf, RADII_FRAC]
    else:
        diff = (ra.long() - rb.long()).abs().amax(dim=-1) if ra.numel() else ra.new_zeros(0)
        frac = float((diff > 0).float().mean()) if diff.numel() else 0.0
        # a radius off by more than a pixel is a bug whatever the fraction
        errs[f"{case}/radii"] = [inf if (diff.numel() and int(diff.max()) > 1) else frac, RADII_FRAC]
    for k in ref:
        if not k.startswith("grad_"):
            continue
        b = ref[k]
        a = test.get(k)
        tol = GRAD_RTOL * (float(b.abs().max()) if b.numel() else 0.0) + 1e-6
        errs[f"{case}/{k}"] = [inf if a is None else maxabs(a, b), tol]
    for k in test:  # a gradient the reference does not have (the test backend invented one)
        if k.startswith("grad_") and k not in ref:
            errs[f"{case}/{k}"] = [float(test[k].abs().max()) if test[k].numel() else 0.0, 1e-6]
    return errs


_tls = threading.local()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            p = torch.cuda.get_device_properties(device)
            return f"{p.name} (sm_{p.major}{p.minor})"
        except Exception:
            return str(device)
    return "cpu"


def selftest(kind: str, device, *, render_fn: Optional[Callable] = None,
             reference_fn: Optional[Callable] = None, reference_device="cpu") -> SelftestResult:
    """Render the self-test scenes with ``kind`` on ``device`` and compare with the torch reference.

    Args:
        kind: "cpu", "cuda" or "gsplat" (gsplat skips the features case it cannot render).
        device: where ``render_fn`` renders.
        render_fn: ``fn(**rasterization_kwargs) -> (renders, alphas, meta)``; default
            ``rasterization(..., backend=kind)``. Injected by tests to check the failure path.
        reference_fn: the same for the reference; default ``rasterization(..., backend="torch")``.
        reference_device: where the reference renders (default CPU: independent of the device).

    Never raises for a rendering error: an exception is a failed result.
    """
    from langfield.render.api import rasterization

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    fn = render_fn or functools.partial(rasterization, backend=kind)
    ref_fn = reference_fn or functools.partial(rasterization, backend="torch")
    ref_dev = torch.device(reference_device)
    t0 = time.perf_counter()
    errors: Dict[str, List[float]] = {}
    exception = None
    prev = getattr(_tls, "running", False)
    _tls.running = True
    try:
        for case, kw in _cases(with_features=kind != "gsplat"):
            ref = _run_case(ref_fn, kw, ref_dev)
            test = _run_case(fn, kw, device)
            errors.update(_compare(case, test, ref))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # a crash of the backend is a failed self-test, not a crash of the caller
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        exception = f"{type(e).__name__}: {first}"[:500]
    finally:
        _tls.running = prev
    dt = time.perf_counter() - t0
    if exception is not None:
        worst, err, tol = "exception", float("inf"), 0.0
    else:
        worst = max(errors, key=lambda k: (errors[k][0] / errors[k][1]) if errors[k][1] > 0 else float("inf"))
        err, tol = errors[worst]
    passed = exception is None and all(e <= t for e, t in errors.values())
    lib = None
    if kind in ("cpu", "cuda"):
        from langfield.render._build import library_path

        p = library_path(kind)
        lib = str(p) if p is not None else None
    return SelftestResult(kind, str(device), _device_name(device), passed, worst, err, tol, errors, exception,
                          round(dt, 4), lib)


# ------------------------------------------------------------------- per process + on disk
_results: Dict[Tuple[str, str], Optional[SelftestResult]] = {}
_warned: set = set()
_lock = threading.Lock()
_gsplat: Dict[str, bool] = {}


def _key(kind: str, device: torch.device) -> Tuple[str, str]:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return kind, str(device)


def record_path(kind: str, device) -> Optional[Path]:
    """``selftest-<device>.json`` in the loaded library's cache folder (None before it is loaded)."""
    from langfield.render._build import library_path

    lib = library_path(kind)
    if lib is None:
        return None
    device = torch.device(device)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", _device_name(device)).strip("-").lower() or "device"
    if device.type == "cuda":
        tag += f"-torch-cuda{torch.version.cuda or 'none'}"
    return lib.parent / f"selftest-{tag}.json"


def _read_record(path: Optional[Path]) -> Optional[SelftestResult]:
    if path is None or not path.is_file():
        return None
    try:
        res = SelftestResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # unreadable or foreign: run the test again
        return None
    res.source = "record"
    return res


def _write_record(path: Optional[Path], res: SelftestResult) -> None:
    if path is None:
        return
    from langfield.io.checkpoint import atomic_write_json

    try:
        atomic_write_json(path, res.to_json(), indent=1)
    except OSError as e:  # a read-only cache: the result still holds for this process
        warnings.warn(f"langfield: could not record the self-test result in {path}: {e}", RuntimeWarning,
                      stacklevel=3)


def ensure_selftest(kind: str, device, *, run: Optional[bool] = None, force: bool = False,
                    render_fn: Optional[Callable] = None) -> Optional[SelftestResult]:
    """The self-test result of ``kind`` on ``device`` for this process, computing it at most once.

    Order: this process's result; else the JSON record next to the library; else, when ``run``
    (default: for "cuda" only), the test itself, recorded in both places. ``force`` (or
    LANGFIELD_FORCE_SELFTEST=1) skips the record. None when skipped (LANGFIELD_SKIP_SELFTEST=1),
    not run, or asked for from inside a running self-test. A failure warns once per process.
    """
    if os.environ.get("LANGFIELD_SKIP_SELFTEST", "").strip() == "1":
        return None
    device = torch.device(device)
    key = _key(kind, device)
    if not force and key in _results:
        return _results[key]
    if getattr(_tls, "running", False):
        return None  # the self-test's own renders
    if run is None:
        run = kind == "cuda"
    force = force or os.environ.get("LANGFIELD_FORCE_SELFTEST", "").strip() == "1"
    with _lock:
        if not force and key in _results:
            return _results[key]
        path = record_path(kind, device)
        res = None if force else _read_record(path)
        if res is None and run:
            res = selftest(kind, device, render_fn=render_fn)
            _write_record(path, res)
        if res is not None or not run:
            _results[key] = res
    if res is not None and not res.passed and key not in _warned:
        _warned.add(key)
        fb = fallback_backend(device) if kind == "cuda" else "torch"
        warnings.warn(
            f"langfield: the native {kind} renderer FAILED its self-test on {res.device_name}: {res.worst} "
            f"differs from the torch reference by {res.error:.3g} (tolerance {res.tolerance:.3g})"
            + (f" [{res.exception}]" if res.exception else "")
            + f"; backend='auto' uses '{fb}' instead (backend='{kind}' still forces it). Please report this; "
              "LANGFIELD_FORCE_SELFTEST=1 or `langfield build` checks again.",
            RuntimeWarning, stacklevel=3)
    return res


def selftest_failed(kind: str, device) -> bool:
    """True when ``kind`` has a failed self-test on ``device`` (runs it first for CUDA)."""
    res = _results.get(_key(kind, device)) if _key(kind, device) in _results else ensure_selftest(kind, device)
    return res is not None and not res.passed


def gsplat_ready(device) -> bool:
    """gsplat's CUDA rasterizer is installed, already compiled (never starts its JIT build here)
    and passes the self-test on ``device``. Cached per device."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    key = str(_key("gsplat", device)[1])
    if key in _gsplat:
        return _gsplat[key]
    ok = False
    try:
        import importlib.util

        if importlib.util.find_spec("gsplat") is not None:
            built = importlib.util.find_spec("gsplat.csrc") is not None
            if not built:
                from torch.utils.cpp_extension import _get_build_directory

                d = Path(_get_build_directory("gsplat_cuda", verbose=False))
                built = (d / "gsplat_cuda.so").exists()
            if built:
                from gsplat.cuda._backend import _C

                ok = _C is not None
        if ok:
            ok = selftest("gsplat", device).passed
    except Exception:
        ok = False
    _gsplat[key] = ok
    return ok


def fallback_backend(device, needs_features: bool = False) -> str:
    """What ``backend="auto"`` uses instead of a native backend that failed its self-test."""
    device = torch.device(device)
    if device.type == "cuda" and not needs_features and gsplat_ready(device):
        return "gsplat"
    return "torch"


def clear_cache() -> None:
    """Forget this process's results (tests; records on disk stay)."""
    with _lock:
        _results.clear()
        _warned.clear()
        _gsplat.clear()
