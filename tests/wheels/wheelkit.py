"""Shared by the wheel tests: the wheel scripts loaded by path (they are not package modules), and a fake wheel.

Not a conftest.py: the node-pack tests import their own `conftest` by name.
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load(path: Path, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


build = load(REPO / "wheels" / "build.py", "comfy_sage_wheels_build")
index = load(REPO / "wheels" / "index.py", "comfy_sage_wheels_index")
setup_py = load(REPO / "setup.py", "comfy_sage_setup")
hook = load(REPO / "install.py", "comfy_sage_install_hook")


def make_wheel(folder: Path, name: str, files: dict[str, bytes] | None = None) -> Path:
    """A small but well-formed wheel (no RECORD hashes: set_local_version writes them)."""
    dist, version = name.split("-")[:2]
    info = f"{dist}-{version}.dist-info"
    files = files or {"comfy_sage/__init__.py": b'__version__ = "x"\n', "comfy_sage/_C.abi3.so": b"\x7fELF"}
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.4\nName: comfy-sage\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp310-abi3-linux_x86_64\n",
    }
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in files) + f"{info}/RECORD,,\n")
    return path
