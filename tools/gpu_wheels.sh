#!/usr/bin/env bash
# Wheels a GPU machine without network needs for tools/gpu_check.sh, into .whl/ (run from the project root on a
# connected machine; carry .whl to the GPU machine). ../shared/gpu/fetch_wheels.sh brings deepspeed, webdataset,
# bitsandbytes and their needs; this adds what mmscale's loader, synthetic data and the tests import beyond a
# torch + transformers + accelerate + peft image. Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x ../shared/gpu/fetch_wheels.sh ]; then ../shared/gpu/fetch_wheels.sh >/dev/null; fi
mkdir -p .whl
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl \
  "simplejpeg>=1.7" "torchdata>=0.10" "matplotlib>=3.8" contourpy cycler fonttools kiwisolver pyparsing \
  python-dateutil "pytest>=8" iniconfig pluggy
ls .whl
