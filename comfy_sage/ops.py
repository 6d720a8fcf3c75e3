"""The compiled ops (`torch.ops.comfy_sage.*`): their fake kernels and the Python side of a kernel call.

`comfy_sage::attention(q, k, v, layout, qk_bits, pv, is_causal, sm_scale, return_lse, family, key_bias=None)
-> (out, lse)`
runs kernel family `family` (80: mma.sync; 90: wgmma, INT8 Q·Kᵀ + FP8 or INT8 P·V, head dim ≤ 128) with P·V in
`pv` (`PV_CODES`). It takes Q, K, V in the caller's layout (layout 0 = HND, 1 = NHD), float16 or bfloat16,
contiguous in head_dim with 16-byte aligned rows, and returns O in the same layout and dtype, and the LSE
[B, H_q, N_q] float32 (an empty tensor when `return_lse` is False). `key_bias` (INT8 Q·Kᵀ, both families) is a key
mask as `key_bias` below builds it. It quantizes and attends on the current CUDA
stream and never synchronizes. The fake kernel below gives torch.compile the output metadata, so
`torch.compile(fullgraph=True)` traces through it.
"""

from __future__ import annotations

import math
import re

import torch

from .modes import Mode

LAYOUT_CODES = {"HND": 0, "NHD": 1}
FAMILY_CODES = {"sm80": 80, "sm90": 90}  # the op's `family`: mma.sync, wgmma
PV_CODES = {"fp16": 0, "fp8": 1, "int8": 2}  # the op's `pv` (csrc/attention/params.h PvType)
_ALIGN_ELEMENTS = 8  # 16 bytes of fp16/bf16
KEY_BIAS_ALIGN = 128  # key_bias's row length: a multiple of every kernel's K block
LOG2E = math.log2(math.e)
# key_bias's lowest finite value: far below any score, and far enough above float32's range that the kernel's
# division by a dequantization scale cannot overflow it to −inf.
FINITE_BIAS_FLOOR = -1e25
_FLAG_KEYS = 64  # keys per key_bias flag: the mma.sync kernel's K block
_MAX_KEY_BIAS_ROWS = 65_535  # the key_bias op's grid rows
# What the op's error says when an allocation failed (csrc/binding.cpp kOutOfMemory): the GPU is out of memory,
# and the call needs this many bytes.
OUT_OF_MEMORY = "comfy_sage: out of GPU memory"
_OUT_OF_MEMORY_BYTES = re.compile(re.escape(OUT_OF_MEMORY) + r": (\d+) bytes")


_registered = False


def register_fakes() -> None:
    """Register the fake kernels once, after the extension has loaded."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("comfy_sage::attention")
    def _attention_fake(q, k, v, layout, qk_bits, pv, is_causal, sm_scale, return_lse, family=80, key_bias=None):
        return torch.empty_like(q), empty_lse(q, layout == LAYOUT_CODES["NHD"], return_lse)

    if hasattr(torch.ops.comfy_sage, "key_bias"):  # absent from extensions built before it

        @torch.library.register_fake("comfy_sage::key_bias")
        def _key_bias_fake(mask):
            return mask.new_empty((mask.shape[0], key_bias_row_length(mask.shape[1])), dtype=torch.float32)


def out_of_memory_bytes(error: BaseException) -> int | None:
    """When `error`, raised by a kernel call, says the GPU had no memory left for the output or the quantized
    copies of Q, K and V (PyTorch attention, which needs no copies, may still fit): the bytes the call needs, or
    0 where torch's own OutOfMemoryError does not say. None for any other error."""
    if isinstance(error, torch.OutOfMemoryError):
        return 0
    found = _OUT_OF_MEMORY_BYTES.search(str(error)) if isinstance(error, RuntimeError) else None
    return int(found[1]) if found else None


def empty_lse(q: torch.Tensor, nhd: bool, return_lse: bool) -> torch.Tensor:
    """An uninitialized LSE for caller-layout `q`: [B, H_q, N_q] float32, or the empty tensor the ops return
    when `return_lse` is False (for the fake kernels)."""
    b, h, n = (q.shape[0], q.shape[2], q.shape[1]) if nhd else (q.shape[0], q.shape[1], q.shape[2])
    return q.new_empty((b, h, n) if return_lse else (0,), dtype=torch.float32)


def key_bias(attn_mask: torch.Tensor, rows: int, seq_kv: int) -> torch.Tensor:
    """`key_bias_reference`'s values, on a CUDA device by one kernel launch (csrc/attention/key_bias.cu) where the
    extension has loaded: the reference's ten small operations cost ~18 µs of GPU time and 130-160 µs of host time
    a call on the H100 machine, against 14-27 µs of host time for the op (docs/hopper-notes.md km3)."""
    mask = attn_mask.reshape(rows, seq_kv)
    if mask.is_cuda and 0 < rows <= _MAX_KEY_BIAS_ROWS and hasattr(torch.ops.comfy_sage, "key_bias"):
        return torch.ops.comfy_sage.key_bias(mask)
    return key_bias_reference(mask, rows, seq_kv)


def key_bias_reference(attn_mask: torch.Tensor, rows: int, seq_kv: int) -> torch.Tensor:
    """A key mask (`_inputs.key_mask_rows` gave `rows`) as the kernel takes it (csrc/attention/params.h): a bias
    on its log2-domain scores, [rows, width + flags] float32 with width = N_kv rounded up to KEY_BIAS_ALIGN: the
    bias of each key (−inf for a masked key: False, or −inf; −inf past N_kv), then a flag per 64 keys, 1 where any
    of them has a bias, so the kernel skips the addition in the others (their count padded with 0 to a multiple of
    4: rows of 16-byte multiples).

    An additive mask is scaled by log2(e). A finite value stays finite, at least FINITE_BIAS_FLOOR (bfloat16's
    −finfo.max, the padding value ComfyUI's models use, would overflow to −inf), so a row whose every key has
    one averages V as PyTorch's attention does, where −inf or False make it 0."""
    mask = attn_mask.reshape(rows, seq_kv)
    width = key_bias_width(seq_kv)
    blocks = width // _FLAG_KEYS
    out = torch.zeros((rows, key_bias_row_length(seq_kv)), dtype=torch.float32, device=mask.device)
    bias, flags = out[:, :width], out[:, width : width + blocks]
    bias[:, seq_kv:] = -math.inf
    if mask.dtype == torch.bool:
        bias[:, :seq_kv] = torch.where(mask, 0.0, -math.inf)
    else:
        values = mask.float()
        bias[:, :seq_kv] = torch.where(values == -math.inf, values, (values * LOG2E).clamp(min=FINITE_BIAS_FLOOR))
    flags.copy_(bias.unflatten(1, (-1, _FLAG_KEYS)).ne(0.0).any(-1))
    return out


def key_bias_width(seq_kv: int) -> int:
    """key_bias's bias values a row: N_kv rounded up to KEY_BIAS_ALIGN."""
    return -(-seq_kv // KEY_BIAS_ALIGN) * KEY_BIAS_ALIGN


def key_bias_row_length(seq_kv: int) -> int:
    """key_bias's row: its bias values, then their flags rounded up to 4."""
    width = key_bias_width(seq_kv)
    return width + -(-(width // _FLAG_KEYS) // 4) * 4


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """`x`, or a fresh contiguous copy where its head_dim is strided or its rows are not 16-byte aligned (the
    strides of size-1 dimensions are never used, so they do not count)."""
    if x.data_ptr() % 16 == 0 and x.is_contiguous():  # the usual input
        return x
    strides, sizes = x.stride(), x.shape
    ok = (
        strides[-1] == 1
        and all(s % _ALIGN_ELEMENTS == 0 for s, n in zip(strides[:-1], sizes[:-1], strict=True) if n > 1)
        and x.data_ptr() % 16 == 0
    )
    # A fresh allocation is aligned; `contiguous()` would return a misaligned contiguous `x` itself.
    return x if ok else x.clone(memory_format=torch.contiguous_format)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: str,
    mode: Mode,
    *,
    family: str = "sm80",
    is_causal: bool,
    scale: float,
    return_lse: bool,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel of quantized `mode` and `family` on caller-layout inputs, with an optional key mask as
    `key_bias` builds it; float32 inputs are computed in bfloat16."""
    out_dtype = q.dtype
    if out_dtype == torch.float32:
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    out, lse = torch.ops.comfy_sage.attention(
        _aligned(q), _aligned(k), _aligned(v), LAYOUT_CODES[layout], mode.qk_bits, PV_CODES[mode.pv], is_causal, scale,
        return_lse, FAMILY_CODES[family], key_bias,
    )  # fmt: skip
    # The kernel's own tensor when the dtype matches (`out.to` would return it too, through the dispatcher).
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out, (lse if return_lse else None)
