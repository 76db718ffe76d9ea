#!/usr/bin/env bash
# The GPU checks in one call, for a machine with CUDA (such as the device tool's): the half-precision
# parity and decode-path tests marked `gpu`, the GPU's copy bandwidth, and the 3B bf16 batch-1 benchmark
# against the reference (eager, optimized, compiled). Run from the repository root with a Python that has
# torch (CUDA), transformers, safetensors, tokenizers, huggingface_hub, jinja2 and pytest; logs go to
# $OUT (default ./gpu-check). About 5-8 minutes on an H100.
#   bash benchmarks/gpu_check.sh            PYTHON=python3 OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
status=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/device.txt" || status=1
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_devices.py tests/test_attention.py \
  tests/test_checkpoint.py 2>&1 | tee "$OUT/tests.log" || status=1
"$PY" benchmarks/bandwidth.py --device cuda 2>&1 | tee "$OUT/bandwidth.log" || status=1
"$PY" benchmarks/generate.py --shape 3b --dtype bfloat16 --batch 1 --device cuda --compile --rounds 2 \
  2>&1 | tee "$OUT/generate-3b-bf16-b1.log" || status=1
exit $status
