#!/usr/bin/env bash
# The GPU test tier and the benchmarks on a CUDA machine, one part after another, on one GPU.
#
#   bash benchmarks/run_gpu.sh [tests] [e2e] [kernels] [forms]     # default: all four, in that order
#   PARTS="tests kernels" bash benchmarks/run_gpu.sh               # the same choice by environment
#
# Run from anywhere; it works in the repository root. Nothing is installed into the machine's Python:
# the checkout goes on PYTHONPATH (mla_compile imports from it), and wheels carried in .whl/ (a newer
# transformers than the machine's, sgl-flash-mla for the FlashMLA columns) are unpacked into
# /tmp/site, which goes on PYTHONPATH too. Results go to $OUT if set, else benchmarks/results/; the
# output of each part is also written to $OUT/logs/<part>.log (benchmarks/results/logs/ without $OUT).
#
# Arguments of each part (defaults in brackets):
#   TESTS_ARGS    extra pytest arguments for `python -m pytest -m gpu -q`                      []
#   E2E_ARGS      benchmarks/e2e.py arguments   [--models v2-lite,v3 --batch 1,8 --prompt 2048,16384]
#   KERNELS_ARGS  benchmarks/kernel_bench.py arguments                                         []
#   FORMS_ARGS    benchmarks/forms.py arguments                                                [--budget 300]
#   TIMEOUT_<PART>  seconds each part may take (TIMEOUT_TESTS, TIMEOUT_E2E, ...)               [3600]
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PARTS=${*:-${PARTS:-tests e2e kernels forms}}
if [ -n "${OUT:-}" ]; then RESULTS=$OUT; else RESULTS=$ROOT/benchmarks/results; fi
LOGS=$RESULTS/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 MLA_COMPILE_CACHE_DIR=/tmp/mla-cache TRITON_CACHE_DIR=/tmp/triton-cache
export PYTHONPATH=$ROOT
if ls .whl/*.whl >/dev/null 2>&1 &&
   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; then
  export PYTHONPATH=$ROOT:/tmp/site
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__, '|', torch.cuda.get_device_name(), 'x', torch.cuda.device_count())" \
  | tee "$LOGS/versions.txt"

# run PART CMD...: the command under a timeout, its output on the terminal and in logs/PART.log
run() {
  local part=$1; shift
  local limit_var="TIMEOUT_${part^^}"
  echo "== $part: $*" | tee "$LOGS/$part.log"
  timeout -k 10 "${!limit_var:-3600}" "$@" 2>&1 | tee -a "$LOGS/$part.log"
  local rc=${PIPESTATUS[0]}
  echo "== $part rc=$rc" | tee -a "$LOGS/$part.log" "$LOGS/summary.txt"
}

: > "$LOGS/summary.txt"
for part in $PARTS; do
  case $part in
    tests)   run tests python3 -m pytest -m gpu -q -p no:cacheprovider ${TESTS_ARGS:-} ;;
    e2e)     run e2e python3 benchmarks/e2e.py --out "$RESULTS" \
               ${E2E_ARGS:---models v2-lite,v3 --batch 1,8 --prompt 2048,16384} ;;
    kernels) run kernels python3 benchmarks/kernel_bench.py --out "$RESULTS" ${KERNELS_ARGS:-} ;;
    forms)   run forms python3 benchmarks/forms.py --out "$RESULTS" ${FORMS_ARGS:---budget 300} ;;
    *)       echo "unknown part: $part (known: tests e2e kernels forms)" | tee -a "$LOGS/summary.txt" ;;
  esac
done
cat "$LOGS/summary.txt"
