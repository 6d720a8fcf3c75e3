"""What this machine gets: GPU, versions, kernel status, and the mode each head dim runs."""

from __future__ import annotations

import platform

import torch

from . import __version__, capability, dispatch
from .modes import QUANTIZED_MODES, Mode

REPORTED_HEAD_DIMS = (40, 64, 80, 128, 160, 256)  # SD1.5, SDXL/SD3, SD1.5, Flux/Wan, SD1.5, others


def summary(device: torch.device | str | None = None) -> dict:
    """A JSON-ready description of what runs here (on `device`, default the current CUDA device)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    status = capability.kernel_status()
    cc = capability.device_capability(device)
    info = {
        "comfy_sage": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cc else None,
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "kernels_loaded": status.loaded,
        "kernels_reason": status.reason,
        "kernel_archs": list(status.archs),
        "kernels_run_here": bool(cc) and status.loaded and capability.kernels_run_on(device),
    }
    modes = {}
    for mode in QUANTIZED_MODES:
        plan = dispatch.plan(mode, device, 128, torch.bfloat16, False)
        if plan.fallback:
            modes[mode.value] = f"sdpa ({plan.reason})"
        elif plan.mode is mode:
            modes[mode.value] = f"native, {KERNEL_NAMES[plan.kernel.family]}"
        else:
            modes[mode.value] = f"runs as {plan.mode.value} ({plan.note})"
    info["modes"] = modes
    auto = {}
    for head_dim in REPORTED_HEAD_DIMS:
        long = dispatch.plan(Mode.AUTO, device, head_dim, torch.bfloat16, False)
        short = dispatch.plan(Mode.AUTO, device, head_dim, torch.bfloat16, False, 1024, seq_q=1024)
        auto[str(head_dim)] = describe(long) + ("" if short == long else f"; 1,024 tokens: {describe(short)}")
    info["auto"] = auto
    # Masks, at head dim 128: a key mask (one value per key: text padding) and any other.
    long = dispatch.plan(Mode.AUTO, device, 128, torch.bfloat16, False, key_mask=True)
    short = dispatch.plan(Mode.AUTO, device, 128, torch.bfloat16, False, 1024, seq_q=1024, key_mask=True)
    info["masks"] = {
        "key mask": describe(long) + ("" if short == long else f"; 1,024 tokens: {describe(short)}"),
        "other masks": describe(dispatch.plan(Mode.AUTO, device, 128, torch.bfloat16, True)),
    }
    info["other_gpus"] = other_gpus(device)
    return info


def other_gpus(device: torch.device) -> list[dict]:
    """The CUDA GPUs besides `device` (all of them for a CPU device): name, compute capability and whether the
    kernels run there. A model placed on one of them runs there (`doctor --device cuda:N` shows its modes)."""
    if not torch.cuda.is_available():
        return []
    here = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else -1
    found = []
    for index in range(torch.cuda.device_count()):
        if index == here:
            continue
        gpu = torch.device("cuda", index)
        cc = capability.device_capability(gpu)
        found.append({
            "device": str(gpu),
            "gpu": torch.cuda.get_device_name(gpu),
            "compute_capability": f"{cc[0]}.{cc[1]}",
            "kernels_run_here": capability.kernel_status().loaded and capability.kernels_run_on(gpu),
        })  # fmt: skip
    return found


KERNEL_NAMES = {"sm80": "mma.sync kernel", "sm90": "wgmma kernel"}


def describe(plan: dispatch.Plan) -> str:
    """What runs a plan, in a few words: the mode and kernel family, or the fallback and why."""
    if plan.fallback:
        return f"sdpa ({plan.reason})"
    return f"{plan.mode.value} ({KERNEL_NAMES[plan.kernel.family]})"


def render(info: dict) -> str:
    lines = [
        f"comfy_sage {info['comfy_sage']}  python {info['python']}  torch {info['torch']}"
        f"  (CUDA {info['torch_cuda'] or 'none: CPU build'})",
        f"device: {info['device']}"
        + (f"  {info['gpu']}  compute capability {info['compute_capability']}" if info["gpu"] else "  (no CUDA GPU)"),
        "kernels: "
        + (
            "loaded"
            + (f" (built for {', '.join(info['kernel_archs'])})" if info["kernel_archs"] else "")
            + (("" if info["kernels_run_here"] else ", but NO code for this GPU") if info["gpu"] else "")
            if info["kernels_loaded"]
            else "not loaded: " + info["kernels_reason"]
        ),
        "modes on this GPU:",
    ]
    lines += [f"  {mode:<10} {what}" for mode, what in info["modes"].items()]
    lines.append("mode 'auto' picks, by head dim (bf16, no mask):")
    lines += [f"  D={head_dim:<4} {what}" for head_dim, what in info["auto"].items()]
    lines.append("with a mask, 'auto' at D=128 (a key mask: one value per key, as text padding is):")
    lines += [f"  {kind:<11} {what}" for kind, what in info["masks"].items()]
    if info.get("other_gpus"):
        lines.append("other GPUs (`doctor --device cuda:N` shows one's modes):")
        lines += [
            f"  {gpu['device']:<7} {gpu['gpu']}  compute capability {gpu['compute_capability']}: "
            + ("the kernels run there" if gpu["kernels_run_here"] else "PyTorch attention there")
            for gpu in info["other_gpus"]
        ]
    return "\n".join(lines)
