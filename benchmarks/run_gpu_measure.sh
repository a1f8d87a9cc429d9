#!/usr/bin/env bash
# The second device call of a session (nvidia-h200-x4), in parallel:
#   GPUs 0,1  a fresh forms grid (SEED, default 1: points the efficiencies were not fitted on)
#   GPU 2     the kernel tests on CUDA, then StaticCache vs DynamicCache in generate (cache_kinds.py)
#   GPU 3     the kernel table against FlashMLA, HF eager, Inductor and the roofline (bench_kernels.py)
# Results: $OUT/results.tgz (benchmarks/results/* and the logs) and $OUT/summary.txt.
source benchmarks/gpu_env.sh
forms_shards "${SEED:-1}" "${FORMS_BUDGET:-400}" "${FORMS_TIMEOUT:-520}" --no-first 0 1
(
  export CUDA_VISIBLE_DEVICES=2
  timeout -k 5 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py > "$OUT/logs/gpu-kernel-tests.log" 2>&1
  echo "kernel tests rc=$?" >> "$OUT/logs/gpu-kernel-tests.log"
  timeout -k 5 360 python3 benchmarks/cache_kinds.py --points ${CACHE_POINTS:-v3:8:4096,v3:1:16384} > "$OUT/logs/cache-kinds.log" 2>&1
  echo "cache kinds rc=$?" >> "$OUT/logs/cache-kinds.log"
) &
CUDA_VISIBLE_DEVICES=3 timeout -k 5 ${KERNELS_TIMEOUT:-520} python3 benchmarks/bench_kernels.py ${KERNELS_ARGS:-} > "$OUT/logs/kernels.log" 2>&1 &
wait
{
  cat "$OUT/logs/versions.txt"
  tail -n 4 "$OUT/logs/gpu-kernel-tests.log"
  grep -E "^\||rc=" "$OUT/logs/cache-kinds.log"
  grep -E "^\| 128 \| (8|32) \| 4096|Error|rc" "$OUT/logs/kernels.log" | head -20
  for f in "$OUT"/logs/forms-*.log; do echo "== $f"; grep -E "^\[|Error" "$f" | tail -n 2; grep -c "^\[" "$f"; done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
pack
