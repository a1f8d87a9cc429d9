#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for kernel work, in parallel:
#   GPU 0  the GPU test tier (kernels at real sizes, triton_op tracing, HF families end to end on CUDA)
#   GPU 1  the small-head split sweep (H=16,32; SWEEP=0 skips it), then `python3 benchmarks/$EXTRA` if set
# Results: $OUT/results.tgz (benchmarks/results/* and the logs) and $OUT/summary.txt.
source benchmarks/gpu_env.sh
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 5 ${TESTS_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
    tests/test_triton_ops.py tests/test_gpu.py tests/test_reliability.py > "$OUT/logs/gpu-tests.log" 2>&1
  echo "tests rc=$?" >> "$OUT/logs/gpu-tests.log"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  if [ "${SWEEP:-1}" != 0 ]; then
    timeout -k 5 ${SWEEP_TIMEOUT:-300} python3 benchmarks/split_sweep.py --heads ${HEADS:-16,32} > "$OUT/logs/sweep.log" 2>&1
    echo "sweep rc=$?" >> "$OUT/logs/sweep.log"
  fi
  if [ -n "${EXTRA:-}" ]; then
    timeout -k 5 ${EXTRA_TIMEOUT:-240} python3 benchmarks/$EXTRA > "$OUT/logs/extra.log" 2>&1
    echo "extra rc=$?" >> "$OUT/logs/extra.log"
  fi
) &
wait
{
  cat "$OUT/logs/versions.txt"
  grep -E "passed|failed|error|FAIL|rc=" "$OUT/logs/gpu-tests.log" | tail -n 15
  [ -f "$OUT/logs/sweep.log" ] && grep -E "^\||rc=|!" "$OUT/logs/sweep.log"
  [ -f "$OUT/logs/extra.log" ] && grep -vE "^W1121|^  warnings|UserWarning" "$OUT/logs/extra.log" | tail -n 90
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
pack
