#!/usr/bin/env bash
# One prepared GPU check (bench/gpu.py): extraction of ResNet-101 at 256x256 JPEG -> Parquet,
# attention-decoder training with mixed precision, and Serve with GPU replicas at concurrency 32,
# each through raycap's real Ray path, in under 8 minutes. Without a CUDA GPU it runs the same code
# at tiny sizes on CPU. Extra arguments go to bench/gpu.py (--tiny).
#
#   bash bench/gpu.sh            # from a checkout with .venv (make install), or PYTHON=python3
#
# Output: one line per phase, then a JSON line; also saved to $OUT/gpu_check.txt when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
log=${OUT:+$OUT/gpu_check.txt}
RAY_DEDUP_LOGS=1 timeout --signal=INT --kill-after=20 480 "$PYTHON" bench/gpu.py "$@" 2>&1 | tee ${log:-/dev/null}
