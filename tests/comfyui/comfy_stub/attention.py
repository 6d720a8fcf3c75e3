"""Stand-in for comfy.ldm.modules.attention: the backend signature, the override hook, two backends.

Contract (COMFYUI.md): every backend is `(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
skip_output_reshape=False, **kwargs)`; q/k/v are [b, tokens, heads·dim] or, with skip_reshape,
[b, heads, tokens, dim]; the output is [b, tokens, heads·dim] or, with skip_output_reshape, [b, heads,
tokens, dim]. The decorator calls `transformer_options["optimized_attention_override"](func, *args, **kwargs)`
when set, with `_inside_attn_wrapper=True` in kwargs so the override may call any backend directly.

Newer ComfyUI call sites may hand q/k/v over wrapped in `AttentionTensorContainer` (0.33 defines it; by 0.38
Flux, Wan and SDXL use it) and add a `preferred_attention` keyword (a layer's own backend choice, after 0.33).
The decorator drops that keyword before anything else and unwraps the containers before it calls an override,
unless the override has a `container_function`, which then gets the containers instead. Older releases pass
plain tensors and no such keyword.

`CALLS` counts what ran, by backend name, so tests can tell the fallback from the global default.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.nn.functional as F

CALLS: Counter = Counter()


class AttentionTensorContainer:
    """One of q/k/v handed over by reference, so that the callee can take it (and free the caller's name)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def take(self):
        tensor, self.tensor = self.tensor, None
        return tensor


def _unwrapped(args):
    return tuple(a.take() if isinstance(a, AttentionTensorContainer) else a for a in args[:3]) + tuple(args[3:])


def wrap_attn(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        kwargs.pop("preferred_attention", None)
        if "_inside_attn_wrapper" in kwargs:
            return func(*_unwrapped(args), **kwargs)
        kwargs["_inside_attn_wrapper"] = True
        options = kwargs.get("transformer_options")
        if options is not None and "optimized_attention_override" in options:
            override = options["optimized_attention_override"]
            if hasattr(override, "container_function"):
                return override.container_function(*args, **kwargs)
            return override(func, *_unwrapped(args), **kwargs)
        return func(*_unwrapped(args), **kwargs)

    return wrapper


def _to_heads(q, k, v, heads, skip_reshape):
    """[b, h, n, d] views and the head dim; K/V heads come from their own width (GQA)."""
    if skip_reshape:
        return q, k, v, q.shape[-1]
    d = q.shape[-1] // heads
    q = q.unflatten(-1, (heads, d)).transpose(1, 2)
    k, v = (t.unflatten(-1, (t.shape[-1] // d, d)).transpose(1, 2) for t in (k, v))
    return q, k, v, d


def _from_heads(out, skip_output_reshape):
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def _mask_4d(mask):
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(-3) if mask.dim() == 3 else mask.unsqueeze(0)
    return mask


@wrap_attn
def attention_pytorch(
    q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs
):
    """PyTorch SDPA (what ComfyUI's own attention_pytorch does), honouring `scale` and `enable_gqa`."""
    CALLS["pytorch"] += 1
    q, k, v, _ = _to_heads(q, k, v, heads, skip_reshape)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=_mask_4d(mask), scale=kwargs.get("scale"), enable_gqa=q.shape[1] != k.shape[1]
    )
    return _from_heads(out, skip_output_reshape)


@wrap_attn
def attention_default(
    q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs
):
    """The global default backend (`func` of the override): explicit float32 softmax, a different code path."""
    CALLS["default"] += 1
    q, k, v, d = _to_heads(q, k, v, heads, skip_reshape)
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scale = kwargs.get("scale") or d**-0.5
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    mask = _mask_4d(mask)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    out = (s.softmax(-1) @ v.float()).to(q.dtype)
    return _from_heads(out, skip_output_reshape)


optimized_attention = attention_default
