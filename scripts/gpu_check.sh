#!/usr/bin/env bash
# GPU prefill check on the GPU machine, from a bare copy of the repository (nothing installed):
#   1. python3 -m pytest -x -q tests/gpu            (CUDA correctness)
#   2. bench/gpu_moe_kernel.py                      (Triton vs dequant + _grouped_mm, several M)
#   3. bench/gpu_prefill.py                         (the seed's prefill table, S1 and S2)
# Logs and JSON go to $OUT (or ./gpu-results when OUT is unset). Each stage has its own time
# limit so the whole run ends inside 10 minutes (about 590 s at most); a failing stage does
# not stop the next one. Stages can also run alone, each in its own call.
# Usage: scripts/gpu_check.sh [all|tests|kernel|prefill]
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
stage="${1:-all}"
status=0

{
  date -u; nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

run_stage() {  # name, time limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

if [ "$stage" = all ] || [ "$stage" = tests ]; then
  # the tests load with fixed tiles (EngineOptions(autotune=False)); the benchmarks autotune
  run_stage tests 260 python3 -m pytest -x -q -p no:cacheprovider tests/gpu
fi
if [ "$stage" = all ] || [ "$stage" = kernel ]; then
  run_stage kernel 110 python3 bench/gpu_moe_kernel.py --bits 4 --sizes 1,16,128,1024,8192 \
    --out "$OUT/kernel.json"
fi
if [ "$stage" = all ] || [ "$stage" = prefill ]; then
  run_stage prefill 210 python3 bench/gpu_prefill.py --runs 3 --out "$OUT/prefill.json"
fi
exit $status
