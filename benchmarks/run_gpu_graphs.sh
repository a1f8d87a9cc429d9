#!/usr/bin/env bash
# One device call (nvidia-h200-x4), four jobs side by side:
#   GPU 0  absorbed-kernel experiments (TMA halves, Hopper warp specialisation) against the production
#          kernel and FlashMLA; then the attention-module step (generate.py, point v3attn:8:4096)
#   GPU 1  the GPU test tier (kernels at real sizes, HF families end to end on CUDA)
#   GPU 2  StaticCache and DynamicCache in generate, CUDA graphs through CompileConfig (cache_kinds.py)
#   GPU 3  probe: model.compile(mode="reduce-overhead") with a StaticCache, mla then inductor, each
#          in its own process under faulthandler (a crash prints the Python stack and ends only it)
# Results: $OUT/results.tgz (benchmarks/results/* and the logs) and $OUT/summary.txt.
source benchmarks/gpu_env.sh
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 5 200 python3 benchmarks/absorbed_experiments.py > "$OUT/logs/experiments.log" 2>&1
  echo "experiments rc=$?" >> "$OUT/logs/experiments.log"
  timeout -k 5 300 python3 benchmarks/generate.py --no-prefill --points ${MODULE_POINTS:-v3attn:8:4096} \
    > "$OUT/logs/module-step.log" 2>&1
  echo "module step rc=$?" >> "$OUT/logs/module-step.log"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout -k 5 ${TEST_TIMEOUT:-480} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
    tests/test_gpu.py tests/test_reliability.py > "$OUT/logs/gpu-tests.log" 2>&1
  echo "gpu tests rc=$?" >> "$OUT/logs/gpu-tests.log"
) &
(
  export CUDA_VISIBLE_DEVICES=2
  timeout -k 5 480 python3 -X faulthandler benchmarks/cache_kinds.py --points ${CACHE_POINTS:-v3:8:4096} \
    --systems eager,hf-graphs,mla,mla-graphs > "$OUT/logs/cache-kinds.log" 2>&1
  echo "cache kinds rc=$?" >> "$OUT/logs/cache-kinds.log"
) &
(
  export CUDA_VISIBLE_DEVICES=3
  for s in model-graphs inductor-model-graphs; do
    timeout -k 5 220 python3 -X faulthandler benchmarks/cache_kinds.py --points v3:2:512 --new 8 --systems $s \
      --tag "-probe-$s" > "$OUT/logs/probe-$s.log" 2>&1
    echo "probe $s rc=$?" >> "$OUT/logs/probe-$s.log"
  done
) &
wait
{
  cat "$OUT/logs/versions.txt"
  grep -E "^\||rc=|Error" "$OUT/logs/experiments.log" | head -60
  grep -E "^\[|rc=" "$OUT/logs/module-step.log" | tail -n 8
  tail -n 6 "$OUT/logs/gpu-tests.log"
  grep -E "^\||rc=" "$OUT/logs/cache-kinds.log"
  for s in model-graphs inductor-model-graphs; do
    echo "== probe $s"; grep -E "^\||rc=|Fatal|Segmentation|File \"|Error" "$OUT/logs/probe-$s.log" | head -40
  done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
pack
