"""`python -m comfy_sage bench`: TOPS per shape for every implementation found, as a table and JSON.

Times what a user pays: one call on bf16 inputs, the implementation's own quantization included. CUDA
events around each call, median of `repeat` calls after `warmup` (`time_call` says how the calls are issued).
TOPS = 4·B·H·N_q·N_kv·D / time, halved when causal. Shapes are those of ../shared/design/ANCHORS.md, or
(`STEP_SHAPES`) the shorter calls of real image and video steps that the anchors leave out. With `key_mask_pad`
every call carries a text-padding key mask ([1, 1, 1, N_kv], −finfo.max on the last keys, as HunyuanVideo
passes it), and the peers are PyTorch's attention with the mask (its own backend choice, and cuDNN's).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (B, H, N, D, causal, what it is)
SHAPES = (
    (1, 24, 4608, 128, False, "Flux 1024²"),
    (1, 24, 16896, 128, False, "Flux 2048²"),
    (1, 12, 32760, 128, False, "Wan 1.3B 480p"),
    (1, 40, 75600, 128, False, "Wan 14B 720p"),
    (2, 10, 4096, 64, False, "SDXL 1024²"),
    (1, 24, 16384, 64, False, "D=64 long"),
    (2, 24, 4096, 128, False, "generic"),
    (1, 24, 16384, 128, False, "B1 H24 N16k"),
    (1, 24, 16384, 128, True, "LLM prefill (causal)"),
)
# The attention calls of real steps that SHAPES leaves out: cross attention over text tokens, the lower levels
# of SDXL's and SD1.5's UNets, Flux below 1024² (docs/hopper-notes.md, "Shorter K/V"). A seventh field is N_kv
# where it differs from N.
STEP_SHAPES = (
    (2, 20, 1024, 64, False, "SDXL self 32×32"),
    (2, 10, 4096, 64, False, "SDXL cross 64×64", 77),
    (2, 20, 1024, 64, False, "SDXL cross 32×32", 77),
    (2, 8, 4096, 40, False, "SD1.5 self 64×64"),
    (2, 8, 4096, 40, False, "SD1.5 cross 64×64", 77),
    (2, 8, 1024, 80, False, "SD1.5 self 32×32"),
    (1, 24, 1536, 128, False, "Flux 512²"),
    (1, 24, 2816, 128, False, "Flux 768²"),
    (1, 12, 32760, 128, False, "Wan 1.3B cross", 512),
)


def shape_sizes(shape: tuple) -> tuple[int, int, int, int, int, bool, str]:
    """(B, H, N_q, N_kv, D, causal, what) of a SHAPES or STEP_SHAPES entry."""
    b, h, n, d, causal, what, *kv = shape
    return b, h, n, kv[0] if kv else n, d, causal, what


def parse_shape(text: str) -> tuple:
    """`B,H,N,D` or `B,H,N,D,causal` (causal 0 or 1) as a SHAPES entry, e.g. "1,24,4096,128" for a model's own
    attention; N may be `N_q:N_kv` (cross attention, e.g. "2,10,4096:77,64"; not causal). ValueError names the
    accepted form."""
    fields = text.replace(" ", "").split(",")
    n_kv = None
    if len(fields) >= 3 and fields[2].count(":") == 1:
        fields[2], n_kv = fields[2].split(":")
    try:
        values = [int(f) for f in fields]
        n_kv = None if n_kv is None else int(n_kv)
    except ValueError:
        values = []
    if (
        len(values) not in (4, 5)
        or min(values[:4]) < 1
        or (len(values) == 5 and values[4] not in (0, 1))
        or (n_kv is not None and (n_kv < 1 or (len(values) == 5 and values[4] == 1)))
    ):
        raise ValueError(
            f"shape must be B,H,N,D or B,H,N,D,causal: positive integers, causal 0 or 1, N as N_q:N_kv for "
            f"cross attention (not causal) (e.g. 1,24,4096,128 or 2,10,4096:77,64); got {text!r}"
        )
    b, h, n, d, causal = (*values, 0) if len(values) == 4 else values
    shape = (b, h, n, d, bool(causal), "your shape")
    return shape if n_kv is None or n_kv == n else (*shape, n_kv)


def _peer(module: str, attr: str) -> Callable | None:
    """`module.attr` when that package is installed, else None."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # not installed, or installed without a working build: not a peer here
        return None
    return getattr(mod, attr, None)


def implementations(modes: list[str], masked: bool = False) -> dict[str, Callable]:
    """Every implementation to time: comfy_sage's modes (and, on Hopper, the mma.sync family of the modes the
    wgmma kernel runs, for comparison), PyTorch SDPA on cuDNN and flash, and the released peers found installed.
    Each is `fn(q, k, v, causal)`, or `fn(q, k, v, causal, mask)`. `masked`: the ones that take a key mask (ours,
    and PyTorch's attention with its own backend choice or cuDNN); the released peers ignore masks or have none."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import comfy_sage
    from comfy_sage import api, dispatch

    impls: dict[str, Callable] = {}
    for mode in modes:

        def ours(q, k, v, c, mask=None, m=mode):
            return comfy_sage.sageattn(q, k, v, mask, is_causal=c, mode=m)

        # What the call runs at a shape (`run` records where it is PyTorch attention: Hopper's `auto` below
        # 4,096 tokens).
        ours.plan = lambda q, k, v, c, mask=None, m=mode: api.plan_for(q, k, v, is_causal=c, mode=m, attn_mask=mask)
        impls[f"comfy_sage {mode}"] = ours
    if torch.cuda.get_device_capability() == (9, 0):
        wgmma_modes = {m.value for m in dispatch.SM90_MODES}  # int8_fp8 and int8_int8
        for mode in (m for m in modes if m in wgmma_modes):

            def mma_sync(q, k, v, c, mask=None, m=mode):
                with dispatch.prefer_family("sm80"):
                    return comfy_sage.sageattn(q, k, v, mask, is_causal=c, mode=m)

            impls[f"comfy_sage {mode} mma.sync"] = mma_sync

    def sdpa(backend):
        def run(q, k, v, c, mask=None):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c)

        # The backend is chosen around a shape's timed calls (`run` enters `context`), not inside each call:
        # `sdpa_kernel` costs the host ~40 µs every time it is entered (H100 machine, torch 2.11), which a
        # model that calls SDPA does not pay, and which single calls and short queued ones would count.
        run.context = lambda: sdpa_kernel(backend)
        return run

    if masked:  # PyTorch's own choice of backend for a masked call, and cuDNN's (flash takes no mask)
        impls["SDPA"] = lambda q, k, v, c, mask=None: F.scaled_dot_product_attention(q, k, v, mask, is_causal=c)
        impls["SDPA cuDNN"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        return impls
    impls["SDPA cuDNN"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    impls["SDPA flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    if (sage := _peer("sageattention", "sageattn")) is not None:  # the released SageAttention
        impls["sageattention"] = lambda q, k, v, c: sage(q, k, v, is_causal=c)
    # FlashAttention 3 (Hopper) and 2 take [B, N, H, D].
    for name, module in (("FlashAttention-3", "flash_attn_interface"), ("FlashAttention-2", "flash_attn")):
        if (fa := _peer(module, "flash_attn_func")) is not None:
            impls[name] = lambda q, k, v, c, fa=fa: fa(*(t.transpose(1, 2) for t in (q, k, v)), causal=c)
    if (kitchen := _peer("comfy_kitchen", "int8_attention")) is not None:  # no causal mode
        for layout, fn in (
            ("HND", lambda q, k, v, c: kitchen(q, k, v) if not c else _no_causal()),
            ("NHD", lambda q, k, v, c: kitchen(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
             if not c else _no_causal()),
        ):  # fmt: skip
            if _agrees_with_sdpa(fn):  # the layout it expects is checked, not assumed
                impls[f"comfy-kitchen int8_attention ({layout})"] = fn
                break
        else:
            print("comfy-kitchen is installed but its int8_attention did not match attention in either layout")
    return impls


def _no_causal():
    raise NotImplementedError("this implementation has no causal mode")


def _agrees_with_sdpa(fn: Callable, device: str = "cuda") -> bool:
    """Whether `fn(q, k, v, causal=False)` computes attention on [B, H, N, D] inputs (cos sim > 0.99)."""
    q, k, v = (torch.randn(1, 2, 256, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    try:
        out = fn(q, k, v, False)
    except Exception:
        return False
    ref = F.scaled_dot_product_attention(q, k, v)
    return out.shape == ref.shape and F.cosine_similarity(out.float().flatten(), ref.float().flatten(), 0) > 0.99


TIMINGS = ("queued", "single")


def _check_timing(timing: str) -> None:
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}; got {timing!r}")


def time_call(fn: Callable, args: tuple, warmup: int, repeat: int, timing: str = "queued") -> float:
    """Median seconds of one call `fn(*args)`, from CUDA events recorded around each call.

    timing "queued": the calls are issued back to back and synchronized once, at the end, as a model's
    forward pass issues its layers: the host queues each call while the GPU runs the ones before, and a call's
    events time its GPU work (a call whose host time exceeds its GPU time still shows it, as gaps).
    "single": every call is synchronized before the next is issued, so its time also holds the host's time
    to issue it: what one isolated call costs.
    """
    _check_timing(timing)
    for _ in range(warmup):
        fn(*args)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    if timing == "single":
        torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn(*args)
        end.record()
        if timing == "single":
            end.synchronize()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)


def run(
    modes: list[str],
    shapes=SHAPES,
    warmup: int = 5,
    repeat: int = 20,
    json_path: str | None = None,
    plot_path: str | None = None,
    timing: str = "queued",
    key_mask_pad: int = 0,
) -> list:
    _check_timing(timing)  # before any GPU work
    if isinstance(key_mask_pad, bool) or not isinstance(key_mask_pad, int) or key_mask_pad < 0:
        raise ValueError(f"key_mask_pad must be a non-negative int (keys padded at the end); got {key_mask_pad!r}")
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA GPU")
    impls = implementations(modes, masked=True) if key_mask_pad else implementations(modes)
    results = []
    gpu = torch.cuda.get_device_name()
    masked = f", a key mask on the last {key_mask_pad} keys of each row" if key_mask_pad else ""
    print(f"{gpu}, torch {torch.__version__}; TOPS (quantization included), median of {repeat}, {timing} calls{masked}")
    width = max(14, *(len(name) + 2 for name in impls))
    header = f"{'shape':<34}" + "".join(f"{name:>{width}}" for name in impls) + f"{'ours / best peer':>22}"
    print(header)
    for shape in shapes:
        b, h, n, n_kv, d, causal, what = shape_sizes(shape)
        if key_mask_pad and causal:  # a mask and is_causal do not combine (SDPA's rule too)
            print(f"{what}: causal, left out of a masked run")
            continue
        q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, h, n_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        args = (q, k, v, causal)
        if key_mask_pad:  # every row keeps its first key
            mask = torch.zeros(1, 1, 1, n_kv, device="cuda", dtype=torch.bfloat16)
            mask[..., max(1, n_kv - key_mask_pad) :] = -torch.finfo(torch.bfloat16).max
            args = (*args, mask)
        flops = 4 * b * h * n * n_kv * d / (2 if causal else 1)
        row = {"shape": [b, h, n, d], "causal": causal, "what": what, "tops": {}, "us": {}}
        if n_kv != n:
            row["seq_kv"] = n_kv
        for name, fn in impls.items():
            plan = fn.plan(*args) if hasattr(fn, "plan") else None
            if plan is not None and plan.fallback:
                row.setdefault("pytorch_attention", {})[name] = plan.reason
            try:
                with getattr(fn, "context", contextlib.nullcontext)():
                    seconds = time_call(fn, args, warmup, repeat, timing)
                row["tops"][name] = flops / seconds / 1e12
                row["us"][name] = seconds * 1e6
            except Exception as exc:  # an implementation that cannot run this shape: recorded, not fatal
                row["tops"][name] = row["us"][name] = None
                row.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        versus = _versus_best_peer(row)
        results.append(row)
        label = f"B{b} H{h} N{n}{f' Nkv{n_kv}' if n_kv != n else ''} D{d}{' causal' if causal else ''}"
        routed = row.get("pytorch_attention", {})
        cells = "".join(
            f"{(f'{t:.0f}' if t else '—') + ('*' if name in routed else ''):>{width}}"
            for name, t in row["tops"].items()
        )
        print(f"{label:<34}{cells}{versus:>22}", flush=True)
        del q, k, v, args
    reasons = sorted({why for row in results for why in row.get("pytorch_attention", {}).values()})
    for why in reasons:
        print(f"* PyTorch attention ran: {why}")
    if json_path:
        with open(json_path, "w") as f:
            summary = {"gpu": gpu, "torch": torch.__version__, "timing": timing, "key_mask_pad": key_mask_pad}
            json.dump({**summary, "results": results}, f, indent=2)
    if plot_path:
        plot(results, plot_path, f"{gpu}, bf16 inputs, quantization included")
    return results


def _versus_best_peer(row: dict) -> str:
    """The fastest of our implementations against the fastest peer of one shape's row (the bar: at least 1.00
    everywhere); records both ratios in the row (`vs_best_peer`, `best_peer`) and returns the table's cell, e.g.
    "1.04 × SDPA cuDNN" ("*" where ours ran PyTorch attention), or "" without both."""
    ours = {name: t for name, t in row["tops"].items() if name.startswith("comfy_sage") and t}
    peers = {name: t for name, t in row["tops"].items() if not name.startswith("comfy_sage") and t}
    if not (ours and peers):
        return ""
    peer = max(peers, key=peers.get)
    row["best_peer"] = peer
    row["vs_best_peer"] = {name: t / peers[peer] for name, t in ours.items()}
    fastest = max(ours, key=ours.get)
    routed = "*" if fastest in row.get("pytorch_attention", {}) else ""
    return f"{row['vs_best_peer'][fastest]:.2f}{routed} × {peer}"


def plot(results: list, path: str, title: str) -> None:
    """TOPS against sequence length, one line per implementation and panel per (head dim, causal)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot written: {path} needs matplotlib (pip install matplotlib)")
        return
    panels = sorted({(r["shape"][3], r["causal"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    names = list(dict.fromkeys(name for r in results for name in r["tops"]))
    for ax, (d, causal) in zip(axes[0], panels, strict=True):
        panel = (r for r in results if r["shape"][3] == d and r["causal"] == causal)
        rows = sorted(panel, key=lambda r: r["shape"][2])
        for name in names:
            points = [(r["shape"][2], r["tops"].get(name)) for r in rows if r["tops"].get(name)]
            if points:
                xs, ys = [n for n, _ in points], [t for _, t in points]
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("TOPS")
        ax.set_title(f"D={d}{', causal' if causal else ''}")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
