"""Where the time of one `sageattn` call goes, per shape: what a user pays for one synchronized call, the same
call back to back, the GPU time alone (the call replayed from a CUDA graph), the host time to issue it, and
the GPU time of each kernel it launches. For kernel and launch-path development; `python -m comfy_sage bench`
is the benchmark of record.

    python scripts/call_anatomy.py [--family sm90|sm80] [--shapes flux,sdxl,...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import comfy_sage
from comfy_sage import dispatch

SHAPES = {
    "flux": (1, 24, 4608, 128, False),
    "sdxl": (2, 10, 4096, 64, False),
    "generic": (2, 24, 4096, 128, False),
    "n16k": (1, 24, 16384, 128, False),
    "d64": (1, 24, 16384, 64, False),
}


def synced_single(fn, repeat=30):
    """Median ms of one call between events, synchronized after each: what bench measures."""
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back(fn, iters=30):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def graph_replay(fn, iters=30):
    """ms of the call replayed from a CUDA graph: GPU work and the gaps between its kernels, no host work."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return back_to_back(graph.replay, iters)


def host_issue(fn, repeat=30):
    """Median µs the host spends issuing one call (the GPU idle beforehand)."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return [
        (e.key[:48], e.device_time_total / e.count, e.count // 5)
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]


def host_layers(q, k, v) -> None:
    """Host µs of each layer of the call path (Flux shape), outermost first, with the GPU kept busy."""
    from comfy_sage import ops
    from comfy_sage.modes import Mode

    def issue_us(fn, repeat=200):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        us = (time.perf_counter() - t0) * 1e6 / repeat
        torch.cuda.synchronize()
        return us

    layers = {
        "sageattn": lambda: comfy_sage.sageattn(q, k, v, mode="int8_fp8"),
        "ops.attention": lambda: ops.attention(
            q, k, v, "HND", Mode.INT8_FP8, family="sm90", is_causal=False, scale=0.088, return_lse=False
        ),
        "torch.ops attention": lambda: torch.ops.comfy_sage.attention(q, k, v, 0, 8, True, False, 0.088, False, 90),
        "torch.ops runs_on (no launch)": lambda: torch.ops.comfy_sage.runs_on(0, 90),
        "3 x torch.empty_like": lambda: [torch.empty_like(q) for _ in range(3)],
        "SDPA cuDNN": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    print("host µs per call, issued back to back (the GPU busy, so no launch waits for it):")
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for name, fn in layers.items():
            print(f"  {name:32s} {issue_us(fn):7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="sm90")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--host", action="store_true", help="also time the host side of each layer of the call")
    args = parser.parse_args()
    if args.host:
        small = [torch.randn(1, 24, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        host_layers(*small)
    for name in args.shapes.split(","):
        b, h, n, d, causal = SHAPES[name]
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)

        def ours(q=q, k=k, v=v, causal=causal):
            return comfy_sage.sageattn(q, k, v, mode="int8_fp8", is_causal=causal)

        def cudnn(q=q, k=k, v=v, causal=causal):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        print(f"== {name}: B{b} H{h} N{n} D{d}{' causal' if causal else ''}", flush=True)
        with dispatch.prefer_family(args.family):
            for label, fn in (("ours", ours), ("cudnn", cudnn)):
                for _ in range(5):
                    fn()
                single, b2b, graph, host = synced_single(fn), back_to_back(fn), graph_replay(fn), host_issue(fn)
                print(
                    f"  {label:6s} single {single * 1e3:7.1f} us ({flops / single / 1e9:5.0f} TOPS)"
                    f" | back-to-back {b2b * 1e3:7.1f} | graph {graph * 1e3:7.1f} ({flops / graph / 1e9:5.0f} TOPS)"
                    f" | host {host:5.1f} us"
                )
            total = 0.0
            for key, us, per_call in kernels(ours):
                total += us * per_call
                print(f"    {key:48s} {us:8.1f} us x{per_call}")
            print(f"    {'sum of kernels':48s} {total:8.1f} us ({flops / total / 1e6:5.0f} TOPS)", flush=True)


if __name__ == "__main__":
    main()
