#!/usr/bin/env bash
# Fetch, on a machine with the package index, the wheels tools/gpu_check.sh installs offline on a GPU machine that
# has Python 3.12 and a CUDA build of torch but no network: megatron-core (and what it needs beyond torch and
# numpy) and math-verify with its parser. About 3 MB.
#   bash tools/fetch_gpu_wheels.sh [DIR]        (default .whl/, ignored by git; carry it to the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" \
  megatron-core==0.19.2 packaging==26.4 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
  antlr4-python3-runtime==4.13.2
ls -l "$DIR"
