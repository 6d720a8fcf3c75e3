"""The Python side of a kernel call (`comfy_sage.ops.attention`), with the compiled op replaced by a recorder:
what reaches `torch.ops.comfy_sage.attention` for each mode, layout and dtype. The op itself is tested on a
GPU (tests/gpu)."""

from __future__ import annotations

import math

import pytest
import torch

import comfy_sage.api  # noqa: F401  (creates the torch.ops.comfy_sage namespace)
from comfy_sage import ops
from comfy_sage.modes import QUANTIZED_MODES, Mode


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def fake(q, k, v, layout, qk_bits, pv, is_causal, sm_scale, return_lse, family, key_bias):
        calls.append(
            dict(
                q=q, layout=layout, qk_bits=qk_bits, pv=pv, causal=is_causal, scale=sm_scale, family=family,
                key_bias=key_bias,
            )
        )  # fmt: skip
        return torch.zeros_like(q), q.new_zeros((0,), dtype=torch.float32)

    monkeypatch.setattr(torch.ops.comfy_sage, "attention", fake, raising=False)
    return calls


@pytest.mark.parametrize("mode", QUANTIZED_MODES, ids=str)
@pytest.mark.parametrize("layout", ("HND", "NHD"))
def test_mode_and_layout_reach_the_op(recorded, mode: Mode, layout: str):
    q = k = v = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    out, lse = ops.attention(q, k, v, layout, mode, is_causal=True, scale=0.1, return_lse=False)
    (call,) = recorded
    assert (call["qk_bits"], call["pv"]) == (mode.qk_bits, {"fp16": 0, "fp8": 1, "int8": 2}[mode.pv])
    assert call["layout"] == ops.LAYOUT_CODES[layout] and call["causal"] is True and call["scale"] == 0.1
    assert call["family"] == 80  # the mma.sync family unless told otherwise
    assert out.dtype == torch.float16 and lse is None


def test_family_reaches_the_op(recorded):
    q = k = v = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    ops.attention(q, k, v, "HND", Mode.INT8_FP8, family="sm90", is_causal=False, scale=0.1, return_lse=False)
    assert recorded[0]["family"] == 90


def test_key_bias_reaches_the_op(recorded):
    q = k = v = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    bias = ops.key_bias(torch.tensor([True, False]), 1, 2)
    ops.attention(q, k, v, "HND", Mode.INT8_FP8, is_causal=False, scale=0.1, return_lse=False, key_bias=bias)
    ops.attention(q, k, v, "HND", Mode.INT8_FP8, is_causal=False, scale=0.1, return_lse=False)
    assert recorded[0]["key_bias"] is bias and recorded[1]["key_bias"] is None


@pytest.mark.parametrize("rows", [1, 3])
def test_key_bias_from_bool_and_additive_masks(rows):
    # The kernel adds the bias to log2-domain scores: an additive mask times log2(e), a bool mask 0 or −inf; the
    # row is padded with −inf to a multiple of every kernel's K block (128), and a flag per 64 keys says whether
    # any of them has a bias.
    keep = torch.rand(rows, 1, 1, 200, generator=torch.Generator().manual_seed(0)) > 0.4
    keep[..., :64] = True  # the first 64 keys: no bias, flag 0
    out = ops.key_bias(keep, rows, 200)
    assert out.shape == (rows, 256 + 4) and out.dtype == torch.float32 and out.is_contiguous()  # 4 flags
    bias, flags = out[:, :256], out[:, 256:]
    assert torch.equal(bias[:, :200], torch.where(keep.reshape(rows, 200), 0.0, -math.inf))
    assert (bias[:, 200:] == -math.inf).all()
    assert torch.equal(flags, torch.tensor([[0.0, 1.0, 1.0, 1.0]] * rows))

    additive = torch.randn(rows, 1, 1, 200, dtype=torch.bfloat16)
    additive[..., 5] = -torch.finfo(torch.bfloat16).max  # ComfyUI's padding value: stays finite
    additive[..., 6] = -math.inf
    bias = ops.key_bias(additive, rows, 200)[:, :256]
    assert ops.key_bias(keep[..., :100], rows, 100).shape == (rows, 128 + 4)  # 2 flags, padded to 4
    expected = additive.reshape(rows, 200).float() * math.log2(math.e)
    torch.testing.assert_close(bias[:, 7:200], expected[:, 7:])
    assert (bias[:, 5] == ops.FINITE_BIAS_FLOOR).all() and (bias[:, 6] == -math.inf).all()


def test_float32_runs_in_bfloat16_and_returns_float32(recorded):
    q = k = v = torch.randn(1, 2, 8, 64)
    out, _ = ops.attention(q, k, v, "HND", Mode.INT8_FP16, is_causal=False, scale=0.125, return_lse=True)
    assert recorded[0]["q"].dtype == torch.bfloat16 and out.dtype == torch.float32


def test_misaligned_inputs_are_made_contiguous(recorded):
    base = torch.randn(1, 2, 8, 72, dtype=torch.bfloat16)
    q = base[..., 1:65]  # head_dim 64 starting one element in: not 16-byte aligned
    ops.attention(q, q, q, "HND", Mode.INT8_FP8, is_causal=False, scale=0.125, return_lse=False)
    sent = recorded[0]["q"]
    assert sent.is_contiguous() and sent.data_ptr() % 16 == 0 and torch.equal(sent, q)


def test_misaligned_contiguous_inputs_are_copied(recorded):
    """A contiguous tensor that starts off a 16-byte boundary (a view into a larger buffer) is copied: the
    kernels read 16-byte vectors."""
    q = torch.randn(2 * 8 * 64 + 1, dtype=torch.float16)[1:].view(1, 2, 8, 64)
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    ops.attention(q, q, q, "HND", Mode.INT8_FP8, is_causal=False, scale=0.125, return_lse=False)
    sent = recorded[0]["q"]
    assert sent.is_contiguous() and sent.data_ptr() % 16 == 0 and torch.equal(sent, q)


def test_size_one_dimensions_do_not_force_a_copy(recorded):
    """The stride of a size-1 dimension is never used, so an odd one does not make the input a copy."""
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16).as_strided((1, 2, 8, 64), (3, 512, 64, 1))
    ops.attention(q, q, q, "HND", Mode.INT8_FP8, is_causal=False, scale=0.125, return_lse=False)
    assert recorded[0]["q"] is q


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_inputs_and_output_pass_through_uncopied(monkeypatch, dtype):
    """Aligned inputs reach the op as they are, contiguous or not (Q, K, V split from one fused projection),
    and the op's output comes back itself: no copy, no `.to` through the dispatcher."""
    sent, returned = [], []

    def fake(q, k, v, *args):
        sent.append((q, k, v))
        returned.append(torch.zeros_like(q))
        return returned[-1], q.new_zeros((0,), dtype=torch.float32)

    monkeypatch.setattr(torch.ops.comfy_sage, "attention", fake, raising=False)
    q = torch.randn(1, 8, 2, 64, dtype=dtype)  # NHD
    k, v = torch.randn(1, 8, 2, 2, 64, dtype=dtype).unbind(2)  # NHD views with a token stride of 256
    assert not k.is_contiguous()
    out, lse = ops.attention(q, k, v, "NHD", Mode.INT8_FP8, is_causal=False, scale=0.125, return_lse=False)
    assert len(sent) == 1 and all(a is b for a, b in zip(sent[0], (q, k, v), strict=True))
    assert out is returned[0] and lse is None
