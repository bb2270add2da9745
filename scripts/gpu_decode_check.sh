#!/usr/bin/env bash
# Hybrid decode on the GPU machine, in one command from the repository root:
#   builds krasis_native in place, runs the GPU tests of hybrid decode (tests/gpu/test_hybrid*.py)
#   and the decode benchmark (bench/gpu_decode.py), writing logs and JSON under $OUT.
# Usage: scripts/gpu_decode_check.sh [all|tests|bench] [extra arguments for the benchmark]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mode="${1:-all}"
[ $# -gt 0 ] && shift
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

start=$(date +%s)
if ! python3 -c "import krasis_native" 2>/dev/null; then
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
{ nvidia-smi; nproc; free -g; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
    > "$OUT/machine.txt" 2>&1
echo "build: $(( $(date +%s) - start )) s"

test_rc=0
if [ "$mode" = all ] || [ "$mode" = tests ]; then
    timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_hybrid*.py \
        --junitxml="$OUT/test_hybrid.xml" > "$OUT/test_hybrid.log" 2>&1
    test_rc=$?
    tail -30 "$OUT/test_hybrid.log"
    echo "tests: rc=$test_rc, $(( $(date +%s) - start )) s"
fi

bench_rc=0
if [ "$mode" = all ] || [ "$mode" = bench ]; then
    cache_dir="$PWD/.bench-cache"  # on disk, outside \$OUT: about 18 GB of caches
    mkdir -p "$cache_dir"
    timeout 480 python3 bench/gpu_decode.py --cache-dir "$cache_dir" --out "$OUT/gpu_decode.json" "$@" \
        > "$OUT/gpu_decode.log" 2>&1
    bench_rc=$?
    rm -rf "$cache_dir"
    tail -45 "$OUT/gpu_decode.log"
    echo "bench: rc=$bench_rc, $(( $(date +%s) - start )) s"
fi
exit $(( test_rc != 0 || bench_rc != 0 ))
