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
timeout -k 5 ${TEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_gpu.py tests/test_reliability.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 25
echo "gpu tests rc=${PIPESTATUS[0]}"
MLA_COMPILE_FUZZ_DEVICE=cuda MLA_COMPILE_FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-80} timeout -k 5 ${FUZZ_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider \
  tests/test_fuzz.py::test_fuzz_compiled_matches_eager --hypothesis-show-statistics 2>&1 | tee "$OUT/gpu-fuzz.log" | grep -E "passed|failed|passing|failing|invalid|Error|assert" | head -20
echo "gpu fuzz rc=${PIPESTATUS[0]}"
[ -n "${SKIP_GENERATE:-}" ] || timeout -k 5 ${GEN_TIMEOUT:-200} python3 benchmarks/generate.py --budget ${GEN_BUDGET:-160} --no-prefill \
  --points ${GEN_POINTS:-v32:1:65536,v3:8:4096,v32:1:16384} > "$OUT/generate.log" 2>&1
echo "generate rc=$?"
grep -v "^\[" "$OUT/generate.log" | grep -v "^ " | tail -n 30
cp benchmarks/results/generate-*.md "$OUT/" 2>/dev/null
ls -la "$OUT"
