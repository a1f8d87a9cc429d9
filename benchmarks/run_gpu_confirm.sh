#!/usr/bin/env bash
# The third device call (nvidia-h200-x4), after the cost model is frozen, in parallel:
#   GPUs 0,1  a third forms grid (SEED=2): the final held-out check of the shipped cost model
#   GPU 2     the 64-bit offsets test, StaticCache vs DynamicCache (eager, mla), then mla + CUDA graphs
#             with a static cache in its own process (it crashed once: faulthandler prints the stack)
#   GPU 3     generate.py: decode and prefill, HF eager vs Inductor vs mla
source benchmarks/gpu_env.sh
forms_shards "${SEED:-2}" "${FORMS_BUDGET:-370}" "${FORMS_TIMEOUT:-470}" --no-first 0 1
(
  export CUDA_VISIBLE_DEVICES=2
  timeout -k 5 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k offsets > "$OUT/logs/gpu-offsets.log" 2>&1
  echo "offsets rc=$?" >> "$OUT/logs/gpu-offsets.log"
  timeout -k 5 220 python3 benchmarks/cache_kinds.py --systems eager,mla --points v3:8:4096 --tag=-eager-mla > "$OUT/logs/cache-kinds.log" 2>&1
  echo "cache kinds rc=$?" >> "$OUT/logs/cache-kinds.log"
  timeout -k 5 120 python3 -X faulthandler benchmarks/cache_kinds.py --systems mla-graphs --points v3:8:4096 --tag=-graphs > "$OUT/logs/cache-kinds-graphs.log" 2>&1
  echo "cache kinds graphs rc=$?" >> "$OUT/logs/cache-kinds-graphs.log"
) &
CUDA_VISIBLE_DEVICES=3 timeout -k 5 ${GEN_TIMEOUT:-470} python3 benchmarks/generate.py --budget ${GEN_BUDGET:-330} > "$OUT/logs/generate.log" 2>&1 &
wait
{
  cat "$OUT/logs/versions.txt"
  tail -n 3 "$OUT/logs/gpu-offsets.log"
  grep -E "^\||rc=" "$OUT"/logs/cache-kinds*.log
  grep -B2 -A25 "Fatal Python error" "$OUT/logs/cache-kinds-graphs.log" | grep -v "^W1121" | head -40
  grep -E "^\| v" "$OUT/logs/generate.log" | head -40
  for f in "$OUT"/logs/forms-*.log; do echo "== $f"; grep -c "^\[" "$f"; done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
pack
