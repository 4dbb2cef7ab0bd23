#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine (nvidia-h200 kind: Python 3.12,
# x86_64, no internet) lacks, so that `scripts/gpu_check.sh` can install them
# there. Run HERE, with access to PyPI, before a session that has a GPU; then
# name ".whl" in the device call's `carry`.
#
# What is missing there (checked against /work/.library/device/KINDS.md,
# "Python packages already there", 2026-11-17):
#   gsplat==1.5.3     pure Python; JIT-compiles its CUDA sources on first use.
#                     Its requirements (jaxtyping, ninja, numpy, rich, torch)
#                     are all there already.
#   tyro              langfield's CLI (`python3 -m langfield.cli ...`); needs
#   docstring-parser  these two, which are missing too (typing-extensions is
#   typeguard         there).
#   plyfile           langfield.io (PLY export); needs numpy (there).
# Already there, not fetched: torch, numpy, filelock, safetensors, tqdm,
# pillow, rich, jaxtyping, ninja, typing-extensions, pytest, packaging.
#
# Usage: bash scripts/fetch_gpu_wheels.sh     (from anywhere inside the repo)
set -euo pipefail

cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

# Keep one version of each package (two stop the install there): pinned here.
PKGS=(
  "gsplat==1.5.3"
  "tyro==1.0.17"
  "docstring-parser==0.18.0"
  "typeguard==4.6.1"
  "plyfile==1.1.5"
)

if ! git check-ignore -q .whl/probe.whl; then
  echo "/.whl/" >> .git/info/exclude
  echo "added /.whl/ to .git/info/exclude (it was not ignored)"
fi

mkdir -p .whl
rm -f .whl/*.whl

PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLAT[@]}" -d .whl "${PKGS[@]}"

echo "== wheels in .whl/"
ls -la .whl/*.whl
echo "== their requirements (each must be in .whl/ or already on the GPU machine)"
for w in .whl/*.whl; do
  reqs=$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
         | sed 's/^Requires-Dist: //' | tr '\n' ';' || true)
  echo "$(basename "$w"): ${reqs:-<none>}"
done
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "== total: $total bytes ($((total / 1024)) KiB); the limit for everything that travels is 64 MiB"
