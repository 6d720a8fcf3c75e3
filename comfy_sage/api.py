"""`sageattn`: the public entry point, a drop-in for `torch.nn.functional.scaled_dot_product_attention`."""

from __future__ import annotations

import math

import torch

from . import dispatch, fallback, ops
from ._inputs import (
    Problem,
    check_dropout,
    check_layout,
    check_mask,
    check_sm_scale,
    from_hnd,
    key_mask_rows,
    qkv_sizes,
    to_hnd,
)
from ._log import log_once
from .modes import Mode

# Logged once, at WARNING, the first time a kernel call finds the GPU out of memory.
OUT_OF_MEMORY_REASON = (
    "the GPU ran out of memory for the kernels' quantized copies of Q, K and V (about half their size); such calls "
    "run PyTorch attention, which needs no copies, until enough memory is free again"
)
# Logged once, at WARNING, the first time a call asks for gradients.
NEEDS_GRAD_REASON = (
    "the kernels have no backward pass: calls whose inputs require gradients (with grad mode on) run PyTorch attention"
)
# Logged once, at WARNING, the first time a call asks for dropout.
DROPOUT_REASON = "the kernels have no dropout: calls with dropout_p > 0 run PyTorch attention"
# Kernel calls that found the GPU out of memory, by their sizes and kernel: the bytes they need. Until that much is
# free again, calls of those sizes go straight to PyTorch attention (a failed try costs a stack trace on stderr
# from some torch versions' stable ABI, and the time to fail).
_short_of_memory: dict[tuple, int] = {}
_SHORT_OF_MEMORY_ENTRIES = 256
# dropout_p's default: SDPA's 0.0, as an int, since torch.compile traces a function that reads a float default
# twice. The common call is then one identity check.
_NO_DROPOUT = 0


def sageattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = _NO_DROPOUT,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    tensor_layout: str = "HND",
    sm_scale: float | None = None,
    mode: Mode | str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with SageAttention2's low-bit kernels where the GPU runs them, PyTorch attention elsewhere.

    The arguments up to `enable_gqa` are `torch.nn.functional.scaled_dot_product_attention`'s (the first six by
    position or by name, as there), so `sageattn` stands in for it wherever it is called:
    q: [B, H_q, N_q, D] (tensor_layout "HND", SDPA's; [H_q, N_q, D] and more leading batch dimensions work too)
        or [B, N_q, H_q, D] ("NHD"); k, v: the same with H_kv heads and N_kv tokens. H_q must be a multiple of
        H_kv (grouped-query attention, whatever `enable_gqa` says). float16, bfloat16 or float32 (float32 is
        computed in bfloat16 and returned in float32).
    attn_mask: bool or additive float mask broadcasting to [B, H_q, N_q, N_kv]. A key mask (one value per key for
        every head and query row: [B or 1, 1, 1, N_kv], [1, 1, N_kv], [1, N_kv], as text padding is) runs on the
        kernels with INT8 Q·Kᵀ; any other mask runs PyTorch attention.
    dropout_p: dropout on the attention weights, as SDPA applies it (in training and in eval alike); above 0 the
        call runs PyTorch attention, since the kernels have none.
    is_causal: causal mask aligned bottom-right when N_q ≠ N_kv (SDPA aligns it top-left; the same when
        N_q = N_kv); rows that see no key give 0.
    scale (or sm_scale, the same; give one): softmax scale, default 1/sqrt(D).
    mode: "auto" (the fastest accurate mode for this GPU; on Hopper PyTorch attention where that is faster:
        fewer than 4,096 query or key tokens, 8,192 causal, 2,560 with a key mask, or head dims above 128),
        "int8_fp8", "int4_fp8", "int8_fp16", "int4_fp16", "int8_int8" (INT8 Q·Kᵀ and INT8 P·V with exact integer
        sums: more accurate than "int8_fp8", native on every GPU the kernels support), or "sdpa" (PyTorch
        attention); a `Mode` works too.
    return_lse: also return the natural-log log-sum-exp of the scaled logits, [B, H_q, N_q] float32.

    A call no kernel can run (no CUDA GPU, an older GPU, a mask other than a key mask, dropout, a head dim outside
    32..256, kernels not installed, inputs that require gradients: the kernels have no backward pass) runs PyTorch
    attention and logs the reason once to the "comfy_sage" logger (a call that "auto" leaves to PyTorch attention
    for speed: once, at INFO).
    """
    # The checks run on every call, so the common case costs little: a `Problem` is built only for a mask (and
    # in the fallback), and the loop that names a flag that is not a bool runs only when one is not.
    mode = Mode.parse(mode)
    layout = check_layout(tensor_layout)
    try:
        sizes = qkv_sizes(q, k, v, layout)
    except ValueError:
        if not (layout == "HND" and isinstance(q, torch.Tensor) and q.dim() != 4):
            raise
        # SDPA's [heads, tokens, head_dim] or more leading batch dimensions: found here, off the common path.
        return _with_batch_dims_flattened(
            q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa, sm_scale=sm_scale,
            mode=mode, return_lse=return_lse,
        )  # fmt: skip
    if not (isinstance(is_causal, bool) and isinstance(return_lse, bool) and isinstance(enable_gqa, bool)):
        for name, flag in (("is_causal", is_causal), ("return_lse", return_lse), ("enable_gqa", enable_gqa)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    if dropout_p is not _NO_DROPOUT and (dropout_p != 0 or dropout_p.__class__ not in (int, float)):
        check_dropout(dropout_p)
    if attn_mask is not None:
        check_mask(attn_mask, Problem(*sizes, layout), is_causal, q.device)
    if scale is not None:
        if sm_scale is not None:
            raise TypeError("give the softmax scale as scale or as sm_scale, not both")
        scale = check_sm_scale(scale, sizes[-1], name="scale")
    else:
        scale = check_sm_scale(sm_scale, sizes[-1])

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad or dropout_p:
        # The kernels have no backward pass and no dropout: PyTorch's attention, which has both (traced as it is
        # under compile).
        if mode is not Mode.SDPA and not torch.compiler.is_compiling():
            log_once(NEEDS_GRAD_REASON if needs_grad else DROPOUT_REASON)
        out, lse = _pytorch_attention(q, k, v, layout, sizes, is_causal, scale, attn_mask, return_lse, dropout_p)
    elif torch.compiler.is_compiling():  # one opaque op for torch.compile: no graph break, no tracing into dispatch
        out, lse = torch.ops.comfy_sage.sageattn(q, k, v, layout, is_causal, scale, mode.value, attn_mask, return_lse)
    else:
        out, lse = _run(q, k, v, layout, sizes, is_causal, scale, mode, attn_mask, return_lse)
    return (out, lse) if return_lse else out


def _with_batch_dims_flattened(q, k, v, attn_mask, *args, return_lse: bool, **kwargs):
    """`sageattn` on HND inputs of 3 or more than 4 dimensions, as SDPA takes them ([..., heads, tokens,
    head_dim]): their leading dimensions as one batch dimension (none: a batch of 1), the results shaped back."""
    tensors = (("q", q), ("k", k), ("v", v))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if q.dim() < 3:
        raise ValueError(
            "q must be [batch, heads, tokens, head_dim] for tensor_layout='HND' (or [heads, tokens, head_dim], or "
            f"with more leading batch dimensions); got shape {tuple(q.shape)}"
        )
    if not q.dim() == k.dim() == v.dim():
        raise ValueError(
            "q, k and v must have the same number of dimensions; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    lead = q.shape[:-3]
    if k.shape[:-3] != lead or v.shape[:-3] != lead:
        raise ValueError(
            "q, k and v must have the same leading (batch) dimensions; got "
            f"{tuple(lead)}, {tuple(k.shape[:-3])}, {tuple(v.shape[:-3])}"
        )
    batch = math.prod(lead)
    flat = [t.reshape(batch, *t.shape[-3:]) for _, t in tensors]
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() > 3:
        if attn_mask.dim() > q.dim():
            raise ValueError(
                f"attn_mask must broadcast to [..., heads, N_q, N_kv] with q's {q.dim() - 3} leading dimensions; "
                f"got shape {tuple(attn_mask.shape)}"
            )
        mask = attn_mask[(None,) * (q.dim() - attn_mask.dim())]
        try:
            mask = mask.expand(*lead, *mask.shape[-3:])
        except RuntimeError:
            raise ValueError(
                f"attn_mask's leading dimensions {tuple(attn_mask.shape[:-3])} must broadcast to q's {tuple(lead)}"
            ) from None
        attn_mask = mask.reshape(batch, *mask.shape[-3:])
    result = sageattn(*flat, attn_mask, *args, return_lse=return_lse, **kwargs)
    if not return_lse:
        return result.reshape(q.shape)
    out, lse = result
    return out.reshape(q.shape), lse.reshape(*lead, *lse.shape[1:])


def plan_for(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    mode: Mode | str = "auto",
    has_mask: bool = False,
    return_lse: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> dispatch.Plan:
    """What `sageattn` runs for these inputs and options (a kernel, or PyTorch attention and why), without
    running it; for benchmarks and reports. `has_mask`: a mask other than a key mask; `attn_mask`: the mask
    itself, whichever kind."""
    layout = check_layout(tensor_layout)
    sizes = qkv_sizes(q, k, v, layout)
    key_mask = False
    if attn_mask is not None:
        check_mask(attn_mask, Problem(*sizes, layout), is_causal, q.device)
        key_mask = key_mask_rows(attn_mask, sizes[0], sizes[4]) is not None
        has_mask = not key_mask
    return _plan(q, sizes, is_causal, Mode.parse(mode), has_mask, return_lse, key_mask)


def _plan(
    q, sizes, is_causal: bool, mode: Mode, has_mask: bool, return_lse: bool, key_mask: bool = False
) -> dispatch.Plan:
    return dispatch.plan(
        mode, q.device, sizes[-1], q.dtype, has_mask, sizes[4], seq_q=sizes[3], is_causal=is_causal,
        return_lse=return_lse, heads_q=sizes[1], key_mask=key_mask,
    )  # fmt: skip


def _run(q, k, v, layout: str, sizes, is_causal: bool, scale: float, mode: Mode, attn_mask, return_lse: bool):
    """Dispatch one validated call (`sizes` from `qkv_sizes`): (out in the caller's layout, LSE or None)."""
    key_rows = None if attn_mask is None else key_mask_rows(attn_mask, sizes[0], sizes[4])
    plan = _plan(
        q, sizes, is_causal, mode, attn_mask is not None and key_rows is None, return_lse, key_rows is not None
    )
    if plan.reason:
        log_once(plan.reason, plan.log_level)
    if plan.note:
        log_once(plan.note, plan.log_level)
    if plan.fallback:
        return _pytorch_attention(q, k, v, layout, sizes, is_causal, scale, attn_mask, return_lse)
    if not _short_of_memory or _kernel_fits(_memory_key(q, sizes, plan, is_causal, return_lse)):
        try:
            bias = None if key_rows is None else ops.key_bias(attn_mask, key_rows, sizes[4])
            return ops.attention(
                q, k, v, layout, plan.mode, family=plan.kernel.family, is_causal=is_causal, scale=scale,
                return_lse=return_lse, key_bias=bias,
            )  # fmt: skip
        except RuntimeError as error:
            need = ops.out_of_memory_bytes(error)
            if need is None:
                raise
            if need:
                if len(_short_of_memory) >= _SHORT_OF_MEMORY_ENTRIES:
                    _short_of_memory.clear()
                _short_of_memory[_memory_key(q, sizes, plan, is_causal, return_lse)] = need
            log_once(OUT_OF_MEMORY_REASON)
    return _pytorch_attention(q, k, v, layout, sizes, is_causal, scale, attn_mask, return_lse)


def _pytorch_attention(
    q, k, v, layout: str, sizes, is_causal: bool, scale: float, attn_mask, return_lse: bool, dropout_p: float = 0.0
):
    """PyTorch's attention on one validated call: (out in the caller's layout, LSE or None)."""
    batch, heads_q, heads_kv, seq_q, seq_kv, _ = sizes
    qh, kh, vh = (to_hnd(t, layout) for t in (q, k, v))
    plain = attn_mask is None and not return_lse and not dropout_p and (not is_causal or seq_q == seq_kv)
    # Not empty either: SDPA on CUDA returns None for an empty batch or zero heads (the general path answers).
    if plain and batch and heads_q and seq_q and seq_kv:
        # The common call `auto` leaves to PyTorch attention for speed (no mask, no LSE, causal only when square):
        # SDPA itself, without the general path's `Problem` and branches, which cost ~10 µs of host time a call.
        gqa = True if heads_q != heads_kv else False  # noqa: SIM210 (a branch, as in `fallback.attention`)
        out, lse = fallback.sdpa(qh, kh, vh, is_causal=is_causal, scale=scale, enable_gqa=gqa), None
    else:
        out, lse = fallback.attention(
            qh, kh, vh, Problem(*sizes, layout), is_causal=is_causal, scale=scale, attn_mask=attn_mask,
            return_lse=return_lse, dropout_p=dropout_p,
        )  # fmt: skip
    # Contiguous in the caller's layout, as the kernels write it: `out.view(B, N, H * D)` works either way.
    return from_hnd(out, layout).contiguous(), lse


def _memory_key(q: torch.Tensor, sizes, plan: dispatch.Plan, is_causal: bool, return_lse: bool) -> tuple:
    """What the memory a kernel call needs depends on (`_short_of_memory`'s key); the device first."""
    return q.device, sizes, q.dtype, plan.mode, plan.kernel.family, is_causal, return_lse


def _kernel_fits(key: tuple) -> bool:
    """False while a kernel call of `key` that found the GPU out of memory would find it so again."""
    need = _short_of_memory.get(key)
    if need is None:
        return True
    if _available_bytes(key[0]) < need:
        return False
    del _short_of_memory[key]
    return True


def _available_bytes(device: torch.device) -> int:
    """What an allocation on `device` can take: the driver's free memory and the blocks PyTorch's caching
    allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)
    return free + stats.get("reserved_bytes.all.current", 0) - stats.get("allocated_bytes.all.current", 0)


@torch.library.custom_op(
    "comfy_sage::sageattn",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, str layout, bool is_causal, float scale, str mode, Tensor? attn_mask, "
    "bool return_lse) -> (Tensor, Tensor)",
)
def _sageattn_op(q, k, v, layout, is_causal, scale, mode, attn_mask, return_lse):
    sizes = qkv_sizes(q, k, v, check_layout(layout))
    out, lse = _run(q, k, v, layout, sizes, is_causal, scale, Mode(mode), attn_mask, return_lse)
    return out, lse if lse is not None else q.new_empty((0,), dtype=torch.float32)


@_sageattn_op.register_fake
def _(q, k, v, layout, is_causal, scale, mode, attn_mask, return_lse):
    return torch.empty_like(q, memory_format=torch.contiguous_format), ops.empty_lse(q, layout == "NHD", return_lse)
