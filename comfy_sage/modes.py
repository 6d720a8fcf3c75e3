"""Attention modes: what Q·Kᵀ and P·V are computed in.

A mode is converted from the caller's string once, at the API boundary (`Mode.parse`); everything past
that point works with the enum.
"""

from __future__ import annotations

import enum

# INT8 P·V (`Mode.INT8_INT8`) accumulates a whole row in int32: Σ_keys p̂·|v̂| ≤ p_max · 127 · N_kv must stay below
# 2^31 (less a margin for the floor of each rescale), so P̃'s range p_max shrinks below 255 past 65,793 keys, and
# past INT8_PV_MAX_KEYS even p_max = 1 could overflow (csrc/attention/params.h, the same rule).
INT8_P_MAX = 255
INT8_PV_BUDGET = 2**31 - 2**24
INT8_PV_MAX_KEYS = INT8_PV_BUDGET // 127


class Mode(str, enum.Enum):
    """The precision of the two matrix products.

    ``AUTO`` picks the fastest accurate mode for the GPU; ``SDPA`` is PyTorch's own FP16/BF16 attention,
    with no quantization.
    """

    AUTO = "auto"
    INT8_FP8 = "int8_fp8"
    INT4_FP8 = "int4_fp8"
    INT8_FP16 = "int8_fp16"
    INT4_FP16 = "int4_fp16"
    INT8_INT8 = "int8_int8"
    SDPA = "sdpa"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Mode | str) -> Mode:
        """`Mode` from a `Mode` or its string name; `ValueError` naming the accepted values otherwise."""
        if isinstance(value, cls):
            return value
        if type(value) is str and value in _BY_VALUE:  # the common spellings, without Enum's lookup machinery
            return _BY_VALUE[value]
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        accepted = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"mode must be one of {accepted}; got {value!r}")

    @property
    def is_quantized(self) -> bool:
        return self in QUANTIZED_MODES

    @property
    def qk_bits(self) -> int:
        """Bits of the Q·Kᵀ integers (8 or 4); only for quantized modes."""
        return _QK_BITS[self]

    @property
    def pv(self) -> str:
        """What P̃·V runs in: "fp8" (e4m3), "fp16" or "int8" (exact integer accumulation); quantized modes only."""
        return _PV[self]

    @property
    def pv_fp8(self) -> bool:
        """True where P̃·V runs in FP8 e4m3; only for quantized modes."""
        return _PV[self] == "fp8"

    def with_qk_bits(self, bits: int) -> Mode:
        """The mode with the same P·V precision and Q·Kᵀ in `bits`."""
        return _sibling(lambda m: m.qk_bits == bits and m.pv == self.pv)

    def with_pv(self, pv: str) -> Mode:
        """The mode with the same Q·Kᵀ precision and P·V in `pv` ("fp8", "fp16" or "int8")."""
        return _sibling(lambda m: m.qk_bits == self.qk_bits and m.pv == pv)


def _sibling(wanted) -> Mode:
    found = next((m for m in QUANTIZED_MODES if wanted(m)), None)
    if found is None:  # INT4 Q·Kᵀ has no INT8 P·V mode
        raise ValueError("no such quantized mode")
    return found


QUANTIZED_MODES = (Mode.INT8_FP8, Mode.INT4_FP8, Mode.INT8_FP16, Mode.INT4_FP16, Mode.INT8_INT8)
_QK_BITS = {Mode.INT8_FP8: 8, Mode.INT4_FP8: 4, Mode.INT8_FP16: 8, Mode.INT4_FP16: 4, Mode.INT8_INT8: 8}
_PV = {
    Mode.INT8_FP8: "fp8",
    Mode.INT4_FP8: "fp8",
    Mode.INT8_FP16: "fp16",
    Mode.INT4_FP16: "fp16",
    Mode.INT8_INT8: "int8",
}
_BY_VALUE = {m.value: m for m in Mode}  # "int8_fp8" -> Mode.INT8_FP8: what `Mode.parse` returns for that exact string
