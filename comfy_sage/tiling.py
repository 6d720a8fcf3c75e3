"""Tile shapes that decide how the kernels quantize, shared by the kernels' launchers and the reference.

Quantization groups follow the tensor-core accumulator layout, so the reference must be configured with
the same tile shape as the kernel it checks. The two kernel families tile differently (mma.sync on
Ampere/Ada/consumer Blackwell, wgmma on Hopper): one `Tiling` each.
"""

from __future__ import annotations

from dataclasses import dataclass

# Rows of an m16n8 (mma.sync) or m64nN (wgmma, per warp) accumulator that one lane holds differ by 8;
# columns come in pairs. See `comfy_sage.reference.layout`.
ROW_GROUPS = 8
COL_GROUPS = 4


@dataclass(frozen=True)
class Tiling:
    """One kernel family's tile shape.

    block_q: Q rows per thread block; the unit of Q smoothing (one mean, one ΔS row per block).
    warp_q:  Q rows per warp; within it, rows with equal index mod 8 share one Q scale.
    block_k: keys per K block; the unit of K scales (4 per block), of the online-softmax step and of the
             two-level P·V accumulation (a fresh accumulator per block, added into fp32).
    pv_k:    keys per P·V tensor-core instruction; an emulated FP22 accumulator rounds after each.
    int8_p_via_fp16: how INT8 P·V rounds P̃ to its integers: through fp16 first (the mma.sync kernels' packing)
             or directly (the wgmma kernel's); see `comfy_sage.reference.quant.round_p_int8`.
    """

    block_q: int
    warp_q: int
    block_k: int
    pv_k: int = 32
    int8_p_via_fp16: bool = True

    def __post_init__(self) -> None:
        for name in ("block_q", "warp_q", "block_k", "pv_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % ROW_GROUPS:
                raise ValueError(f"Tiling.{name} must be a positive multiple of {ROW_GROUPS}; got {value!r}")
        if self.block_q % self.warp_q:
            raise ValueError(f"Tiling.block_q ({self.block_q}) must be a multiple of warp_q ({self.warp_q})")
        if self.block_k % self.pv_k:
            raise ValueError(f"Tiling.block_k ({self.block_k}) must be a multiple of pv_k ({self.pv_k})")


# mma.sync family (csrc/attention/params.h kSm80*): 8 warps of 16 Q rows, 64 keys per step; head dims
# above 128 (padded to 256) use 4 warps, so their Q block, the unit of INT4 Q smoothing, is 64 rows.
SM80 = Tiling(block_q=128, warp_q=16, block_k=64)
SM80_WIDE = Tiling(block_q=64, warp_q=16, block_k=64)
# wgmma family (csrc/attention/params.h kSm90BlockK): warpgroups of 4 warps × 16 rows, 128 keys per step.
# Its CTAs hold 192 Q rows (three consumer warpgroups), but it runs INT8 only, without Q smoothing, so no
# quantization depends on block_q: 128 keeps the reference's Q-smoothing unit a power of two.
SM90 = Tiling(block_q=128, warp_q=16, block_k=128, int8_p_via_fp16=False)
# Q rows one wgmma CTA holds, by padded head dim (csrc/attention/params.h sm90_block_q): 64 per consumer
# warpgroup, three of them at head dim 128 and four at 64 (three with a key mask: SM90_KEY_MASK_CTA_ROWS).
# What the tile count, and so the waves, follow.
SM90_CTA_ROWS = {128: 192, 64: 256}
SM90_KEY_MASK_CTA_ROWS = {128: 192, 64: 192}


def sm80_tiling(head_dim: int) -> Tiling:
    """The mma.sync family's tiling for a head dim (the kernel pads it to 64, 128 or 256)."""
    return SM80_WIDE if head_dim > 128 else SM80
