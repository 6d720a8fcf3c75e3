"""scripts/comfyui_e2e.py's arguments (the measurement itself needs a GPU and a ComfyUI checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "comfyui_e2e.py"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env={**environ, **(env or {})}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), None, "set COMFYUI_PATH to a ComfyUI checkout"),
        (("--repeat", "0"), {"COMFYUI_PATH": "/nowhere"}, "--repeat must be at least 1"),
        (("--rounds", "0"), {"COMFYUI_PATH": "/nowhere"}, "--rounds must be at least 1"),
    ],
)
def test_bad_arguments_are_usage_errors(args, env, message):
    done = run(*args, env=env)
    assert done.returncode == 2 and message in done.stderr


def test_without_a_gpu_it_says_so(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    done = run(env={"COMFYUI_PATH": str(tmp_path)})
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
