"""How the timing method moves PyTorch's attention, and whether it moves our ratio to it (docs/hopper-notes.md x12).

ANCHORS.md gives cuDNN's SDPA 561 TOPS at Flux 1024² and 305 at SDXL on this project's H100, where `bench`
measures 650-660 and 470-480. This times cuDNN's SDPA at the ANCHORS.md shapes in several ways (`bench`'s two:
calls queued as a model issues them, and isolated calls timed by CUDA events; isolated calls by the wall clock;
each with and without PyTorch's `sdpa_kernel` context entered in every call), then `comfy_sage.sageattn` (`auto`)
and cuDNN side by side the way that comes nearest ANCHORS.md. bf16 random-normal inputs, [B, H, N, D], the
median of 20 calls after 3 warm-ups; the side-by-side part takes the better of two interleaved rounds.

    python scripts/anchors_method.py            (a CUDA GPU; the compiled kernels for the last part)
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import comfy_sage
from comfy_sage.bench import time_call

# name: ((B, H, N, D), the cuDNN TOPS ANCHORS.md gives)
SHAPES = {
    "Flux 1024²": ((1, 24, 4608, 128), 561),
    "Flux 2048²": ((1, 24, 16896, 128), 631),
    "Wan 1.3B": ((1, 12, 32760, 128), 577),
    "Wan 14B": ((1, 40, 75600, 128), 569),
    "SDXL": ((2, 10, 4096, 64), 305),
    "N16k D64": ((1, 24, 16384, 64), 480),
    "B2 H24 N4096": ((2, 24, 4096, 128), 581),
}
CALLS, WARMUP = 20, 3


def wall(fn) -> float:
    """Median seconds of one isolated call by the wall clock: the host's time to issue it and to see it end."""
    times = []
    for _ in range(CALLS):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sdpa(q, k, v, context: bool):
    if not context:
        return lambda: F.scaled_dot_product_attention(q, k, v)

    def call():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    return call


def tops(shape, method: str, fn) -> float:
    """TOPS of `fn` timed by `method`: "wall" (above), or `bench`'s own "queued" or "single" (CUDA events)."""
    if method == "wall":
        for _ in range(WARMUP):
            fn()
        seconds = wall(fn)
    else:
        seconds = time_call(fn, (), warmup=WARMUP, repeat=CALLS, timing=method)
    batch, heads, n, d = shape
    return 4 * batch * heads * n * n * d / seconds / 1e12


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    methods = {
        "queued": ("queued", False),
        "events": ("single", False),
        "wall": ("wall", False),
        "events+ctx": ("single", True),
        "wall+ctx": ("wall", True),
    }
    print("\ncuDNN SDPA, TOPS by timing method")
    print(f"{'shape':14s}" + "".join(f"{m:>12s}" for m in methods) + f"{'ANCHORS.md':>12s}")
    for name, (shape, anchor) in SHAPES.items():
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row = [tops(shape, method, sdpa(q, k, v, context)) for method, context in methods.values()]
        print(f"{name:14s}" + "".join(f"{x:12.0f}" for x in row) + f"{anchor:12d}", flush=True)

    print("\nwall+ctx for both, the better of two interleaved rounds")
    print(f"{'shape':14s}{'auto':>8s}{'cuDNN':>8s}{'ANCHORS.md':>12s}{'auto / cuDNN':>14s}{'auto / ANCHORS':>16s}")
    for name, (shape, anchor) in SHAPES.items():
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ours_fn, theirs_fn = partial(comfy_sage.sageattn, q, k, v), sdpa(q, k, v, context=True)
        ours, theirs = [], []
        for _ in range(2):
            ours.append(tops(shape, "wall", ours_fn))
            theirs.append(tops(shape, "wall", theirs_fn))
        a, c = max(ours), max(theirs)
        print(f"{name:14s}{a:8.0f}{c:8.0f}{anchor:12d}{a / c:14.2f}{a / anchor:16.2f}", flush=True)


if __name__ == "__main__":
    main()
