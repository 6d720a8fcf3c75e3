"""Stand-in kernels for machines without them (no pytest here: the real-ComfyUI script uses it too).

`FakeKernels.plan` answers as an sm_89 GPU with the kernels would: masks other than key masks and head dims
outside 32..128 (or not a multiple of 8) fall back, everything else runs a kernel; with `min_tokens` set, `auto`
leaves calls with fewer query or key tokens to PyTorch attention as the faster, as Hopper's does. It records the
token counts it is asked about. `FakeKernels.sageattn` computes exact
attention in float64 (or, with `quantized`, the reference's SageAttention2) and records each call;
`poison` > 0 makes that many next calls return NaN. `install` puts both into `comfy_sage.comfyui`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfy_sage import comfyui, dispatch, reference
from comfy_sage.dispatch import KernelSpec, Plan
from comfy_sage.modes import Mode
from comfy_sage.tiling import SM80


class FakeKernels:
    MASK_REASON = f"falls back to PyTorch attention: {dispatch.MASK_REASON}"

    def __init__(self, quantized: bool = False):
        self.quantized = quantized
        self.calls: list[dict] = []
        self.poison = 0
        self.min_tokens: int | None = None
        self.planned: list[tuple[int, int]] = []

    FEW_TOKENS_REASON = "mode 'auto' runs PyTorch attention on sm_90 for calls with few tokens: faster there"

    def plan(self, mode, device, head_dim, dtype, has_mask, seq_kv=0, *, seq_q=0, **options):
        """`dispatch.plan`'s signature; its other options (causality, the LSE, the query heads) change nothing here."""
        self.planned.append((seq_q, seq_kv))
        resolved = Mode.INT8_FP8 if mode is Mode.AUTO else mode
        if has_mask:
            return Plan(requested=mode, mode=Mode.SDPA, kernel=None, reason=f"{resolved.value} {self.MASK_REASON}")
        if not 32 <= head_dim <= 128 or head_dim % 8:
            reason = f"{resolved.value} falls back to PyTorch attention: head_dim {head_dim} is not supported"
            return Plan(requested=mode, mode=Mode.SDPA, kernel=None, reason=reason)
        if mode is Mode.AUTO and self.min_tokens and 0 < min(seq_q, seq_kv) < self.min_tokens:
            return Plan(requested=mode, mode=Mode.SDPA, kernel=None, reason=self.FEW_TOKENS_REASON, faster=True)
        return Plan(requested=mode, mode=resolved, kernel=KernelSpec("sm80", resolved, SM80))

    def sageattn(self, q, k, v, attn_mask=None, *, tensor_layout, sm_scale, mode):
        self.calls.append(
            {
                "layout": tensor_layout,
                "mode": mode,
                "scale": sm_scale,
                "q": tuple(q.shape),
                "k": tuple(k.shape),
                "dtype": q.dtype,
                "mask": attn_mask,
            }
        )
        if self.quantized:
            resolved = Mode.INT8_FP8 if mode is Mode.AUTO else mode
            out = reference.sageattn(
                q, k, v, mode=resolved, tensor_layout=tensor_layout, sm_scale=sm_scale, attn_mask=attn_mask
            )
        else:
            qh, kh, vh = (t if tensor_layout == "HND" else t.transpose(1, 2) for t in (q, k, v))
            mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
            out = F.scaled_dot_product_attention(
                qh.double(), kh.double(), vh.double(), mask, scale=sm_scale, enable_gqa=qh.shape[1] != kh.shape[1]
            ).to(q.dtype)
            out = out if tensor_layout == "HND" else out.transpose(1, 2)
        if self.poison > 0:
            self.poison -= 1
            out = torch.full_like(out, float("nan"))
        return out

    def install(self, setattr_=setattr):
        """Route the adapter's plan and sageattn here (`setattr_`: pytest's monkeypatch.setattr to undo it)."""
        setattr_(comfyui.dispatch, "plan", self.plan)
        setattr_(comfyui, "sageattn", self.sageattn)
        return self
