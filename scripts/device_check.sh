#!/usr/bin/env bash
# On a GPU machine: use a prebuilt extension (from .devbuild, built elsewhere for this GPU), then the GPU
# tests, compute-sanitizer on small shapes of each variant, and the benchmark. Logs and JSON go to $OUT.
#   usage: scripts/device_check.sh [pytest args...]
# WHEEL=path/to.whl tests that wheel instead, as users get it: installed with `pip --no-deps` into a folder of
# its own and imported from there (the tests run outside the checkout, so its comfy_sage/ cannot shadow it).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${OUT:-/tmp/comfy-sage-device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -n "${WHEEL:-}" ]; then
    pkg=/tmp/comfy-sage-wheel
    rm -rf "$pkg"
    python3 -m pip install -q --no-deps --target "$pkg" "$WHEEL" || exit 1
    cd /tmp
else
    pkg=$repo
    cp .devbuild/comfy_sage/_C*.so comfy_sage/ || exit 1
fi
export PYTHONPATH="$pkg"
python3 -c "import comfy_sage; print('comfy_sage from', comfy_sage.__file__)" | tee "$out/package.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -m comfy_sage doctor | tee "$out/doctor.txt"
timeout 300 python3 -m pytest "$repo/tests/gpu" -q -x -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu-tests.log" | tail -25
# the wgmma kernel's instruction orders
python3 "$repo/scripts/sass_schedule.py" "$(ls "$pkg"/comfy_sage/_C*.so)" 2>&1 | tee "$out/sass-schedule.txt"
if [ -z "${SKIP_SANITIZER:-}" ]; then
    timeout 200 compute-sanitizer --tool memcheck --print-limit 20 python3 "$repo/scripts/sanitize_cases.py" 2>&1 | tail -8 | tee "$out/memcheck.log"
    timeout 120 compute-sanitizer --tool racecheck --print-limit 20 python3 "$repo/scripts/sanitize_cases.py" --family sm90 2>&1 | tail -8 | tee "$out/racecheck.log"
fi
if [ -z "${SKIP_ACCURACY:-}" ]; then
    timeout 120 python3 -m comfy_sage accuracy --kernels --device cuda 2>&1 | tee "$out/accuracy.md" | grep -E "kernel|B="
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    if [ -d "$repo/.devwheels" ]; then  # matplotlib for the plot, from wheels carried along (the machine is offline)
        deps="matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil packaging"
        python3 -c "import numpy" 2>/dev/null || deps="$deps numpy"
        python3 -m pip install -q --no-index --no-deps --find-links "$repo/.devwheels" --target /tmp/bench-deps $deps \
            >/dev/null 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/bench-deps"
    fi
    timeout 240 python3 -m comfy_sage bench --json "$out/bench.json" --plot "$out/bench.png" ${BENCH_ARGS:-} 2>&1 \
        | tee "$out/bench.txt"
fi
