#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for kernel work, in parallel:
#   GPU 0  the GPU test tier (kernels at real sizes, triton_op tracing, HF families end to end on CUDA;
#          TESTS_K="expr" selects tests as pytest -k does; TESTS_ENV2="VAR=value ..." runs the selection
#          a second time with those variables set, e.g. a kernel variant's switch)
#   GPU 1  the small-head split sweep (H=16,32; SWEEP=0 skips it), then `python3 benchmarks/$EXTRA` if set (several: ';' between),
#          then, with NCU="B T H[;B T H]", Nsight Compute over one absorbed-kernel launch (profile_absorbed.py)
# Results: $OUT/results.tgz (benchmarks/results/* and the logs) and $OUT/summary.txt.
source benchmarks/gpu_env.sh
# gpu_tests [VAR=value ...]: the GPU test selection, with those variables set, appended to the log
gpu_tests() {
  env "$@" timeout -k 5 ${TESTS_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
    tests/test_triton_ops.py tests/test_gpu.py tests/test_reliability.py ${TESTS_K:+-k "$TESTS_K"} >> "$OUT/logs/gpu-tests.log" 2>&1
}
(
  export CUDA_VISIBLE_DEVICES=0
  gpu_tests
  echo "tests rc=$?" >> "$OUT/logs/gpu-tests.log"
  if [ -n "${TESTS_ENV2:-}" ]; then
    echo "== again with $TESTS_ENV2" >> "$OUT/logs/gpu-tests.log"
    gpu_tests $TESTS_ENV2
    echo "tests ($TESTS_ENV2) rc=$?" >> "$OUT/logs/gpu-tests.log"
  fi
) &
(
  export CUDA_VISIBLE_DEVICES=1
  if [ "${SWEEP:-1}" != 0 ]; then
    timeout -k 5 ${SWEEP_TIMEOUT:-300} python3 benchmarks/split_sweep.py --heads ${HEADS:-16,32} > "$OUT/logs/sweep.log" 2>&1
    echo "sweep rc=$?" >> "$OUT/logs/sweep.log"
  fi
  if [ -n "${EXTRA:-}" ]; then   # "script args[;script args...]", one after another
    IFS=';' read -ra extras <<< "$EXTRA"
    for ex in "${extras[@]}"; do
      timeout -k 5 ${EXTRA_TIMEOUT:-240} python3 benchmarks/$ex >> "$OUT/logs/extra.log" 2>&1
      echo "extra ($ex) rc=$?" >> "$OUT/logs/extra.log"
    done
  fi
  if [ -n "${NCU:-}" ]; then   # "B T H[;B T H...]"; stall reasons by regex, retried without if refused
    IFS=';' read -ra points <<< "$NCU"
    sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
      --section WarpStateStats --section LaunchStats --section Occupancy"
    for pt in "${points[@]}"; do
      timeout -k 5 ${NCU_TIMEOUT:-180} ncu --profile-from-start off -k regex:split_kernel $sections \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        python3 benchmarks/profile_absorbed.py $pt > "$OUT/logs/ncu-one.txt" 2>&1 \
      || timeout -k 5 ${NCU_TIMEOUT:-180} ncu --profile-from-start off -k regex:split_kernel $sections \
        python3 benchmarks/profile_absorbed.py $pt > "$OUT/logs/ncu-one.txt" 2>&1
      echo "ncu ($pt) rc=$?" >> "$OUT/logs/ncu-one.txt"
      cat "$OUT/logs/ncu-one.txt" >> "$OUT/logs/ncu.txt" && rm "$OUT/logs/ncu-one.txt"
    done
  fi
) &
wait
{
  cat "$OUT/logs/versions.txt"
  grep -E "passed|failed|error|FAIL|rc=|== again" "$OUT/logs/gpu-tests.log" | tail -n 25
  [ -f "$OUT/logs/sweep.log" ] && grep -E "^\||rc=|!" "$OUT/logs/sweep.log"
  [ -f "$OUT/logs/extra.log" ] && grep -vE "^W1121|^  warnings|UserWarning" "$OUT/logs/extra.log" | tail -n 90
  [ -f "$OUT/logs/ncu.txt" ] && grep -E "_kernel \(|compiled|Duration|Throughput|Pipe|stalled|Registers Per|Warp Cycles Per Issued|rc=" "$OUT/logs/ncu.txt" | head -n 90
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
pack
