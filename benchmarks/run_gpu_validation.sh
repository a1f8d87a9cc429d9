#!/usr/bin/env bash
# One device call on a multi-GPU machine (nvidia-h200-x4; x2 and x1 work, slower): in parallel,
#   GPUs 0,1  the forms grid against the cost model (bench_forms.py, one shard per GPU)
#   GPU 2     the kernel tests at CUDA (tiny and odd dims too), the GPU tier, the 64K stress tests
#   GPU 3     the long fuzz: 8 processes x FUZZ_EACH examples, half with the Triton kernels forced
#             at every size (MLA_COMPILE_KERNELS=triton), half as the backend chooses
# Results come back as $OUT/results.tgz (benchmarks/results/* and every log) and $OUT/summary.txt.
#   SEED=0 FORMS_BUDGET=400 FUZZ_EACH=70 bash benchmarks/run_gpu_validation.sh
source benchmarks/gpu_env.sh
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
g_forms=(0 1); g_tests=2; g_fuzz=3
if [ "$NG" -lt 4 ]; then g_forms=(0); g_tests=$((NG - 1)); g_fuzz=$((NG - 1)); fi
forms_shards "${SEED:-0}" "${FORMS_BUDGET:-400}" "${FORMS_TIMEOUT:-530}" "" "${g_forms[@]}"
(
  export CUDA_VISIBLE_DEVICES=$g_tests
  timeout -k 5 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py > "$OUT/logs/gpu-tests.log" 2>&1
  echo "kernels+gpu rc=$?" >> "$OUT/logs/gpu-tests.log"
  timeout -k 5 200 python3 -m pytest -q -p no:cacheprovider tests/test_reliability.py -m gpu > "$OUT/logs/gpu-stress.log" 2>&1
  echo "stress rc=$?" >> "$OUT/logs/gpu-stress.log"
) &
for s in 1 2 3 4 5 6 7 8; do
  if [ $s -le 4 ]; then kern=triton; else kern=auto; fi
  CUDA_VISIBLE_DEVICES=$g_fuzz MLA_COMPILE_KERNELS=$kern MLA_COMPILE_FUZZ_DEVICE=cuda MLA_COMPILE_FUZZ_SEED=$s \
    MLA_COMPILE_FUZZ_LONG_EXAMPLES=${FUZZ_EACH:-70} OMP_NUM_THREADS=4 timeout -k 5 ${FUZZ_TIMEOUT:-480} \
    python3 -m pytest -q -p no:cacheprovider tests/test_fuzz.py::test_fuzz_long -m slow --hypothesis-show-statistics \
    > "$OUT/logs/fuzz-seed$s-$kern.log" 2>&1 &
done
wait
{
  cat "$OUT/logs/versions.txt"
  for f in "$OUT"/logs/gpu-*.log; do echo "== $f"; tail -n 15 "$f"; done
  for f in "$OUT"/logs/fuzz-*.log; do echo "== $f"; grep -E "passing|failing|invalid|passed|failed|Error|assert" "$f" | head -8; done
  for f in "$OUT"/logs/forms-*.log; do echo "== $f"; grep -E "^\[|Error" "$f" | tail -n 4; grep -c "^\[" "$f"; done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
pack
ls -la "$OUT"
