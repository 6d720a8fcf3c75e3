"""`sageattn`: the public entry point, a drop-in for `torch.nn.functional.scaled_dot_product_attention`."""

from __future__ import annotations

import torch

from . import dispatch, fallback, ops
from ._inputs import Problem, check_layout, check_mask, check_sm_scale, from_hnd, qkv_sizes, to_hnd
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
# Kernel calls that found the GPU out of memory, by their sizes and kernel: the bytes they need. Until that much is
# free again, calls of those sizes go straight to PyTorch attention (a failed try costs a stack trace on stderr
# from some torch versions' stable ABI, and the time to fail).
_short_of_memory: dict[tuple, int] = {}
_SHORT_OF_MEMORY_ENTRIES = 256


def sageattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    mode: Mode | str = "auto",
    attn_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with SageAttention2's low-bit kernels where the GPU runs them, PyTorch attention elsewhere.

    q: [B, H_q, N_q, D] (tensor_layout "HND") or [B, N_q, H_q, D] ("NHD"); k, v: the same with H_kv heads
    and N_kv tokens. H_q must be a multiple of H_kv (grouped-query attention). float16, bfloat16 or float32
    (float32 is computed in bfloat16 and returned in float32).
    is_causal: causal mask aligned bottom-right when N_q ≠ N_kv; rows that see no key give 0.
    sm_scale: softmax scale, default 1/sqrt(D).
    mode: "auto" (the fastest accurate mode for this GPU; on Hopper PyTorch attention where that is faster:
        fewer than 4,096 query or key tokens, 8,192 causal, or head dims above 128), "int8_fp8", "int4_fp8",
        "int8_fp16", "int4_fp16", "int8_int8" (INT8 Q·Kᵀ and INT8 P·V with exact integer sums: more accurate than
        "int8_fp8", native on every GPU the kernels support), or "sdpa" (PyTorch attention); a `Mode` works too.
    attn_mask: bool or additive float mask broadcasting to [B, H_q, N_q, N_kv]; runs PyTorch attention.
    return_lse: also return the natural-log log-sum-exp of the scaled logits, [B, H_q, N_q] float32.

    A call no kernel can run (no CUDA GPU, an older GPU, a mask, a head dim outside 32..256, kernels not
    installed, inputs that require gradients: the kernels have no backward pass) runs PyTorch attention and logs
    the reason once to the "comfy_sage" logger (a call that "auto" leaves to PyTorch attention for speed: once,
    at INFO).
    """
    # The checks run on every call, so the common case costs little: a `Problem` is built only for a mask (and
    # in the fallback), and the loop that names a flag that is not a bool runs only when one is not.
    mode = Mode.parse(mode)
    layout = check_layout(tensor_layout)
    sizes = qkv_sizes(q, k, v, layout)
    if not (isinstance(is_causal, bool) and isinstance(return_lse, bool)):
        for name, flag in (("is_causal", is_causal), ("return_lse", return_lse)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    if attn_mask is not None:
        check_mask(attn_mask, Problem(*sizes, layout), is_causal, q.device)
    scale = check_sm_scale(sm_scale, sizes[-1])

    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # The kernels have no backward pass: PyTorch's attention, which has one (traced as it is under compile).
        if mode is not Mode.SDPA and not torch.compiler.is_compiling():
            log_once(NEEDS_GRAD_REASON)
        out, lse = _pytorch_attention(q, k, v, layout, sizes, is_causal, scale, attn_mask, return_lse)
    elif torch.compiler.is_compiling():  # one opaque op for torch.compile: no graph break, no tracing into dispatch
        out, lse = torch.ops.comfy_sage.sageattn(q, k, v, layout, is_causal, scale, mode.value, attn_mask, return_lse)
    else:
        out, lse = _run(q, k, v, layout, sizes, is_causal, scale, mode, attn_mask, return_lse)
    return (out, lse) if return_lse else out


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
) -> dispatch.Plan:
    """What `sageattn` runs for these inputs and options (a kernel, or PyTorch attention and why), without
    running it; for benchmarks and reports."""
    layout = check_layout(tensor_layout)
    return _plan(q, qkv_sizes(q, k, v, layout), is_causal, Mode.parse(mode), has_mask, return_lse)


def _plan(q, sizes, is_causal: bool, mode: Mode, has_mask: bool, return_lse: bool) -> dispatch.Plan:
    return dispatch.plan(
        mode, q.device, sizes[-1], q.dtype, has_mask, sizes[4], seq_q=sizes[3], is_causal=is_causal,
        return_lse=return_lse, heads_q=sizes[1],
    )  # fmt: skip


def _run(q, k, v, layout: str, sizes, is_causal: bool, scale: float, mode: Mode, attn_mask, return_lse: bool):
    """Dispatch one validated call (`sizes` from `qkv_sizes`): (out in the caller's layout, LSE or None)."""
    plan = _plan(q, sizes, is_causal, mode, attn_mask is not None, return_lse)
    if plan.reason:
        log_once(plan.reason, plan.log_level)
    if plan.note:
        log_once(plan.note, plan.log_level)
    if not plan.fallback and (not _short_of_memory or _kernel_fits(_memory_key(q, sizes, plan, is_causal, return_lse))):
        try:
            return ops.attention(
                q, k, v, layout, plan.mode, family=plan.kernel.family, is_causal=is_causal, scale=scale,
                return_lse=return_lse,
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


def _pytorch_attention(q, k, v, layout: str, sizes, is_causal: bool, scale: float, attn_mask, return_lse: bool):
    """PyTorch's attention on one validated call: (out in the caller's layout, LSE or None)."""
    qh, kh, vh = (to_hnd(t, layout) for t in (q, k, v))
    out, lse = fallback.attention(
        qh, kh, vh, Problem(*sizes, layout), is_causal=is_causal, scale=scale, attn_mask=attn_mask,
        return_lse=return_lse,
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
