"""Checks two instruction orders in the wgmma kernel's machine code (SASS) that ptxas is free to change and that
the source cannot pin (docs/hopper-notes.md, i13 and g14):

- INT8 P·V at head dim 128: the wait for a block's P̃·V (`WARPGROUP.DEPBAR.LE gsb0, 0x0`) comes after most of
  that consumer's exponentials of the next block (at least half; the builds measured run 47-64 of 64 before it),
  so the softmax runs under the product (the K loop's design; placed before all of them it cost 3-8%, i13);
- FP8 P·V at head dim 64 (plain kernel): the turn's barrier (`BAR.SYNC ..., 0x100`) comes after the block's
  exponentials, so a consumer never holds the tensor cores' turn through its softmax (when it did, after
  unrelated edits, the kernel ran at ~60%).

Outputs do not depend on either; speed does. Run it on a build after any change to the kernel:

    python scripts/sass_schedule.py [path to comfy_sage/_C*.so or a cubin]

It needs `cuobjdump` (the CUDA toolkit's; `$CUOBJDUMP` overrides) but no GPU, and exits 1 if an order is
broken, 2 if it cannot check.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

KERNEL = "sm90_attention_kernel"
# Itanium-mangled template arguments of the instantiations checked: <kDim, PvType (1 FP8, 2 INT8), kSplit,
# kKeyBias>. The key-mask instantiation at head dim 64 keeps P̃ in shared memory, whose barrier orders it.
INT8_D128 = re.compile(r"sm90_attention_kernelILi128ELNS_6PvTypeE2ELb[01]E")
FP8_D64_PLAIN = re.compile(r"sm90_attention_kernelILi64ELNS_6PvTypeE1ELb0ELb0E")
EXPONENTIALS_PER_BLOCK = 64  # 64 rows × 128 keys over a warpgroup's 128 threads


@dataclass
class Finding:
    kernel: str
    body: int
    ok: bool
    detail: str


def text(line: str) -> str:
    """A SASS line as `cuobjdump -sass` prints it without its address and encoding comments."""
    return re.sub(r"/\*[^*]*\*/", " ", line).strip()


def opcode(line: str) -> str:
    """The opcode of a SASS line (predicate guards skipped)."""
    words = text(line).replace(";", " ").split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def functions(sass: str, arch: str = "sm_90a") -> dict[str, list[str]]:
    """The instruction lines of each kernel in `sass` (cuobjdump -sass output), for the cubins of `arch`."""
    result: dict[str, list[str]] = {}
    current_arch, name = None, None
    for line in sass.splitlines():
        header = re.search(r"(?:arch =|code for) (sm_\w+)", line)
        if header:
            current_arch, name = header.group(1), None
            continue
        function = re.search(r"Function : (\S+)", line)
        if function:
            name = function.group(1) if current_arch == arch else None
            if name is not None:
                result[name] = []
            continue
        if name is not None and re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            result[name].append(line)
    return result


def main_loop(lines: list[str]) -> list[str]:
    """The K loop: the shortest backward branch's body with two blocks' wgmmas and exponentials (ptxas lays it
    out as a masked and an unmasked body); the other long ones are retry branches of the barrier waits, placed
    at the function's end, back into the loop."""
    addresses = [int(re.match(r"\s*/\*([0-9a-f]+)\*/", line).group(1), 16) for line in lines]
    index = {address: i for i, address in enumerate(addresses)}
    best: list[str] = []
    for i, line in enumerate(lines):
        target = re.search(r"0x([0-9a-f]+)\s*;", text(line))
        if not target or not opcode(line).startswith("BRA"):
            continue
        start = index.get(int(target.group(1), 16))
        if start is None or start >= i:
            continue
        body = lines[start : i + 1]
        ops = [opcode(x) for x in body]
        two_blocks = sum("GMMA" in op for op in ops) >= 12 and ops.count("MUFU.EX2") >= 2 * EXPONENTIALS_PER_BLOCK
        if two_blocks and (not best or len(body) < len(best)):
            best = body
    return best


def check_pv_wait(name: str, loop: list[str]) -> list[Finding]:
    """Each block after a turn (BAR.ARV) up to its P̃ fence (MEMBAR): most exponentials, then the P̃·V wait."""
    ops = [opcode(x) for x in loop]
    findings = []
    for body, start in enumerate(i for i, op in enumerate(ops) if op == "BAR.ARV"):
        end = next((i for i in range(start, len(ops)) if ops[i].startswith("MEMBAR")), len(ops))
        exps = [i for i in range(start, end) if ops[i] == "MUFU.EX2"]
        waits = [i for i in range(start, end) if ops[i] == "WARPGROUP.DEPBAR.LE" and text(loop[i]).endswith("0x0 ;")]
        if len(exps) < EXPONENTIALS_PER_BLOCK or not waits:
            findings.append(Finding(name, body, False, f"{len(exps)} exponentials, {len(waits)} P̃·V waits"))
            continue
        before = sum(i < waits[0] for i in exps)
        findings.append(
            Finding(name, body, 2 * before >= len(exps), f"{before} of {len(exps)} exponentials before the P̃·V wait")
        )
    return findings


def check_turn_barrier(name: str, loop: list[str]) -> list[Finding]:
    """Each turn's barrier (BAR.SYNC over 256 threads) after the exponentials since the previous turn."""
    ops = [opcode(x) for x in loop]
    findings = []
    turns = [i for i, x in enumerate(loop) if ops[i].startswith("BAR.SYNC") and text(x).endswith("0x100 ;")]
    for body, at in enumerate(turns):
        previous = max((i for i in range(at) if ops[i] == "BAR.ARV"), default=0)
        exps = sum(op == "MUFU.EX2" for op in ops[previous:at])
        findings.append(
            Finding(name, body, exps >= EXPONENTIALS_PER_BLOCK, f"{exps} exponentials before the turn's barrier")
        )
    return findings


def check(kernels: dict[str, list[str]]) -> list[Finding]:
    findings: list[Finding] = []
    for name, lines in sorted(kernels.items()):
        if INT8_D128.search(name):
            checker = check_pv_wait
        elif FP8_D64_PLAIN.search(name):
            checker = check_turn_barrier
        else:
            continue
        findings += checker(name, main_loop(lines)) or [Finding(name, -1, False, "no K loop found")]
    return findings


def disassembler() -> str | None:
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    candidates += [str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def default_binary() -> str | None:
    root = Path(__file__).resolve().parent.parent
    found = sorted(glob.glob(str(root / "comfy_sage" / "_C*.so")))
    return found[0] if found else None


def short(name: str) -> str:
    match = re.search(r"ILi(\d+)ELNS_6PvTypeE(\d)ELb([01])ELb([01])E", name)
    if not match:
        return name
    dim, pv, split, key_mask = match.groups()
    kind = ("split" if split == "1" else "plain") + (", key mask" if key_mask == "1" else "")
    return f"{KERNEL}<{dim}, {'FP8' if pv == '1' else 'INT8'}, {kind}>"


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", nargs="?", help="the extension (.so) or a cubin; default: comfy_sage/_C*.so")
    args = parser.parse_args(argv)
    binary = args.binary or default_binary()
    tool = disassembler()
    if binary is None or tool is None:
        print(f"cannot check: {'no cuobjdump (set CUOBJDUMP)' if tool is None else 'no built extension'}")
        return 2
    dump = subprocess.run([tool, "-sass", "-arch", "sm_90a", binary], capture_output=True, text=True, check=False)
    findings = check(functions(dump.stdout)) if dump.returncode == 0 else []
    if not findings:
        print(f"cannot check: no sm_90a wgmma kernels in {binary} {dump.stderr.strip()}".rstrip())
        return 2
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'} {short(f.kernel)} loop body {f.body}: {f.detail}")
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(run())
