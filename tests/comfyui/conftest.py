"""Fixtures of the node-pack tests: the ComfyUI stand-in (comfy_stub), stand-in kernels, loading the pack."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
from comfy_stub import attention, comfy_modules, patcher
from fake_kernels import FakeKernels

from comfy_sage import _log, comfyui, dispatch

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


@pytest.fixture
def kernels(monkeypatch) -> FakeKernels:
    """Make the adapter see kernels: its plan and its sageattn are the stand-ins'."""
    return FakeKernels().install(monkeypatch.setattr)


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
