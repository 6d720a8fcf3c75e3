"""ComfyUI-Manager's install hook: run with ComfyUI's own Python after `requirements.txt`.

It installs the prebuilt kernel wheel that fits this Python, torch, OS and GPU, through comfy_sage's
installer (`comfy_sage/install.py`, also `python -m comfy_sage install`): one wheel from the comfy-sage
index with `--no-deps`, so torch is never touched, and never a source build. Where no wheel fits, or the
wheel does not load, the nodes run ComfyUI's PyTorch attention and the log says why in one line.
COMFY_SAGE_NO_KERNELS=1 skips it. It always exits 0: a failed hook must not stop ComfyUI-Manager.
"""

from __future__ import annotations

import importlib.util
import os
import sys

INSTALLER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_sage", "install.py")


def installer():
    """comfy_sage/install.py, loaded once by path: importing the package would import all of comfy_sage here."""
    name = "comfy_sage_installer"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, INSTALLER)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def wheel_commands() -> list[list[str]]:
    """The pip commands that install the kernel wheel fitting this Python (none where none fits: it says why)."""
    return installer().plan().commands


def main() -> int:
    if os.environ.get("COMFY_SAGE_NO_KERNELS") == "1":
        print("comfy-sage: COMFY_SAGE_NO_KERNELS=1: no kernel wheel installed; the nodes run PyTorch attention")
        return 0
    try:
        previous = installer().installed_version()
        commands = wheel_commands()
        if commands:
            installer().apply(commands, previous, None)
    except Exception as exc:  # the hook must never fail ComfyUI-Manager's install
        print(f"comfy-sage: the kernel installer failed ({type(exc).__name__}: {exc}); the nodes run PyTorch attention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
