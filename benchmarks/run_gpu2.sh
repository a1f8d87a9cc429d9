#!/usr/bin/env bash
# Second device call: generate first (all three systems, the mla backend registered by hand), then
# more forms points (seed 1, target points not repeated) with what is left.
set -x
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MLA_COMPILE_CACHE_DIR=/tmp/mla-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout -k 5 330 python3 benchmarks/generate.py --budget ${GEN_BUDGET:-270} > "$OUT/generate.log" 2>&1
echo "generate rc=$?"
grep -v "^\[" "$OUT/generate.log" | grep -v "^ " | tail -n 50
timeout -k 5 ${FORMS_TIMEOUT:-150} python3 benchmarks/bench_forms.py --budget ${FORMS_BUDGET:-110} --no-fit --no-first --seed 1 > "$OUT/forms.log" 2>&1
echo "bench_forms rc=$?"
tail -n 3 "$OUT/forms.log"
ls -la "$OUT"
