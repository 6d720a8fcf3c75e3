"""Key masks (one value per key for every head and query row, as the text-padding masks of HunyuanVideo-style
models are) on both kernel families: poisoned outputs against the reference given the same mask (and the
family's tiling), and against PyTorch's attention with it (see kernel_checks.py for the criterion)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_checks import inputs, poisoned, seed

import comfy_sage
from comfy_sage import api, capability, dispatch, ops, reference
from comfy_sage.modes import Mode

MODES = (Mode.INT8_FP8, Mode.INT8_FP16, Mode.INT8_INT8)
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
# The wgmma family where this GPU runs it (INT8 Q·Kᵀ with FP8 or INT8 P·V, head dims up to 128).
FAMILIES = ("sm80", "sm90") if HOPPER and capability.kernels_run_on(torch.device("cuda"), "sm90") else ("sm80",)


@pytest.fixture(params=FAMILIES)
def family(request):
    """The kernel family under test: the mma.sync one pinned, or the wgmma one as Hopper plans it."""
    with dispatch.prefer_family(request.param):
        yield request.param


# (N_q, N_kv): lengths that are not multiples of the 64-key block, a single key, N_q ≠ N_kv both ways.
LENGTHS = ((77, 77), (1000, 1000), (300, 1000), (1000, 300), (129, 1))
# A mask's shape for batch b and N_kv keys, as callers pass them: per batch entry, or one row for all.
SHAPES = {
    "[B,1,1,N]": lambda b, n: (b, 1, 1, n),
    "[1,1,1,N]": lambda b, n: (1, 1, 1, n),
    "[1,1,N]": lambda b, n: (1, 1, n),
    "[1,N]": lambda b, n: (1, n),
}


def key_mask(s: int, shape: tuple, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask on the GPU, the keys it keeps as bool): about 30% of the keys masked ("padding": the last 150), the
    first kept unless the mask has a batch row of its own for entry 1, which then masks every key (its rows must
    give 0)."""
    g = torch.Generator().manual_seed(s)
    keep = torch.rand(shape, generator=g) > 0.3
    if kind == "padding":  # text padding: the last keys only, so most K blocks carry no bias
        keep = torch.ones(shape, dtype=torch.bool)
        keep[..., -150:] = False
    keep[..., 0] = True
    if shape[0] > 1:
        keep[1] = False
    if kind == "bool":
        mask = keep
    else:  # additive: small biases on the kept keys (none for "padding"), ComfyUI's -finfo.max on the others
        # (-inf on an entry that sees no key: with finite values everywhere PyTorch averages V there)
        bias = torch.randn(shape, generator=g) * 0.5 if kind == "additive" else torch.zeros(shape)
        mask = bias.masked_fill(~keep, -torch.finfo(dtype).max)
        if shape[0] > 1:
            mask[1] = -math.inf
        mask = mask.to(dtype)
    return mask.cuda(), keep.cuda()


def check_key_mask(mode, d, layout, gqa, dtype, nq, nkv, shape_name, kind, family, *, batch=2):
    s = seed()
    # Enough heads for an output over 1 MB: the caching allocator serves it from its large pool, where the
    # poisoned block waits, and the small key-bias buffers the call builds first from the small one.
    heads_kv = max(2, math.ceil(1.1 * 2**20 / (batch * gqa * nq * d * 2)))
    q, k, v = inputs(
        s, heads_q=heads_kv * gqa, heads_kv=heads_kv, nq=nq, nkv=nkv, d=d, dtype=dtype, layout=layout, batch=batch
    )
    mask, keep = key_mask(s, SHAPES[shape_name](batch, nkv), kind, dtype)
    where = f"seed {s}, {mode.value} D={d} {layout} gqa={gqa} {dtype} Nq={nq} Nkv={nkv} {shape_name} {kind}"
    plan = api.plan_for(q, k, v, tensor_layout=layout, mode=mode, attn_mask=mask)
    wgmma = family == "sm90" and dispatch.wgmma_fits((9, 0), mode, d)
    assert not plan.fallback and plan.kernel.family == ("sm90" if wgmma else "sm80"), (plan, where)

    like = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    (out, lse), reused = poisoned(
        like, comfy_sage.sageattn, q, k, v, attn_mask=mask, mode=mode, tensor_layout=layout, return_lse=True
    )
    assert reused, f"the poisoned block was not reused: the check would be blind ({where})"
    assert torch.isfinite(out).all(), f"unwritten or non-finite output ({where})"

    # The truth: PyTorch's attention in float32 with the same mask (rows that see no key: 0 and an LSE of -inf).
    f32 = [t.float() for t in (q, k, v)]
    truth, true_lse = comfy_sage.sageattn(
        *f32, attn_mask=mask.float() if kind != "bool" else mask, mode="sdpa", tensor_layout=layout, return_lse=True
    )
    ref, ref_lse = reference.sageattn(
        q, k, v, mode=plan.mode, tensor_layout=layout, tiling=plan.kernel.tiling, delta_s="int8", return_lse=True,
        attn_mask=mask,
    )  # fmt: skip
    err, ref_err = reference.relative_l1(out, truth), reference.relative_l1(ref, truth)
    assert err <= 1.5 * ref_err + 1e-3, f"kernel rel L1 {err:.5f} vs reference {ref_err:.5f} ({where})"
    seen = torch.isfinite(true_lse)
    assert torch.equal(torch.isfinite(lse), seen) and torch.equal(torch.isfinite(ref_lse), seen), where
    lse_err = (lse[seen].double() - true_lse[seen].double()).abs().mean()
    ref_lse_err = (ref_lse[seen].double() - true_lse[seen].double()).abs().mean()
    assert lse_err <= 1.5 * ref_lse_err + 1e-3, f"LSE error {lse_err:.5f} vs reference {ref_lse_err:.5f} ({where})"
    if keep.shape[0] > 1:  # batch entry 1 sees no key
        rows = out[1]
        assert (rows == 0).all() and (lse[1] == -math.inf).all(), where
    return out


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("nq,nkv", LENGTHS, ids=lambda x: str(x))
def test_key_masks_match_the_reference(mode, nq, nkv, family):
    """Every mode × length, across head dims × layouts × mask shapes and kinds, GQA and the dtype alternating."""
    combos = itertools.product((64, 128, 256, 80), ("HND", "NHD"), SHAPES, ("bool", "additive"))
    for i, (d, layout, shape_name, kind) in enumerate(combos):
        if i % 3:  # a third of the 64 combinations per case, a different third each case
            continue
        gqa, dtype = (1, 4)[i % 2], (torch.float16, torch.bfloat16)[(i // 2) % 2]
        check_key_mask(mode, d, layout, gqa, dtype, nq, nkv, shape_name, kind, family)


@pytest.mark.parametrize("mode", (Mode.INT8_FP8, Mode.INT8_INT8), ids=str)
def test_key_masks_across_many_blocks_and_a_split_wave(mode, family):
    """Long rows with masked keys in some blocks only (the flags route those through the masked body, a block
    ahead), and grids short of a wave, which the wgmma kernel splits along the keys."""
    check_key_mask(mode, 128, "HND", 2, torch.bfloat16, 600, 5000, "[B,1,1,N]", "padding", family)
    check_key_mask(mode, 128, "NHD", 1, torch.bfloat16, 600, 5000, "[1,1,1,N]", "bool", family)
    check_key_mask(mode, 64, "NHD", 1, torch.float16, 700, 900, "[1,1,1,N]", "padding", family, batch=4)


def test_an_all_true_mask_gives_the_unmasked_bits(family):
    """A bias of 0 on every key changes no score: every K block's flag is 0, so it runs the unmasked code and
    gives the same bits as the call without a mask."""
    q, k, v = inputs(seed(), heads_q=4, heads_kv=2, nq=700, nkv=900, d=128, dtype=torch.bfloat16, layout="HND")
    keep = torch.ones(1, 1, 1, 900, dtype=torch.bool, device="cuda")
    for mode in MODES:
        plain = comfy_sage.sageattn(q, k, v, mode=mode)
        masked = comfy_sage.sageattn(q, k, v, attn_mask=keep, mode=mode)
        assert torch.equal(masked, plain), mode


def test_key_masks_under_compile_and_cuda_graphs(family):
    """A key-masked call compiled with fullgraph=True gives the eager call's bits, and so does each replay of
    its CUDA graph ("reduce-overhead") with a different mask every call: the mask's conversion into the kernels'
    bias is part of the graph, not kept from the recording."""
    torch._dynamo.reset()  # a graph recorded under the other family's test would replay its kernels

    def fn(q, k, v, mask):
        return comfy_sage.sageattn(q, k, v, attn_mask=mask, mode=Mode.INT8_INT8)

    def padding(call):  # 100 more padded keys each call
        mask = torch.zeros(1, 1, 1, 900, dtype=torch.bfloat16, device="cuda")
        mask[..., 800 - 100 * call :] = -torch.finfo(torch.bfloat16).max
        return mask

    q, k, v = inputs(seed(), heads_q=4, heads_kv=2, nq=700, nkv=900, d=128, dtype=torch.bfloat16, layout="HND")
    compiled = torch.compile(fn, fullgraph=True)(q, k, v, padding(0))
    torch.testing.assert_close(compiled, fn(q, k, v, padding(0)), atol=0, rtol=0)
    graphs = torch.compile(fn, mode="reduce-overhead")
    outputs = []
    for call in range(4):  # warm-up, recording, then replays
        got = graphs(q, k, v, padding(call)).clone()  # a replay's output is overwritten by the next
        torch.testing.assert_close(got, fn(q, k, v, padding(call)), atol=0, rtol=0, msg=f"call {call}")
        outputs.append(got)
    assert not torch.equal(outputs[2], outputs[3]), "the masks differ, so must the outputs"


def test_masked_keys_do_not_count(family):
    """Keys a mask takes out change nothing, whatever their values: K and V of the masked keys replaced by
    large random values give the same output within the quantization's reach (their values still enter K's
    mean and V's scales, as in the reference)."""
    s = seed()
    q, k, v = inputs(s, heads_q=4, heads_kv=4, nq=500, nkv=640, d=128, dtype=torch.float16, layout="HND")
    keep = torch.ones(640, dtype=torch.bool, device="cuda")
    keep[400:] = False  # text padding: the tail
    mask = keep[None, None, None, :]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 400:] = torch.randn_like(k2[:, :, 400:]) * 30
    v2[:, :, 400:] = torch.randn_like(v2[:, :, 400:]) * 30
    truth = reference.exact.attention(q[:, :, :, :], k[:, :, :400], v[:, :, :400])
    for mode in MODES:
        out = comfy_sage.sageattn(q, k2, v2, attn_mask=mask, mode=mode)
        tiling = api.plan_for(q, k2, v2, mode=mode, attn_mask=mask).kernel.tiling
        ref = reference.sageattn(q, k2, v2, mode=mode, tiling=tiling, delta_s="int8", attn_mask=mask)
        err, ref_err = reference.relative_l1(out, truth), reference.relative_l1(ref, truth)
        assert err <= 1.5 * ref_err + 1e-3, f"seed {s} {mode.value}: {err:.5f} vs reference {ref_err:.5f}"


def test_the_op_rejects_a_key_mask_with_is_causal():
    """The kernels' masked body relies on it (the bias covers the padding; no causal test): the op refuses the
    pair, as `sageattn` and SDPA refuse a mask with is_causal."""
    q, k, v = inputs(seed(), heads_q=2, heads_kv=2, nq=64, nkv=64, d=64, dtype=torch.float16, layout="HND")
    bias = ops.key_bias(torch.ones(1, 64, dtype=torch.bool, device="cuda"), 1, 64)
    with pytest.raises(RuntimeError, match="is_causal"):
        torch.ops.comfy_sage.attention(q, k, v, 0, 8, ops.PV_CODES["fp8"], True, 0.125, False, 80, bias)


def test_other_masks_still_run_pytorch_attention():
    q, k, v = inputs(seed(), heads_q=2, heads_kv=2, nq=64, nkv=96, d=64, dtype=torch.float16, layout="HND")
    per_row = torch.rand(64, 96, device="cuda") > 0.3
    plan = api.plan_for(q, k, v, mode=Mode.INT8_FP8, attn_mask=per_row)
    assert plan.fallback and dispatch.MASK_REASON in plan.reason


@pytest.mark.parametrize("dtype", (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64), ids=str)
def test_the_key_bias_op_gives_the_reference_values(dtype):
    """The one-launch op ops.key_bias runs on a GPU against the tensor operations that specify it
    (ops.key_bias_reference), bit for bit, output poisoned: key counts around the 64-key flags and the 128-key
    rows, strided and broadcast masks, one row or a batch, and the values that need care (−inf, −finfo.max, NaN,
    +inf, ±0, tiny and huge)."""
    gen = torch.Generator(device="cuda").manual_seed(seed())
    reused_count, cases = 0, 0
    specials = torch.tensor([-math.inf, -3.4e38, math.nan, math.inf, 0.0, -0.0, 1e-30, -1e30, -65504.0], device="cuda")
    for rows, seq_kv, layout in itertools.product((1, 3), (1, 63, 64, 65, 127, 128, 129, 1000, 4097), range(3)):
        values = torch.randn(rows, 2 * seq_kv, generator=gen, device="cuda") * 30
        spots = torch.rand(values.shape, generator=gen, device="cuda") < 0.1
        values[spots] = specials[torch.randint(0, len(specials), (int(spots.sum()),), generator=gen, device="cuda")]
        full = values > 0 if dtype == torch.bool else values.to(dtype)
        # contiguous, every other key (key stride 2), or one row broadcast to all (row stride 0)
        mask = (full[:, :seq_kv], full[:, ::2], full[:1, :seq_kv].expand(rows, seq_kv))[layout]
        expected = ops.key_bias_reference(mask, rows, seq_kv)
        got, reused = poisoned(expected, torch.ops.comfy_sage.key_bias, mask)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=f"{rows} x {seq_kv} ({layout})")
        reused_count, cases = reused_count + reused, cases + 1
        four_d = mask.reshape(rows, 1, 1, seq_kv)
        torch.testing.assert_close(ops.key_bias(four_d, rows, seq_kv), expected, rtol=0, atol=0, equal_nan=True)
    # These outputs are small: the allocator's small pool may place one elsewhere than the freed poisoned block.
    assert reused_count >= 0.8 * cases, f"the poisoned block was reused in {reused_count} of {cases} cases only"
    # opcheck compares eager and traced outputs without equal_nan: a mask without NaN.
    clean = torch.randn(2, 300, generator=gen, device="cuda")
    clean = clean > 0 if dtype == torch.bool else clean.to(dtype)
    torch.library.opcheck(torch.ops.comfy_sage.key_bias.default, (clean,))
