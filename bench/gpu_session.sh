#!/usr/bin/env bash
# Build, GPU tests and the cuDNN comparison on a CUDA machine, in steps that each fit in a
# 10-minute slot. Logs and raw JSON go to $OUT (default bench/results/).
#
#   bash bench/gpu_session.sh build test quick      # ~6 min: build, GPU correctness, 3 layers
#   bash bench/gpu_session.sh vgg16,resnet56        # ~9 min: those suites (budgeted)
#   bash bench/gpu_session.sh resnet50,batch1       # ~9 min
#   python bench/bench_gpu.py --from-json bench/results/bench_gpu_*.json   # merged table + plot
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET="${BENCH_BUDGET_S:-480}"
status=0
for step in "$@"; do
  case "$step" in
    build)
      nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
      python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
      # With the CUDA C++ kernels; if they fail to build, the CPU extension alone (Triton needs no build).
      if ! pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
        tail -40 "$OUT/build.log"; echo "CUDA kernels failed to build: CPU extension only"
        STRIPECONV_FORCE_CUDA=0 pip install --no-build-isolation --no-deps -e . >"$OUT/build_cpu.log" 2>&1 \
          || { tail -40 "$OUT/build_cpu.log"; exit 1; }
      fi ;;
    test)
      python -m pytest tests/test_gpu.py tests/test_triton.py tests/test_gpu_select.py tests/test_cuda_backend.py \
        tests/test_correctness.py tests/test_module.py \
        -q -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    quick)
      python bench/bench_gpu.py --quick --out "$OUT" --tag _quick 2>&1 | tee "$OUT/bench_quick.log" | tail -60 ;;
    *)
      python bench/bench_gpu.py --suites "$step" --budget-s "$BUDGET" --out "$OUT" --tag "_${step//,/_}" \
        2>&1 | tee "$OUT/bench_${step//,/_}.log" | tail -80 ;;
  esac
done
exit $status
