"""SageAttention2 in float32 PyTorch, block by block as the kernels compute it: the oracle of every kernel test.

Pipeline (../shared/design/ALGORITHM.md):
1. K smoothing: K' = K − mean_tokens(K) per (batch, kv head). Exact under softmax; the LSE adds q·k̄ back.
2. Q smoothing (on by default for INT4, off for INT8): per Q block of `tiling.block_q` rows, Q' = Q − q̄,
   and ΔS = q̄·K'ᵀ (one row per Q block) is added back to S: in float32 from the unquantized K'
   (`delta_s="exact"`), or from INT8 q̄ and K' as the mma.sync kernels compute it (`delta_s="int8"`).
3. Q', K' to INT8/INT4 with per-thread groups (`quant.q_group_ids`, `quant.k_group_ids`); the softmax scale
   and log2(e) are folded into the Q scale.
4. V per channel to FP8 e4m3 or INT8 (optionally smoothed by its channel mean), or to FP16.
5. Online softmax in base 2 over K blocks of `tiling.block_k` keys: P̃ = exp2(S − m + log2 448) in [0, 448]
   (FP8), exp2(S − m) in [0, 1] (FP16), or exp2(S − m + log2 p_max) rounded to integers in [0, p_max]
   (INT8, `quant.int8_p_max`); the row sum uses the unquantized P̃.
6. FP8 and FP16: two-level accumulation: each K block's P̂·V̂ in a fresh accumulator (optionally with the
   FP22 rounding of the FP8 tensor cores, after every `tiling.pv_k` keys), added into a float32 O.
   INT8: the row max m is kept an integer (rounded up), so the rescale exp2(m_old − m_new) is 2^-k and the
   int32 accumulator of the whole row is shifted right by k (floor; k capped at 31) before each block's
   exact integer P̂·V̂ is added: no float accumulator, no conversion per block.
7. O / l · δV (+ v̄); causal masking is bottom-right aligned; rows that see no key give 0 (LSE −inf).
A key mask (one value per key for every head and query row, as text-padding masks are) is added to S in the
log2 domain after step 3's dequantization, as both kernel families add it (`ops.key_bias`).

Memory is bounded by the tile sizes: Q rows are processed in chunks whose S tile stays under
`max_tile_elements`, so N = 32k runs on a CPU without materializing N × N.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .._inputs import (
    causal_visible,
    check_layout,
    check_mask,
    check_qkv,
    check_sm_scale,
    from_hnd,
    key_mask_rows,
    to_hnd,
)
from ..modes import QUANTIZED_MODES, Mode
from ..ops import key_bias
from ..tiling import SM80, Tiling
from .quant import (
    FP8_MAX,
    Granularity,
    block_means,
    int8_p_max,
    k_group_ids,
    q_group_ids,
    quantize_int,
    quantize_v_fp8,
    quantize_v_int8,
    round_p_int8,
    to_e4m3,
    truncate_fp22,
)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
LOG2_FP8_MAX = math.log2(FP8_MAX)
DEFAULT_TILE_ELEMENTS = 1 << 22


def sageattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: Mode | str,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    tiling: Tiling = SM80,
    smooth_q: bool | None = None,
    smooth_k: bool = True,
    smooth_v: bool = False,
    granularity: Granularity | str = Granularity.THREAD,
    emulate_fp22: bool = False,
    delta_s: str = "exact",
    max_tile_elements: int = DEFAULT_TILE_ELEMENTS,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SageAttention2 as the kernels compute it; same conventions as `comfy_sage.sageattn`.

    mode: one of "int8_fp8", "int4_fp8", "int8_fp16", "int4_fp16", "int8_int8".
    tiling: the tile shape of the kernel being checked (`comfy_sage.tiling.SM80` or `SM90`).
    smooth_q: Q smoothing with ΔS; None means on for INT4 modes, off for INT8 modes.
    granularity: "thread" (the kernels'), "block" or "tensor": which values share a Q/K scale.
    emulate_fp22: round the FP8 P·V accumulator to 13 mantissa bits after each `tiling.pv_k` keys.
    delta_s: how Q smoothing's ΔS = q̄·K'ᵀ is computed: "exact" (float32, as the paper describes) or "int8"
        (as the mma.sync kernels do it: q̄ in INT8 with one scale per Q block, K' in INT8 with K's groups).
    attn_mask: a key mask (bool, True = attend, or additive), [B or 1, 1, 1, N_kv] or fewer leading dimensions of
        1: as the kernels take it. Other masks raise ValueError.
    Returns O in q's dtype and layout, and with `return_lse` also the natural-log LSE [B, H_q, N_q] float32.
    """
    mode = Mode.parse(mode)
    if not mode.is_quantized:
        raise ValueError(
            "mode must be a quantized mode (" + ", ".join(m.value for m in QUANTIZED_MODES) + f"); got {mode.value!r}"
        )
    if not isinstance(tiling, Tiling):
        raise TypeError(f"tiling must be a comfy_sage.tiling.Tiling; got {type(tiling).__name__}")
    granularity = Granularity(granularity)
    if delta_s not in ("exact", "int8"):
        raise ValueError(f"delta_s must be 'exact' or 'int8'; got {delta_s!r}")
    layout = check_layout(tensor_layout)
    problem = check_qkv(q, k, v, layout)
    scale = check_sm_scale(sm_scale, problem.head_dim)
    bias = None
    if attn_mask is not None:
        check_mask(attn_mask, problem, is_causal, q.device)
        rows = key_mask_rows(attn_mask, problem.batch, problem.seq_kv)
        if rows is None:
            raise ValueError(
                "attn_mask must be a key mask ([batch or 1, 1, 1, N_kv]) for the reference; got shape "
                f"{list(attn_mask.shape)}"
            )
        bias = key_bias(attn_mask, rows, problem.seq_kv)[:, : problem.seq_kv]  # the kernels' own values
    if smooth_q is None:
        smooth_q = mode.qk_bits == 4
    with _exact_float32_matmul():
        out, lse = _forward(
            to_hnd(q, layout).float(),
            to_hnd(k, layout).float(),
            to_hnd(v, layout).float(),
            mode=mode,
            causal=is_causal,
            log2_scale=scale * LOG2E,
            tiling=tiling,
            smooth_q=smooth_q,
            smooth_k=smooth_k,
            smooth_v=smooth_v,
            granularity=granularity,
            emulate_fp22=emulate_fp22,
            delta_s=delta_s,
            max_tile_elements=max_tile_elements,
            key_bias=bias,
        )
    out = from_hnd(out.to(q.dtype), layout)
    return (out, lse) if return_lse else out


def _forward(q, k, v, *, mode, causal, log2_scale, tiling, smooth_q, smooth_k, smooth_v, granularity,
             emulate_fp22, delta_s, max_tile_elements, key_bias=None):  # fmt: skip
    b, hq, nq, d = q.shape
    hkv, nkv = k.shape[1], k.shape[2]
    dev = q.device
    fp8, int8_pv = mode.pv == "fp8", mode.pv == "int8"
    log2_p_max = math.log2(int8_p_max(nkv)) if int8_pv else LOG2_FP8_MAX if fp8 else 0.0  # P̃'s exponent offset

    # 1. K smoothing; the q·k̄ shift it removes from every logit of a row, for the LSE.
    k_mean = k.mean(2, keepdim=True) if smooth_k and nkv else None
    kc = k - k_mean if k_mean is not None else k
    heads = torch.arange(hq, device=dev) // (hq // hkv)  # the kv head of each query head

    # 2. Q smoothing per Q block.
    q_mean = block_means(q, tiling.block_q) if smooth_q and nq else None
    qc = q - q_mean.repeat_interleave(tiling.block_q, 2)[:, :, :nq] if q_mean is not None else q

    # 3. Per-group INT quantization; the Q scale carries sm_scale·log2(e).
    q_int, q_scale = quantize_int(qc, mode.qk_bits, q_group_ids(nq, tiling, granularity, dev))
    k_groups = k_group_ids(nkv, tiling, granularity, dev)
    k_int, k_scale = quantize_int(kc, mode.qk_bits, k_groups)
    q_scale = q_scale * log2_scale
    # ΔS's operands: q̄ (log2-scaled) and K' in float32, or both in INT8 as the mma.sync kernels take them.
    if q_mean is not None and delta_s == "int8":
        blocks = q_mean.shape[2]
        mean_int, mean_scale = quantize_int(q_mean, 8, torch.arange(blocks, device=dev))
        delta_q = mean_int * (mean_scale * log2_scale)[..., None]
        k8_int, k8_scale = quantize_int(kc, 8, k_groups)
        delta_k = (k8_int * k8_scale[..., None])[:, heads]
    elif q_mean is not None:
        delta_q, delta_k = q_mean * log2_scale, kc[:, heads]
    k_int, k_scale, kc = k_int[:, heads], k_scale[:, heads], kc[:, heads]

    # 4. V.
    v_mean = v.mean(2, keepdim=True) if smooth_v and nkv else None
    vc = v - v_mean if v_mean is not None else v
    if fp8:
        v_hat, v_scale = quantize_v_fp8(vc)
    elif int8_pv:
        v_hat, v_scale = quantize_v_int8(vc)
    else:
        v_hat, v_scale = vc.to(torch.float16).to(torch.float32), None
    v_hat = v_hat[:, heads]

    out = torch.empty(b, hq, nq, d, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=dev)
    rows_per_chunk = max(1, max_tile_elements // max(1, b * hq * tiling.block_k * tiling.block_q)) * tiling.block_q
    for r0 in range(0, nq, rows_per_chunk):
        r1 = min(nq, r0 + rows_per_chunk)
        rows = torch.arange(r0, r1, device=dev)
        # Keys past the last row's causal limit contribute nothing: skip their blocks (the kernels do).
        kv_end = min(nkv, r1 + nkv - nq) if causal else nkv
        m = torch.full((b, hq, r1 - r0), -math.inf, device=dev)
        l = torch.zeros(b, hq, r1 - r0, device=dev)  # noqa: E741 (the paper's name)
        acc = torch.zeros(b, hq, r1 - r0, d, device=dev, dtype=torch.float64 if int8_pv else torch.float32)
        m_use = torch.zeros_like(m)
        qi, qs = q_int[:, :, r0:r1], q_scale[:, :, r0:r1, None]
        for c0 in range(0, max(kv_end, 0), tiling.block_k):
            c1 = min(nkv, c0 + tiling.block_k)
            s = (qi @ k_int[:, :, c0:c1].transpose(-1, -2)) * (qs * k_scale[:, :, None, c0:c1])
            if q_mean is not None:
                blocks = delta_q[:, :, r0 // tiling.block_q : -(-r1 // tiling.block_q)]
                delta = blocks @ delta_k[:, :, c0:c1].transpose(-1, -2)
                s = s + delta.repeat_interleave(tiling.block_q, 2)[:, :, : r1 - r0]
            if key_bias is not None:  # [B or 1, N_kv], log2 domain
                s = s + key_bias[:, None, None, c0:c1]
            if causal:
                visible = causal_visible(rows, torch.arange(c0, c1, device=dev), nq, nkv)
                s = s.masked_fill(~visible, -math.inf)
            block_max = s.amax(-1)
            m_new = torch.maximum(m, torch.ceil(block_max) if int8_pv else block_max)
            m_use = torch.where(m_new == -math.inf, 0.0, m_new)  # rows that have seen no key yet
            alpha = torch.exp2(m - m_use)
            p = torch.exp2(s - (m_use - log2_p_max)[..., None])
            l = l * alpha + p.sum(-1)  # noqa: E741
            if int8_pv:  # exact in float64: |acc| < 2^31
                shift = (m_new - m).nan_to_num(31.0).clamp(max=31.0)  # m_old = -inf: acc is 0, any shift
                p_hat = round_p_int8(p, tiling.int8_p_via_fp16).double()
                acc = torch.floor(acc * torch.exp2(-shift.double())[..., None]) + p_hat @ v_hat[:, :, c0:c1].double()
            else:
                p_hat = to_e4m3(p) if fp8 else p.to(torch.float16).to(torch.float32)
                acc = acc * alpha[..., None] + _block_pv(p_hat, v_hat[:, :, c0:c1], tiling.pv_k, fp8 and emulate_fp22)
            m = m_new
        seen = l > 0
        o = acc.float() / torch.where(seen, l, 1.0)[..., None]
        if v_scale is not None:
            o = o * v_scale[:, heads]
        if v_mean is not None:
            o = o + v_mean[:, heads]
        out[:, :, r0:r1] = torch.where(seen[..., None], o, 0.0)
        log2_sum = m_use + torch.log2(torch.where(seen, l, 1.0)) - log2_p_max
        row_lse = log2_sum * LN2
        if k_mean is not None:
            row_lse = row_lse + (q[:, :, r0:r1] @ k_mean[:, heads].transpose(-1, -2))[..., 0] * (log2_scale * LN2)
        lse[:, :, r0:r1] = torch.where(seen, row_lse, -math.inf)
    return out, lse


def _block_pv(p_hat: torch.Tensor, v_hat: torch.Tensor, pv_k: int, fp22: bool) -> torch.Tensor:
    """One K block's P̂·V̂ in a fresh accumulator; with `fp22`, rounded as the FP8 tensor cores do."""
    if not fp22:
        return p_hat @ v_hat
    acc = torch.zeros(*p_hat.shape[:-1], v_hat.shape[-1], device=p_hat.device)
    for c0 in range(0, p_hat.shape[-1], pv_k):
        acc = truncate_fp22(acc + p_hat[..., c0 : c0 + pv_k] @ v_hat[..., c0 : c0 + pv_k, :])
    return acc


@contextlib.contextmanager
def _exact_float32_matmul():
    """Keep float32 matrix products in float32 on CUDA (no TF32), so integer products stay exact."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = saved
