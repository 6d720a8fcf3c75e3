"""PyTorch's own attention, for every call a kernel cannot run.

Runs `torch.nn.functional.scaled_dot_product_attention` in the caller's dtype (cuDNN / flash on a GPU),
with the same conventions as the kernels: bottom-right aligned causal masking when N_q ≠ N_kv, rows that
see no key give 0, GQA without copying K and V, and an exact natural-log LSE on request.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._inputs import Problem, causal_visible

_LSE_CHUNK_ELEMENTS = 1 << 24


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    problem: Problem,
    *,
    is_causal: bool,
    scale: float,
    attn_mask: torch.Tensor | None,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """O [B, H_q, N_q, D] (HND views in, HND out) and, with `return_lse`, the LSE [B, H_q, N_q] float32."""
    nq, nkv = problem.seq_q, problem.seq_kv
    gqa = problem.heads_q != problem.heads_kv
    if nkv == 0 or nq == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device) if return_lse else None
        return out, lse
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype, torch.float32):
        # SDPA takes a float mask only in q's dtype or float32; float32 holds an fp16/bf16 mask exactly.
        attn_mask = attn_mask.float()

    hidden = max(0, nq - nkv) if is_causal else 0  # leading rows that see no key
    if hidden:
        out = q.new_zeros(q.shape)
        if hidden < nq:
            out[:, :, hidden:] = F.scaled_dot_product_attention(
                q[:, :, hidden:], k, v, is_causal=True, scale=scale, enable_gqa=gqa
            )
    elif is_causal and nq != nkv:
        # Imported here: torch.nn.attention.bias pulls in torch._dynamo, which doubles `import comfy_sage`.
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(nq, nkv), scale=scale, enable_gqa=gqa
        )
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    lse = _lse(q, k, problem, is_causal=is_causal, scale=scale, attn_mask=attn_mask) if return_lse else None
    return out, lse


def _lse(q, k, problem: Problem, *, is_causal: bool, scale: float, attn_mask) -> torch.Tensor:
    """log Σ_j exp(q·k_j·scale + mask), float32, in chunks of query rows so N × N never materializes."""
    heads = torch.arange(problem.heads_q, device=q.device) // problem.gqa_group
    kf = k[:, heads].float()
    cols = torch.arange(problem.seq_kv, device=q.device)
    rows_per_chunk = max(1, _LSE_CHUNK_ELEMENTS // max(1, problem.batch * problem.heads_q * problem.seq_kv))
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for r0 in range(0, problem.seq_q, rows_per_chunk):
        r1 = min(problem.seq_q, r0 + rows_per_chunk)
        s = (q[:, :, r0:r1].float() @ kf.transpose(-1, -2)) * scale
        if is_causal:
            rows = torch.arange(r0, r1, device=q.device)
            s = s.masked_fill(~causal_visible(rows, cols, problem.seq_q, problem.seq_kv), -math.inf)
        if attn_mask is not None:
            m = attn_mask.expand(problem.batch, problem.heads_q, problem.seq_q, problem.seq_kv)[:, :, r0:r1]
            s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.float()
        lse[:, :, r0:r1] = torch.logsumexp(s, -1)
    return lse
