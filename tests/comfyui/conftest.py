"""Fixtures of the node-pack tests: the ComfyUI stand-in (comfy_stub), stand-in kernels, loading the pack."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfy_stub import attention, comfy_modules, patcher

from comfy_sage import _log, comfyui, dispatch, reference
from comfy_sage.dispatch import KernelSpec, Plan
from comfy_sage.modes import Mode
from comfy_sage.tiling import SM80

REPO = Path(__file__).resolve().parents[2]
_pack_names = itertools.count()


@pytest.fixture(autouse=True)
def fresh_state():
    """No test sees another's attention counts, one-time log lines or cached plans."""
    attention.CALLS.clear()
    _log.forget_logged()
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


@pytest.fixture
def hooks() -> comfyui.ComfyHooks:
    """The ComfyUI pieces the patch uses, from the stand-in."""
    return comfyui.ComfyHooks(attention.attention_pytorch, True, patcher.WrappersMP.APPLY_MODEL)


class FakeKernels:
    """Stands in for the compiled kernels on a CPU.

    `plan` answers as an sm_89 GPU with kernels would: masks and head dims outside 32..128 (or not a multiple
    of 8) fall back, everything else runs a kernel. `sageattn` computes exact attention in float64 (or, with
    `quantized`, the reference's SageAttention2) and records each call; `poison` > 0 makes that many next
    calls return NaN.
    """

    MASK_REASON = "falls back to PyTorch attention: attn_mask is not supported by the kernels"

    def __init__(self, quantized: bool = False):
        self.quantized = quantized
        self.calls: list[dict] = []
        self.poison = 0

    def plan(self, mode, device, head_dim, dtype, has_mask):
        resolved = Mode.INT8_FP8 if mode is Mode.AUTO else mode
        if has_mask:
            return Plan(requested=mode, mode=Mode.SDPA, kernel=None, reason=f"{resolved.value} {self.MASK_REASON}")
        if not 32 <= head_dim <= 128 or head_dim % 8:
            reason = f"{resolved.value} falls back to PyTorch attention: head_dim {head_dim} is not supported"
            return Plan(requested=mode, mode=Mode.SDPA, kernel=None, reason=reason)
        return Plan(requested=mode, mode=resolved, kernel=KernelSpec("sm80", resolved, SM80))

    def sageattn(self, q, k, v, *, tensor_layout, sm_scale, mode):
        self.calls.append(
            {
                "layout": tensor_layout,
                "mode": mode,
                "scale": sm_scale,
                "q": tuple(q.shape),
                "k": tuple(k.shape),
                "dtype": q.dtype,
            }
        )
        if self.quantized:
            resolved = Mode.INT8_FP8 if mode is Mode.AUTO else mode
            out = reference.sageattn(q, k, v, mode=resolved, tensor_layout=tensor_layout, sm_scale=sm_scale)
        else:
            qh, kh, vh = (t if tensor_layout == "HND" else t.transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(
                qh.double(), kh.double(), vh.double(), scale=sm_scale, enable_gqa=qh.shape[1] != kh.shape[1]
            ).to(q.dtype)
            out = out if tensor_layout == "HND" else out.transpose(1, 2)
        if self.poison > 0:
            self.poison -= 1
            out = torch.full_like(out, float("nan"))
        return out


@pytest.fixture
def kernels(monkeypatch) -> FakeKernels:
    """Make the adapter see kernels: its plan and its sageattn are the stand-ins'."""
    fake = FakeKernels()
    monkeypatch.setattr(comfyui.dispatch, "plan", fake.plan)
    monkeypatch.setattr(comfyui, "sageattn", fake.sageattn)
    return fake


@pytest.fixture
def comfy_env(monkeypatch):
    """Install the stand-in as `comfy` / `comfy_api.latest` in sys.modules (for the node-level tests)."""

    def install(with_v3: bool = True, with_override: bool = True):
        for name in ("comfy_api", "comfy_api.latest"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        for name, module in comfy_modules(with_v3, with_override).items():
            monkeypatch.setitem(sys.modules, name, module)

    return install


@pytest.fixture
def load_pack():
    """Import the repo root as ComfyUI imports a custom node folder: its __init__.py under a path-like name."""
    loaded: list[str] = []

    def load():
        name = f"custom_nodes_comfy_sage_{next(_pack_names)}"
        spec = importlib.util.spec_from_file_location(
            name, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def make_model(seed: int = 0, **kwargs) -> patcher.ModelPatcher:
    """A ModelPatcher around the stand-in's tiny transformer."""
    from comfy_stub.model import TinyDiT

    return patcher.ModelPatcher(patcher.BaseModel(TinyDiT(seed=seed, **kwargs)))


def model_inputs(seed: int = 1, batch: int = 2, tokens: int = 24, channels: int = 64, context: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, channels, generator=g), torch.randn(batch, 7, context, generator=g)
