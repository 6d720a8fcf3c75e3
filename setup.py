"""Builds the CUDA extension `comfy_sage._C` when a CUDA build of torch and nvcc are present.

Without them (or with COMFY_SAGE_BUILD_KERNELS=0) the package installs as pure Python and runs every call
through PyTorch attention. COMFY_SAGE_BUILD_KERNELS=1 makes a missing toolchain an error instead.
Build with `pip install --no-build-isolation .` so the installed CUDA torch is the one built against;
release wheels come from `python wheels/build.py` (the same steps as CI's cibuildwheel).
Arch list: TORCH_CUDA_ARCH_LIST (default below; `X+PTX` adds PTX of the portable `compute_X`, without the
`a`/`f` suffix, so GPUs newer than the list JIT it); archs the toolkit cannot compile are left out. The
extension uses the LibTorch stable ABI (torch >= 2.10) and the CPython limited API (one cp310-abi3 wheel
for every CPython >= 3.10). It links no libcuda: driver entry points are looked up at run time.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0a;12.0a+PTX"
TORCH_2_10 = "0x020a000000000000"
# The oldest nvcc that compiles each arch (the ones not listed: any CUDA >= 12).
MIN_NVCC = {"8.9": (11, 8), "10.0a": (12, 8), "12.0": (12, 8), "12.0a": (12, 8), "12.0f": (12, 9)}

# The extension's sources. Each .cu file builds for every arch of the list unless SOURCE_ARCHS narrows it.
sources = [
    "csrc/binding.cpp",
    "csrc/attention/key_bias.cu",
    "csrc/quant/quantize.cu",
    "csrc/sm80/launch.cu",
    "csrc/sm90/launch.cu",
]
# Sources that build only for some archs (wgmma/TMA code: sm_90a only), e.g. "csrc/sm90/launch.cu": ("9.0a",).
# A source none of whose archs is in the build's list is left out and COMFY_SAGE_NO_<ITS DIR> is defined
# (COMFY_SAGE_NO_SM90), so the binding can leave its launcher out too.
SOURCE_ARCHS: dict[str, tuple[str, ...]] = {"csrc/sm90/launch.cu": ("9.0a",)}


def parse_arch_list(text: str, nvcc: tuple[int, int] | None) -> list[str]:
    """`8.0;9.0a;12.0a+PTX` -> archs this nvcc compiles; the +PTX of a dropped arch moves to the newest kept."""
    archs = [a for a in re.split(r"[;\s]+", text.strip()) if a]
    wants_ptx = any(a.endswith("+PTX") for a in archs)
    kept = []
    for arch in archs:
        base = arch.removesuffix("+PTX")
        if nvcc is not None and nvcc < MIN_NVCC.get(base, (0, 0)):
            print(f"comfy-sage: nvcc {nvcc[0]}.{nvcc[1]} cannot compile sm_{base}; leaving it out", file=sys.stderr)
        else:
            kept.append(arch)
    if wants_ptx and kept and not any(a.endswith("+PTX") for a in kept):
        kept[-1] += "+PTX"
    return kept


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc -gencode flags: SASS for each arch, and PTX of the portable compute_X for `X+PTX`."""
    flags = []
    for arch in archs:
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            portable = number.rstrip("af")
            flags.append(f"-gencode=arch=compute_{portable},code=compute_{portable}")
    return flags


def arch_groups(archs: list[str]) -> tuple[list[str], dict[tuple[str, ...], list[str]], list[str]]:
    """Splits `sources` into (built for every arch, {arch subset: sources}, defines for the sources left out)."""
    common, groups, defines = [], {}, []
    bases = {a.removesuffix("+PTX"): a for a in archs}
    for source in sources:
        if source not in SOURCE_ARCHS:
            common.append(source)
            continue
        subset = tuple(bases[a] for a in SOURCE_ARCHS[source] if a in bases)
        if subset:
            groups.setdefault(subset, []).append(source)
        else:
            defines.append(f"-DCOMFY_SAGE_NO_{Path(source).parent.name.upper()}")
    return common, groups, sorted(set(defines))


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [str(Path(cuda_home, "bin", "nvcc")), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


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
    archs = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS, nvcc_version(CUDA_HOME))
    if not archs:
        return _skip(mode, "no arch of TORCH_CUDA_ARCH_LIST can be compiled by this nvcc")
    common, groups, left_out = arch_groups(archs)
    print(f"comfy-sage: building the kernels for {';'.join(archs)}", file=sys.stderr)
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_2_10}", "-DPy_LIMITED_API=0x030A0000", "-DUSE_CUDA", *left_out]
    cxx = ["/O2", "/std:c++17"] if sys.platform == "win32" else ["-O3", "-std=c++17"]
    nvcc = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", *defines]
    if os.environ.get("COMFY_SAGE_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    extension = CUDAExtension(
        "comfy_sage._C",
        common,
        py_limited_api=True,
        extra_compile_args={"cxx": [*cxx, *defines], "nvcc": [*nvcc, *gencode_flags(archs)]},
    )
    extension.arch_groups = groups
    return [extension]


def _skip(mode, why):
    if mode == "1":
        sys.exit(f"COMFY_SAGE_BUILD_KERNELS=1 but the kernels cannot be built: {why}")
    print(f"comfy-sage: building the pure-Python package: {why}", file=sys.stderr)
    return []


def build_ext_class():
    """torch's BuildExtension (ninja), compiling each arch group of SOURCE_ARCHS with its own -gencode flags."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithArchGroups(BuildExtension):
        def build_extension(self, ext):
            # By now torch has added its defines to the nvcc flags; swap only the -gencode flags per group.
            shared = [f for f in ext.extra_compile_args["nvcc"] if not f.startswith("-gencode=")]
            for subset, group_sources in getattr(ext, "arch_groups", {}).items():
                ext.extra_objects += self.compiler.compile(
                    group_sources,
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={**ext.extra_compile_args, "nvcc": shared + gencode_flags(list(subset))},
                    depends=ext.depends,
                )
            super().build_extension(ext)

    return BuildWithArchGroups.with_options(use_ninja=True)


def sdist_class():
    """The sdist carries the CUDA sources and the wheel tools even when this machine builds no kernels."""
    from setuptools.command.sdist import sdist

    class SdistWithKernelSources(sdist):
        def make_distribution(self):
            for folder in ("csrc", "wheels"):
                self.filelist.extend(
                    p.relative_to(ROOT).as_posix()
                    for p in ROOT.glob(f"{folder}/**/*")
                    if p.is_file() and "__pycache__" not in p.parts
                )
            self.filelist.sort()
            self.filelist.remove_duplicates()
            super().make_distribution()

    return SdistWithKernelSources


if __name__ == "__main__":
    ext_modules = kernel_extension()
    cmdclass = {"sdist": sdist_class()}
    options = {}
    if ext_modules:
        cmdclass["build_ext"] = build_ext_class()
        options["bdist_wheel"] = {"py_limited_api": "cp310"}
    setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
