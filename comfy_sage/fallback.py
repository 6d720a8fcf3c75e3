"""PyTorch's own attention, for every call a kernel cannot run.

Runs `torch.nn.functional.scaled_dot_product_attention` in the caller's dtype (cuDNN / flash on a GPU),
with the same conventions as the kernels: bottom-right aligned causal masking when N_q ≠ N_kv, rows that
see no key give 0, GQA without copying K and V, and an exact natural-log LSE on request. A float
`attn_mask` is added in q's dtype (as PyTorch's GPU backends need); a row that sees no key (all False, or
all −inf) gives 0 and an LSE of −inf.
"""

from __future__ import annotations

import math

import torch

from ._inputs import Problem, causal_visible

_LSE_CHUNK_ELEMENTS = 1 << 24
# PyTorch's own function (what `F.scaled_dot_product_attention` is), not the module attribute looked up at call
# time: a program that replaces `F.scaled_dot_product_attention` with `sageattn` would otherwise send every call
# that falls back here into `sageattn` again, without end.
sdpa = torch._C._nn.scaled_dot_product_attention


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
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """O [B, H_q, N_q, D] (HND views in, HND out) and, with `return_lse`, the LSE [B, H_q, N_q] float32 (of the
    logits: without the dropout that `dropout_p` applies to the weights, as SDPA does)."""
    nq, nkv = problem.seq_q, problem.seq_kv
    # A branch, not the comparison itself: under torch.compile's dynamic shapes that would be a SymBool, which
    # SDPA's enable_gqa rejects; the branch makes the trace guard on it instead.
    gqa = True if problem.heads_q != problem.heads_kv else False  # noqa: SIM210
    # No keys to attend to, or nothing to compute (SDPA on CUDA returns None for an empty batch or zero heads:
    # seen on an H100 with torch 2.11).
    if nkv == 0 or q.numel() == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device) if return_lse else None
        return out, lse
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype):
        # An additive mask is applied in q's dtype. SDPA rejects most other dtypes, and the one it takes
        # (float32 with fp16/bf16 q) went wrong on CUDA: on an H100 with torch 2.11 its cuDNN backend
        # returned cos sim 0.78 against float64, or NaN, where a bf16 mask gave 0.999998.
        attn_mask = attn_mask.to(q.dtype)

    hidden = max(0, nq - nkv) if is_causal else 0  # leading rows that see no key
    if hidden:
        out = q.new_zeros(q.shape)
        if hidden < nq:
            out[:, :, hidden:] = sdpa(
                q[:, :, hidden:], k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa
            )
    elif is_causal and nq != nkv:
        # Imported here: torch.nn.attention.bias pulls in torch._dynamo, which doubles `import comfy_sage`.
        from torch.nn.attention.bias import causal_lower_right

        out = sdpa(q, k, v, attn_mask=causal_lower_right(nq, nkv), dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    else:
        out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if attn_mask is not None:
        # PyTorch's CUDA backends give a row whose keys are all masked a finite non-zero value (seen on an
        # H100 with torch 2.11, bool masks); our convention is 0. Out of place: SDPA's backward needs its
        # output as it was.
        out = out.masked_fill(_sees_no_key(attn_mask), 0.0)
    lse = _lse(q, k, problem, is_causal=is_causal, scale=scale, attn_mask=attn_mask) if return_lse else None
    return out, lse


def _sees_no_key(attn_mask: torch.Tensor) -> torch.Tensor:
    """[..., N_q, 1], True for the query rows whose every key is masked out (False, or −inf)."""
    masked = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == -math.inf
    return masked.all(-1, keepdim=True)


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
