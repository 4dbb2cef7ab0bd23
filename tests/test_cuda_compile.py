"""The CUDA backend (cuda/cuda/*.cu) compiles and exports the whole C ABI.

Needs only nvcc (no GPU): the library is built with exactly the command the
Python side uses, then `nm -D` must list every function declared with LF_API
in cuda/include/langfield_abi.h, and nothing else of ours except the CUDA
library's own debug switch lf_cuda_set_sync (declared in cuda/cuda/common.cuh,
not in the ABI header: the CPU library has no such symbol; see
LANGFIELD_CUDA_SYNC there). A second, stricter build (sm_90 only, host
-Wall -Wextra, every nvcc warning an error) keeps the sources warning-free.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABI_HEADER = ROOT / "cuda" / "include" / "langfield_abi.h"
CU_SOURCES = sorted((ROOT / "cuda" / "cuda").glob("*.cu"))
# Exported by the CUDA library on top of the ABI (see common.cuh): the run-time
# switch of LANGFIELD_CUDA_SYNC, looked up optionally (ctypes) by scripts/gpu_check.py.
CUDA_EXTRA_EXPORTS = {"lf_cuda_set_sync"}
NVCC = shutil.which("nvcc")
NM = shutil.which("nm")
BUILD_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH"),
]

# The build command of the Python side (static cudart, the nvcc default).
BUILD_FLAGS = [
    "-O3", "-std=c++17", "-shared",
    "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
    "--expt-relaxed-constexpr", "-lineinfo",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=compute_90",
    "-I", "cuda/include",
]

STRICT_FLAGS = [
    "-O3", "-std=c++17", "-shared",
    "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
    "--expt-relaxed-constexpr",
    "-gencode", "arch=compute_90,code=sm_90",
    "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
    "-I", "cuda/include",
]


def abi_functions() -> set[str]:
    """Names of the functions declared with LF_API in the ABI header."""
    text = ABI_HEADER.read_text()
    text = re.sub(r"//[^\n]*", "", text)                        # comments
    text = re.sub(r"^\s*#[^\n]*", "", text, flags=re.MULTILINE)  # preprocessor
    names = set(re.findall(r"\bLF_API\b[^;(]*?\b(lf_\w+)\s*\(", text))
    assert "lf_abi_version" in names and len(names) >= 10, names
    return names


def nvcc(flags: list[str], out: Path) -> subprocess.CompletedProcess:
    assert CU_SOURCES, "no .cu sources under cuda/cuda"
    cmd = [NVCC, *flags, *[str(p.relative_to(ROOT)) for p in CU_SOURCES], "-o", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nvcc took more than {BUILD_TIMEOUT_S} s: {' '.join(cmd)}")
    if proc.returncode != 0:
        print(proc.stdout)
        print(proc.stderr)
    return proc


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cuda_build") / "liblangfield_cuda.so"
    proc = nvcc(BUILD_FLAGS, out)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr}"
    assert out.is_file()
    return out, proc


def test_cuda_library_builds_without_warnings(cuda_library):
    _, proc = cuda_library
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


def test_cuda_library_exports_the_abi(cuda_library):
    if NM is None:
        pytest.skip("nm not on PATH")
    lib, _ = cuda_library
    proc = subprocess.run([NM, "-D", "--defined-only", str(lib)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    exported = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            exported[parts[2]] = parts[1]
    expected = abi_functions()
    missing = sorted(n for n in expected if exported.get(n) != "T")
    assert not missing, f"ABI functions not exported as text symbols: {missing}"
    missing_extra = sorted(n for n in CUDA_EXTRA_EXPORTS if exported.get(n) != "T")
    assert not missing_extra, f"CUDA-only functions not exported: {missing_extra}"
    # -fvisibility=hidden: nothing of ours beyond the ABI (+ the debug switch) leaks out
    extra = sorted(n for n in exported if n.startswith(("lf_", "_ZN3lfc"))
                   and n not in expected and n not in CUDA_EXTRA_EXPORTS)
    assert not extra, f"unexpected exported symbols: {extra}"
    assert not CUDA_EXTRA_EXPORTS & expected, "a CUDA-only symbol moved into the ABI header"


def test_cuda_sources_are_warning_free_under_strict_flags(tmp_path):
    proc = nvcc(STRICT_FLAGS, tmp_path / "liblangfield_cuda_strict.so")
    assert proc.returncode == 0, f"strict nvcc build failed:\n{proc.stderr}"
