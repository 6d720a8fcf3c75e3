"""Quantization exactly as the kernels do it, in float32 arithmetic.

Integers are held as float32 values (exact: |x| ≤ 127, and every Q·Kᵀ dot product of them stays below
2^24 for head_dim ≤ 256, so float32 matrix products of them are exact).

Rules shared with the kernels (csrc/quant):
- symmetric: scale = amax / qmax (qmax 127 for INT8, 7 for INT4), x_q = round_half_even(x · (qmax / amax)),
  clamped to ±qmax; a group whose amax is 0 gets scale 0 and all-zero values; a zero stays zero even where
  qmax / amax overflows to inf (amax below ~1e-36; 0 · inf would be NaN, and the kernels must not give NaN);
- V in FP8 e4m3 per channel: scale = amax / 448, v̂ = e4m3_rn(clamp(v · (448 / amax), ±448)), zeros kept;
- V in INT8 per channel (INT8 P·V): scale = amax / 127, v̂ = round_half_even(v · (127 / amax)), zeros kept;
  P̃ in [0, p_max] to unsigned integers as the kernels round it: to the nearest integer (ties to even), by
  the wgmma kernel directly and by the mma.sync kernels through float16 first (`round_p_int8`).
"""

from __future__ import annotations

import enum

import torch

from ..modes import INT8_P_MAX, INT8_PV_BUDGET
from ..tiling import COL_GROUPS, ROW_GROUPS, Tiling

FP8_MAX = 448.0  # largest finite float8 e4m3fn value
INT_MAX = {8: 127, 4: 7}
FP22_DROPPED_BITS = 10  # float32 keeps 23 mantissa bits; the FP8 mma accumulator keeps 13


class Granularity(str, enum.Enum):
    """Which values share one Q or K scale."""

    THREAD = "thread"  # the tensor-core fragment groups of comfy_sage.reference.layout (the kernels' choice)
    BLOCK = "block"  # one scale per Q block (block_q rows) and per K block (block_k tokens)
    TENSOR = "tensor"  # one scale per (batch, head)


def q_group_ids(seq: int, tiling: Tiling, granularity: Granularity, device: torch.device) -> torch.Tensor:
    """Group index of every Q row (vectorized `layout.q_group`)."""
    rows = torch.arange(seq, device=device)
    if granularity is Granularity.THREAD:
        return (rows // tiling.warp_q) * ROW_GROUPS + rows % ROW_GROUPS
    if granularity is Granularity.BLOCK:
        return rows // tiling.block_q
    return torch.zeros_like(rows)


def k_group_ids(seq: int, tiling: Tiling, granularity: Granularity, device: torch.device) -> torch.Tensor:
    """Group index of every K token (vectorized `layout.k_group`)."""
    tokens = torch.arange(seq, device=device)
    if granularity is Granularity.THREAD:
        return (tokens // tiling.block_k) * COL_GROUPS + (tokens % ROW_GROUPS) // (ROW_GROUPS // COL_GROUPS)
    if granularity is Granularity.BLOCK:
        return tokens // tiling.block_k
    return torch.zeros_like(tokens)


def quantize_int(x: torch.Tensor, bits: int, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 `x` [B, H, N, D] with one scale per group of rows.

    Returns (integer values as float32 [B, H, N, D], the scale of each row [B, H, N]).
    """
    qmax = INT_MAX[bits]
    b, h, n, _ = x.shape
    row_amax = x.abs().amax(-1)
    index = group_ids.expand(b, h, n)
    groups = int(group_ids.max()) + 1 if n else 0
    amax = torch.zeros(b, h, groups, dtype=torch.float32, device=x.device)
    amax = amax.scatter_reduce(-1, index, row_amax, reduce="amax", include_self=True).gather(-1, index)
    scale = amax / qmax
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    return _keep_zeros(x, torch.round(x * inv[..., None]).clamp_(-qmax, qmax)), scale


def _keep_zeros(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Zeros stay zero where qmax / amax overflowed to inf (amax below ~1e-36): 0 · inf would be NaN."""
    return torch.where(x == 0, torch.zeros_like(quantized), quantized)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest float8 e4m3fn value (saturating at ±448), returned as float32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def quantize_v_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 V: (e4m3 values as float32 [B, H, N, D], scale [B, H, 1, D])."""
    amax = v.abs().amax(-2, keepdim=True)
    inv = torch.where(amax > 0, FP8_MAX / amax, torch.zeros_like(amax))
    return _keep_zeros(v, to_e4m3(v * inv)), amax / FP8_MAX


def quantize_v_int8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel INT8 V: (integer values as float32 [B, H, N, D], scale [B, H, 1, D]); `quantize_int` with
    each channel its own group."""
    channels = torch.arange(v.shape[-1], device=v.device)
    v_int, scale = quantize_int(v.transpose(-1, -2), 8, channels)
    return v_int.transpose(-1, -2), scale.unsqueeze(-2)


def int8_p_max(seq_kv: int) -> int:
    """The largest P̃ value of INT8 P·V for `seq_kv` keys (csrc/attention/params.h int8_p_max)."""
    return max(1, min(INT8_P_MAX, INT8_PV_BUDGET // (INT_MAX[8] * max(seq_kv, 1))))


def round_p_int8(p: torch.Tensor, via_fp16: bool) -> torch.Tensor:
    """P̃ in [0, p_max] to integers: the nearest one (ties to even), of P̃ itself or (`via_fp16`, the mma.sync
    kernels' packing) of P̃ rounded to float16 first."""
    return torch.round(p.to(torch.float16).to(torch.float32) if via_fp16 else p)


def truncate_fp22(x: torch.Tensor) -> torch.Tensor:
    """Drop float32 mantissa bits below the FP22 accumulator's 13 (round toward zero)."""
    mask = -(1 << FP22_DROPPED_BITS)  # ...1111_0000000000 as int32
    return (x.contiguous().view(torch.int32) & mask).view(torch.float32)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of `block` rows of float32 `x` [B, H, N, D] over its valid rows: [B, H, ⌈N/block⌉, D]."""
    b, h, n, d = x.shape
    blocks = -(-n // block)
    padded = torch.zeros(b, h, blocks * block, d, dtype=x.dtype, device=x.device)
    padded[:, :, :n] = x
    counts = torch.full((blocks,), float(block), device=x.device)
    if n % block:
        counts[-1] = n % block
    return padded.view(b, h, blocks, block, d).sum(3) / counts[:, None]
