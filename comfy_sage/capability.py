"""What this machine can run: the GPU, its compute capability, and whether the compiled kernels loaded.

Importing the compiled extension is attempted once, lazily; the reason it failed is kept for `doctor`
and for the fallback's log line. Nothing here needs a GPU, a CUDA toolkit or the extension.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from . import ops

EXTENSION = "comfy_sage._C"


@dataclass(frozen=True)
class KernelStatus:
    loaded: bool
    reason: str | None  # why not, when not loaded
    archs: tuple[str, ...] = ()  # the GPU architectures the extension was compiled for


@functools.cache
def kernel_status() -> KernelStatus:
    """Load the compiled extension once; never raises."""
    try:
        module = importlib.import_module(EXTENSION)
    except ImportError as exc:
        # Only "not found" means a pure-Python install; a found extension that fails to load (its ImportError
        # may carry the same name on some Pythons) must keep its reason.
        if isinstance(exc, ModuleNotFoundError) and exc.name == EXTENSION:
            return KernelStatus(False, "this install has no compiled kernels (pure-Python package)")
        return KernelStatus(False, f"the compiled kernels failed to load: {exc}")
    except Exception as exc:  # an initializer that throws (op registration, a CUDA runtime mismatch, ...)
        return KernelStatus(False, f"the compiled kernels failed to load: {type(exc).__name__}: {exc}")
    if not hasattr(torch.ops.comfy_sage, "attention"):
        return KernelStatus(False, f"the compiled kernels loaded from {module.__file__} but registered no ops")
    ops.register_fakes()
    return KernelStatus(True, None, tuple(getattr(module, "ARCHS", ())))


def kernels_run_on(device: torch.device, family: str = "sm80") -> bool:
    """Whether the loaded kernels of `family` ("sm80": mma.sync, "sm90": wgmma) hold code for this CUDA device
    (a host-side query, once per device and family)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _kernels_run_on(index, family)


@functools.cache
def _kernels_run_on(device_index: int, family: str = "sm80") -> bool:
    return kernel_status().loaded and bool(torch.ops.comfy_sage.runs_on(device_index, ops.FAMILY_CODES[family]))


@functools.cache
def compute_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None for any other device."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return compute_capability(index)


def sm_name(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"
