"""Small shapes of every compiled variant, for `compute-sanitizer --tool memcheck python scripts/sanitize_cases.py`.

Calls the op directly so the INT4 variants run too (the dispatcher sends INT4 to INT8 where INT4 is emulated).
"""

import itertools

import torch

import comfy_sage.api  # noqa: F401  (loads the ops)
from comfy_sage import capability
from comfy_sage.testing import make_qkv

assert capability.kernel_status().loaded, capability.kernel_status().reason
for bits, d, pv_fp8, dtype, causal in itertools.product(
    (8, 4), (64, 128, 256), (True, False), (torch.float16, torch.bfloat16), (False, True)
):
    q, k, v = make_qkv(1, 4, 130, d, heads_kv=2, seq_kv=70, dtype=dtype, device="cuda")
    out, lse = torch.ops.comfy_sage.attention(q, k, v, 0, bits, pv_fp8, causal, d**-0.5, True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), (bits, d, pv_fp8, dtype, causal)
print("sanitize cases ran: 48 variants")
