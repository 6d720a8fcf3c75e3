"""The PyTorch fallback through the public API, against float64 attention.

On a machine without a CUDA GPU every call runs the fallback, so these tests check its conventions: both
layouts, GQA, bottom-right causal masking (rows that see no key give exactly 0), masks, the scale, the
natural-log LSE and empty sequences. Bounds are what rounding the exact result to the dtype costs (measured:
bf16 rel L1 ≈ 2.1e-3, fp16 ≈ 2.7e-4, fp32 ≈ 3e-7), with about 2× headroom.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfy_sage import fallback, sageattn
from comfy_sage._inputs import Problem
from comfy_sage.reference import exact
from comfy_sage.testing import make_qkv

pytestmark = pytest.mark.filterwarnings("ignore")

# dtype: (min cos sim, max relative L1) against float64
BOUNDS = {
    torch.bfloat16: (0.99999, 4e-3),
    torch.float16: (0.9999998, 5e-4),
    torch.float32: (1 - 1e-10, 2e-6),
}


def assert_close_to(out: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> None:
    min_cos, max_l1 = BOUNDS[dtype]
    acc = exact.accuracy(out, truth)
    assert acc["cos_sim"] >= min_cos, acc
    assert acc["rel_l1"] <= max_l1, acc


def dense_reference(q, k, v, *, is_causal=False, attn_mask=None, sm_scale=None):
    """float64 O and LSE ([B, H_q, N_q]) from HND inputs, with an optional bool or additive mask."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    s = q @ k.transpose(-1, -2) * scale
    nq, nkv = q.shape[2], k.shape[2]
    if is_causal:
        visible = torch.ones(nq, nkv, dtype=torch.bool).tril(nkv - nq)
        s = s.masked_fill(~visible, -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


def check_lse(lse: torch.Tensor, truth: torch.Tensor) -> None:
    assert lse.dtype == torch.float32
    assert lse.shape == truth.shape
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == -math.inf).all()
    torch.testing.assert_close(lse[finite].double(), truth[finite], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_float64(dtype, layout, is_causal, gen):
    q, k, v = make_qkv(2, 4, 200, 64, dtype=dtype, layout=layout, generator=gen)
    out = sageattn(q, k, v, tensor_layout=layout, is_causal=is_causal)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert_close_to(out, exact.attention(q, k, v, tensor_layout=layout, is_causal=is_causal), dtype)


@pytest.mark.parametrize("seq", [1, 77, 1000])
@pytest.mark.parametrize("head_dim", [40, 64, 128])
def test_odd_lengths_and_head_dims(seq, head_dim, gen):
    q, k, v = make_qkv(1, 2, seq, head_dim, generator=gen)
    out = sageattn(q, k, v, is_causal=seq > 1)
    assert out.shape == (1, 2, seq, head_dim)
    assert_close_to(out, exact.attention(q, k, v, is_causal=seq > 1), torch.bfloat16)


def test_unusual_head_dims(gen):
    # Head dims the kernels do not run fall back without any trouble.
    for head_dim in (8, 31, 257):
        q, k, v = make_qkv(1, 2, 33, head_dim, generator=gen)
        assert_close_to(sageattn(q, k, v), exact.attention(q, k, v), torch.bfloat16)


def test_fp32_returns_fp32(gen):
    q, k, v = make_qkv(1, 2, 64, 64, dtype=torch.float32, generator=gen)
    out, lse = sageattn(q, k, v, return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_non_contiguous_inputs(layout, gen):
    # Q, K, V sliced from one packed QKV projection, as attention layers produce them.
    b, n, h, d = 2, 96, 4, 64
    qkv = torch.randn(b, n, 3, h, d, generator=gen).bfloat16()
    q, k, v = qkv.unbind(2)  # NHD views, not contiguous
    if layout == "HND":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    out = sageattn(q, k, v, tensor_layout=layout, is_causal=True)
    assert out.shape == q.shape
    truth = exact.attention(q, k, v, tensor_layout=layout, is_causal=True)
    assert_close_to(out, truth, torch.bfloat16)
    # Same numbers as with contiguous copies.
    dense = sageattn(*(t.contiguous() for t in (q, k, v)), tensor_layout=layout, is_causal=True)
    torch.testing.assert_close(out, dense, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_output_is_contiguous_in_the_callers_layout(layout, is_causal, gen):
    # As the kernels write it, so `out.view(B, N, H * D)` after an NHD call works on every path.
    q, k, v = make_qkv(2, 4, 30, 64, seq_kv=20, layout=layout, generator=gen)
    out = sageattn(q, k, v, tensor_layout=layout, is_causal=is_causal)
    assert out.is_contiguous()
    if layout == "NHD":
        assert out.view(2, 30, 4 * 64).shape == (2, 30, 256)


def test_nhd_is_hnd_transposed(gen):
    q, k, v = make_qkv(2, 4, 50, 64, heads_kv=2, seq_kv=70, generator=gen)
    hnd, lse_hnd = sageattn(q, k, v, is_causal=True, return_lse=True)
    nhd, lse_nhd = sageattn(
        *(t.transpose(1, 2).contiguous() for t in (q, k, v)), tensor_layout="NHD", is_causal=True, return_lse=True
    )
    assert nhd.shape == (2, 50, 4, 64)
    assert lse_nhd.shape == (2, 4, 50)  # the LSE is [B, H_q, N_q] in both layouts
    torch.testing.assert_close(nhd.transpose(1, 2), hnd, atol=0, rtol=0)
    torch.testing.assert_close(lse_nhd, lse_hnd, atol=0, rtol=0)


@pytest.mark.parametrize("heads_q, heads_kv", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa(heads_q, heads_kv, is_causal, gen):
    q, k, v = make_qkv(2, heads_q, 100, 64, heads_kv=heads_kv, seq_kv=130, generator=gen)
    out, lse = sageattn(q, k, v, is_causal=is_causal, return_lse=True)
    assert out.shape == (2, heads_q, 100, 64)
    assert_close_to(out, exact.attention(q, k, v, is_causal=is_causal), torch.bfloat16)
    check_lse(lse, dense_reference(q, k, v, is_causal=is_causal)[1])
    # Query head h reads key/value head h // group: the same as repeating K and V.
    group = heads_q // heads_kv
    rep = sageattn(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=is_causal)
    torch.testing.assert_close(out, rep, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("seq_q, seq_kv", [(64, 64), (40, 100), (100, 40), (77, 1), (1, 77), (5, 3)])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_causal_bottom_right(seq_q, seq_kv, layout, gen):
    q, k, v = make_qkv(1, 2, seq_q, 64, seq_kv=seq_kv, layout=layout, generator=gen)
    out, lse = sageattn(q, k, v, tensor_layout=layout, is_causal=True, return_lse=True)
    truth = exact.attention(q, k, v, tensor_layout=layout, is_causal=True)
    assert_close_to(out, truth, torch.bfloat16)
    to_hnd = (lambda t: t.transpose(1, 2)) if layout == "NHD" else (lambda t: t)
    out_h = to_hnd(out)
    hidden = max(0, seq_q - seq_kv)  # query i sees key j iff j <= i + seq_kv - seq_q
    assert (out_h[:, :, :hidden] == 0).all()
    assert torch.isfinite(out).all()
    if hidden < seq_q:
        assert out_h[:, :, hidden:].abs().sum(-1).min() > 0
    check_lse(lse, dense_reference(*(to_hnd(t) for t in (q, k, v)), is_causal=True)[1])
    assert (lse[:, :, :hidden] == -math.inf).all()
    # The last query sees every key (bottom-right alignment), so its row equals the non-causal one.
    if seq_kv > 0:
        full = to_hnd(sageattn(q, k, v, tensor_layout=layout))
        torch.testing.assert_close(out_h[:, :, -1], full[:, :, -1], atol=0, rtol=0)


def test_causal_first_visible_row_sees_one_key(gen):
    # With N_q > N_kv the first query that sees anything sees only key 0: its output is v[0].
    q, k, v = make_qkv(1, 2, 10, 32, seq_kv=4, generator=gen)
    out = sageattn(q, k, v, is_causal=True)
    torch.testing.assert_close(out[:, :, 6], v[:, :, 0], atol=0, rtol=0)


@pytest.mark.parametrize("sm_scale", [0.05, 0.3, 1.0, 2])
def test_sm_scale(sm_scale, gen):
    q, k, v = make_qkv(1, 2, 64, 64, generator=gen)
    out, lse = sageattn(q, k, v, sm_scale=sm_scale, return_lse=True)
    assert_close_to(out, exact.attention(q, k, v, sm_scale=sm_scale), torch.bfloat16)
    check_lse(lse, dense_reference(q, k, v, sm_scale=sm_scale)[1])


def test_default_scale_is_inverse_sqrt_head_dim(gen):
    q, k, v = make_qkv(1, 2, 64, 80, generator=gen)
    torch.testing.assert_close(sageattn(q, k, v), sageattn(q, k, v, sm_scale=80**-0.5), atol=0, rtol=0)


@pytest.mark.parametrize("mask_shape", [(48, 80), (2, 1, 48, 80), (1, 4, 1, 80), (1, 1, 48, 1), (4, 48, 80)])
def test_bool_mask(mask_shape, gen):
    q, k, v = make_qkv(2, 4, 48, 64, seq_kv=80, generator=gen)
    mask = torch.rand(mask_shape, generator=gen) > 0.3
    out, lse = sageattn(q, k, v, attn_mask=mask, return_lse=True)
    truth_out, truth_lse = dense_reference(q, k, v, attn_mask=mask)
    assert_close_to(out, truth_out, torch.bfloat16)
    check_lse(lse, truth_lse)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_additive_mask(q_dtype, mask_dtype, gen):
    # A float mask is added in q's dtype (what PyTorch's GPU backends need): the truth uses it so rounded.
    q, k, v = make_qkv(2, 4, 48, 64, seq_kv=80, dtype=q_dtype, generator=gen)
    mask = (torch.randn(2, 1, 48, 80, generator=gen) * 2).to(mask_dtype)
    mask[0, 0, 3, ::2] = -math.inf
    out, lse = sageattn(q, k, v, attn_mask=mask, return_lse=True)
    truth_out, truth_lse = dense_reference(q, k, v, attn_mask=mask.to(q_dtype))
    assert_close_to(out, truth_out, q_dtype)
    check_lse(lse, truth_lse)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_fully_masked_rows_give_zero(mask_dtype, gen):
    q, k, v = make_qkv(1, 2, 8, 64, seq_kv=16, generator=gen)
    keep = torch.ones(8, 16, dtype=torch.bool)
    keep[3] = False
    mask = keep if mask_dtype == torch.bool else torch.zeros(8, 16).masked_fill(~keep, -math.inf)
    out, lse = sageattn(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, 3] == 0).all()
    assert (lse[:, :, 3] == -math.inf).all() and torch.isfinite(lse[:, :, [0, 1, 2, 4, 5, 6, 7]]).all()
    assert_close_to(out, dense_reference(q, k, v, attn_mask=mask)[0], torch.bfloat16)


def test_mask_with_gqa_and_nhd(gen):
    q, k, v = make_qkv(1, 8, 30, 64, heads_kv=2, seq_kv=50, layout="NHD", generator=gen)
    mask = torch.rand(1, 8, 30, 50, generator=gen) > 0.5
    out = sageattn(q, k, v, tensor_layout="NHD", attn_mask=mask)
    truth = dense_reference(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)[0]
    assert out.shape == q.shape
    assert_close_to(out.transpose(1, 2), truth, torch.bfloat16)


def test_all_true_mask_equals_no_mask(gen):
    q, k, v = make_qkv(1, 2, 40, 64, generator=gen)
    ones = torch.ones(40, 40, dtype=torch.bool)
    torch.testing.assert_close(sageattn(q, k, v, attn_mask=ones), sageattn(q, k, v), atol=2e-3, rtol=0)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_kv", [(0, 10), (10, 0), (0, 0)])
def test_empty_sequences(seq_q, seq_kv, is_causal, layout, gen):
    q, k, v = make_qkv(2, 4, seq_q, 64, heads_kv=2, seq_kv=seq_kv, layout=layout, generator=gen)
    out, lse = sageattn(q, k, v, tensor_layout=layout, is_causal=is_causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out == 0).all()
    assert lse.shape == (2, 4, seq_q) and lse.dtype == torch.float32
    assert (lse == -math.inf).all()


@pytest.mark.parametrize("batch, heads_q", [(0, 4), (2, 0)])
def test_empty_batch_or_no_query_heads(batch, heads_q, gen):
    q, k, v = make_qkv(batch, heads_q, 16, 64, heads_kv=2, generator=gen)
    out, lse = sageattn(q, k, v, return_lse=True)
    assert out.shape == (batch, heads_q, 16, 64) and lse.shape == (batch, heads_q, 16)


def test_empty_lse_is_float32_whatever_the_default_dtype(gen):
    q, k, v = make_qkv(1, 2, 4, 64, seq_kv=0, generator=gen)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _, lse = sageattn(q, k, v, return_lse=True)
    finally:
        torch.set_default_dtype(previous)
    assert lse.dtype == torch.float32


def test_lse_is_natural_log(gen):
    # One query, two keys with known logits: LSE = log(e^a + e^b) with a, b the scaled dot products.
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[2.0, 0.0], [0.0, 3.0]]]])
    v = torch.randn(1, 1, 2, 2, generator=gen)
    _, lse = sageattn(q, k, v, sm_scale=1.0, return_lse=True)
    assert lse.item() == pytest.approx(math.log(math.exp(2.0) + math.exp(0.0)), rel=1e-6)


def test_lse_long_rows_are_chunked(gen, monkeypatch):
    # Force tiny LSE chunks: the result must not depend on the chunking.
    from comfy_sage import fallback

    q, k, v = make_qkv(1, 2, 37, 32, seq_kv=45, generator=gen)
    _, whole = sageattn(q, k, v, is_causal=True, return_lse=True)
    monkeypatch.setattr(fallback, "_LSE_CHUNK_ELEMENTS", 100)
    _, chunked = sageattn(q, k, v, is_causal=True, return_lse=True)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)  # matmul blocking may differ in the last bit


def test_does_not_modify_inputs(gen):
    q, k, v = make_qkv(1, 2, 20, 64, seq_kv=10, generator=gen)
    copies = [t.clone() for t in (q, k, v)]
    sageattn(q, k, v, is_causal=True, return_lse=True)
    for t, c in zip((q, k, v), copies, strict=True):
        assert torch.equal(t, c)


def test_autograd_through_the_fallback(gen):
    # SDPA users train through attention; the fallback must stay differentiable (including hidden rows).
    q, k, v = make_qkv(1, 2, 12, 32, seq_kv=8, dtype=torch.float32, generator=gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sageattn(q, k, v, is_causal=True).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    dense_reference(*ref, is_causal=True)[0].sum().backward()
    for t, r in zip((q, k, v), ref, strict=True):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=1e-5, rtol=1e-4)


def _general_path_recorder(monkeypatch) -> list:
    """Record the calls that reach `fallback.attention`, the general path (it still runs them)."""
    calls = []
    general = fallback.attention

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return general(*args, **kwargs)

    monkeypatch.setattr(fallback, "attention", recording)
    return calls


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("heads_q, heads_kv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_plain_calls_go_straight_to_sdpa_with_the_general_paths_bits(
    layout, heads_q, heads_kv, is_causal, gen, monkeypatch
):
    # The call `auto` most often leaves to PyTorch attention (no mask, LSE or dropout; causal only when square)
    # skips the general path's host work, and must give exactly what that path gives.
    q, k, v = make_qkv(2, heads_q, 40, 64, heads_kv=heads_kv, layout=layout, generator=gen)
    hnd = [t.transpose(1, 2) if layout == "NHD" else t for t in (q, k, v)]
    problem = Problem(2, heads_q, heads_kv, 40, 40, 64, layout)
    general, _ = fallback.attention(*hnd, problem, is_causal=is_causal, scale=0.1, attn_mask=None, return_lse=False)
    calls = _general_path_recorder(monkeypatch)
    out = sageattn(q, k, v, is_causal=is_causal, tensor_layout=layout, scale=0.1)
    assert calls == []
    assert out.is_contiguous() and out.shape == q.shape
    torch.testing.assert_close(out, general.transpose(1, 2) if layout == "NHD" else general, atol=0, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["causal, fewer keys", "causal, more keys", "mask", "lse", "dropout", "empty batch", "no keys"],
)
def test_other_calls_take_the_general_path(case, gen, monkeypatch):
    batch, seq_q, seq_kv = (
        (0 if case == "empty batch" else 2),
        30,
        {"causal, fewer keys": 20, "no keys": 0}.get(case, 40),
    )
    if case == "causal, more keys":
        seq_q = 20
    q, k, v = make_qkv(batch, 4, seq_q, 64, seq_kv=seq_kv, generator=gen)
    kwargs = {
        "mask": {"attn_mask": torch.ones(seq_q, seq_kv, dtype=torch.bool)},
        "lse": {"return_lse": True},
        "dropout": {"dropout_p": 0.5},
    }.get(case, {"is_causal": case.startswith("causal")})
    calls = _general_path_recorder(monkeypatch)
    sageattn(q, k, v, **kwargs)
    assert len(calls) == 1


# --- on a GPU: PyTorch's CUDA backends (flash, memory-efficient, cuDNN) must keep the same conventions ------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_q, seq_kv", [(256, 256), (100, 300), (300, 100)])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_gpu_fallback_matches_float64(dtype, seq_q, seq_kv, layout, gen):  # pragma: no cover - GPU only
    q, k, v = make_qkv(2, 8, seq_q, 128, heads_kv=2, seq_kv=seq_kv, dtype=dtype, layout=layout, generator=gen)
    q, k, v = (t.cuda() for t in (q, k, v))
    out, lse = sageattn(q, k, v, tensor_layout=layout, is_causal=True, mode="sdpa", return_lse=True)
    assert out.device == q.device and out.dtype == dtype and out.shape == q.shape
    truth = exact.attention(q, k, v, tensor_layout=layout, is_causal=True)
    assert_close_to(out, truth, dtype)
    hnd = (lambda t: t.transpose(1, 2)) if layout == "NHD" else (lambda t: t)
    hidden = max(0, seq_q - seq_kv)
    assert (hnd(out)[:, :, :hidden] == 0).all()
    check_lse(lse.cpu(), dense_reference(*(hnd(t).cpu() for t in (q, k, v)), is_causal=True)[1])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.bfloat16, torch.float16, torch.float32])
def test_gpu_masked_fallback(mask_dtype, gen):  # pragma: no cover - GPU only
    q, k, v = (t.cuda() for t in make_qkv(2, 4, 64, 64, seq_kv=96, generator=gen))
    keep = torch.rand(2, 1, 64, 96, generator=gen) > 0.3
    keep[:, :, 5] = False  # a row that sees no key
    mask = keep if mask_dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    mask = mask.to(mask_dtype).cuda()
    out, lse = sageattn(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, 5] == 0).all() and (lse[:, :, 5] == -math.inf).all()
    truth_out, truth_lse = dense_reference(q.cpu(), k.cpu(), v.cpu(), attn_mask=keep)
    assert_close_to(out.cpu(), truth_out, torch.bfloat16)
    check_lse(lse.cpu(), truth_lse)


@pytest.mark.gpu
@cuda
def test_gpu_masked_fallback_backward(gen):  # pragma: no cover - GPU only
    q, k, v = (t.cuda().requires_grad_() for t in make_qkv(1, 2, 32, 64, seq_kv=40, dtype=torch.float16, generator=gen))
    keep = torch.rand(32, 40, generator=gen) > 0.5
    keep[7] = False
    sageattn(q, k, v, attn_mask=keep.cuda()).float().sum().backward()
    ref = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    dense_reference(*ref, attn_mask=keep)[0].sum().backward()
    for t, r in zip((q, k, v), ref, strict=True):
        torch.testing.assert_close(t.grad.cpu().double(), r.grad, atol=2e-2, rtol=2e-2)
    assert (q.grad[:, :, 7] == 0).all()  # the row that sees nothing has no gradient


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["auto", "int8_int8", "int8_fp8"])
def test_gpu_calls_that_need_gradients_run_pytorch_attention(mode, gen):  # pragma: no cover - GPU only
    # The kernels have no backward pass: the output and gradients of PyTorch's attention, also where a kernel
    # would run the same call without gradients.
    q, k, v = (t.cuda().requires_grad_() for t in make_qkv(1, 4, 4608, 128, dtype=torch.bfloat16, generator=gen))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q, k, v))
    out = sageattn(q, k, v, mode=mode)
    assert torch.equal(out, expected)
    for got, want in zip(torch.autograd.grad(out.float().square().sum(), (q, k, v)), expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-2)  # backward kernels may sum in any order
    with torch.no_grad():
        assert not torch.equal(sageattn(q, k, v, mode=mode), expected)  # the kernel
