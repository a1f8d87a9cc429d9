#!/usr/bin/env bash
# One device call: GPU tests (kernels at real sizes, HF families end to end on CUDA, GPU fuzz), then
# generate with transformers 5.23 (carried in .whl: its DSA models cache the latent, 5.17's do not).
set -x
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MLA_COMPILE_CACHE_DIR=/tmp/mla-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl .whl/huggingface_hub-*.whl \
   && PYTHONPATH=$PYTHONPATH:/tmp/site python3 -c "import transformers, transformers.models.deepseek_v32"; then
  export PYTHONPATH=$PWD:/tmp/site           # the checkout, then 5.23 ahead of the installed 5.17
fi
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
timeout -k 5 ${TEST_TIMEOUT:-230} python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_gpu.py ${GPU_FUZZ:-} 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 25
echo "gpu tests rc=${PIPESTATUS[0]}"
timeout -k 5 ${GEN_TIMEOUT:-250} python3 benchmarks/generate.py --budget ${GEN_BUDGET:-200} --no-prefill \
  --points ${GEN_POINTS:-v32:1:65536,v3:8:4096,v32:1:16384} > "$OUT/generate.log" 2>&1
echo "generate rc=$?"
grep -v "^\[" "$OUT/generate.log" | grep -v "^ " | tail -n 30
cp benchmarks/results/generate-*.md "$OUT/" 2>/dev/null
ls -la "$OUT"
