"""Command line: `python -m comfy_sage {doctor,demo,accuracy,bench}`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from .modes import Mode


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    info = doctor.summary(_device(args.device))
    print(json.dumps(info, indent=2) if args.json else doctor.render(info))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """doctor, then one attention call through the public API, checked against float64."""
    from . import dispatch, doctor, reference, sageattn
    from .testing import make_qkv

    device = _device(args.device)
    print(doctor.render(doctor.summary(device)))
    b, h, n, d = args.batch, args.heads, args.seq, args.head_dim
    q, k, v = make_qkv(b, h, n, d, device=device, generator=torch.Generator().manual_seed(args.seed))
    truth = reference.exact.attention(q, k, v)
    plan = dispatch.plan(Mode.parse(args.mode), device, d, q.dtype, False, n, seq_q=n)
    print(f"\ndemo: sageattn(q, k, v, mode={args.mode!r}) on {device}, q/k/v [B={b}, H={h}, N={n}, D={d}] bf16")
    print(
        f"  runs: {plan.kernel.name if plan.kernel else 'PyTorch attention'}"
        + (f" - {plan.reason}" if plan.reason else "")
    )
    sageattn(q, k, v, mode=args.mode)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = sageattn(q, k, v, mode=args.mode)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    rows = [("sageattn (this call)", out, elapsed)]
    for mode in ("int8_fp8", "int8_int8", "int8_fp16"):
        rows.append((f"reference {mode}", reference.sageattn(q, k, v, mode=mode), None))
    print(f"  {'':<22} {'cos sim':>9} {'rel L1':>8} {'time':>9}")
    for name, o, t in rows:
        acc = reference.accuracy(o, truth)
        print(f"  {name:<22} {acc['cos_sim']:9.6f} {acc['rel_l1']:8.4f} {f'{t * 1e3:.2f} ms' if t else '':>9}")
    print(f"  output: shape {list(out.shape)} {out.dtype}, mean {out.float().mean():.5f}, std {out.float().std():.5f}")
    return 0


def cmd_accuracy(args: argparse.Namespace) -> int:
    """The README's accuracy table: the reference (and with --kernels the kernels) against float64."""
    from . import dispatch, reference, sageattn
    from .modes import QUANTIZED_MODES
    from .testing import make_qkv

    variants = [
        ("per-thread, K smoothing", dict(smooth_q=False)),
        ("per-thread, Q+K smoothing", dict(smooth_q=True)),
        ("per-block, Q+K smoothing", dict(smooth_q=True, granularity="block")),
        ("per-thread, no smoothing", dict(smooth_q=False, smooth_k=False)),
    ]
    device = _device(args.device)
    kernels = args.kernels and device.type == "cuda"
    print(f"B={args.batch} H={args.heads} N={args.seq} D={args.head_dim} bf16, seed {args.seed}, vs float64")
    print("| inputs | mode | quantization | cos sim | rel L1 |\n|---|---|---|---|---|")
    for kind in ("normal", "biased"):
        g = torch.Generator().manual_seed(args.seed)
        q, k, v = make_qkv(args.batch, args.heads, args.seq, args.head_dim, kind=kind, generator=g, device=device)
        truth = reference.exact.attention(q, k, v)
        if kind == "normal":
            normal = q, k, v, truth
        for mode in QUANTIZED_MODES:
            rows = [(f"reference, {name}", reference.sageattn(q, k, v, mode=mode, **kw)) for name, kw in variants]
            if kernels:
                plan = dispatch.plan(mode, device, args.head_dim, q.dtype, False)
                ran = plan.kernel.name if plan.kernel else "PyTorch fallback"
                rows.insert(0, (f"**kernel** ({ran})", sageattn(q, k, v, mode=mode)))
            for name, out in rows:
                acc = reference.accuracy(out, truth)
                print(f"| {kind} | {mode.value} | {name} | {acc['cos_sim']:.5f} | {acc['rel_l1']:.4f} |")
    # The floor each P·V pays for its number formats alone (exact Q·Kᵀ, row sums and accumulation).
    q, k, v, truth = normal
    print("\nP·V number formats alone (normal inputs; exact Q·Kᵀ, row sums and accumulation)")
    print("| P̃ | V | cos sim | rel L1 |\n|---|---|---|---|")
    for p_format, v_format in (
        ("fp8", None),
        (None, "fp8"),
        ("fp8", "fp8"),
        ("int8", None),
        (None, "int8"),
        ("int8", "int8"),
    ):
        acc = reference.accuracy(reference.exact.pv_formats(q, k, v, p_format, v_format), truth)
        print(f"| {p_format or 'exact'} | {v_format or 'exact'} | {acc['cos_sim']:.5f} | {acc['rel_l1']:.4f} |")
    return 0


def _shape_argument(text: str) -> tuple:
    from .bench import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _padded_keys(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"the padded keys must be a non-negative integer; got {text!r}")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    built_in = bench.STEP_SHAPES if args.steps else bench.SHAPES
    shapes = args.shape or [s for s in built_in if not args.only or any(o in s[5] for o in args.only.split(","))]
    bench.run(
        args.modes.split(","), shapes, warmup=args.warmup, repeat=args.repeat, json_path=args.json,
        plot_path=args.plot, timing=args.timing, key_mask_pad=args.key_mask,
    )  # fmt: skip
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """The prebuilt kernel wheel for this Python, torch, OS and GPU, from the wheel index (never a source build)."""
    from . import install

    return install.install(index_url=args.index_url, wheel=args.wheel, version=args.version, dry_run=args.dry_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_sage")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="what this machine runs: GPU, kernels, modes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--device", help="e.g. cuda:1 (default: the current CUDA device, else cpu)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("demo", help="doctor, then one call through the API checked against float64")
    p.add_argument("--device")
    p.add_argument("--mode", default="auto", type=str.lower, choices=[m.value for m in Mode])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    # 4,096 tokens: the accuracy inputs, and long enough that `auto` runs the kernel on every GPU (Hopper's
    # leaves shorter calls to PyTorch attention, which is faster there).
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("accuracy", help="the reference's accuracy table (every mode vs float64)")
    p.add_argument("--device", help="where to compute (default: the current CUDA device, else cpu)")
    p.add_argument("--kernels", action="store_true", help="add a row for the kernel of each mode (CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_accuracy)

    from .bench import TIMINGS

    p = sub.add_parser("bench", help="TOPS per shape for every implementation found (needs a GPU)")
    p.add_argument("--modes", default="int8_fp8,int8_int8,int8_fp16", help="comma-separated comfy_sage modes")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", default="bench.json", help="where to write the results")
    p.add_argument("--plot", default="bench.png", help="where to draw TOPS against N (needs matplotlib)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--only", help="comma-separated substrings of the shape names to run (default: all)")
    which.add_argument(
        "--shape", action="append", type=_shape_argument, metavar="B,H,N,D[,causal]",
        help="time this shape instead of the built-in ones (repeatable), e.g. 1,24,4096,128 or 1,24,4096,128,1; "
        "N_q:N_kv for cross attention, e.g. 2,10,4096:77,64",
    )  # fmt: skip
    p.add_argument(
        "--steps", action="store_true",
        help="the built-in shapes of real steps that the anchor shapes leave out: cross attention over text "
        "tokens, the lower UNet levels, Flux below 1024²",
    )  # fmt: skip
    p.add_argument(
        "--timing", default="queued", choices=TIMINGS,
        help="queued: calls issued back to back, as in a model (default); single: each call synchronized, "
        "so its host time counts too",
    )  # fmt: skip
    p.add_argument(
        "--key-mask", type=_padded_keys, default=0, metavar="PAD",
        help="every call with a text-padding key mask on its last PAD keys (as HunyuanVideo passes it), against "
        "PyTorch's attention with the mask; causal shapes are left out",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench)

    from .install import add_arguments as add_install_arguments

    p = sub.add_parser("install", help="install the prebuilt kernels for this Python, torch and GPU (pip, no deps)")
    add_install_arguments(p)
    p.set_defaults(func=cmd_install)

    args = parser.parse_args(argv)
    if getattr(args, "device", None):
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            parser.error(f"--device {args.device!r}: {exc}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU on this machine")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
