"""Shared fixtures: a seeded generator, and a clean slate for the process-wide caches."""

from __future__ import annotations

import pytest
import torch

from comfy_sage import _log, api, capability, dispatch


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so every test sees the same inputs on every run."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def fresh_state():
    """Forget cached plans, the kernel status, the messages already logged and the calls that ran out of GPU
    memory, before and after the test."""

    def clear():
        dispatch.clear_cache()
        capability.kernel_status.cache_clear()
        capability._kernels_run_on.cache_clear()
        _log.forget_logged()
        api._short_of_memory.clear()

    clear()
    yield
    clear()
