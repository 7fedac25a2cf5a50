#!/usr/bin/env bash
# GPU run: the GPU test suite, then (when ndconv/bench.py exists) the GPU benchmark.
# Meant for the device machine (an NVIDIA GPU with CuPy and PyTorch): from the repo root,
#   OUT=/some/dir bash scripts/gpu_run.sh [extra pytest args]
# Logs and JSON go to $OUT (default ./gpu-out); GPU_RUN_BENCH=0 skips the float32 benchmark,
# GPU_RUN_FP16=1 adds the float16 one, GPU_RUN_TESTS=0 skips the tests.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Keep run-time compiled kernels out of the (read-only or absent) home cache.
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy-kernel-cache}
# The autotuner's choices too (the bench may read them; tests use private files).
export NDCONV_CACHE_DIR=${NDCONV_CACHE_DIR:-/tmp/ndconv-cache}

python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import sys, numpy
print("python", sys.version.split()[0], "numpy", numpy.__version__)
try:
    from ndconv.engine import cudnn
    print("cudnn", cudnn.version(), cudnn.load_error() or "")
except Exception as e:
    print("cudnn check failed:", e)
try:
    import cupy
    print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount(),
          cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
except Exception as e:
    print("cupy unavailable:", e)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
except Exception as e:
    print("torch unavailable:", e)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$OUT/versions.txt"

status=0
if [ "${GPU_RUN_TESTS:-1}" != 0 ]; then
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu*.py tests/test_autotune.py tests/test_phases.py "$@" 2>&1 | tee "$OUT/gpu-tests.log" || status=$?
fi

if [ "${GPU_RUN_BENCH:-1}" != 0 ] && [ -f ndconv/bench.py ]; then
    # NDCONV_AUTOTUNE=1: ndconv tunes each call once, as PyTorch does in cudnn.benchmark mode.
    NDCONV_AUTOTUNE=${NDCONV_AUTOTUNE:-1} python3 -m ndconv.bench --device gpu --repeat 10 --json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log"
    bench_status=$?
    [ "$status" -eq 0 ] && status=$bench_status
fi
if [ "${GPU_RUN_FP16:-0}" != 0 ] && [ -f ndconv/bench.py ]; then
    NDCONV_AUTOTUNE=${NDCONV_AUTOTUNE:-1} python3 -m ndconv.bench --device gpu --dtype float16 --repeat 10 --json "$OUT/bench-gpu-fp16.json" 2>&1 | tee "$OUT/bench-gpu-fp16.log"
    bench_status=$?
    [ "$status" -eq 0 ] && status=$bench_status
fi
exit $status
