"""torch.compile and torch.library contracts of the public API, on whatever device is here (CPU in CI)."""

from __future__ import annotations

import pytest
import torch

import comfy_sage
import comfy_sage.api  # registers comfy_sage::sageattn


def _qkv(layout="HND", n=48, d=32):
    g = torch.Generator().manual_seed(1)
    shape = (2, 4, n, d) if layout == "HND" else (2, n, 4, d)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


@pytest.mark.parametrize("layout", ("HND", "NHD"))
@pytest.mark.parametrize("return_lse", (False, True))
def test_compile_fullgraph_matches_eager(layout, return_lse):
    """fullgraph=True fails on any graph break: the API must compile as one opaque op."""
    q, k, v = _qkv(layout)

    def fn(q, k, v):
        return comfy_sage.sageattn(q, k, v, is_causal=True, tensor_layout=layout, return_lse=return_lse)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, expected = compiled(q, k, v), fn(q, k, v)
    if return_lse:
        torch.testing.assert_close(got[1], expected[1])
        got, expected = got[0], expected[0]
    torch.testing.assert_close(got, expected)
    assert got.shape == q.shape and got.is_contiguous()


def test_compile_dynamic_shapes_matches_eager():
    """Dynamic shapes (a compiled model run at several resolutions): one graph serves every length."""

    def fn(q, k, v):
        return comfy_sage.sageattn(q, k, v, mode="int8_fp8")

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for n in (48, 77, 130):
        q, k, v = _qkv(n=n)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), atol=0, rtol=0)
    assert counter.frame_count == 1


def test_opcheck_sageattn_op():
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 48, 48) > 0.2
    for args in (
        (q, k, v, "HND", False, 0.2, "auto", None, True),
        (q, k, v, "HND", True, 0.2, "sdpa", None, False),
        (q, k, v, "HND", False, 0.2, "int8_fp8", mask, False),
    ):
        torch.library.opcheck(torch.ops.comfy_sage.sageattn.default, args)


@pytest.mark.parametrize("layout", ("HND", "NHD"))
def test_compile_with_gradients_matches_eager(layout):
    """Inputs that require gradients take PyTorch's attention, which torch.compile traces: the same output and
    gradients as eager, in a function compiled whole."""
    leaves = [t.requires_grad_() for t in _qkv(layout)]

    def fn(q, k, v):
        return comfy_sage.sageattn(q, k, v, is_causal=True, tensor_layout=layout)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, expected = compiled(*leaves), fn(*leaves)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), leaves), strict=True):
        torch.testing.assert_close(a, b)
