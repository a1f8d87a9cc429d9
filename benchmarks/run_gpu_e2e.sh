#!/usr/bin/env bash
# One device call (nvidia-h200-x4, or x2 with two groups per GPU in turn); JOBS picks what runs (default: all):
#   group 0  experiments  absorbed-kernel variants (TMA halves, Hopper warp specialisation) against the
#                       production kernel and FlashMLA (absorbed_experiments.py)
#          module       the attention-module step, HF eager / Inductor / mla (generate.py v3attn:8:4096)
#          profile      that step's GPU time by kernel, and its bytes floor (profile_module_step.py)
#          profile-prefill  V2-Lite B=1 prefill of 512: GPU kernels, wall time, host ops
#   group 1  generate     decode and prefill over the default points (generate.py; the plots' data)
#          readme       the README's GPU reproduction, verbatim: install, then its generate.py command,
#                       from another directory with no PYTHONPATH (a new user's path)
#   group 2  tests        the GPU test tier (kernels at real sizes, HF families end to end on CUDA)
#          cache        StaticCache / DynamicCache in generate, CUDA graphs via CompileConfig (cache_kinds.py)
#   group 3  probes       model.compile(mode="reduce-overhead") with a StaticCache, mla then inductor, each in
#                       its own process under faulthandler (a crash prints the stack and ends only itself)
#          cache-long   cache_kinds.py at B=1, 16K
# Results: $OUT/results.tgz (benchmarks/results/* and the logs) and $OUT/summary.txt.
source benchmarks/gpu_env.sh
JOBS=" ${JOBS:-experiments module profile profile-prefill generate readme tests cache probes cache-long} "
want() { [[ "$JOBS" == *" $1 "* ]]; }
run_logged() {   # run_logged NAME TIMEOUT CMD...: the command's output in logs/NAME.log, its rc at the end
  local name=$1 limit=$2; shift 2     # (OUT unset for it: its reports travel in results.tgz; 8 files come back)
  env -u OUT timeout -k 5 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  echo "$name rc=$?" >> "$OUT/logs/$name.log"
}
group0() {
  want experiments && run_logged experiments 200 python3 benchmarks/absorbed_experiments.py
  want module && run_logged module-step 200 python3 benchmarks/generate.py --no-prefill --tag=-module \
    --points ${MODULE_POINTS:-v3attn:8:4096}
  want profile && run_logged profile 150 python3 benchmarks/profile_module_step.py
  want profile-prefill && run_logged profile-prefill 150 python3 benchmarks/profile_module_step.py \
    --point v2lite:1:512 --prefill
}
group1() {
  want generate && run_logged generate 540 python3 benchmarks/generate.py --budget ${GEN_BUDGET:-420} ${GEN_POINTS:+--points $GEN_POINTS}
  # the README's commands; no network here, so pip takes the carried wheels and the installed setuptools
  want readme && run_logged readme 400 env -u PYTHONPATH bash -c "
    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -m pip install -q --no-deps .whl/transformers-*.whl .whl/huggingface_hub-*.whl &&
    cd /tmp && python3 $ROOT/benchmarks/generate.py --no-prefill --tag=-readme --points v3:8:4096,v32:1:65536,v3:32:4096"
}
group2() {
  want tests && run_logged gpu-tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
    tests/test_triton_ops.py tests/test_gpu.py tests/test_reliability.py
  want cache && run_logged cache-kinds 300 python3 -X faulthandler benchmarks/cache_kinds.py \
    --points v3:8:4096 --systems ${CACHE_SYSTEMS:-eager,hf-graphs,mla,mla-graphs}
}
group3() {
  for s in model-graphs inductor-model-graphs; do
    want probes && run_logged probe-$s 150 python3 -X faulthandler benchmarks/cache_kinds.py --points v3:2:512 \
      --new 8 --systems $s --tag=-probe-$s
  done
  want cache-long && run_logged cache-long 300 python3 -X faulthandler benchmarks/cache_kinds.py \
    --points v3:1:16384 --systems eager,hf-graphs,mla,mla-graphs --tag=-16k
}
# Group i runs on GPU i % NGPU (nvidia-h200-x4: one each; x2: 0 and 2 share GPU 0, in the order of ORDER).
NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
for gpu in $(seq 0 $((NGPU - 1))); do
  (
    export CUDA_VISIBLE_DEVICES=$gpu
    for g in ${ORDER:-0 1 2 3}; do
      if (( g % NGPU == gpu )); then group$g; fi
    done
  ) &
done
wait
{
  cat "$OUT/logs/versions.txt"
  for f in "$OUT"/logs/*.log; do
    echo "== $(basename "$f")"
    grep -E "^\||^\[|rc=|Fatal|Segmentation|^  File|Error|passed|failed" "$f" | grep -v "^| kernel" | head -45
  done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
pack
