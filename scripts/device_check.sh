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
timeout 300 python3 -m pytest tests/gpu -q -x -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu-tests.log" | tail -25
python3 scripts/sass_schedule.py 2>&1 | tee "$out/sass-schedule.txt"  # the wgmma kernel's instruction orders
if [ -z "${SKIP_SANITIZER:-}" ]; then
    PYTHONPATH=. timeout 200 compute-sanitizer --tool memcheck --print-limit 20 python3 scripts/sanitize_cases.py 2>&1 | tail -8 | tee "$out/memcheck.log"
    PYTHONPATH=. timeout 120 compute-sanitizer --tool racecheck --print-limit 20 python3 scripts/sanitize_cases.py --family sm90 2>&1 | tail -8 | tee "$out/racecheck.log"
fi
if [ -z "${SKIP_ACCURACY:-}" ]; then
    timeout 120 python3 -m comfy_sage accuracy --kernels --device cuda 2>&1 | tee "$out/accuracy.md" | grep -E "kernel|B="
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    if [ -d .devwheels ]; then  # matplotlib for the plot, from wheels carried along (the machine is offline)
        deps="matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil"
        python3 -c "import numpy" 2>/dev/null || deps="$deps numpy"
        python3 -m pip install -q --no-index --no-deps --find-links .devwheels --target /tmp/bench-deps $deps \
            >/dev/null 2>&1 && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/bench-deps"
    fi
    timeout 240 python3 -m comfy_sage bench --json "$out/bench.json" --plot "$out/bench.png" ${BENCH_ARGS:-} 2>&1 \
        | tee "$out/bench.txt"
fi
