"""Exact attention, softmax(Q·Kᵀ·scale)·V, in float64 (or any dtype), and the accuracy metrics.

The ground truth that accuracy is measured against. Processed in chunks of query rows, so long sequences
never materialize N × N.
"""

from __future__ import annotations

import torch

from .._inputs import causal_visible, check_layout, check_qkv, check_sm_scale, from_hnd, to_hnd
from . import quant

PV_FORMATS = (None, "fp8", "int8")  # `pv_formats`' choices: exact, FP8 e4m3, INT8 (P̃ unsigned, V signed)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale)·V computed in `dtype`; causal is bottom-right aligned; rows seeing no key give 0."""
    layout = check_layout(tensor_layout)
    problem = check_qkv(q, k, v, layout)
    scale = check_sm_scale(sm_scale, problem.head_dim)
    qh, kh, vh = (to_hnd(t, layout).to(dtype) for t in (q, k, v))
    heads = torch.arange(problem.heads_q, device=q.device) // problem.gqa_group
    kh, vh = kh[:, heads], vh[:, heads]
    out = torch.zeros(qh.shape, dtype=dtype, device=q.device)
    cols = torch.arange(problem.seq_kv, device=q.device)
    for r0 in range(0, problem.seq_q, chunk_rows):
        r1 = min(problem.seq_q, r0 + chunk_rows)
        s = (qh[:, :, r0:r1] @ kh.transpose(-1, -2)) * scale
        if is_causal:
            visible = causal_visible(torch.arange(r0, r1, device=q.device), cols, problem.seq_q, problem.seq_kv)
            s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num_(0.0)  # all-masked rows: 0
        out[:, :, r0:r1] = p @ vh
    return from_hnd(out, layout)


def pv_formats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p_format: str | None, v_format: str | None
) -> torch.Tensor:
    """What P·V's number formats alone cost: float64 attention (HND, no mask, single head group) whose P̃ and V
    are rounded to `p_format` and `v_format` (`PV_FORMATS`) as the kernels scale them, with Q·Kᵀ, the row
    sums and the accumulation exact.

    P̃ is P relative to its row's max, scaled to the format's largest value (448 for FP8, p_max for INT8); V is
    scaled per channel. Rounding errors are relative, so the running max the kernels use instead of the final
    one changes nothing but the tiniest values. No kernel with these formats can be more accurate than this.
    """
    for name, fmt in (("p_format", p_format), ("v_format", v_format)):
        if fmt not in PV_FORMATS:
            raise ValueError(f"{name} must be one of {PV_FORMATS}; got {fmt!r}")
    qd, kd, vd = (t.to(torch.float64) for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * check_sm_scale(None, q.shape[-1])
    p = torch.exp(s - s.amax(-1, keepdim=True))  # in (0, 1], 1 at each row's max
    if p_format == "fp8":
        p_hat = quant.to_e4m3((p * quant.FP8_MAX).float()).double() / quant.FP8_MAX
    elif p_format == "int8":
        p_max = quant.int8_p_max(k.shape[-2])
        p_hat = torch.round(p * p_max) / p_max
    else:
        p_hat = p
    if v_format == "fp8":
        values, scale = quant.quantize_v_fp8(vd.float())
    elif v_format == "int8":
        values, scale = quant.quantize_v_int8(vd.float())
    else:
        values, scale = vd, 1.0
    return (p_hat @ (values.double() * scale)) / p.sum(-1, keepdim=True)


def cosine_similarity(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors, in float64."""
    a, b = x.double().flatten(), ref.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def relative_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Σ|x − ref| / Σ|ref|, in float64."""
    return float((x.double() - ref.double()).abs().sum() / ref.double().abs().sum().clamp_min(1e-300))


def accuracy(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """{"cos_sim", "rel_l1"} of `x` against `ref`."""
    return {"cos_sim": cosine_similarity(x, ref), "rel_l1": relative_l1(x, ref)}
