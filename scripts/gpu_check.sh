#!/usr/bin/env bash
# The GPU check in one command: build, parity (CUDA vs CPU, CUDA vs gsplat 1.5.3), timings.
#
#   bash scripts/gpu_check.sh          # from the repo root, on a CUDA machine
#
# Results under $OUT (default ./gpu_check_out): gpu_check.log (everything printed here),
# gsplat_build.log (gsplat's JIT build), gpu_check.json (all numbers; see scripts/gpu_check.py),
# pytest_gpu.log / pytest_gpu.xml (`pytest -m gpu`, tests/test_gpu.py).
# Wheels for packages the machine lacks are installed from .whl/ when present
# (scripts/fetch_gpu_wheels.sh makes it; name ".whl" in the device call's carry).
#
# Time: everything ends within GPU_CHECK_TOTAL_S (default 530 s) so that the whole check fits
# one 10-minute device call; gsplat's build (started first, in the background, overlapping our
# build and the CPU parity checks) gets until GPU_CHECK_GSPLAT_S (default 360 s) after the
# start, then the gsplat parts are skipped and recorded as such. An interrupted gsplat build
# resumes where it stopped when this is run again on the same (still warm) machine.
# Without a CUDA device it runs the CPU-only variant (a dry run of the same code paths).
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

START=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-530}
GSPLAT_S=${GPU_CHECK_GSPLAT_S:-360}
DEADLINE=$((START + TOTAL_S))
GS_DEADLINE=$((START + GSPLAT_S))
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export LANGFIELD_CUDA_ARCHS=${LANGFIELD_CUDA_ARCHS:-90}
export LANGFIELD_CACHE_DIR=${LANGFIELD_CACHE_DIR:-/tmp/langfield-cache}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # gsplat's JIT build: H200 only
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
# one CUDA toolkit for our build and torch's JIT (gsplat): /usr/local/cuda unless set
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if ! command -v nvcc >/dev/null && [ -n "${CUDA_HOME:-}" ]; then export PATH=$CUDA_HOME/bin:$PATH; fi
GS_STATUS=/tmp/gsplat_build_status.json
GS_PID=""

step() { echo; echo "=== [$(($(date +%s) - START))s] $*"; }
left() { echo $((DEADLINE - $(date +%s))); }
cleanup() {
  if [ -n "$GS_PID" ] && kill -0 "$GS_PID" 2>/dev/null; then
    echo "stopping the background gsplat build (process group $GS_PID)"
    kill -TERM -- "-$GS_PID" 2>/dev/null
    sleep 1
    kill -KILL -- "-$GS_PID" 2>/dev/null
  fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ a. environment
step "environment"
uname -a
echo "cpus: $(nproc)"; free -g 2>/dev/null | head -2; df -h /tmp 2>/dev/null | tail -1
timeout 30 nvidia-smi || echo "nvidia-smi: not available"
timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>/dev/null
echo "nvcc: $(command -v nvcc || echo 'not found')  CUDA_HOME=${CUDA_HOME:-unset}"
timeout 30 nvcc --version 2>/dev/null | tail -2
g++ --version 2>/dev/null | head -1
timeout 120 "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, f'sm_{p.major}{p.minor}', p.multi_processor_count, 'SMs', round(p.total_memory / 2**30, 1), 'GiB')
"
HAVE_GPU=0
if timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAVE_GPU=1
fi
echo "HAVE_GPU=$HAVE_GPU"

# ------------------------------------------------------------------ b. carried wheels
step "wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  ls .whl/
  if timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "FAIL: installing the carried wheels failed; going on without them"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  fi
else
  echo "no .whl/ folder: nothing to install (gsplat parts need gsplat; see scripts/fetch_gpu_wheels.sh)"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
echo "PYTHONPATH=$PYTHONPATH"
timeout 60 "$PY" -c "
import importlib.metadata as m
for p in ('gsplat', 'jaxtyping', 'rich', 'ninja', 'numpy', 'filelock', 'tyro', 'plyfile', 'safetensors', 'tqdm', 'pytest'):
    try: print(f'  {p} {m.version(p)}')
    except Exception: print(f'  {p} MISSING')
"

# ------------------------------------------------------------------ c. gsplat's JIT build, in the background
step "gsplat JIT build in the background (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, until +${GSPLAT_S}s)"
rm -f "$GS_STATUS"
GS_ARGS=()
if [ "$HAVE_GPU" = 1 ] && timeout 60 "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gsplat') is None)"; then
  set -m   # its own process group, so that ninja and nvcc stop with it
  timeout -s TERM $((GSPLAT_S + 30)) "$PY" scripts/gpu_check.py --build-gsplat --gsplat-status "$GS_STATUS" \
    >"$OUT/gsplat_build.log" 2>&1 &
  GS_PID=$!
  set +m
  echo "started (pid/pgid $GS_PID); log: $OUT/gsplat_build.log"
  GS_ARGS=(--gsplat-status "$GS_STATUS" --gsplat-deadline "$GS_DEADLINE" --gsplat-pid "$GS_PID")
else
  echo "skipped (no GPU or gsplat not importable)"
fi

# ------------------------------------------------------------------ d. our native libraries
step "build: CPU (g++) and CUDA (nvcc, LANGFIELD_CUDA_ARCHS=$LANGFIELD_CUDA_ARCHS) libraries, cache $LANGFIELD_CACHE_DIR"
build_one() {
  timeout "$2" "$PY" -c "
import time, sys
from langfield.render._build import build_library, NativeBuildError
t = time.time()
try:
    r = build_library('$1', verbose=True)
except NativeBuildError as e:
    print('[$1] FAILED'); print(e); sys.exit(1)
print(f'[$1] {\"built\" if r.built else \"cached\"} in {time.time() - t:.1f}s: {r.path}')
"
}
BUILD_CPU=fail; BUILD_CUDA=skip
build_one cpu 240 & P_CPU=$!
if command -v nvcc >/dev/null; then
  build_one cuda 300 & P_CUDA=$!
  if wait $P_CUDA; then BUILD_CUDA=ok; else BUILD_CUDA=fail; fi
fi
if wait $P_CPU; then BUILD_CPU=ok; fi
echo "build: cpu=$BUILD_CPU cuda=$BUILD_CUDA"

# ------------------------------------------------------------------ e. parity and timings
HAS_GPU_TESTS=0
grep -rqE "mark\.gpu|marks=.*gpu" tests/ 2>/dev/null && HAS_GPU_TESTS=1
PYTEST_S=${GPU_CHECK_PYTEST_S:-150}   # the pytest step's share of the total
RESERVE=5; [ "$HAS_GPU_TESTS" = 1 ] && RESERVE=$((PYTEST_S + 10))
PY_S=$(($(left) - RESERVE))
step "scripts/gpu_check.py (at most ${PY_S}s)"
PY_RC=skipped
if [ "$PY_S" -gt 30 ]; then
  timeout -s TERM --kill-after=10 "$PY_S" "$PY" scripts/gpu_check.py --out "$OUT" \
    --deadline $(($(date +%s) + PY_S - 10)) "${GS_ARGS[@]}" ${GPU_CHECK_ARGS:-}
  PY_RC=$?
  [ "$PY_RC" = 124 ] && echo "FAIL: scripts/gpu_check.py ran out of time (partial results are in gpu_check.json)"
else
  echo "FAIL: no time left for scripts/gpu_check.py"
fi
cleanup   # the gsplat build must not outlive the check (it may rebuild under pytest)
GS_PID=""

# ------------------------------------------------------------------ f. pytest -m gpu
# the gpu-marked tests (tests/test_gpu.py: CUDA vs CPU vs torch reference, self-test, gsplat
# parity) with LANGFIELD_REQUIRE_GPU=1, so that a GPU torch cannot see fails instead of
# skipping; without a GPU, the CPU dry-run variants of the same tests. Full output in
# $OUT/pytest_gpu.log, JUnit XML in $OUT/pytest_gpu.xml, the verdict in the summary line.
PYTEST=none
if [ "$HAS_GPU_TESTS" = 1 ]; then
  T=$(($(left) - 3)); [ "$T" -gt "$PYTEST_S" ] && T=$PYTEST_S
  if [ "$HAVE_GPU" = 1 ]; then
    PT_ARGS=(-m gpu tests/); PT_ENV="LANGFIELD_REQUIRE_GPU=1"
  else
    PT_ARGS=(tests/test_gpu.py); PT_ENV="LANGFIELD_REQUIRE_GPU=0"
  fi
  step "pytest -q ${PT_ARGS[*]} ($PT_ENV, at most ${T}s) -> $OUT/pytest_gpu.log"
  if [ "$T" -gt 10 ]; then
    env "$PT_ENV" timeout -s TERM --kill-after=5 "$T" "$PY" -m pytest -q -p no:cacheprovider "${PT_ARGS[@]}" \
      --junitxml="$OUT/pytest_gpu.xml" >"$OUT/pytest_gpu.log" 2>&1
    PT_RC=$?
    tail -40 "$OUT/pytest_gpu.log"
    PYTEST="rc=$PT_RC ($(grep -aE '^[0-9]+ (passed|failed|skipped|error|deselected)|^=+ .*(passed|failed|error)' \
      "$OUT/pytest_gpu.log" | tail -1 | tr -d '='| sed 's/^ *//; s/ *$//'))"
    [ "$PT_RC" = 124 ] && PYTEST="$PYTEST timed out after ${T}s"
  else
    PYTEST="skipped (no time)"
  fi
else
  step "pytest -m gpu: no tests carry the gpu marker; skipped"
fi

# ------------------------------------------------------------------ summary
step "done"
SUMMARY=$(grep -a "^GPU_CHECK " "$LOG" | tail -1)
echo "GPU_CHECK_SH build cpu=$BUILD_CPU cuda=$BUILD_CUDA | gpu_check.py rc=$PY_RC | pytest $PYTEST | $(($(date +%s) - START))s | ${SUMMARY:-no summary from gpu_check.py}"
exit 0
