"""Quick side-by-side timing of the two kernel families and cuDNN SDPA at a few shapes (TOPS, quantization
included). For kernel development; `python -m comfy_sage bench` is the benchmark of record."""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import comfy_sage
from comfy_sage import dispatch

SHAPES = [(1, 24, 16384, 128, False), (1, 24, 4608, 128, False), (2, 10, 4096, 64, False), (1, 24, 16384, 128, True)]


def timed(fn, *args, iters=20, **kwargs):
    for _ in range(3):
        fn(*args, **kwargs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(*args, **kwargs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


for b, h, n, d, causal in SHAPES:
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    row = [f"B{b} H{h} N{n} D{d}{' causal' if causal else ''}"]
    for family in ("sm90", "sm80"):
        with dispatch.prefer_family(family):
            ms = timed(comfy_sage.sageattn, q, k, v, mode="int8_fp8", is_causal=causal)
        row.append(f"{family} {flops / ms / 1e9:7.1f}")
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = timed(F.scaled_dot_product_attention, q, k, v, is_causal=causal)
    row.append(f"cudnn {flops / ms / 1e9:7.1f}")
    print(" | ".join(row), flush=True)
    if "--profile" in sys.argv:  # per-kernel GPU time of the sm90 call
        with (
            dispatch.prefer_family("sm90"),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
        ):
            for _ in range(5):
                comfy_sage.sageattn(q, k, v, mode="int8_fp8", is_causal=causal)
            torch.cuda.synchronize()
        for event in prof.key_averages():
            if event.device_time_total > 0:
                print(f"    {event.key[:60]:60s} {event.device_time_total / event.count:9.1f} us x{event.count // 5}")
sys.exit(0)
