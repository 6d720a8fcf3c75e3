#!/usr/bin/env bash
# On a GPU machine: use a prebuilt extension (from .devbuild, built elsewhere for this GPU), then the GPU
# tests, compute-sanitizer on small shapes of each variant, and the benchmark. Logs and JSON go to $OUT.
#   usage: scripts/device_check.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/comfy-sage-device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cp .devbuild/comfy_sage/_C*.so comfy_sage/ || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -m comfy_sage doctor | tee "$out/doctor.txt"
python3 -m pytest tests/gpu -q -x -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu-tests.log" | tail -25
if [ -z "${SKIP_SANITIZER:-}" ]; then
    PYTHONPATH=. compute-sanitizer --tool memcheck --print-limit 20 python3 scripts/sanitize_cases.py 2>&1 | tail -8 | tee "$out/memcheck.log"
    PYTHONPATH=. compute-sanitizer --tool racecheck --print-limit 20 python3 scripts/sanitize_cases.py --family sm90 2>&1 | tail -8 | tee "$out/racecheck.log"
fi
if [ -z "${SKIP_ACCURACY:-}" ]; then
    python3 -m comfy_sage accuracy --kernels --device cuda 2>&1 | tee "$out/accuracy.md" | grep -E "kernel|B=" 
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    python3 -m comfy_sage bench --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
fi
