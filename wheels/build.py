"""The one wheel build entry point: CI (cibuildwheel) and developers run the same steps.

    python wheels/build.py deps                 the build tools, and $COMFY_SAGE_TORCH from $COMFY_SAGE_TORCH_INDEX
    python wheels/build.py [all --outdir DIR]   build, repair, label and audit (what a developer runs)
    python wheels/build.py repair WHEEL DEST    repair, label and audit one wheel (cibuildwheel's repair step)
    python wheels/build.py audit WHEEL          the audits alone
    python wheels/build.py count LOG            kernel instantiations per arch in a build log

The build step is `python -m build --wheel --no-isolation`, which is also cibuildwheel's build frontend
(`[tool.cibuildwheel]` in pyproject.toml), run against the CUDA torch already installed, with
COMFY_SAGE_BUILD_KERNELS=1 (a missing toolchain fails instead of giving a pure-Python wheel) and
COMFY_SAGE_PTXAS_VERBOSE=1 (ptxas prints one `Compiling entry function` line per kernel and arch).
TORCH_CUDA_ARCH_LIST and MAX_JOBS pass through; CUDA_HOME must name the toolkit.

Repair: Linux wheels go through auditwheel, which must not vendor torch or the CUDA runtime (they come with
torch, and `import torch` loads them first); Windows wheels keep their DLL imports as they are. The version
then gets the local label of the CUDA major it was built with (`0.1.0+cu13`), the key of the wheel index.
Audit: the cp310-abi3 tag and platform, `abi3audit --strict`, `torch-abi-audit --check torch`, the
extension's ELF dependencies and undefined symbols (no libcuda, no libtorch_python, no C++ torch symbols
outside the stable C shim), `check-wheel-contents`, and nothing of torch or CUDA vendored.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_COMMAND = ["-m", "build", "--wheel", "--no-isolation"]  # after sys.executable; cibuildwheel: the same
BUILD_ENV = {"COMFY_SAGE_BUILD_KERNELS": "1", "COMFY_SAGE_PTXAS_VERBOSE": "1"}
# Shared libraries the extension loads from torch's install, never from the wheel.
EXTERNAL_LIBS = ("libtorch*", "libc10*", "libcudart*", "libcuda*")
ALLOWED_NEEDED = re.compile(
    r"lib(c10|c10_cuda|torch|torch_cpu|torch_cuda|cudart\.so\.\d+|stdc\+\+|gcc_s|c|m|dl|pthread|rt)(\.so.*)?$"
)
NAME = "comfy_sage"
WHEEL_NAME = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)
TORCH_CXX = re.compile(r"\b(at|c10|torch|caffe2)::")  # in demangled names: the unstable C++ API
ENTRY = re.compile(r"Compiling entry function '[^']+' for '(sm_\w+)'")


def log(message: str) -> None:
    print(f"wheels: {message}", flush=True)


def run(command: list[str], **kwargs) -> None:
    log("$ " + " ".join(command))
    subprocess.run(command, check=True, **kwargs)


# ----------------------------------------------------------------------------------------------- build


def deps() -> None:
    """cibuildwheel's before-build (no build isolation): the CUDA torch to build against, and the tools."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if os.environ.get("COMFY_SAGE_TORCH"):
        index = os.environ.get("COMFY_SAGE_TORCH_INDEX")
        run([*pip, os.environ["COMFY_SAGE_TORCH"], *(["--index-url", index] if index else [])])
    run([*pip, "-r", str(ROOT / "wheels" / "requirements.txt")])


def build(outdir: Path) -> Path:
    """`python -m build --wheel --no-isolation` into a fresh folder; the log goes to outdir/build.log."""
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in BUILD_ENV.items()}}
    raw = Path(tempfile.mkdtemp(prefix="comfy-sage-raw-"))
    outdir.mkdir(parents=True, exist_ok=True)
    log_path = outdir / "build.log"
    command = [sys.executable, *BUILD_COMMAND, "--outdir", str(raw)]
    log("$ " + " ".join(command) + f"  (log: {log_path})")
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:
            text = line.decode(errors="replace")
            log_file.write(text)
            if ENTRY.search(text) is None and "ptxas info" not in text:  # keep the console readable
                sys.stdout.write(text)
        if process.wait() != 0:
            sys.exit(f"wheels: the build failed (exit {process.returncode}); see {log_path}")
    wheels = list(raw.glob("*.whl"))
    if len(wheels) != 1:
        sys.exit(f"wheels: expected one wheel in {raw}, found {wheels}")
    jobs = os.environ.get("MAX_JOBS", "all")
    log(f"built {wheels[0].name} in {time.monotonic() - started:.0f} s wall ({os.cpu_count()} cores, MAX_JOBS={jobs})")
    print_counts(count_instantiations(log_path.read_text(errors="replace")))
    return wheels[0]


def count_instantiations(build_log: str) -> dict[str, int]:
    """Kernels ptxas compiled, per arch (`-Xptxas -v` prints one `Compiling entry function` line each)."""
    counts = Counter(ENTRY.findall(build_log))
    return dict(sorted(counts.items(), key=lambda item: int(re.sub(r"\D", "", item[0]))))


def print_counts(counts: dict[str, int]) -> None:
    if counts:
        per_arch = ", ".join(f"{arch}: {n}" for arch, n in counts.items())
        log(f"kernel instantiations: {sum(counts.values())} ({per_arch})")
    else:
        log("kernel instantiations: none counted (ptxas -v output missing from the log)")


# ---------------------------------------------------------------------------------------------- repair


def cuda_major() -> int:
    """The CUDA major of the torch the wheel was built against (the build environment's)."""
    import torch

    if torch.version.cuda is None:
        sys.exit("wheels: the build environment's torch is a CPU build")
    return int(torch.version.cuda.split(".")[0])


def repair(wheel: Path, dest: Path, plat: str | None, label: str | None) -> Path:
    """auditwheel (Linux), then the local version label; returns the audited wheel in dest."""
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="comfy-sage-repair-"))
    if sys.platform.startswith("linux"):
        command = [*tool("auditwheel"), "repair", "-w", str(work)]
        if plat:
            command += ["--plat", plat]
        for pattern in EXTERNAL_LIBS:
            command += ["--exclude", pattern]
        run([*command, str(wheel)])
        (repaired,) = work.glob("*.whl")
    else:
        repaired = Path(shutil.copy2(wheel, work))
    labelled = set_local_version(repaired, dest, label or f"cu{cuda_major()}")
    audit(labelled, plat)
    return labelled


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def set_local_version(wheel: Path, dest: Path, label: str) -> Path:
    """A copy of `wheel` in dest whose version carries `+label`: file name, dist-info folder, METADATA, RECORD."""
    parts = WHEEL_NAME.match(wheel.name)
    if parts is None:
        sys.exit(f"wheels: not a wheel file name: {wheel.name}")
    old = parts["version"]
    new = f"{old.split('+')[0]}+{label}"
    old_info, new_info = f"{parts['name']}-{old}.dist-info/", f"{parts['name']}-{new}.dist-info/"
    target = dest / wheel.name.replace(f"-{old}-", f"-{new}-", 1)
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            name = info.filename.replace(old_info, new_info, 1) if info.filename.startswith(old_info) else None
            name = name or info.filename
            if name == new_info + "RECORD":
                continue
            data = src.read(info)
            if name == new_info + "METADATA":
                data = re.sub(rb"(?m)^Version: .*$", f"Version: {new}".encode(), data, count=1)
            entry = zipfile.ZipInfo(name, date_time=info.date_time)
            entry.external_attr, entry.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
            out.writestr(entry, data)
            records.append(f"{name},{_record_hash(data)},{len(data)}")
        records.append(f"{new_info}RECORD,,")
        out.writestr(new_info + "RECORD", "\n".join(records) + "\n")
    log(f"labelled {wheel.name} -> {target.name}")
    return target


# ----------------------------------------------------------------------------------------------- audit


class AuditError(Exception):
    pass


def check_name(wheel_name: str, max_glibc: tuple[int, int] | None) -> dict[str, str]:
    """The tags every release wheel has: cp310-abi3, a local CUDA label, manylinux_2_X<=max or win_amd64."""
    parts = WHEEL_NAME.match(wheel_name)
    if parts is None or parts["name"] != NAME:
        raise AuditError(f"{wheel_name}: not a {NAME} wheel")
    if (parts["python"], parts["abi"]) != ("cp310", "abi3"):
        raise AuditError(f"{wheel_name}: tagged {parts['python']}-{parts['abi']}, not cp310-abi3")
    if not re.search(r"\+cu\d+$", parts["version"]):
        raise AuditError(f"{wheel_name}: the version has no +cuNN label")
    plats = parts["plat"].split(".")
    for plat in plats:
        glibc = re.match(r"manylinux_(\d+)_(\d+)_", plat)
        if glibc and max_glibc and (int(glibc[1]), int(glibc[2])) > max_glibc:
            raise AuditError(f"{wheel_name}: needs glibc {glibc[1]}.{glibc[2]}, more than {max_glibc}")
        if not glibc and plat != "win_amd64":
            raise AuditError(f"{wheel_name}: platform {plat} is neither manylinux_2_X nor win_amd64")
    return parts.groupdict()


def check_members(names: list[str]) -> str:
    """One compiled extension at comfy_sage/_C.*, and no torch or CUDA library inside the wheel."""
    extensions = [n for n in names if re.fullmatch(rf"{NAME}/_C\.(abi3\.so|pyd)", n)]
    if len(extensions) != 1:
        raise AuditError(f"expected one {NAME}/_C.abi3.so or _C.pyd, found {extensions}")
    vendored = [n for n in names if re.search(r"(^|/)(lib)?(torch|c10|cudart|cuda)[^/]*\.(so|dll)", n)]
    if vendored:
        raise AuditError(f"torch or CUDA libraries vendored into the wheel: {vendored}")
    return extensions[0]


def check_elf(needed: list[str], undefined: list[str]) -> None:
    """NEEDED libs are torch's, cudart and the C/C++ runtime; no undefined (demangled) symbol is torch C++."""
    bad_needed = [n for n in needed if not ALLOWED_NEEDED.match(n)]
    if bad_needed:
        raise AuditError(f"the extension needs libraries it must not: {bad_needed} (libcuda: use driver entry points)")
    cxx_torch = [s for s in undefined if TORCH_CXX.search(s)]
    if cxx_torch:
        raise AuditError(f"unstable torch C++ symbols (only the aoti_torch_* C shim is stable): {cxx_torch[:10]}")


def elf_facts(path: Path) -> tuple[list[str], list[str]]:
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    symbols = subprocess.run(
        ["nm", "-D", "--undefined-only", "--demangle", str(path)], capture_output=True, text=True, check=True
    )
    undefined = [line.split(maxsplit=1)[-1] for line in symbols.stdout.splitlines() if line.strip()]
    return needed, undefined


def tool(name: str) -> list[str]:
    """A console tool next to this Python, else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise AuditError(f"{name} is not installed (pip install {name})")
    return [found]


def audit(wheel: Path, plat: str | None = None) -> None:
    max_glibc = None
    if plat and (m := re.match(r"manylinux_(\d+)_(\d+)", plat)):
        max_glibc = (int(m[1]), int(m[2]))
    try:
        tags = check_name(wheel.name, max_glibc)
        log(f"tags: {tags['python']}-{tags['abi']}-{tags['plat']}, version {tags['version']}")
        with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
            extension = check_members(zf.namelist())
            zf.extractall(tmp)
            so = Path(tmp, extension)
            run([*tool("abi3audit"), "--strict", "--summary", "--verbose", str(wheel)])
            if sys.platform.startswith("linux"):
                run([*tool("torch-abi-audit"), "--check", "torch", "--verbose", str(so)])
                needed, undefined = elf_facts(so)
                check_elf(needed, undefined)
                log(f"NEEDED: {', '.join(needed)}")
                shims = [s for s in undefined if s.startswith(("aoti_torch_", "torch_"))]
                log(f"torch symbols: {len(shims)}, all from the stable C shim (aoti_torch_*, torch_*), no C++ ones")
                print_fatbin(so)
        run([*tool("check-wheel-contents"), str(wheel)])
    except (AuditError, subprocess.CalledProcessError) as exc:
        sys.exit(f"wheels: AUDIT FAILED for {wheel.name}: {exc}")
    size = wheel.stat().st_size
    log(f"audit passed: {wheel} ({size / 2**20:.1f} MiB)")


def print_fatbin(so: Path) -> None:
    """The SASS and PTX the extension embeds, where a cuobjdump is around (CUDA toolkit, or $CUOBJDUMP)."""
    cuobjdump = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if cuobjdump is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"], "bin", "cuobjdump")
        cuobjdump = str(candidate) if candidate.exists() else None
    if cuobjdump is None:
        log("embedded archs: not listed (no cuobjdump)")
        return
    listing = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(so)], capture_output=True, text=True)
    sass = sorted(set(re.findall(r"\.(sm_\w+)\.cubin", listing.stdout)))
    ptx = sorted(set(re.findall(r"\.(sm_\w+)\.ptx", listing.stdout)))
    log(f"embedded SASS: {', '.join(sass) or 'none'}; PTX: {', '.join(ptx) or 'none'}")


# ------------------------------------------------------------------------------------------------ main


def platform_tag(plat: str | None) -> str | None:
    """auditwheel's --plat: `manylinux_2_28` gets this CPU appended; None lets auditwheel pick the lowest."""
    if plat and re.fullmatch(r"manylinux_\d+_\d+", plat):
        return f"{plat}_{platform.machine()}"
    return plat or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python wheels/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--plat",
        default=os.environ.get("COMFY_SAGE_WHEEL_PLAT"),
        help="auditwheel --plat, e.g. manylinux_2_28 (default: $COMFY_SAGE_WHEEL_PLAT, else the lowest that fits)",
    )
    parser.add_argument("--label", help="local version label (default: cuNN of the build environment's torch)")
    sub = parser.add_subparsers(dest="step")
    sub.add_parser("deps", help="install $COMFY_SAGE_TORCH and the build tools (cibuildwheel's before-build)")
    p = sub.add_parser("all", help="build, repair, label, audit (the default)")
    p.add_argument("--outdir", type=Path, default=ROOT / "dist")
    p = sub.add_parser("repair", help="repair, label and audit a built wheel")
    p.add_argument("wheel", type=Path)
    p.add_argument("dest", type=Path)
    p = sub.add_parser("audit", help="audit a repaired wheel")
    p.add_argument("wheel", type=Path)
    p = sub.add_parser("count", help="kernel instantiations per arch in a build log")
    p.add_argument("log", type=Path)
    args = parser.parse_args(argv)
    plat = platform_tag(args.plat)
    if args.step == "deps":
        deps()
    elif args.step == "repair":
        repair(args.wheel, args.dest, plat, args.label)
    elif args.step == "audit":
        audit(args.wheel, plat)
    elif args.step == "count":
        print_counts(count_instantiations(args.log.read_text(errors="replace")))
    else:
        outdir = getattr(args, "outdir", ROOT / "dist")
        repair(build(outdir), outdir, plat, args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
