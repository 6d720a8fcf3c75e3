"""GPU tests: they need a CUDA GPU and the compiled kernels, and skip with the reason otherwise."""

from __future__ import annotations

import pytest
import torch

from comfy_sage import capability


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU (none here)"
    elif not capability.kernel_status().loaded:
        reason = f"needs the compiled kernels: {capability.kernel_status().reason}"
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
