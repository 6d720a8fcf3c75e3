#!/usr/bin/env bash
# Creates .venv with comfy-sage (editable) and its test tools. Reuses a torch already in the venv;
# otherwise installs $COMFY_SAGE_TORCH (default: the pin in requirements-dev.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "comfy-sage needs Python >= 3.10" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    "${pip[@]}" ${COMFY_SAGE_TORCH:-$(grep -E '^torch==' requirements-dev.txt)}
fi
"${pip[@]}" -e ".[dev]"
.venv/bin/python -c 'import comfy_sage, torch; print(f"comfy_sage {comfy_sage.__version__} with torch {torch.__version__} in .venv")'
