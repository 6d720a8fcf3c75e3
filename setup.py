"""Builds the CUDA extension `comfy_sage._C` when a CUDA build of torch and nvcc are present.

Without them (or with COMFY_SAGE_BUILD_KERNELS=0) the package installs as pure Python and runs every call
through PyTorch attention. COMFY_SAGE_BUILD_KERNELS=1 makes a missing toolchain an error instead.
Build with `pip install --no-build-isolation .` so the installed CUDA torch is the one built against.
Arch list: TORCH_CUDA_ARCH_LIST (default below); the extension uses the LibTorch stable ABI (torch >= 2.10)
and the CPython limited API (one cp310-abi3 wheel for every CPython >= 3.10).
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0a;12.0a"
TORCH_2_10 = "0x020a000000000000"


def kernel_extension():
    mode = os.environ.get("COMFY_SAGE_BUILD_KERNELS", "auto")
    if mode == "0":
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError as exc:
        return _skip(mode, f"torch is not importable ({exc})")
    if torch.version.cuda is None or CUDA_HOME is None:
        return _skip(mode, "no CUDA build of torch or no CUDA toolkit (set CUDA_HOME)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_2_10}", "-DPy_LIMITED_API=0x030A0000", "-DUSE_CUDA"]
    nvcc = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", *defines]
    if os.environ.get("COMFY_SAGE_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    sources = ["csrc/binding.cpp", "csrc/quant/quantize.cu", "csrc/sm80/launch.cu"]
    return [
        CUDAExtension(
            "comfy_sage._C",
            sources,
            py_limited_api=True,
            extra_compile_args={"cxx": ["-O3", "-std=c++17", *defines], "nvcc": nvcc},
        )
    ]


def _skip(mode, why):
    if mode == "1":
        sys.exit(f"COMFY_SAGE_BUILD_KERNELS=1 but the kernels cannot be built: {why}")
    print(f"comfy-sage: building the pure-Python package: {why}", file=sys.stderr)
    return []


ext_modules = kernel_extension()
cmdclass = {}
options = {}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    options["bdist_wheel"] = {"py_limited_api": "cp310"}

setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
