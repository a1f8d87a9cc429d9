# Sourced by the one-call device scripts (run_gpu_validation.sh, run_gpu_measure.sh, run_gpu_confirm.sh):
# the environment, the carried wheels (.whl/: transformers 5.23 ahead of the machine's 5.17, whose DSA
# models cache expanded K/V rather than the latent; sgl-flash-mla for bench_kernels.py), the versions.
set -u
ROOT=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 MLA_COMPILE_CACHE_DIR=/tmp/mla-cache TRITON_CACHE_DIR=/tmp/triton-cache
export PYTHONPATH=$ROOT
if ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
  export PYTHONPATH=$ROOT:/tmp/site
fi
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())" | tee "$OUT/logs/versions.txt"

# forms_shards SEED BUDGET TIMEOUT EXTRA_ARGS GPU...: one bench_forms.py shard per GPU, in the background
forms_shards() {
  local seed=$1 budget=$2 limit=$3 extra=$4; shift 4
  local gpus=("$@") i
  for i in "${!gpus[@]}"; do
    CUDA_VISIBLE_DEVICES=${gpus[$i]} timeout -k 5 "$limit" python3 benchmarks/bench_forms.py --budget "$budget" \
      --no-fit $extra --seed "$seed" --shard "$i/${#gpus[@]}" > "$OUT/logs/forms-shard$i.log" 2>&1 &
  done
}

# pack: benchmarks/results and the logs into $OUT/results.tgz (the device returns at most 8 files)
pack() {
  tar czf "$OUT/results.tgz" -C "$ROOT" benchmarks/results -C "$OUT" logs
  rm -rf "$OUT/logs"
}
