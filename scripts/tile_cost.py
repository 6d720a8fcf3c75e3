"""What a tile of the wgmma kernel costs besides its K blocks: the attention kernel's GPU time (profiler) at a
fixed number of tiles (four whole waves on a 132-SM H100, so that nothing is split) and a growing number of
K blocks per tile, and the line through those times: µs per K block and wave, and the fixed µs per tile (its
start, the pipeline's fill and drain, the epilogue). For kernel development (docs/hopper-notes.md, k1).

    python scripts/tile_cost.py [--mode int8_int8] [--head-dim 128] [--waves 4]
"""

from __future__ import annotations

import argparse

import torch

import comfy_sage
from comfy_sage import dispatch
from comfy_sage.tiling import SM90, SM90_CTA_ROWS


def kernel_us(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, calls: int = 10) -> float:
    """Mean GPU time of the attention kernels (the quantization's kernels left out) per call."""
    for _ in range(3):
        comfy_sage.sageattn(q, k, v, mode=mode)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            comfy_sage.sageattn(q, k, v, mode=mode)
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if "attention_kernel" in e.key) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="int8_int8", choices=["int8_int8", "int8_fp8"])
    parser.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    parser.add_argument("--waves", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("tile_cost.py times the sm_90a kernel: it needs an H100-class GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = SM90_CTA_ROWS[args.head_dim]
    tiles = args.waves * sms
    points = []
    for q_blocks in (12, 24, 48, 132):  # tiles per head; K blocks per tile = q_blocks * rows / 128
        if tiles % q_blocks:
            continue
        heads, n = tiles // q_blocks, q_blocks * rows
        q, k, v = (torch.randn(1, heads, n, args.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with dispatch.prefer_family("sm90"):
            us = kernel_us(q, k, v, args.mode)
        blocks = -(-n // SM90.block_k)
        points.append((blocks, us / args.waves))
        flops = 4 * heads * n * n * args.head_dim
        print(
            f"H{heads:3d} N{n:6d}: {blocks:4d} K blocks a tile, kernel {us:9.1f} us ({flops / us / 1e6:5.0f} TOPS), "
            f"{us / args.waves / blocks:.3f} us per K block and wave",
            flush=True,
        )
        del q, k, v
    if len(points) >= 2:
        (b0, t0), (b1, t1) = points[0], points[-1]
        slope = (t1 - t0) / (b1 - b0)
        fixed = t0 - b0 * slope
        print(f"line through {b0} and {b1} blocks: {slope:.3f} us per K block and wave, {fixed:.1f} us per tile")


if __name__ == "__main__":
    main()
