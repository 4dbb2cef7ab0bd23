"""Build the native renderer on first use, into a cache keyed by sources and flags.

The CPU library is compiled with the system C++ compiler (``$CXX`` or g++) and
OpenMP; the CUDA library with nvcc when it and a GPU are present. Builds are
keyed by a hash of every source file, the compiler command and the compiler's
version, written atomically (temp file + rename) under a file lock so that two
processes building at once neither clash nor load a half-written library.
``langfield build`` builds ahead of time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["NativeBuildError", "source_dir", "cache_dir", "build_library", "load_library", "library_path",
           "cpu_features", "cli_build"]


class NativeBuildError(RuntimeError):
    """The native library could not be built or loaded."""


def source_dir() -> Path:
    """cuda/ sources: the installed ``langfield.csrc`` package, else the source tree."""
    # langfield.csrc is a data-only (namespace) package: cuda/ has no __init__.py on purpose,
    # so a checkout on sys.path does not shadow NVIDIA's own `cuda` Python package
    import importlib.util

    try:
        spec = importlib.util.find_spec("langfield.csrc")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "include" / "langfield_abi.h").exists():
                return Path(loc).resolve()
    return Path(__file__).resolve().parents[2] / "cuda"  # a checkout without install


def cache_dir() -> Path:
    env = os.environ.get("LANGFIELD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "langfield" / "native"


def _sources(kind: str) -> List[Path]:
    root = source_dir()
    if kind == "cpu":
        return sorted((root / "cpu").glob("*.cpp"))
    return sorted((root / "cuda").glob("*.cu"))


def _headers(kind: str) -> List[Path]:
    root = source_dir()
    own = sorted((root / "cpu").glob("*.h")) if kind == "cpu" else sorted((root / "cuda").glob("*.cuh"))
    return sorted((root / "include").glob("*.h")) + own


def find_cxx() -> Optional[str]:
    for cand in [os.environ.get("CXX"), "g++", "c++", "clang++"]:
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def find_nvcc() -> Optional[str]:
    cands = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += ["nvcc", "/usr/local/cuda/bin/nvcc"]
    for cand in cands:
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _tool_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.strip()
    except Exception:  # pragma: no cover - version is only part of the cache key
        return "unknown"


def cuda_arch_flags() -> List[str]:
    """-gencode flags: $LANGFIELD_CUDA_ARCHS (e.g. "80;90") or the visible GPUs' archs."""
    archs: List[str] = []
    env = os.environ.get("LANGFIELD_CUDA_ARCHS")
    if env:
        archs = [a.strip().replace(".", "") for a in env.replace(",", ";").split(";") if a.strip()]
    else:
        try:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    major, minor = torch.cuda.get_device_capability(i)
                    archs.append(f"{major}{minor}")
        except Exception:
            pass
    if not archs:
        archs = ["80", "90"]
    archs = sorted(set(archs))
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _loaded_openmp_runtimes() -> List[str]:
    """File names of the OpenMP runtimes mapped into this process (Linux; OSError elsewhere)."""
    names = set()
    with open("/proc/self/maps") as f:  # OSError where there is no /proc (macOS, ...)
        for line in f:
            name = os.path.basename(line.split()[-1]) if "/" in line else ""
            if name.startswith(("libgomp", "libiomp", "libomp")):
                names.add(name)
    return sorted(names)


def _use_openmp() -> bool:
    """Build the CPU library with -fopenmp? Only when it would join the runtime already here.

    g++'s -fopenmp links GNU libgomp. With torch's libgomp loaded (pip's Linux torch) our library
    binds to that same copy and shares its threads; with another runtime loaded (Intel's or LLVM's)
    a second one would spin against it, so our own pool is used instead. LANGFIELD_OPENMP=0 or 1
    overrides.
    """
    env = os.environ.get("LANGFIELD_OPENMP", "").strip()
    if env in ("0", "1"):
        return env == "1"
    try:
        loaded = _loaded_openmp_runtimes()
    except OSError:  # cannot tell which runtime torch uses: our own pool is the safe choice
        return False
    return not loaded or all(n.startswith("libgomp") for n in loaded)


def _commands(kind: str, out: Path) -> List[List[str]]:
    """Candidate compile commands, best first (fallbacks drop optional flags)."""
    inc = str(source_dir() / "include")
    srcs = [str(s) for s in _sources(kind)]
    if kind == "cpu":
        cxx = find_cxx()
        if cxx is None:
            raise NativeBuildError("no C++ compiler found (set $CXX or install g++)")
        base = [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden", "-Wno-psabi", "-I", inc]
        tail = srcs + ["-o", str(out)]
        # threads: the process's OpenMP runtime when it is libgomp (shared with torch, see
        # cuda/cpu/parallel.h), else our own pool; each fallback drops an optional flag
        omp = ["-fopenmp"] if _use_openmp() else []
        cmds = [
            base + ["-march=native", "-fno-math-errno"] + omp + ["-pthread"] + tail,
            base + ["-march=native", "-fno-math-errno", "-pthread"] + tail,
            base + ["-pthread"] + tail,
        ]
        return [c for i, c in enumerate(cmds) if c not in cmds[:i]]
    nvcc = find_nvcc()
    if nvcc is None:
        raise NativeBuildError("nvcc not found (set $CUDA_HOME or put nvcc on PATH)")
    return [
        [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
         "--expt-relaxed-constexpr", "-lineinfo", "-I", inc]
        + cuda_arch_flags()
        + srcs
        + ["-o", str(out)]
    ]


@dataclass
class BuildResult:
    kind: str
    path: Path
    built: bool  # False: taken from the cache
    command: List[str]


_cpu_features_cache: Dict[str, str] = {}


def _parse_cpu_features(cpuinfo: str) -> str:
    """The instruction-set flags of the first processor in /proc/cpuinfo text, sorted ("" if none).

    x86 lists them as ``flags``, ARM as ``Features``; the model name alone does not say what a
    virtual machine exposes (AVX-512 may be masked off), and ``-march=native`` uses what it sees.
    """
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features"):
            return " ".join(sorted(set(value.split())))
    return ""


def cpu_features(cxx: Optional[str] = None) -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (cached per process).

    /proc/cpuinfo where there is one; else what the compiler enables for ``-march=native``
    (``-Q --help=target``); else "" (the processor name in the key is all there is).
    """
    if "cpu" in _cpu_features_cache:
        return _cpu_features_cache["cpu"]
    feats = ""
    try:
        with open("/proc/cpuinfo") as f:
            feats = _parse_cpu_features(f.read())
    except OSError:
        pass
    if not feats and cxx:
        try:
            out = subprocess.run([cxx, "-march=native", "-Q", "--help=target"], capture_output=True, text=True,
                                 timeout=60)
            feats = " ".join(line.split()[0] for line in out.stdout.splitlines()
                             if line.strip().startswith("-m") and "[enabled]" in line)
            feats += " " + " ".join(line.strip() for line in out.stdout.splitlines()
                                    if line.strip().startswith(("-march=", "-mtune=")))
        except Exception:  # pragma: no cover - the flags are only part of the cache key
            feats = ""
    _cpu_features_cache["cpu"] = feats.strip()
    return _cpu_features_cache["cpu"]


def _key(kind: str, cmd: List[str], cpu_flags: Optional[str] = None) -> str:
    """Cache key: sources, headers, the command, the compiler's version and the machine.

    A ``-march=native`` build also hashes the CPU's feature flags (``cpu_flags``, default
    :func:`cpu_features`), so a cache shared between machines never hands a library built for
    AVX-512 to a CPU without it (SIGILL).
    """
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(" ".join(c for c in cmd if not c.endswith(".so")).encode())
    h.update(_tool_version(cmd[0]).encode())
    h.update(platform.machine().encode())
    h.update(platform.processor().encode())
    if "-march=native" in cmd:
        h.update(b"\0cpu-features\0")
        h.update((cpu_features(cmd[0]) if cpu_flags is None else cpu_flags).encode())
    for f in _sources(kind) + _headers(kind):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def build_library(kind: str = "cpu", force: bool = False, verbose: bool = False) -> BuildResult:
    """Build (or find in the cache) ``liblangfield_<kind>.so``; kind is "cpu" or "cuda"."""
    from filelock import FileLock

    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    if not _sources(kind):
        raise NativeBuildError(f"no {kind} sources found under {source_dir()}")
    name = f"liblangfield_{kind}.so"
    cmds = _commands(kind, Path(name))
    key = _key(kind, cmds[0])
    folder = cache_dir() / f"{kind}-{key}"
    lib = folder / name
    if lib.exists() and not force:
        return BuildResult(kind, lib, False, cmds[0])
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock"), timeout=1800):
        if lib.exists() and not force:  # built by another process meanwhile
            return BuildResult(kind, lib, False, cmds[0])
        errors = []
        for cmd in cmds:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            cmd = cmd[:-1] + [tmp]
            if verbose:
                print(" ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, lib)
                return BuildResult(kind, lib, True, cmd)
            os.unlink(tmp)
            errors.append(f"$ {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        raise NativeBuildError(f"building the {kind} renderer failed:\n" + "\n".join(errors))


_c = ctypes
_P = _c.c_void_p
_I = _c.c_int
_F = _c.c_float
_I64 = _c.c_int64
_SIGNATURES: Dict[str, list] = {
    "lf_abi_version": [],
    "lf_last_error": [],
    "lf_num_threads": [],
    "lf_project_fwd": [_I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _F, _F, _F, _F, _P, _P, _P, _P, _P, _P],
    "lf_project_bwd": [_I, _I, _P, _P, _P, _P, _P, _I, _I, _F, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P],
    "lf_sh_fwd": [_I, _I, _I, _P, _P, _P, _P, _P],
    "lf_sh_bwd": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P],
    "lf_isect_count": [_I, _I, _P, _P, _I, _I, _I, _P, _P, _P],
    "lf_isect_fill": [_I, _I, _P, _P, _P, _I, _I, _I, _P, _I64, _P, _P, _P, _P],
    "lf_rasterize_fwd": [_I, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _P],
    "lf_rasterize_bwd": [_I, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _P,
                         _P, _P, _P, _P, _P, _P, _P],
    "lf_box_filter": [_I, _I, _I, _I, _P, _P, _P, _P],
}
ABI_VERSION = 1

_loaded: Dict[str, ctypes.CDLL] = {}
_paths: Dict[str, Path] = {}
_failed: Dict[str, str] = {}
_lock = threading.Lock()


def load_library(kind: str = "cpu") -> ctypes.CDLL:
    """Build if needed and load the native library; raises NativeBuildError."""
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise NativeBuildError(_failed[kind])
        try:
            res = build_library(kind)
            lib = ctypes.CDLL(str(res.path))
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = _c.c_char_p if name == "lf_last_error" else _I
            if kind == "cpu":
                lib.lf_cpu_count_nonfinite.argtypes = [_P, _I64]
                lib.lf_cpu_count_nonfinite.restype = _I64
            if lib.lf_abi_version() != ABI_VERSION:
                raise NativeBuildError(f"{res.path}: ABI version {lib.lf_abi_version()} != {ABI_VERSION}")
        except (NativeBuildError, OSError, AttributeError) as e:
            _failed[kind] = str(e)
            raise NativeBuildError(str(e)) from e
        _loaded[kind] = lib
        _paths[kind] = res.path
        return lib


def library_path(kind: str = "cpu") -> Optional[Path]:
    """The file of the loaded ``kind`` library (None until :func:`load_library` succeeded)."""
    return _paths.get(kind)


def native_available(kind: str = "cpu", warn: bool = True) -> bool:
    try:
        load_library(kind)
        return True
    except NativeBuildError as e:
        if warn and kind not in _warned:
            _warned.add(kind)
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unknown error"
            warnings.warn(
                f"langfield: native {kind} renderer unavailable ({first}); using the slower torch backend. "
                "Run `langfield build` for the full compiler output.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False


_warned: set = set()


def cli_build(cuda: Optional[bool] = None, force: bool = False, verbose: bool = False) -> int:
    """Build the native renderer ahead of time and report what was built.

    Args:
        cuda: also build the CUDA library (default: when nvcc is found).
        force: rebuild even when a cached build exists.
        verbose: print the compiler commands.
    """
    import time

    kinds = ["cpu"]
    if cuda or (cuda is None and find_nvcc() is not None):
        kinds.append("cuda")
    status = 0
    for kind in kinds:
        t0 = time.perf_counter()
        try:
            res = build_library(kind, force=force, verbose=verbose)
        except NativeBuildError as e:
            print(f"[{kind}] FAILED\n{e}")
            status = 1
            continue
        dt = time.perf_counter() - t0
        what = f"built in {dt:.1f}s" if res.built else "up to date (cached)"
        print(f"[{kind}] {what}: {res.path}")
        if kind == "cpu":
            lib = ctypes.CDLL(str(res.path))
            how = "OpenMP (shared with torch)" if lib.lf_cpu_openmp() else "own thread pool"
            print(f"[{kind}] threads: {lib.lf_num_threads()}, {how} (set LANGFIELD_NUM_THREADS to change)")
    status = max(status, _report_selftest("cuda" in kinds))
    print(f"cache: {cache_dir()}")
    return status


def _report_selftest(cuda_built: bool) -> int:
    """`langfield build`: run the CUDA self-test afresh on every visible device and print it."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        n = 0
    if n == 0:
        print("[cuda] no CUDA device: self-test not run")
        return 0
    if not cuda_built:
        print("[cuda] library not built: self-test not run")
        return 0
    if os.environ.get("LANGFIELD_SKIP_SELFTEST", "").strip() == "1":
        print("[cuda] self-test skipped (LANGFIELD_SKIP_SELFTEST=1)")
        return 0
    from langfield.render.selftest import ensure_selftest, fallback_backend

    status = 0
    for i in range(n):
        dev = torch.device("cuda", i)
        try:
            load_library("cuda")
        except NativeBuildError as e:
            print(f"[cuda] not loadable: self-test not run ({str(e).strip().splitlines()[0]})")
            return 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # printed here instead
            res = ensure_selftest("cuda", dev, run=True, force=True)
        if res is None:
            print(f"[cuda] {dev}: self-test not run")
            continue
        print(f"[cuda] self-test {res.summary()}")
        if not res.passed:
            print(f"[cuda] backend='auto' on {dev} uses '{fallback_backend(dev)}' instead of CUDA "
                  "(backend='cuda' still forces it)")
            status = 1
    return status
