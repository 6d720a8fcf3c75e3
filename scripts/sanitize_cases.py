"""Small shapes of every compiled variant, for `compute-sanitizer --tool memcheck python scripts/sanitize_cases.py`."""

import itertools

import torch

import comfy_sage
from comfy_sage.testing import make_qkv

for d, mode, dtype, causal in itertools.product(
    (64, 128, 256), ("int8_fp8", "int8_fp16"), (torch.float16, torch.bfloat16), (False, True)
):
    q, k, v = make_qkv(1, 4, 130, d, heads_kv=2, seq_kv=70, dtype=dtype, device="cuda")
    out, lse = comfy_sage.sageattn(q, k, v, mode=mode, is_causal=causal, return_lse=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
print("sanitize cases ran")
