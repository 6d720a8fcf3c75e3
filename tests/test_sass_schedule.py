"""scripts/sass_schedule.py on made-up SASS: it passes the orders the wgmma kernel needs and flags the two that
ptxas has produced after edits (docs/hopper-notes.md i13, g14). The script itself runs on real builds where
cuobjdump is installed; here only its reading of cuobjdump's text is checked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "sass_schedule.py"
_SPEC = importlib.util.spec_from_file_location("sass_schedule", _PATH)
sass_schedule = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = sass_schedule  # its dataclass looks itself up there
_SPEC.loader.exec_module(sass_schedule)

INT8_D128 = "_ZN10comfy_sage21sm90_attention_kernelILi128ELNS_6PvTypeE2ELb0ELb0EEEvNS_10Sm90ParamsE"
FP8_D64 = "_ZN10comfy_sage21sm90_attention_kernelILi64ELNS_6PvTypeE1ELb0ELb0EEEvNS_10Sm90ParamsE"
EXPS = ["MUFU.EX2 R40, R40"] * 64


def int8_block(before: int = 64) -> list[str]:
    """One INT8 block whose P̃·V wait comes after `before` of its 64 exponentials."""
    softmax = [*EXPS[:before], "WARPGROUP.DEPBAR.LE gsb0, 0x0", *EXPS[before:]]
    return [
        "BAR.SYNC.DEFER_BLOCKING R11, 0x100",
        *["IGMMA.64x128x32.S8.S8 R24, gdesc[UR12], R24"] * 4,
        *["IGMMA.64x128x32.U8.S8 R88, gdesc[UR12], R88"] * 4,
        "BAR.ARV R10, 0x100",
        "WARPGROUP.DEPBAR.LE gsb0, 0x1",
        *softmax,
        "STS [R63], R24",
        "MEMBAR.ALL.CTA",
        "BAR.SYNC.DEFER_BLOCKING R157, 0x80",
    ]


def fp8_d64_block(turn_first: bool) -> list[str]:
    turn = ["BAR.SYNC.DEFER_BLOCKING R11, 0x100"]
    softmax = turn + EXPS if turn_first else EXPS + turn
    return [
        *["IGMMA.64x128x32.S8.S8 R24, gdesc[UR8], R24"] * 2,
        "BAR.ARV R10, 0x100",
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        *softmax,
        *["QGMMA.64x64x32.F32.E4M3.E4M3 R24, R56, gdesc[UR8], R24"] * 4,
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    ]


def cuobjdump_text(name: str, loop: list[str], arch: str = "sm_90a") -> str:
    """cuobjdump -sass's layout: a prologue, the loop closed by a backward branch, then an exit."""
    body = ["S2R R2, SR_TID.X", *loop]
    lines, start = [], 0x10
    for i, instruction in enumerate(body):
        lines.append(f"        /*{0x10 * i:04x}*/                   {instruction} ;      /* 0x000fe20000000f00 */")
        lines.append("                                                                 /* 0x000fc40000010000 */")
    end = 0x10 * len(body)
    lines.append(f"        /*{end:04x}*/                   @!P0 BRA 0x{start:x} ;      /* 0x0000000000007947 */")
    lines.append(f"        /*{end + 0x10:04x}*/                   EXIT ;                    /* 0x000000000000794d */")
    return "\n".join([f"\tcode for {arch}", "", f"\t\tFunction : {name}", *lines, ""])


def findings(text: str):
    return sass_schedule.check(sass_schedule.functions(text))


def test_int8_head_dim_128_passes_the_softmax_under_the_product():
    result = findings(cuobjdump_text(INT8_D128, int8_block() + int8_block()))
    assert [f.ok for f in result] == [True, True]


def test_int8_head_dim_128_flags_the_product_waited_for_before_the_exponentials():
    result = findings(cuobjdump_text(INT8_D128, int8_block() + int8_block(before=0)))
    assert [f.ok for f in result] == [True, False]
    assert "0 of 64" in result[1].detail


def test_int8_head_dim_128_needs_at_least_half_of_the_exponentials_before_the_wait():
    result = findings(cuobjdump_text(INT8_D128, int8_block(before=32) + int8_block(before=31)))
    assert [f.ok for f in result] == [True, False]
    assert "32 of 64" in result[0].detail and "31 of 64" in result[1].detail


def test_fp8_head_dim_64_passes_the_turn_after_the_softmax():
    result = findings(cuobjdump_text(FP8_D64, fp8_d64_block(False) + fp8_d64_block(False)))
    assert [f.ok for f in result] == [True, True]


def test_fp8_head_dim_64_flags_the_turn_held_through_the_softmax():
    result = findings(cuobjdump_text(FP8_D64, fp8_d64_block(True) + fp8_d64_block(False)))
    assert [f.ok for f in result] == [False, True]


def test_other_architectures_and_kernels_are_left_out():
    assert findings(cuobjdump_text(INT8_D128, int8_block(before=0) * 2, arch="sm_80")) == []
    assert findings(cuobjdump_text("_ZN10comfy_sage12other_kernelEv", int8_block(before=0) * 2)) == []


def test_a_kernel_without_its_loop_is_reported():
    result = findings(cuobjdump_text(FP8_D64, fp8_d64_block(False)))  # one block: no two-block loop
    assert len(result) == 1 and not result[0].ok and "no K loop" in result[0].detail


@pytest.mark.parametrize("line, op", [("/*0a30*/ @!P0 BRA 0x6380 ; /* 0x0 */", "BRA"), ("/*0010*/ EXIT ;", "EXIT")])
def test_opcode(line, op):
    assert sass_schedule.opcode(line) == op


def test_names_and_which_instantiations_are_checked():
    key_mask_d64 = FP8_D64.replace("ELb0ELb0E", "ELb0ELb1E")
    assert sass_schedule.short(FP8_D64) == "sm90_attention_kernel<64, FP8, plain>"
    assert sass_schedule.short(key_mask_d64) == "sm90_attention_kernel<64, FP8, plain, key mask>"
    # The key-mask instantiation keeps P̃ in shared memory: the turn-barrier check is for the register form only.
    assert sass_schedule.FP8_D64_PLAIN.search(FP8_D64) and not sass_schedule.FP8_D64_PLAIN.search(key_mask_d64)
    assert sass_schedule.INT8_D128.search(INT8_D128.replace("ELb0ELb0E", "ELb1ELb1E"))
