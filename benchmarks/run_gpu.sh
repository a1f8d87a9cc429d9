#!/usr/bin/env bash
# One device call: the forms grid (issue 3) and the generate benchmark (issue 7), each under its own
# timeout so one part cannot eat the other's time. Run from the repo root:
#   OUT=/some/dir bash benchmarks/run_gpu.sh
# Results: $OUT/{forms-*,form-efficiency-*,device-*,generate-*} and the logs forms.log, generate.log.
set -x
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MLA_COMPILE_CACHE_DIR=/tmp/mla-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
FORMS_BUDGET=${FORMS_BUDGET:-165}; GEN_BUDGET=${GEN_BUDGET:-250}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout -k 5 $((FORMS_BUDGET + 45)) python3 benchmarks/bench_forms.py --budget "$FORMS_BUDGET" --no-fit ${FORMS_ARGS:-} > "$OUT/forms.log" 2>&1
echo "bench_forms rc=$?"
tail -n 5 "$OUT/forms.log"
timeout -k 5 $((GEN_BUDGET + 70)) python3 benchmarks/generate.py --budget "$GEN_BUDGET" ${GEN_ARGS:-} > "$OUT/generate.log" 2>&1
echo "generate rc=$?"
grep -v "^\[" "$OUT/generate.log" | grep -v "^ " | tail -n 45
ls -la "$OUT"
