"""Attention modes: what Q·Kᵀ and P·V are computed in.

A mode is converted from the caller's string once, at the API boundary (`Mode.parse`); everything past
that point works with the enum.
"""

from __future__ import annotations

import enum


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
    def pv_fp8(self) -> bool:
        """True where P̃·V runs in FP8 e4m3, False where it runs in FP16; only for quantized modes."""
        return _PV_FP8[self]

    def with_qk_bits(self, bits: int) -> Mode:
        """The mode with the same P·V precision and Q·Kᵀ in `bits`."""
        return next(m for m in QUANTIZED_MODES if m.qk_bits == bits and m.pv_fp8 == self.pv_fp8)

    def with_pv_fp8(self, fp8: bool) -> Mode:
        """The mode with the same Q·Kᵀ precision and P·V in FP8 (True) or FP16 (False)."""
        return next(m for m in QUANTIZED_MODES if m.qk_bits == self.qk_bits and m.pv_fp8 == fp8)


QUANTIZED_MODES = (Mode.INT8_FP8, Mode.INT4_FP8, Mode.INT8_FP16, Mode.INT4_FP16)
_QK_BITS = {Mode.INT8_FP8: 8, Mode.INT4_FP8: 4, Mode.INT8_FP16: 8, Mode.INT4_FP16: 4}
_PV_FP8 = {Mode.INT8_FP8: True, Mode.INT4_FP8: True, Mode.INT8_FP16: False, Mode.INT4_FP16: False}
_BY_VALUE = {m.value: m for m in Mode}  # "int8_fp8" -> Mode.INT8_FP8: what `Mode.parse` returns for that exact string
