"""One attention call per mode at one shape, for profilers: `ncu python scripts/profile_case.py B H N D`."""

import sys

import torch

import comfy_sage

b, h, n, d = (int(x) for x in sys.argv[1:5]) if len(sys.argv) >= 5 else (1, 24, 16384, 128)
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for mode in ("int8_fp8", "int8_fp16"):
    comfy_sage.sageattn(q, k, v, mode=mode)
torch.cuda.synchronize()
