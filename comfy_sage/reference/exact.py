"""Exact attention, softmax(Q·Kᵀ·scale)·V, in float64 (or any dtype), and the accuracy metrics.

The ground truth that accuracy is measured against. Processed in chunks of query rows, so long sequences
never materialize N × N.
"""

from __future__ import annotations

import torch

from .._inputs import causal_visible, check_layout, check_qkv, check_sm_scale, from_hnd, to_hnd


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
