"""The reference's quantizers: INT8/INT4 rounding and clamping, FP8 e4m3, per-channel V, FP22, block means."""

from __future__ import annotations

import struct

import pytest
import torch

from comfy_sage.reference import quant

CPU = torch.device("cpu")


def one_group(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int of [N, D] rows as one group (a single scale)."""
    n = x.shape[0]
    values, scale = quant.quantize_int(x[None, None].float(), bits, torch.zeros(n, dtype=torch.long))
    return values[0, 0], scale[0, 0]


@pytest.mark.parametrize("bits", [8, 4])
def test_round_half_to_even(bits: int) -> None:
    qmax = quant.INT_MAX[bits]
    # amax = qmax makes the multiplier exactly 1, so the other values are the rounding inputs themselves.
    halves = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 4.5, 5.5, 6.5, 0.49999997, 2.5000002]
    expected = [0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, 4.0, 6.0, 6.0, 0.0, 3.0]
    values, scale = one_group(torch.tensor([[float(qmax), *halves]]), bits)
    assert values[0].tolist() == [float(qmax), *expected]
    assert scale.tolist() == [1.0]


@pytest.mark.parametrize("bits", [8, 4])
def test_range_and_clamp(bits: int) -> None:
    qmax = quant.INT_MAX[bits]
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(1, 1, 512, 128, generator=g) * torch.exp(2 * torch.randn(1, 1, 512, 1, generator=g))
    ids = torch.arange(512) // 8
    values, scale = quant.quantize_int(x, bits, ids)
    assert values.abs().max() == qmax
    assert torch.equal(values, values.round()), "not integers"
    # Every group's largest value lands exactly on ±qmax; nothing outside [-qmax, qmax].
    group_max = values.abs().amax(-1).view(64, 8).amax(-1)
    assert (group_max == qmax).all()
    assert set(values.unique().tolist()) <= set(range(-qmax, qmax + 1))
    if bits == 4:
        assert set(values.unique().tolist()) == set(range(-qmax, qmax + 1))
    # Dequantized error at most half a step (plus float32 rounding).
    err = (values * scale[..., None] - x).abs()
    assert (err <= scale[..., None] * (0.5 + 1e-5)).all()
    # Where qmax / amax overflows to inf (amax ~1e-38), values saturate to ±qmax and zeros stay 0 (no NaN).
    v, s = one_group(torch.tensor([[1e-38, 0.0, -5e-39, 0.0]]), bits)
    assert v.tolist() == [[qmax, 0.0, -qmax, 0.0]]
    assert s.item() == pytest.approx(1e-38 / qmax, rel=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_group_gives_zero_scale_and_values(bits: int) -> None:
    x = torch.randn(1, 2, 16, 32, generator=torch.Generator().manual_seed(0))
    x[:, 0, 8:] = 0.0  # one whole group of head 0 is zero
    ids = torch.arange(16) // 8
    values, scale = quant.quantize_int(x, bits, ids)
    assert torch.equal(scale[0, 0, 8:], torch.zeros(8))
    assert torch.equal(values[0, 0, 8:], torch.zeros(8, 32))
    assert (scale[0, 0, :8] > 0).all() and (scale[0, 1] > 0).all()
    assert not values.isnan().any()


def test_int4_levels() -> None:
    # A ramp across the group: the 15 INT4 levels, symmetric, nothing at ±8.
    ramp = torch.linspace(-1.0, 1.0, 29)[None]
    values, scale = one_group(ramp, 4)
    assert scale.item() == pytest.approx(1 / 7)
    assert values.min() == -7 and values.max() == 7
    assert values.tolist()[0] == torch.round(ramp * 7).tolist()[0]


def test_fp8_e4m3_rounding_and_saturation() -> None:
    x = torch.tensor([1.0625, 1.1875, 1.0625001, 232.0, 448.0, 464.0, 1e6, float("inf"), -500.0, -float("inf")])
    expected = [1.0, 1.25, 1.125, 224.0, 448.0, 448.0, 448.0, 448.0, -448.0, -448.0]
    assert quant.to_e4m3(x).tolist() == expected
    # Subnormals: the smallest is 2^-9; ties go to even.
    sub = torch.tensor([2**-10, 2**-10 * 1.01, 3 * 2**-10, 2**-9, 7 * 2**-9, 7 * 2**-10])
    assert quant.to_e4m3(sub).tolist() == [0.0, 2**-9, 2**-8, 2**-9, 7 * 2**-9, 2**-7]
    # Every finite e4m3 value is kept; 448 is the largest.
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[~codes.isnan()]
    assert torch.equal(quant.to_e4m3(finite), finite)
    assert finite.max() == quant.FP8_MAX == 448.0
    # Random values: the nearest e4m3 value (relative error ≤ 2^-4 in the normal range).
    r = torch.randn(10000, generator=torch.Generator().manual_seed(1)) * 30
    r = r[(r.abs() > 2**-6) & (r.abs() < 448)]
    rel = ((quant.to_e4m3(r) - r) / r).abs()
    assert rel.max() <= 2**-4
    nearest = finite[(finite[None, :] - r[:, None]).abs().argmin(1)]
    assert ((quant.to_e4m3(r) - r).abs() == (nearest - r).abs()).all()


def test_v_fp8_per_channel_scale() -> None:
    g = torch.Generator().manual_seed(2)
    # Channels with very different ranges: per-channel scales keep each one's relative precision.
    v = torch.randn(2, 3, 200, 64, generator=g) * torch.logspace(-3, 3, 64)
    v[0, 1, :, 5] = 0.0  # an all-zero channel
    v_hat, scale = quant.quantize_v_fp8(v)
    assert scale.shape == (2, 3, 1, 64)
    assert torch.equal(scale, v.abs().amax(-2, keepdim=True) / 448.0)
    assert scale[0, 1, 0, 5] == 0 and (v_hat[0, 1, :, 5] == 0).all()
    # Each channel's amax maps to ±448 exactly; all values are e4m3 values.
    peak = v_hat.abs().amax(-2)
    assert (peak == 448).sum() == peak.numel() - 1 and peak[0, 1, 5] == 0
    assert torch.equal(quant.to_e4m3(v_hat), v_hat)
    # Relative error ≤ 2^-4 wherever the scaled value is in e4m3's normal range (≥ 2^-6).
    normal = (v.abs() >= scale * 2**-6) & (v != 0)
    rel = ((v_hat * scale - v).abs() / v.abs())[normal]
    assert rel.max() <= 2**-4 * (1 + 1e-5)
    # Zeros stay zero even in a channel whose 448 / amax overflows to inf.
    tiny = torch.zeros(1, 1, 4, 2)
    tiny[0, 0, 0] = torch.tensor([1e-37, 3.0])
    tiny_hat, tiny_scale = quant.quantize_v_fp8(tiny)
    assert tiny_hat[0, 0, :, 0].tolist() == [448.0, 0.0, 0.0, 0.0] and not tiny_hat.isnan().any()
    assert tiny_scale[0, 0, 0, 0].item() == pytest.approx(1e-37 / 448, rel=1e-6)


def test_fp22_truncation() -> None:
    x = torch.tensor([1 + 2**-13, 1 + 2**-14, -(1 + 2**-14), 1 - 2**-24, 3.0, -2.0 - 2**-12 - 2**-20, 0.0])
    expected = [1 + 2**-13, 1.0, -1.0, 1 - 2**-14, 3.0, -2.0 - 2**-12, 0.0]
    assert quant.truncate_fp22(x).tolist() == expected
    r = torch.randn(100000, generator=torch.Generator().manual_seed(3)) * 1e3
    t = quant.truncate_fp22(r)
    # 13 mantissa bits kept: the 10 low bits of the float32 pattern are zero; toward zero; within 2^-13 relative.
    assert ((t.view(torch.int32) & 0x3FF) == 0).all()
    assert (t.abs() <= r.abs()).all() and (torch.sign(t) == torch.sign(r)).all()
    assert ((r - t).abs() < r.abs() * 2**-13).all()
    # Bit-exact against a pure-Python truncation of the float32 pattern.
    for value in r[:200].tolist():
        bits = struct.unpack("<I", struct.pack("<f", value))[0] & ~0x3FF
        assert quant.truncate_fp22(torch.tensor([value])).item() == struct.unpack("<f", struct.pack("<I", bits))[0]
    # Inf and NaN pass through.
    special = quant.truncate_fp22(torch.tensor([float("inf"), -float("inf"), float("nan")]))
    assert special[0] == float("inf") and special[1] == -float("inf") and special[2].isnan()


@pytest.mark.parametrize(("n", "block"), [(77, 32), (128, 128), (1, 128), (300, 128), (256, 64)])
def test_block_means_over_valid_rows(n: int, block: int) -> None:
    x = torch.randn(2, 3, n, 16, generator=torch.Generator().manual_seed(n))
    means = quant.block_means(x, block)
    blocks = -(-n // block)
    assert means.shape == (2, 3, blocks, 16)
    for i in range(blocks):
        rows = x[:, :, i * block : min(n, (i + 1) * block)]
        torch.testing.assert_close(means[:, :, i], rows.mean(2), rtol=1e-6, atol=1e-6)
