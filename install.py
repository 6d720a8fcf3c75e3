"""ComfyUI-Manager's install hook: run with ComfyUI's own Python after `requirements.txt`.

It never installs torch and never starts a source build (compiling the kernels takes long and needs a CUDA
toolkit). Choosing a prebuilt kernel wheel for this Python, torch and GPU is the wheel installer's job;
until that exists, `wheel_commands` returns nothing and the nodes run ComfyUI's PyTorch attention, saying
so once in the log. It only uses the standard library and always exits 0: a failed hook must not stop
ComfyUI-Manager from finishing the install.
"""

from __future__ import annotations

import sys


def wheel_commands() -> list[list[str]]:
    """The pip commands that would install prebuilt kernels here (none yet: no wheel index exists)."""
    return []


def main() -> int:
    commands = wheel_commands()
    if not commands:
        print(
            "comfy-sage: no prebuilt kernel wheel to install yet; Patch Sage Attention runs ComfyUI's PyTorch "
            "attention until the kernels are installed (the Sage Attention Info node shows what this GPU gets)."
        )
        return 0
    import subprocess

    for command in commands:
        print("comfy-sage: " + " ".join(command))
        if subprocess.run(command, check=False).returncode != 0:
            print("comfy-sage: the kernel wheel did not install; the nodes will run PyTorch attention")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
