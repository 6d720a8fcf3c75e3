"""The SageAttention2 reference against float64 attention, and the properties the kernels' oracle must have.

Inputs are fresh random draws on every run (the seed is in every assertion message; set COMFY_SAGE_TEST_SEED
to replay one). The accuracy bounds are a margin below what was measured over many seeds (the measured
values are in the comments).
"""

from __future__ import annotations

import math
import os
import resource
import secrets
import time

import pytest
import torch

from comfy_sage import reference
from comfy_sage.reference import exact, quant
from comfy_sage.testing import make_qkv
from comfy_sage.tiling import SM80, SM90, Tiling

MODES = ("int8_fp8", "int4_fp8", "int8_fp16", "int4_fp16", "int8_int8")
TILINGS = {"sm80": SM80, "sm90": SM90}
HAS_CUDA = torch.cuda.is_available()


def fresh_seed() -> int:
    return int(os.environ.get("COMFY_SAGE_TEST_SEED", secrets.randbelow(2**31)))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lse64(q, k, *, is_causal=False, sm_scale=None, tensor_layout="HND") -> torch.Tensor:
    """float64 natural-log logsumexp of the scaled logits, [B, H_q, N_q] (−inf for rows that see no key)."""
    if tensor_layout == "NHD":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    if is_causal:
        nq, nkv = q.shape[2], k.shape[2]
        visible = torch.arange(nkv)[None, :] <= torch.arange(nq)[:, None] + (nkv - nq)
        s = s.masked_fill(~visible, -math.inf)
    return torch.logsumexp(s, -1)


def check_accuracy(out, truth, *, kind: str, mode: str, what: str) -> dict[str, float]:
    """`out` against `truth` within BOUNDS[kind, mode] (looser for a few thousand elements: noisier metrics)."""
    cos_min, l1_max = BOUNDS[kind, mode]
    if truth.numel() < 50_000:
        cos_min, l1_max = 1 - 1.5 * (1 - cos_min), 1.3 * l1_max
    acc = reference.accuracy(out, truth)
    assert acc["cos_sim"] >= cos_min and acc["rel_l1"] <= l1_max, (
        f"{what}: cos sim {acc['cos_sim']:.6f} (want ≥ {cos_min:.6f}), rel L1 {acc['rel_l1']:.4f} (want ≤ {l1_max:.4f})"
    )
    return acc


class Case:
    """One random draw and its float64 truth."""

    def __init__(self, kind: str, heads: int, seq: int, head_dim: int, **kwargs) -> None:
        self.seed = fresh_seed()
        self.kind = kind
        self.q, self.k, self.v = make_qkv(1, heads, seq, head_dim, kind=kind, generator=gen(self.seed), **kwargs)
        self.truth = exact.attention(self.q, self.k, self.v)

    def __repr__(self) -> str:
        return f"{self.kind} inputs {list(self.q.shape)}, seed {self.seed}"


@pytest.fixture(scope="module")
def normal_2048() -> Case:
    return Case("normal", 4, 2048, 128)


@pytest.fixture(scope="module")
def biased_2048() -> Case:
    return Case("biased", 4, 2048, 128)


@pytest.fixture(scope="module")
def biased_1024() -> Case:
    return Case("biased", 4, 1024, 128)


# --- accuracy of every mode against float64 ------------------------------------------------------------

# (cos sim ≥, rel L1 ≤) at B=1, H=4, N=2048, D=128, default smoothing (Q+K for INT4, K for INT8).
# Measured, normal (5 seeds): int8_fp8 0.99928-0.99930 / 0.037-0.038, int8_fp16 0.99994 / 0.0108-0.0110,
# int4_fp8 0.9798-0.9804 / 0.199-0.202, int4_fp16 0.9805-0.9810 / 0.196-0.199. Biased (46 seeds): int8_fp8
# 0.99931-0.99947 / 0.029-0.034, int8_fp16 0.99966-0.99981 / 0.014-0.020, int4 0.946-0.968 / 0.18-0.263
# (its spread is wide: the log-normal token norms make some draws much harder for INT4). int8_int8 (6 seeds):
# normal 0.99974 / 0.0217-0.0220, biased 0.99961-0.99976 / 0.019-0.026.
BOUNDS = {
    ("normal", "int8_fp8"): (0.9991, 0.041),
    ("normal", "int8_fp16"): (0.99990, 0.0125),
    ("normal", "int4_fp8"): (0.976, 0.215),
    ("normal", "int4_fp16"): (0.977, 0.21),
    ("biased", "int8_fp8"): (0.9991, 0.038),
    ("biased", "int8_fp16"): (0.9995, 0.024),
    ("biased", "int4_fp8"): (0.935, 0.29),
    ("biased", "int4_fp16"): (0.935, 0.29),
    ("normal", "int8_int8"): (0.99965, 0.025),
    ("biased", "int8_int8"): (0.9993, 0.032),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["normal", "biased"])
def test_mode_vs_float64(kind: str, mode: str, normal_2048: Case, biased_2048: Case) -> None:
    case = normal_2048 if kind == "normal" else biased_2048
    out = reference.sageattn(case.q, case.k, case.v, mode=mode)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    check_accuracy(out, case.truth, kind=kind, mode=mode, what=f"{mode} on {case}")


# --- what smoothing and per-thread groups buy, on biased inputs -----------------------------------------


def run_variants(case: Case, mode: str, variants: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {
        name: reference.accuracy(reference.sageattn(case.q, case.k, case.v, mode=mode, **kwargs), case.truth)
        for name, kwargs in variants.items()
    }


def describe(results: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{n} {r['cos_sim']:.5f}/{r['rel_l1']:.4f}" for n, r in results.items())


@pytest.mark.parametrize("mode", ["int4_fp8", "int4_fp16"])
def test_int4_needs_q_and_k_smoothing(mode: str, biased_1024: Case) -> None:
    # Measured (N=1024, 40 seeds), INT4+FP8 cos sim: none 0.855-0.916, K only 0.907-0.948, Q+K 0.950-0.971;
    # Q+K − K ≥ 0.020 and Q+K − none ≥ 0.046 on every seed; rel L1 Q+K / K ≤ 0.77, Q+K / none ≤ 0.62. Over 1,500
    # later seeds: Q+K − K 0.0125-0.061 (1st percentile 0.0158), Q+K − none ≥ 0.028, rel L1 ratios ≤ 0.79 and
    # ≤ 0.66, except seed 513221388 (COMFY_SAGE_TEST_SEED), an easy draw (none 0.932) where smoothing has less to
    # gain: Q+K − K = 0.0109. The first bound sits below every draw seen, so the test does not fail at random.
    # K only vs none is not asserted: it lowers the logit error (rms 1.1 → 0.67 on a draw where it lost), but
    # with Q unsmoothed the output error is so large that one draw's cos sim can go either way (1 seed in 40
    # had K only 0.009 below none).
    r = run_variants(
        biased_1024,
        mode,
        {"none": dict(smooth_q=False, smooth_k=False), "K": dict(smooth_q=False), "Q+K": dict(smooth_q=True)},
    )
    what = f"{mode} on {biased_1024}: {describe(r)}"
    assert r["Q+K"]["cos_sim"] >= r["K"]["cos_sim"] + 0.009, what
    assert r["Q+K"]["cos_sim"] >= r["none"]["cos_sim"] + 0.025, what
    assert r["Q+K"]["rel_l1"] <= 0.85 * r["K"]["rel_l1"], what
    assert r["Q+K"]["rel_l1"] <= 0.75 * r["none"]["rel_l1"], what
    assert r["Q+K"]["cos_sim"] >= 0.93, what
    # Q smoothing is the INT4 default.
    default = reference.accuracy(reference.sageattn(biased_1024.q, biased_1024.k, biased_1024.v, mode=mode),
                                 biased_1024.truth)  # fmt: skip
    assert default == r["Q+K"]


@pytest.mark.parametrize("mode", MODES)
def test_per_thread_beats_per_block_and_per_tensor(mode: str, biased_1024: Case) -> None:
    # Measured (N=1024, 40 seeds), per-thread / per-block of 1 − cos sim and of rel L1: INT8+FP8 ≤ 0.66 and
    # ≤ 0.81 (its FP8 P·V error is the same for both), INT8+FP16 ≤ 0.43 and ≤ 0.64, INT4 ≤ 0.33 and ≤ 0.52;
    # per-block / per-tensor ≤ 0.75 and ≤ 0.87. INT8+INT8 (8 seeds): ≤ 0.47 and ≤ 0.72.
    r = run_variants(biased_1024, mode, {g: dict(granularity=g) for g in ("thread", "block", "tensor")})
    what = f"{mode} on {biased_1024}: {describe(r)}"
    err = {g: 1 - x["cos_sim"] for g, x in r.items()}
    ratios = {"int8_fp8": (0.8, 0.9), "int8_fp16": (0.6, 0.75), "int8_int8": (0.6, 0.8)}
    err_ratio, l1_ratio = ratios.get(mode, (0.5, 0.65))
    assert err["thread"] <= err_ratio * err["block"], what
    assert r["thread"]["rel_l1"] <= l1_ratio * r["block"]["rel_l1"], what
    assert err["block"] <= err["tensor"], what
    assert r["block"]["rel_l1"] <= r["tensor"]["rel_l1"], what


# --- causal ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seq_q", "seq_kv"), [(512, 512), (700, 300), (130, 1000)])
@pytest.mark.parametrize("mode", MODES)
def test_causal(mode: str, seq_q: int, seq_kv: int) -> None:
    seed = fresh_seed()
    q, k, v = make_qkv(1, 4, seq_q, 64, seq_kv=seq_kv, generator=gen(seed))
    truth = exact.attention(q, k, v, is_causal=True)
    for tiling in (SM80, SM90):
        # A small tile budget splits the rows into several chunks, so blocks are skipped per chunk.
        out, lse = reference.sageattn(q, k, v, mode=mode, is_causal=True, return_lse=True, tiling=tiling,
                                      max_tile_elements=1 << 16)  # fmt: skip
        what = f"{mode} causal, N_q={seq_q} N_kv={seq_kv}, {tiling}, seed {seed}"
        # Bottom-right: row i sees keys j ≤ i + N_kv − N_q; rows with none give exactly 0 and LSE −inf.
        blind = max(0, seq_q - seq_kv)
        assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind])), what
        assert (lse[:, :, :blind] == -math.inf).all(), what
        assert torch.isfinite(lse[:, :, blind:]).all() and torch.isfinite(out).all(), what
        check_accuracy(out[:, :, blind:], truth[:, :, blind:], kind="normal", mode=mode, what=what)
        # With N_q ≥ N_kv the first row that sees anything sees key 0 only: its output is V[0]. Exact with FP16
        # V, up to V's own rounding to FP16 (below 2^-14 FP16's subnormals keep fewer bits than bf16: seed
        # 479256074 has a V value of 7.0035e-6, which FP16 holds as 7.0333e-6); within e4m3's rounding (2^-4
        # relative, 2^-9 of the channel's scale when subnormal) with FP8; within half an INT8 step of the channel
        # plus P̃'s rounding with INT8 (P̃ ≥ p_max / 2 under the integer row max, so 2^-8 relative) plus the
        # output's own rounding (half a bf16 step, 2^-8 relative at most).
        if seq_kv > seq_q:
            continue
        first, v0 = out[:, :, blind].float(), v[:, :, 0].float()
        if mode.endswith("fp16"):
            assert torch.equal(first, v[:, :, 0].to(torch.float16).to(v.dtype).float()), what
        elif mode.endswith("int8"):
            step = v.float().abs().amax(2) / 127
            assert ((first - v0).abs() <= step * 0.51 + v0.abs() * 2**-8 * 1.01 + first.abs() * 2**-8).all(), what
        else:
            channel_scale = v.float().abs().amax(2) / 448
            assert ((first - v0).abs() <= v0.abs() * (2**-4 + 2**-8) + channel_scale * 2**-9).all(), what


def test_causal_differs_from_full() -> None:
    seed = fresh_seed()
    q, k, v = make_qkv(1, 4, 256, 64, generator=gen(seed))
    full = reference.sageattn(q, k, v, mode="int8_fp16")
    causal = reference.sageattn(q, k, v, mode="int8_fp16", is_causal=True)
    # The last row sees every key: the same as without the mask; earlier rows differ.
    torch.testing.assert_close(causal[:, :, -1], full[:, :, -1], rtol=0, atol=0, msg=f"seed {seed}")
    assert not torch.allclose(causal[:, :, :-1].float(), full[:, :, :-1].float(), atol=1e-3), f"seed {seed}"


# --- GQA, layouts, odd lengths ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gqa_equals_repeated_kv(mode: str) -> None:
    seed = fresh_seed()
    q, k, v = make_qkv(2, 8, 300, 64, heads_kv=2, seq_kv=260, kind="biased", generator=gen(seed))
    for causal in (False, True):
        out, lse = reference.sageattn(q, k, v, mode=mode, is_causal=causal, return_lse=True)
        rep = [t.repeat_interleave(4, 1) for t in (k, v)]
        out_rep, lse_rep = reference.sageattn(q, *rep, mode=mode, is_causal=causal, return_lse=True)
        what = f"{mode} GQA 8/2 causal={causal}, seed {seed}"
        torch.testing.assert_close(out, out_rep, rtol=0, atol=0, msg=what)
        torch.testing.assert_close(lse, lse_rep, rtol=1e-6, atol=1e-6, msg=what)
    truth = exact.attention(q, k, v)
    check_accuracy(reference.sageattn(q, k, v, mode=mode), truth, kind="biased", mode=mode, what=what)


@pytest.mark.parametrize("mode", MODES)
def test_hnd_and_nhd_identical(mode: str) -> None:
    seed = fresh_seed()
    kwargs = dict(heads_kv=2, seq_kv=333, kind="biased")
    hnd = make_qkv(2, 4, 200, 64, generator=gen(seed), **kwargs)
    nhd = make_qkv(2, 4, 200, 64, generator=gen(seed), layout="NHD", **kwargs)
    for a, b in zip(hnd, nhd, strict=True):
        assert torch.equal(a, b.transpose(1, 2))
    for causal in (False, True):
        out_h, lse_h = reference.sageattn(*hnd, mode=mode, is_causal=causal, return_lse=True)
        out_n, lse_n = reference.sageattn(*nhd, mode=mode, is_causal=causal, return_lse=True, tensor_layout="NHD")
        what = f"{mode} causal={causal}, seed {seed}"
        assert out_n.shape == nhd[0].shape, what
        assert torch.equal(out_n.transpose(1, 2), out_h), what
        assert torch.equal(lse_n, lse_h), what


@pytest.mark.parametrize("tiling", TILINGS.values(), ids=TILINGS.keys())
@pytest.mark.parametrize(("seq_q", "seq_kv"), [(1, 1), (77, 77), (1000, 1000), (77, 1000), (1000, 77), (1, 333)])
def test_odd_lengths(seq_q: int, seq_kv: int, tiling: Tiling) -> None:
    seed = fresh_seed()
    q, k, v = make_qkv(1, 4, seq_q, 64, seq_kv=seq_kv, generator=gen(seed))
    for causal in (False, True):
        truth = exact.attention(q, k, v, is_causal=causal)
        blind = max(0, seq_q - seq_kv) if causal else 0
        for mode in MODES:
            out = reference.sageattn(q, k, v, mode=mode, is_causal=causal, tiling=tiling)
            what = f"{mode} N_q={seq_q} N_kv={seq_kv} causal={causal} {tiling}, seed {seed}"
            assert out.shape == q.shape and torch.isfinite(out).all(), what
            assert (out[:, :, :blind] == 0).all(), what
            check_accuracy(out[:, :, blind:], truth[:, :, blind:], kind="normal", mode=mode, what=what)
    if seq_kv == 1:  # one key: softmax is 1, the output is V as FP16 holds it (fewer bits below 2^-14: seed 8)
        expected = v.to(torch.float16).to(v.dtype).expand_as(q)
        assert torch.equal(reference.sageattn(q, k, v, mode="int8_fp16", tiling=tiling), expected)


# --- options: V smoothing, FP22, LSE, chunking -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8_fp8", "int4_fp8"])
def test_smooth_v_on_biased_v(mode: str) -> None:
    seed = fresh_seed()
    g = gen(seed)
    q, k, v = make_qkv(1, 4, 1024, 64, kind="biased", generator=g)
    # V with a large per-channel mean: FP8 spends its range on the offset unless it is subtracted first.
    v = (v.float() + 6 * torch.randn(1, 4, 1, 64, generator=g)).to(v.dtype)
    truth = exact.attention(q, k, v)
    plain = reference.accuracy(reference.sageattn(q, k, v, mode=mode), truth)
    smooth = reference.accuracy(reference.sageattn(q, k, v, mode=mode, smooth_v=True), truth)
    what = f"{mode} seed {seed}: plain {plain}, smooth_v {smooth}"
    # Measured (8 seeds), smoothed / plain: INT8+FP8 rel L1 0.20-0.29, 1 − cos 0.04-0.06; INT4+FP8 (whose
    # Q·Kᵀ error remains) 0.63-0.82 for both.
    l1_ratio, cos_ratio = (0.45, 0.2) if mode == "int8_fp8" else (0.92, 0.92)
    assert smooth["rel_l1"] <= l1_ratio * plain["rel_l1"], what
    assert 1 - smooth["cos_sim"] <= cos_ratio * (1 - plain["cos_sim"]), what
    # On V without an offset it changes little.
    q, k, v = make_qkv(1, 4, 512, 64, generator=g)
    truth = exact.attention(q, k, v)
    plain = reference.accuracy(reference.sageattn(q, k, v, mode=mode), truth)
    smooth = reference.accuracy(reference.sageattn(q, k, v, mode=mode, smooth_v=True), truth)
    assert abs(smooth["rel_l1"] - plain["rel_l1"]) < 0.1 * plain["rel_l1"], f"{mode} seed {seed}: {plain} {smooth}"


def test_fp22_accumulator() -> None:
    seed = fresh_seed()
    q, k, v = make_qkv(1, 4, 1024, 128, kind="biased", dtype=torch.float32, generator=gen(seed))
    truth = exact.attention(q, k, v)
    for mode in MODES:
        plain = reference.sageattn(q, k, v, mode=mode)
        fp22 = reference.sageattn(q, k, v, mode=mode, emulate_fp22=True)
        what = f"{mode} seed {seed}"
        if not mode.endswith("fp8"):  # FP22 is the FP8 tensor cores' accumulator: no effect on FP16/INT8 P·V
            assert torch.equal(plain, fp22), what
            continue
        change = reference.relative_l1(fp22, plain)
        assert 0 < change < 2e-4, f"{what}: FP22 changes the output by {change:.2e} (rel L1)"
        a, b = reference.accuracy(plain, truth), reference.accuracy(fp22, truth)
        assert abs(a["cos_sim"] - b["cos_sim"]) < 1e-5 and abs(a["rel_l1"] - b["rel_l1"]) < 2e-4, f"{what}: {a} {b}"


def test_int8_p_max_keeps_the_int32_accumulator_in_range() -> None:
    assert quant.int8_p_max(0) == quant.int8_p_max(1) == quant.int8_p_max(65_793) == 255
    assert quant.int8_p_max(65_794) == 254 and quant.int8_p_max(75_600) == 221  # Wan 14B 720p
    for n in (1, 4096, 65_793, 75_600, 132_000, 10**6, 2**24):
        p_max = quant.int8_p_max(n)
        assert 1 <= p_max <= 255 and p_max * quant.INT_MAX[8] * n <= quant.INT8_PV_BUDGET < 2**31, n


def test_int8_p_rounding_per_kernel_family() -> None:
    """The wgmma kernel rounds P̃ to its integer directly, the mma.sync kernels through float16 first: the two
    differ where float16 lands on a tie (201.46 is 201.5 in float16, which rounds to even)."""
    p = torch.tensor([0.0, 2.5, 3.5, 201.46, 254.6, 255.0])
    assert quant.round_p_int8(p, via_fp16=False).tolist() == [0, 2, 4, 201, 255, 255]
    assert quant.round_p_int8(p, via_fp16=True).tolist() == [0, 2, 4, 202, 255, 255]
    assert SM80.int8_p_via_fp16 and not SM90.int8_p_via_fp16


def test_int8_pv_worst_case_accumulator() -> None:
    """Every key weighs the same and every V value is at its channel's maximum: the int32 row accumulator
    reaches p_max · 127 · N_kv, its largest possible value, and the output is still exact."""
    seq_kv, d = 75_600, 64
    q = torch.zeros(1, 1, 16, d)
    k = torch.randn(1, 1, seq_kv, d, generator=gen(fresh_seed()))
    v = torch.full((1, 1, seq_kv, d), -3.0)
    out, lse = reference.sageattn(q, k, v, mode="int8_int8", tiling=SM90, return_lse=True)
    torch.testing.assert_close(out, torch.full_like(out, -3.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(seq_kv)), rtol=1e-6, atol=0)


def integer_inputs(seed: int, bits: int, *, seq_q: int, seq_kv: int, block_q: int, q_offset: bool):
    """Q and K that quantize without error: smoothing leaves integers in [−qmax, qmax] (exact block and token
    means: rows r and r + half are opposite), every row holds a ±qmax (so every group's scale is exactly 1),
    and the offsets smoothing removes are large (K: ~qmax per channel; Q: ~qmax per channel and Q block)."""
    g = gen(seed)
    qmax = quant.INT_MAX[bits]
    b, hq, hkv, d = 2, 4, 2, 64

    def mirrored(h: int, n: int, period: int) -> torch.Tensor:
        half = torch.randint(-qmax, qmax + 1, (b, h, n // period, period // 2, d), generator=g).float()
        idx = torch.arange(period // 2)
        half[..., idx, idx % d] = qmax * torch.sign(half[..., idx, idx % d] + 0.5)
        return torch.cat([half, -half], 3).reshape(b, h, n, d)

    q = mirrored(hq, seq_q, block_q)
    k = mirrored(hkv, seq_kv, seq_kv) + torch.round(torch.randn(b, hkv, 1, d, generator=g) * qmax * 8) / 8
    if q_offset:
        offsets = torch.round(torch.randn(b, hq, seq_q // block_q, d, generator=g) * qmax * 8) / 8
        q = q + offsets.repeat_interleave(block_q, 2)
    v = torch.randn(b, hkv, seq_kv, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("tiling", TILINGS.values(), ids=TILINGS.keys())
@pytest.mark.parametrize(("mode", "smooth_q"), [(m, True) for m in MODES] + [("int8_fp8", False), ("int8_fp16", False)])
def test_lse_exact_when_logits_are(mode: str, smooth_q: bool, tiling: Tiling) -> None:
    """With inputs that quantize exactly, the LSE is float64's up to float32 rounding: the online softmax's
    bookkeeping (base 2, the 448 offset, the K-smoothing shift q·k̄, ΔS) loses nothing."""
    seed = fresh_seed()
    bits = int(mode[3])
    sm_scale = quant.INT_MAX[bits] ** -2
    bq = tiling.block_q  # the inputs are built per Q block
    for seq_q, seq_kv, causal in ((2 * bq, 3 * bq, False), (2 * bq, 3 * bq, True), (3 * bq, 2 * bq, True)):
        q, k, v = integer_inputs(seed, bits, seq_q=seq_q, seq_kv=seq_kv, block_q=tiling.block_q, q_offset=smooth_q)
        out, lse = reference.sageattn(q, k, v, mode=mode, is_causal=causal, sm_scale=sm_scale, smooth_q=smooth_q,
                                      tiling=tiling, return_lse=True)  # fmt: skip
        truth = lse64(q, k, is_causal=causal, sm_scale=sm_scale)
        what = f"{mode} smooth_q={smooth_q} {tiling} N_q={seq_q} N_kv={seq_kv} causal={causal}, seed {seed}"
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], what
        seen = torch.isfinite(truth)
        assert torch.equal(torch.isfinite(lse), seen), what
        assert (truth.abs()[seen].amax() > 5) and (lse[~seen] == -math.inf).all(), what
        err = (lse.double() - truth)[seen].abs().max().item()
        assert err < 1e-4, f"{what}: max |LSE − float64| = {err:.2e}"
        # The output carries P's and V's rounding only.
        cos = reference.cosine_similarity(out, exact.attention(q, k, v, is_causal=causal, sm_scale=sm_scale))
        assert cos > {"fp8": 0.9995, "int8": 0.9999}.get(mode[-4:].strip("_"), 0.999999), f"{what}: cos sim {cos}"


@pytest.mark.parametrize("mode", MODES)
def test_lse_vs_float64(mode: str) -> None:
    seed = fresh_seed()
    q, k, v = make_qkv(2, 4, 300, 64, heads_kv=2, seq_kv=500, generator=gen(seed))
    _, lse = reference.sageattn(q, k, v, mode=mode, return_lse=True)
    # The logits' quantization error, averaged by softmax. Measured max: INT8 0.0043, INT4 0.12.
    err = (lse.double() - lse64(q, k)).abs().max().item()
    assert err <= {"8": 0.01, "4": 0.25}[mode[3]], f"{mode} seed {seed}: max |LSE − float64| = {err:.2e}"


@pytest.mark.parametrize("mode", ["int8_fp8", "int4_fp8", "int4_fp16"])
def test_chunking_does_not_change_the_result(mode: str) -> None:
    seed = fresh_seed()
    q, k, v = make_qkv(1, 2, 700, 64, seq_kv=500, kind="biased", dtype=torch.float32, generator=gen(seed))
    for causal in (False, True):
        big = reference.sageattn(q, k, v, mode=mode, is_causal=causal, return_lse=True)
        # 1 element: one Q block per chunk.
        small = reference.sageattn(q, k, v, mode=mode, is_causal=causal, return_lse=True, max_tile_elements=1)
        what = f"{mode} causal={causal}, seed {seed}"
        if mode.startswith("int8"):  # no Q smoothing: every row's arithmetic is the same, bit for bit
            assert torch.equal(small[0], big[0]) and torch.equal(small[1], big[1]), what
        # ΔS = q̄·K'ᵀ is a float32 product whose rounding depends on how many Q blocks it covers at once;
        # the last-bit differences can move an FP8 rounding of P̃ now and then. Over 300 seeds: int4_fp8 median
        # 3e-7, 99th percentile 1.6e-5, max 2.3e-5 (a few P̃ roundings moved); int4_fp16 max 1.3e-6. Both bounds
        # stay three orders of magnitude below these modes' own error on these inputs (rel L1 ~0.19 vs float64).
        drift = reference.relative_l1(small[0], big[0])
        assert drift < (2e-4 if mode.endswith("fp8") else 1e-5), f"{what}: rel L1 {drift:.2e} between chunk sizes"
        torch.testing.assert_close(small[1], big[1], rtol=1e-6, atol=1e-5, msg=what)


# --- smoothing is exact where the mathematics says so ---------------------------------------------------------


def grid(shape, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """float32 random values on the grid 2^-5 (|x| < 64): sums and means over ≤ 2^10 of them are exact."""
    return torch.round(torch.randn(*shape, generator=g) * scale * 32) / 32


@pytest.mark.parametrize("tiling", TILINGS.values(), ids=TILINGS.keys())
@pytest.mark.parametrize("mode", MODES)
def test_q_offset_removed_by_q_smoothing(mode: str, tiling: Tiling) -> None:
    """Q + c with c constant within each Q block, along channels where K does not vary: softmax is unchanged
    (c·k_j is the same for every key j). Q smoothing removes c before quantizing (Q' is bit-identical) and
    ΔS = q̄·K'ᵀ puts back exactly what it removed (c·K' = 0), so the output is bit-identical."""
    seed = fresh_seed()
    g = gen(seed)
    b, h, n, d = 1, 4, 4 * tiling.block_q, 64
    q = grid((b, h, n, d), g)
    k = grid((b, h, n, d), g)
    k[..., d // 2 :] = grid((b, h, 1, d // 2), g)  # channels d/2.. are the same for every key
    v = grid((b, h, n, d), g)
    c = torch.zeros(b, h, n // tiling.block_q, d)
    c[..., d // 2 :] = grid((b, h, n // tiling.block_q, d // 2), g, scale=12.0)
    q_off = q + c.repeat_interleave(tiling.block_q, 2)
    what = f"{mode} {tiling}, seed {seed}"
    torch.testing.assert_close(exact.attention(q_off, k, v), exact.attention(q, k, v), rtol=1e-9, atol=1e-12)
    for causal in (False, True):
        ref = reference.sageattn(q, k, v, mode=mode, tiling=tiling, smooth_q=True, is_causal=causal)
        off = reference.sageattn(q_off, k, v, mode=mode, tiling=tiling, smooth_q=True, is_causal=causal)
        assert torch.equal(off, ref), what
    # Without Q smoothing the offset costs accuracy (the Q scales grow with it); much more so in INT4.
    truth = exact.attention(q, k, v)
    with_sq = reference.accuracy(reference.sageattn(q_off, k, v, mode=mode, tiling=tiling, smooth_q=True), truth)
    no_sq = reference.accuracy(reference.sageattn(q_off, k, v, mode=mode, tiling=tiling, smooth_q=False), truth)
    assert 1 - no_sq["cos_sim"] > 2 * (1 - with_sq["cos_sim"]), f"{what}: with {with_sq}, without {no_sq}"


@pytest.mark.parametrize("mode", MODES)
def test_q_offset_general_k(mode: str) -> None:
    """With K varying in every channel a Q offset changes the attention; Q smoothing keeps it accurate (ΔS
    carries the offset's logits in float32) where quantizing Q + c directly loses precision to the offset."""
    seed = fresh_seed()
    g = gen(seed)
    q, k, v = make_qkv(1, 4, 1000, 64, generator=g)
    q = (q.float() + 4 * torch.randn(1, 4, 1, 64, generator=g)).to(q.dtype)
    truth = exact.attention(q, k, v)
    out = reference.sageattn(q, k, v, mode=mode, smooth_q=True)
    with_sq = check_accuracy(out, truth, kind="normal", mode=mode, what=f"{mode} Q smoothing, seed {seed}")
    no_sq = reference.accuracy(reference.sageattn(q, k, v, mode=mode, smooth_q=False), truth)
    # Measured (8 seeds), (1 − cos) without / with: INT8+FP8 1.2-1.7 (FP8 P·V dominates), INT8+INT8 2.2-3.8,
    # others 9-26.
    ratio = (1 - no_sq["cos_sim"]) / (1 - with_sq["cos_sim"])
    want = {"int8_fp8": 1.05, "int8_int8": 1.5}.get(mode, 4)
    assert ratio > want, f"{mode} seed {seed}: with {with_sq}, without {no_sq}"


@pytest.mark.parametrize("mode", MODES)
def test_k_offset_is_invisible(mode: str) -> None:
    """K + c for every token shifts each row's logits by q·c: softmax ignores it, the LSE adds it. K smoothing
    subtracts the mean, so K' (and so the output) is bit-identical on grid inputs, and nearly so on others."""
    seed = fresh_seed()
    g = gen(seed)
    b, h, n, d = 1, 4, 512, 64
    q, k, v = grid((b, h, n, d), g), grid((b, h, n, d), g), grid((b, h, n, d), g)
    c = grid((b, h, 1, d), g, scale=10.0)
    what = f"{mode}, seed {seed}"
    for causal in (False, True):
        out, lse = reference.sageattn(q, k, v, mode=mode, is_causal=causal, return_lse=True)
        out_c, lse_c = reference.sageattn(q, k + c, v, mode=mode, is_causal=causal, return_lse=True)
        assert torch.equal(out_c, out), what
        shift = (q.double() @ c.double().transpose(-1, -2))[..., 0] * d**-0.5
        torch.testing.assert_close(lse_c.double() - lse.double(), shift, rtol=0, atol=1e-4, msg=what)
    # Inputs off the grid, N not a power of two: K' differs in the last bits only.
    q, k, v = make_qkv(1, 4, 1000, 64, kind="biased", dtype=torch.float32, generator=g)
    k_c = k + 10 * torch.randn(1, 4, 1, 64, generator=g)
    truth = exact.attention(q, k, v)
    out, out_c = reference.sageattn(q, k, v, mode=mode), reference.sageattn(q, k_c, v, mode=mode)
    drift = reference.relative_l1(out_c, out)
    error = reference.relative_l1(out, truth)
    assert drift < 0.1 * error, f"{what}: offset changes the output by {drift:.2e}, its error is {error:.2e}"
    # Without K smoothing the offset costs the K scales their precision. Measured over 300 seeds, rel L1 without /
    # with, smallest and median: INT8+FP8 1.28 / 1.64, INT8+INT8 1.55 / 2.06, the other modes 1.80-1.86 / 2.31-2.57
    # (a bound of 1.6 for INT8+INT8 had failed about one run in a hundred).
    raw = reference.accuracy(reference.sageattn(q, k_c, v, mode=mode, smooth_k=False), truth)
    bound = {"int8_fp8": 1.1, "int8_int8": 1.3}.get(mode, 1.4)
    assert raw["rel_l1"] > bound * error, f"{what}: without K smoothing {raw}"


# --- arguments ---------------------------------------------------------------------------------------------------


def test_output_dtypes_and_shapes() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k, v = make_qkv(2, 4, 70, 32, heads_kv=1, seq_kv=90, dtype=dtype, generator=gen(0))
        out, lse = reference.sageattn(q, k, v, mode="int8_fp8", return_lse=True)
        assert out.dtype == dtype and out.shape == (2, 4, 70, 32)
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 70)
        assert isinstance(reference.sageattn(q, k, v, mode="int4_fp16"), torch.Tensor)


def test_invalid_arguments() -> None:
    q, k, v = make_qkv(1, 2, 16, 32, generator=gen(0))
    for mode in ("sdpa", "auto", "int2_fp8", "", None):
        with pytest.raises(ValueError, match="mode"):
            reference.sageattn(q, k, v, mode=mode)
    with pytest.raises(TypeError, match="tiling"):
        reference.sageattn(q, k, v, mode="int8_fp8", tiling="sm80")
    with pytest.raises(ValueError, match="Granularity"):
        reference.sageattn(q, k, v, mode="int8_fp8", granularity="warp")
    with pytest.raises(ValueError, match="tensor_layout"):
        reference.sageattn(q, k, v, mode="int8_fp8", tensor_layout="BHND")
    with pytest.raises(ValueError, match="4-D"):
        reference.sageattn(q[0], k[0], v[0], mode="int8_fp8")
    with pytest.raises(ValueError, match="multiple"):
        reference.sageattn(q, k[:, :1].expand(1, 3, 16, 32), v[:, :1].expand(1, 3, 16, 32), mode="int8_fp8")
    with pytest.raises(ValueError, match="sm_scale"):
        reference.sageattn(q, k, v, mode="int8_fp8", sm_scale=-1.0)
    for bad in (dict(block_q=100, warp_q=20, block_k=64), dict(block_q=128, warp_q=48, block_k=64),
                dict(block_q=128, warp_q=32, block_k=64, pv_k=48), dict(block_q=0, warp_q=32, block_k=64)):  # fmt: skip
        with pytest.raises(ValueError, match="Tiling"):
            Tiling(**bad)


# --- CPU and CUDA agree ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none here): the reference on CUDA vs on the CPU")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode: str) -> None:
    seed = fresh_seed()
    q, k, v = make_qkv(2, 8, 1000, 128, heads_kv=2, seq_kv=777, kind="biased", generator=gen(seed))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the reference must switch TF32 off by itself
    try:
        for causal, fp22, smooth_v in ((False, False, False), (True, True, True)):
            kwargs = dict(mode=mode, is_causal=causal, emulate_fp22=fp22, smooth_v=smooth_v, return_lse=True)
            cpu_out, cpu_lse = reference.sageattn(q, k, v, **kwargs)
            gpu_out, gpu_lse = reference.sageattn(q.cuda(), k.cuda(), v.cuda(), **kwargs)
            what = f"{mode} causal={causal} fp22={fp22}, seed {seed}"
            assert gpu_out.device.type == "cuda" and gpu_lse.device.type == "cuda", what
            # Integer products are exact on both; exp2 and float sums may differ in the last bit, which can
            # move an FP8 rounding: differences far below the quantization error.
            drift = reference.relative_l1(gpu_out.cpu(), cpu_out)
            assert drift < 1e-3, f"{what}: CUDA vs CPU rel L1 {drift:.2e}"
            # The LSE adds terms of ~50-90 (the row max, q·k̄ from K smoothing) that cancel to values near 0 in
            # some rows, so its float32 rounding is absolute (up to 1.0e-4 measured on an H100); and K's mean,
            # summed in another order, can move a K value across a rounding boundary of its quantization, which
            # moves a score by one quantization step (5.2e-3 seen once in ~60 cases).
            lse_drift = (gpu_lse.cpu() - cpu_lse).nan_to_num(0.0).abs().max().item()
            assert torch.equal(gpu_lse.cpu().isinf(), cpu_lse.isinf()), what
            assert lse_drift < 2e-2, f"{what}: CUDA vs CPU LSE max abs difference {lse_drift:.2e}"
            assert torch.backends.cuda.matmul.allow_tf32 is True, "the reference did not restore the TF32 flag"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# --- long sequences on a CPU ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_32k_tokens_on_cpu_without_n_by_n() -> None:
    """N = 32768 causal on a CPU in bounded memory (an N × N float32 matrix alone would be 4 GiB)."""
    seed = fresh_seed()
    n, d = 32768, 64
    q, k, v = make_qkv(1, 1, n, d, generator=gen(seed))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out, lse = reference.sageattn(q, k, v, mode="int8_fp8", is_causal=True, return_lse=True,
                                  max_tile_elements=1 << 19)  # fmt: skip
    elapsed = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    what = f"seed {seed}, {elapsed:.1f} s, peak memory grew {grown / 2**30:.2f} GiB"
    assert grown < 1.5 * 2**30, what
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), what
    # Check the first and the last 512 rows exactly: causal attention of a prefix is that prefix's attention,
    # and the last rows see every key (bottom-right alignment).
    m = 512
    first = exact.attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], is_causal=True)
    last = exact.attention(q[:, :, -m:], k, v, is_causal=True)
    check_accuracy(out[:, :, :m], first, kind="normal", mode="int8_fp8", what=f"first rows, {what}")
    check_accuracy(out[:, :, -m:], last, kind="normal", mode="int8_fp8", what=f"last rows, {what}")
    # LSE: the first rows see few keys, so one logit's quantization error is not averaged out.
    for rows, tol in ((slice(0, m), 0.05), (slice(n - m, n), 0.01)):
        truth = lse64(q[:, :, rows], k[:, :, : rows.stop], is_causal=True)
        lse_err = (lse[:, :, rows].double() - truth).abs().max().item()
        assert lse_err < tol, f"{what}: max |LSE − float64| {lse_err:.2e} in rows {rows}"
    assert elapsed < 180, what  # about 10 s on 2 idle cores


# --- ΔS as the mma.sync kernels compute it ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int4_fp8", "int4_fp16"])
def test_int8_delta_s_close_to_exact_for_int4(mode: str) -> None:
    """ΔS from INT8 q̄ and K' (the kernels' way) costs INT4 almost nothing against float32 ΔS."""
    seed = fresh_seed()
    q, k, v = make_qkv(1, 4, 1024, 128, kind="biased", generator=gen(seed))
    truth = exact.attention(q, k, v)
    exact_ds = reference.accuracy(reference.sageattn(q, k, v, mode=mode, delta_s="exact"), truth)
    int8_ds = reference.accuracy(reference.sageattn(q, k, v, mode=mode, delta_s="int8"), truth)
    assert int8_ds["rel_l1"] <= 1.05 * exact_ds["rel_l1"], f"{mode} seed {seed}: {int8_ds} vs {exact_ds}"
    out = reference.sageattn(q, k, v, mode=mode, delta_s="int8")
    assert not torch.equal(out, reference.sageattn(q, k, v, mode=mode, delta_s="exact")), "ΔS must differ"


def test_delta_s_only_matters_with_q_smoothing() -> None:
    q, k, v = make_qkv(1, 2, 200, 64, generator=gen(fresh_seed()))
    a = reference.sageattn(q, k, v, mode="int8_fp8", smooth_q=False, delta_s="int8")
    b = reference.sageattn(q, k, v, mode="int8_fp8", smooth_q=False, delta_s="exact")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="delta_s"):
        reference.sageattn(q, k, v, mode="int8_fp8", delta_s="fp16")


@pytest.mark.parametrize("seed", [0, None])
def test_pv_formats_floor(seed):
    """P·V's number formats alone, on the accuracy bar's kind of inputs: FP8 e4m3 P̃ and V cost about 0.036
    relative L1 (0.0355-0.037 over 40 seeds at this size) before Q·Kᵀ is quantized at all, at or above the 0.035
    the issues ask of int8_fp8; INT8 P̃ × INT8 V costs about half. The two FP8 roundings are independent, so
    their errors add in quadrature. Seed 0 is the README's; None draws a fresh one."""
    seed = fresh_seed() if seed is None else seed
    q, k, v = make_qkv(1, 8, 1024, 128, generator=gen(seed))
    truth = exact.attention(q, k, v)

    def rel_l1(p_format, v_format):
        return reference.relative_l1(exact.pv_formats(q, k, v, p_format, v_format), truth)

    assert rel_l1(None, None) < 1e-12, seed
    p8, v8, both8 = rel_l1("fp8", None), rel_l1(None, "fp8"), rel_l1("fp8", "fp8")
    assert 0.022 < p8 < 0.029 and 0.022 < v8 < 0.029, (seed, p8, v8)
    assert 0.034 < both8 < 0.039, (seed, both8)
    assert abs(both8 - math.hypot(p8, v8)) < 0.01 * both8, (seed, p8, v8, both8)
    assert rel_l1("int8", "int8") < 0.016, seed
    if seed == 0:
        assert both8 > 0.035


@pytest.mark.parametrize("p_format, v_format", [("e4m3", None), (None, "int4"), ("FP8", "fp8")])
def test_pv_formats_rejects_unknown_formats(p_format, v_format):
    q, k, v = make_qkv(1, 1, 8, 32, generator=gen(0))
    with pytest.raises(ValueError, match="_format must be one of"):
        exact.pv_formats(q, k, v, p_format, v_format)
